"""A/B of two versions of the serving code: the same model served by a baseline checkout of carclf and by
this one, measured in alternating slices of one run so that both see the same machine load.

    git worktree add /tmp/carclf-base <commit>
    python -m carclf.loadtest.ab --baseline-checkout /tmp/carclf-base --model mobilenet_v2_320 \\
        --photo-folder ../shared/data/sfdl_samples --out reports/ab

Both servers run at once (an idle server costs next to nothing) with the same flags; each round measures
every transport against both, in an order that alternates between rounds. Per round and transport it
records the p50 and mean latency at concurrency 1 and, from each server's own metrics, the mean time a
request spent outside TensorFlow (client latency minus the server's runtime per batch: the bench's
"decomposed added latency"). The summary gives medians over rounds and the paired differences
baseline minus candidate (positive: the candidate is faster). Every answer is checked.

A checkout is imported through a shadow tree of symbolic links laid out as its pyproject.toml maps the
``carclf.*`` packages onto the repository's folders, put first on the baseline server's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from carclf.cli import CommandParser
from carclf.errors import CarClfError, ConfigError
from carclf.loadtest import options
from carclf.loadtest import server as srv
from carclf.loadtest.bench import MONITORING_CONFIG, Workload, measure_point

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("baseline", "candidate")


def package_dirs(checkout: Path, pyproject: Path) -> dict[str, str]:
    """``pyproject``'s ``[tool.setuptools] package-dir`` table (package -> folder), with the top ``carclf``;
    ConfigError naming ``checkout`` and what is missing otherwise."""
    where = f"{str(checkout)!r} is not a carclf checkout: its pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc})", field="--baseline-checkout") from None
    mapping: object = data
    for key in ("tool", "setuptools", "package-dir"):
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ConfigError(f"{where} has no [tool.setuptools] package-dir table (package = folder), received "
                          f"{mapping!r}", field="--baseline-checkout")
    if "carclf" not in mapping:
        raise ConfigError(f"{where} has no 'carclf' entry in its [tool.setuptools] package-dir table, received "
                          f"{sorted(mapping)!r}", field="--baseline-checkout")
    return mapping


def shadow_tree(checkout: Path, into: Path) -> Path:
    """Lay out ``checkout``'s packages as importable folders under ``into`` (symlinks); returns ``into``."""
    pyproject = checkout / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"no pyproject.toml in {str(checkout)!r}: not a carclf checkout",
                          field="--baseline-checkout")
    mapping = package_dirs(checkout, pyproject)
    for package, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        target = into.joinpath(*package.split("."))
        if target.exists():  # already reached through its parent's link
            continue
        if package.count(".") == 0:  # the top package: a real folder, so sub-packages can be linked into it
            target.mkdir(parents=True)
            for entry in (checkout / folder).iterdir():
                (target / entry.name).symlink_to(entry.resolve())
        else:
            target.symlink_to((checkout / folder).resolve(), target_is_directory=True)
    return into


def start_servers(args: argparse.Namespace, work_dir: Path, baseline_path: Path) -> dict[str, srv.EmbeddedServer]:
    from google.protobuf import text_format

    repository = Path(args.model_repository)
    config = work_dir / "models.config"
    config.write_text(text_format.MessageToString(srv.models_config({args.model: repository / args.model})))
    monitoring = work_dir / "monitoring.config"
    monitoring.write_text(MONITORING_CONFIG)
    flags = ["--monitoring_config_file", str(monitoring)]
    if args.batching_config:
        # no early dispatch: a baseline from before it would not know the flag
        flags += srv.batching_flags(Path(args.batching_config).resolve(), early_dispatch=False)
    commands = {"baseline": ("env", f"PYTHONPATH={baseline_path}", sys.executable, "-m", "carclf", "serve"),
                "candidate": (sys.executable, "-m", "carclf", "serve")}
    servers = {}
    for side in SIDES:
        address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
        servers[side] = srv.EmbeddedServer(address, model_config_file=config, model_repository=repository,
                                           flags=flags, log_path=work_dir / f"server_{side}.log",
                                           command=commands[side]).start()
    for server in servers.values():
        server.wait_ready([args.model], args.server_timeout)
    return servers


def added_ms(row: dict) -> float | None:
    """Client mean latency minus the server's TensorFlow time per batch (at c=1, one request a batch)."""
    parts = row.get("breakdown") or {}
    runtime = parts.get("runtime_ms_per_batch")
    return None if runtime is None or row.get("mean_ms") is None else round(row["mean_ms"] - runtime, 3)


def summarize(rounds: list[dict], transports: list[str]) -> dict:
    summary = {}
    for t in transports:
        figures = {}
        for name in ("p50_ms", "added_ms"):
            for side in SIDES:
                values = [r[t][side][name] for r in rounds if r[t][side][name] is not None]
                figures[f"{side}_{name}"] = round(statistics.median(values), 3) if values else None
            diffs = [r[t]["baseline"][name] - r[t]["candidate"][name] for r in rounds
                     if r[t]["baseline"][name] is not None and r[t]["candidate"][name] is not None]
            figures[f"saved_{name}"] = {"median": round(statistics.median(diffs), 3), "min": round(min(diffs), 3),
                                        "max": round(max(diffs), 3), "n": len(diffs)} if diffs else None
        summary[t] = figures
    return summary


def markdown(result: dict) -> str:
    lines = [f"# Serving A/B: `{result['baseline']}` (baseline) vs this checkout (candidate)", "",
             f"Command: `{result['command']}`", "",
             f"Model `{result['model']}`, concurrency 1, {result['rounds']} rounds of {result['slice_s']} s slices, "
             f"batching {'on (' + result['batching_config'] + ')' if result['batching_config'] else 'off'}; "
             f"load average {result['loadavg_start']} at the start, {result['loadavg_end']} at the end.", "",
             "| transport | figure (ms, median over rounds) | baseline | candidate | saved (paired, min..max) |",
             "|---|---|---:|---:|---:|"]
    for t, figures in result["summary"].items():
        for name, label in (("p50_ms", "p50 latency"), ("added_ms", "outside TensorFlow (mean - runtime)")):
            saved = figures[f"saved_{name}"]
            span = f"{saved['median']} ({saved['min']}..{saved['max']})" if saved else "n/a"
            lines.append(f"| {t} | {label} | {figures[f'baseline_{name}']} | {figures[f'candidate_{name}']} "
                         f"| {span} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Workload.of_photos(args.model, args.model_repository, args.photo_folder, args.photo_limit or None)
    transports = options.transports(args.transports)
    settings = {"duration_s": args.slice, "warmup_s": args.warmup, "max_requests": args.max_requests}
    result = {"command": " ".join([sys.executable, "-m", "carclf.loadtest.ab", *sys.argv[1:]]),
              "baseline": str(args.baseline_checkout), "model": args.model, "rounds": args.rounds,
              "slice_s": args.slice, "batching_config": args.batching_config or "",
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "per_round": []}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="carclf-ab-") as tmp:
        baseline_path = shadow_tree(Path(args.baseline_checkout).resolve(), Path(tmp) / "baseline")
        servers = start_servers(args, out, baseline_path)
        try:
            for number in range(args.rounds):
                order = SIDES if number % 2 == 0 else SIDES[::-1]
                row: dict = {"round": number + 1}
                for t in transports:
                    row[t] = {}
                    for side in order:
                        point = measure_point(work, t, servers[side], 1, settings)
                        errors += point["errors"]
                        row[t][side] = {"p50_ms": point["p50_ms"], "mean_ms": point["mean_ms"],
                                        "added_ms": added_ms(point), "requests": point["requests"],
                                        "breakdown": point.get("breakdown")}
                result["per_round"].append(row)
        finally:
            for server in servers.values():
                server.stop()
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summarize(result["per_round"], transports)
    result["errors"] = errors
    (out / "ab.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ab.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    if errors:
        print(f"ab: {errors} requests failed or answered wrongly; see the server logs in {out}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m carclf.loadtest.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-checkout", required=True, help="a carclf checkout (e.g. a git worktree)")
    p.add_argument("--model", required=True, help="exported model to serve on both sides")
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"),
                   help="where --model is exported (default: this checkout's model_repository)")
    p.add_argument("--photo-folder", default=str(ROOT / "data" / "sample"),
                   help="photos the requests send (default: this checkout's data/sample)")
    p.add_argument("--photo-limit", type=int, default=0, help="use at most this many photos (0: all)")
    p.add_argument("--batching-config", default=str(ROOT / "serving" / "batching.config"),
                   help="BatchingParameters for both servers ('' for batching off)")
    p.add_argument("--transports", default="grpc,rest", help="comma-separated: grpc, rest (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=8,
                   help="rounds, each measuring every transport against both servers (default: %(default)s)")
    p.add_argument("--slice", type=float, default=4.0, help="measured seconds per side, transport and round")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="seconds of unmeasured requests before each slice (default: %(default)s)")
    p.add_argument("--max-requests", type=int, default=100_000,
                   help="requests at most per slice, whatever its seconds (default: %(default)s)")
    p.add_argument("--server-timeout", type=float, default=300.0,
                   help="seconds each server may take to load the model and answer (default: %(default)s)")
    p.add_argument("--out", default="reports/ab", help="folder for ab.json, ab.md and the servers' logs "
                                                         "(default: %(default)s)")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError naming the flag and value of the first setting that cannot be measured with."""
    options.transports(args.transports)
    for flag, ok, value, expected in (
            ("--rounds", args.rounds >= 1, args.rounds, "an integer >= 1"),
            ("--slice", args.slice > 0, args.slice, "seconds > 0"),
            ("--warmup", args.warmup >= 0, args.warmup, "seconds >= 0"),
            ("--max-requests", args.max_requests >= 1, args.max_requests, "a count >= 1"),
            ("--photo-limit", args.photo_limit >= 0, args.photo_limit, "a count >= 0 (0: all)"),
            ("--server-timeout", args.server_timeout > 0, args.server_timeout, "seconds > 0"),
            ("--batching-config", not args.batching_config or Path(args.batching_config).is_file(),
             args.batching_config, "an existing file, or '' for batching off")):
        options.require(ok, flag, value, expected)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_arguments(args)
        return run(args)
    except CarClfError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    options.exit_on_sigterm()  # the servers it started are stopped by its finally blocks
    started = time.monotonic()
    status = main()
    if status != 2:  # a setup error is its one line
        print(f"ab: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    sys.exit(status)
