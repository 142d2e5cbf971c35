"""Soak: minutes of steady locust load on the ensemble, the server's resident memory sampled all along.

Starts the embedded server (``carclf serve``, a subprocess, so that its memory is its own) over the ensemble
config's members, runs the project's locustfile headless against ``car_ensemble`` only (both users: gRPC
and REST), samples the server's RSS every few seconds, and reports failed requests and the RSS growth after
warm-up: the median of the last window over the median of the first window after warm-up, each window a
minute, or a quarter of the time after warm-up when that is under four minutes (and at least 2 samples), so
that the two never overlap. The clock starts when locust's users start (its stats history), not when locust is
launched. Exits 1 when a request failed, the growth is over ``--max-rss-growth`` or there is no memory verdict
(fewer than 4 samples after warm-up); figures go to ``<reports>/soak.json`` and ``soak.md``.

    nice -n 10 python -m carclf.loadtest.soak                       # 10 minutes, real members
    python -m carclf.loadtest.soak --minutes 1 --warmup-minutes 0.25 --model-repository R --ensemble-config C
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from carclf.cli import CommandParser
from carclf.errors import CarClfError, ConfigError
from carclf.loadtest import options
from carclf.loadtest import run as loadtest_run
from carclf.loadtest import server as srv

HERE = Path(__file__).resolve().parent
MIN_WINDOW_SAMPLES = 2  # per window; a window shorter in time takes this many samples all the same


@dataclass(frozen=True)
class Sample:
    seconds: float   # since the load started (negative: taken before it)
    rss_bytes: int


@dataclass(frozen=True)
class MemoryVerdict:
    baseline_mib: float      # median RSS over the first window after warm-up
    final_mib: float         # median RSS over the last window
    peak_mib: float
    growth: float            # final / baseline - 1
    slope_mib_per_min: float  # least-squares slope after warm-up
    samples: int


def memory_verdict(samples: list[Sample], warmup_s: float, window_s: float = 60.0) -> MemoryVerdict:
    """RSS growth after warm-up: median of the last window over the median of the first.

    Each window is ``window_s``, or a quarter of the span of the samples after warm-up when that is shorter
    (half the span lies between the windows, and a steady rise shows as at least 3/4 of itself), and holds at
    least ``MIN_WINDOW_SAMPLES`` samples. ConfigError (no verdict) when fewer than two windows' worth of samples
    fall after warm-up, or when samples so unevenly spaced would put one in both windows."""
    steady = sorted((s for s in samples if s.seconds >= warmup_s), key=lambda s: s.seconds)
    if len(steady) < 2 * MIN_WINDOW_SAMPLES:
        raise ConfigError(f"only {len(steady)} memory samples after warm-up; run longer or sample more often",
                          field="--minutes")
    start, end = steady[0].seconds, steady[-1].seconds
    window = min(window_s, (end - start) / 4)
    in_first = max(MIN_WINDOW_SAMPLES, sum(1 for s in steady if s.seconds < start + window))
    in_last = max(MIN_WINDOW_SAMPLES, sum(1 for s in steady if s.seconds > end - window))
    if in_first + in_last > len(steady):
        raise ConfigError(f"the {len(steady)} memory samples after warm-up ({end - start:.1f} s) are too unevenly "
                          f"spaced for two windows of {window:.1f} s and {MIN_WINDOW_SAMPLES} samples each that do "
                          "not overlap; run longer or sample more often", field="--minutes")
    first = [s.rss_bytes for s in steady[:in_first]]
    last = [s.rss_bytes for s in steady[-in_last:]]
    baseline, final = statistics.median(first), statistics.median(last)
    xs = [s.seconds / 60 for s in steady]
    ys = [s.rss_bytes / 2**20 for s in steady]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    return MemoryVerdict(baseline / 2**20, final / 2**20, max(s.rss_bytes for s in samples) / 2**20,
                         final / baseline - 1, slope, len(steady))


def load_started_at(csv_prefix: str) -> float | None:
    """When locust's users started (wall-clock seconds, to about one second): the first row of its stats
    history (``<prefix>_stats_history.csv``, a row a second) that counts users; None when there is none."""
    try:
        with open(csv_prefix + loadtest_run.HISTORY_CSV, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("Name") == "Aggregated" and int(row.get("User Count") or 0) > 0:
                    return float(row["Timestamp"])
    except (OSError, KeyError, ValueError):
        return None
    return None


class RssSampler(threading.Thread):
    """Samples one process's resident memory every ``every`` seconds until stopped; ``started_at`` is the
    wall-clock time of its zero."""

    def __init__(self, server: srv.EmbeddedServer, every: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.server, self.every = server, every
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()
        self._start = time.monotonic()
        self.started_at = time.time()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(Sample(time.monotonic() - self._start, self.server.rss_bytes()))
            except Exception:  # noqa: BLE001 - the process is gone: the run reports it
                return
            self._stop_event.wait(self.every)

    def stop(self) -> list[Sample]:
        self._stop_event.set()
        self.join(10)
        return self.samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the steady load lasts")
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="left out of the memory verdict")
    parser.add_argument("--users", type=int, default=4, help="concurrent locust users (half gRPC, half REST)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="fail above this growth (0.05 = 5%%)")
    parser.add_argument("--model-repository", default="model_repository",
                        help="where the ensemble's members are exported (default: %(default)s)")
    parser.add_argument("--ensemble-config", default="ensemble/car_ensemble/config.pbtxt",
                        help="the ensemble served and loaded (default: %(default)s)")
    parser.add_argument("--batching-config", default="serving/batching.config",
                        help="the server's BatchingParameters file (default: %(default)s)")
    parser.add_argument("--photo-folder", default="data/sample", help="photos the users send (default: %(default)s)")
    parser.add_argument("--reports", default="reports/soak",
                        help="folder for soak.json, soak.md and locust's reports (default: %(default)s)")
    parser.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0, metavar="N",
                        help="TensorFlow threads inside one op for the server (0: TensorFlow's default)")


def _settings(args, ensemble: str, target: str, address: srv.ServerAddress, reports: Path) -> dict[str, str]:
    settings = loadtest_run.read_conf(loadtest_run.DEFAULT_CONF)
    settings.update({
        "users": str(args.users), "spawn-rate": str(args.users), "run-time": f"{int(args.minutes * 60)}s",
        "host": address.rest_url, "grpc-host": address.grpc_target, "target-model": target,
        "ensemble-model": ensemble, "backbone-weight": "0", "ensemble-weight": "1",
        "photo-folder": args.photo_folder, "model-repository": args.model_repository, "max-p95-ms": "0",
        "csv": str(reports / "locust"), "html": str(reports / "locust.html"),
    })
    return settings


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError naming the flag unless the run can give a memory verdict: at least a second of load
    (locust reads 0 as "no limit"), longer than the warm-up, at least one user, samples taken."""
    options.require(args.minutes * 60 >= 1, "--minutes", args.minutes, "at least 1/60 (one second)")
    options.require(args.warmup_minutes >= 0, "--warmup-minutes", args.warmup_minutes, "minutes >= 0")
    options.require(args.minutes > args.warmup_minutes, "--minutes", args.minutes,
                    f"more than --warmup-minutes {args.warmup_minutes}")
    options.require(args.users >= 1, "--users", args.users, "an integer >= 1")
    options.require(args.sample_every > 0, "--sample-every", args.sample_every, "seconds > 0")
    options.require(args.max_rss_growth > 0, "--max-rss-growth", args.max_rss_growth,
                    "a growth ratio > 0 such as 0.05 (5 %)")
    options.thread_count(args.tensorflow_intra_op_parallelism, "--tensorflow-intra-op-parallelism")


def soak(args: argparse.Namespace) -> dict:
    from carclf.ensemble.config import load_config

    check_arguments(args)
    config = load_config(args.ensemble_config)
    members = list(config.member_names)
    reports = Path(args.reports)
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    settings = _settings(args, config.name, members[0], address, reports)
    loadtest_run.check_settings(settings)
    loadtest_run.reports_folder(settings, "--reports")
    models_config = srv.write_models_config(reports / "models.config", args.model_repository, members)
    start_args = argparse.Namespace(model_config=str(models_config), ensemble_config=args.ensemble_config,
                                    batching_config=args.batching_config, server_timeout=600.0,
                                    tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism)
    server = loadtest_run.start_server(start_args, settings, address, reports)
    try:
        command = loadtest_run.locust_command(argparse.Namespace(config=str(loadtest_run.DEFAULT_CONF),
                                                                 locust_args=[]), settings)
        print("soak: " + " ".join(command), flush=True)
        sampler = RssSampler(server, args.sample_every)
        sampler.start()
        started = time.monotonic()
        try:
            code = srv.call_child(command)
        except KeyboardInterrupt:  # the figures up to then are written all the same
            print("soak: interrupted", flush=True)
            code = 130
        duration = time.monotonic() - started
        samples = sampler.stop()
    finally:
        exit_status = server.stop()
    load_start = load_started_at(settings["csv"])  # locust's start-up (seconds, no load) falls before 0
    if load_start is not None:
        samples = [Sample(s.seconds - (load_start - sampler.started_at), s.rss_bytes) for s in samples]
    rows = loadtest_run.summarize(settings["csv"])
    total = next((r for r in rows if r["Name"] == "Aggregated"), {})
    try:
        verdict, no_verdict = memory_verdict(samples, args.warmup_minutes * 60), ""
    except ConfigError as exc:  # the figures of the run are written all the same
        verdict, no_verdict = None, f"no memory verdict: {exc.message}"
    requests, failures = int(total.get("Request Count", 0)), int(total.get("Failure Count", 0))
    result = {
        "command": " ".join(sys.argv), "locust_command": command, "locust_exit_status": code,
        "server_exit_status": exit_status, "minutes": duration / 60, "users": args.users,
        "ensemble": config.name, "members": members, "model_repository": args.model_repository,
        "requests": requests, "failures": failures,
        "requests_per_s": float(total.get("Requests/s", 0) or 0), "p50_ms": total.get("50%"),
        "p95_ms": total.get("95%"), "p99_ms": total.get("99%"),
        "memory": asdict(verdict) if verdict else None, "no_verdict": no_verdict,
        "max_rss_growth": args.max_rss_growth,
        "load_clock": "locust stats history" if load_start is not None else "locust launch (no users in its history)",
        "rss_samples": [(round(s.seconds, 1), s.rss_bytes) for s in samples],
        "passed": (failures == 0 and requests > 0 and verdict is not None and verdict.growth < args.max_rss_growth
                   and code == 0),
    }
    (reports / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (reports / "soak.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    memory = result["memory"]
    head = (f"| figure | value |\n|---|---|\n"
            f"| load | {result['users']} locust users on `{result['ensemble']}` ({', '.join(result['members'])}), "
            f"{result['minutes']:.1f} min |\n"
            f"| requests / failures | {result['requests']} / {result['failures']} |\n"
            f"| throughput | {result['requests_per_s']:.2f} req/s |\n"
            f"| latency p50 / p95 / p99 | {result['p50_ms']} / {result['p95_ms']} / {result['p99_ms']} ms |\n")
    if memory is None:
        return head + (f"| memory | {result['no_verdict']} |\n"
                       f"| server exit status (SIGTERM drain) | {result['server_exit_status']} |\n")
    return head + (f"| server RSS after warm-up (first window median) | {memory['baseline_mib']:.0f} MiB |\n"
                   f"| server RSS at the end (last window median) | {memory['final_mib']:.0f} MiB |\n"
                   f"| RSS growth after warm-up | {100 * memory['growth']:+.2f} % (target < "
                   f"{100 * result['max_rss_growth']:.0f} %) |\n"
                   f"| RSS slope after warm-up | {memory['slope_mib_per_min']:+.2f} MiB/min |\n"
                   f"| peak RSS | {memory['peak_mib']:.0f} MiB |\n"
                   f"| server exit status (SIGTERM drain) | {result['server_exit_status']} |\n")


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m carclf.loadtest.soak", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = soak(args)
    except CarClfError as exc:
        print(f"soak: error: {exc.message}", file=sys.stderr)
        return 2
    print(markdown(result))
    reason = f" ({result['no_verdict']})" if result["no_verdict"] else ""
    print(f"soak: {'PASSED' if result['passed'] else 'FAILED'}{reason}; figures in {args.reports}/soak.json")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    options.exit_on_sigterm()  # what it started is stopped by its finally blocks
    sys.exit(main())
