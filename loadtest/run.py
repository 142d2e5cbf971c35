"""``make loadtest``: make sure a server is up, run locust headless, write reports, pass or fail.

The settings live in ``loadtest/locust.conf`` (overridable by ``LOCUST_*`` environment variables and by
the flags below, which are forwarded to locust). When nothing answers on the configured REST address and
it is a local one, the embedded server is started there (``carclf serve`` with TF Serving's flags) over
every model of the model repository (as ``make serve`` does; ``--model-config`` for another config) and
stopped at the end. Before locust starts, the models the run calls must be served (or, for a server it
starts, be in the repository); otherwise it stops with exit status 2 and says which model is missing and
what is there, instead of counting a minute of failed requests. Then the exit status is locust's:
non-zero on any failed request or a p95 above ``max-p95-ms`` (see ``loadtest/locustfile.py``); a locust
killed by a signal reads CRASHED, with the shell's 128 + the signal's number.

    python -m carclf.loadtest.run [--users 16 --run-time 2m ...] [-- any other locust flag]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from carclf import exits, sources, tf_threads
from carclf.cli import CommandParser
from carclf.errors import CarClfError, ConfigError, DeadlineExceeded, NotFound, Unavailable
from carclf.loadtest import checks, options, protocol
from carclf.loadtest import server as srv
from carclf.loadtest.photos import load_photos

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
DEFAULT_CONF = HERE / "locust.conf"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
FIRST_PROBE_S = 10.0  # the status GET that decides between using a server and starting one
REPORT_SETTINGS = ("csv", "html")  # locust.conf keys (and LOCUST_CSV / LOCUST_HTML) of the report paths

# run.py flag -> locust setting it forwards to (also the key read from locust.conf / LOCUST_* variables).
FORWARDED = {
    "users": "users", "spawn_rate": "spawn-rate", "run_time": "run-time", "host": "host",
    "grpc_host": "grpc-host", "target_model": "target-model", "ensemble_model": "ensemble-model",
    "ensemble_weight": "ensemble-weight", "backbone_weight": "backbone-weight", "photo_folder": "photo-folder",
    "signature": "signature", "model_repository": "model-repository", "max_p95_ms": "max-p95-ms",
    "labels_file": "labels-file", "ensemble_grpc_host": "ensemble-grpc-host",
    "ensemble_rest_host": "ensemble-rest-host", "request_timeout": "request-timeout", "think_time": "think-time",
    "max_fail_ratio": "max-fail-ratio",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONF), help="locust config file")
    parser.add_argument("--users", "-u", type=int, help="concurrent users")
    parser.add_argument("--spawn-rate", "-r", type=float, help="users started per second")
    parser.add_argument("--run-time", "-t", help="how long to run, e.g. 30s, 2m")
    parser.add_argument("--host", help="REST base URL, e.g. http://127.0.0.1:8501")
    parser.add_argument("--grpc-host", help="gRPC host:port, e.g. 127.0.0.1:8500")
    parser.add_argument("--target-model", help="backbone to call")
    parser.add_argument("--ensemble-model", help="ensemble to call")
    parser.add_argument("--ensemble-weight", type=int, help="weight of the ensemble tasks (0: none)")
    parser.add_argument("--backbone-weight", type=int, help="weight of the backbone tasks")
    parser.add_argument("--photo-folder", help="folder of real photos")
    parser.add_argument("--signature", help="serving_default or serving_pixels")
    parser.add_argument("--labels-file", help="labels answers are checked against")
    parser.add_argument("--model-repository", help="model repository (served when a server is started)")
    parser.add_argument("--ensemble-grpc-host", help="where the ensemble is served over gRPC (default: --grpc-host)")
    parser.add_argument("--ensemble-rest-host", help="where the ensemble is served over REST (default: --host)")
    parser.add_argument("--request-timeout", type=float, help="seconds per call")
    parser.add_argument("--think-time", type=float, help="seconds between a user's calls (0: closed loop)")
    parser.add_argument("--max-fail-ratio", type=float, help="fail when more than this share of calls failed")
    parser.add_argument("--max-p95-ms", type=float, help="fail when the overall p95 is above this (0: off)")
    parser.add_argument("--reports", help="folder for the CSV and HTML reports (default: from the config)")
    parser.add_argument("--model-config", default="",
                        help="models.config for a started server (default: one generated from the repository)")
    parser.add_argument("--ensemble-config", default="ensemble/car_ensemble/config.pbtxt",
                        help="ensemble config for a started server, when the ensemble tasks are on")
    parser.add_argument("--batching-config", default="serving/batching.config",
                        help="batching parameters for a started server (batching off if missing)")
    parser.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0, metavar="N",
                        help="TensorFlow threads inside one op for a started server (0: TensorFlow's default; "
                             "make loadtest passes make serve's TF_INTRA_OP)")
    parser.add_argument("--no-start", action="store_true", help="never start a server")
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for models")
    parser.add_argument("locust_args", nargs=argparse.REMAINDER, help="-- then any other locust flags")


def read_conf(path: str | os.PathLike) -> dict[str, str]:
    """``key = value`` lines of a locust config file (comments and blank lines skipped)."""
    path = Path(path)
    if why := sources.why_not(path, "file"):
        raise ConfigError(f"locust config file {why}, received {str(path)!r}", field="--config")
    settings = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"expected 'key = value', received {line!r}", source=f"{path}:{number}")
        settings[key.strip()] = value.strip()
    return settings


def resolve(args: argparse.Namespace) -> dict[str, str]:
    """Effective settings: flags over ``LOCUST_*`` environment variables over the config file."""
    settings = read_conf(args.config)
    for key in (*FORWARDED.values(), *REPORT_SETTINGS):
        env = os.environ.get("LOCUST_" + key.upper().replace("-", "_"))
        if env is not None:
            settings[key] = env
    for attr, key in FORWARDED.items():
        value = getattr(args, attr)
        if value is not None:
            settings[key] = str(value)
    if args.reports:
        settings["csv"] = str(Path(args.reports) / "locust")
        settings["html"] = str(Path(args.reports) / "locust.html")
    return settings


def origins(args: argparse.Namespace) -> dict[str, str]:
    """Where each forwarded setting came from: its flag, its ``LOCUST_*`` variable, or the config file."""
    found = {}
    for attr, key in FORWARDED.items():
        env = "LOCUST_" + key.upper().replace("-", "_")
        found[key] = f"--{key}" if getattr(args, attr) is not None else env if env in os.environ else str(args.config)
    return found


# setting -> (type, accepted, what is expected); checked before any server or locust starts.
NUMBERS: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "users": (int, lambda v: v >= 1, "an integer >= 1"),
    "backbone-weight": (int, lambda v: v >= 0, "an integer >= 0"),
    "ensemble-weight": (int, lambda v: v >= 0, "an integer >= 0"),
    "spawn-rate": (float, lambda v: v > 0, "a number > 0"),
    "request-timeout": (float, lambda v: v > 0, "seconds > 0"),
    "think-time": (float, lambda v: v >= 0, "seconds >= 0"),
    "max-fail-ratio": (float, lambda v: 0 <= v <= 1, "a ratio in [0, 1]"),
    "max-p95-ms": (float, lambda v: v >= 0, "milliseconds >= 0 (0: off)"),
}


def _number(kind: type, text: str) -> float | None:
    try:
        return kind(text)
    except ValueError:
        return None


def check_settings(settings: dict[str, str], where: dict[str, str] | None = None, files: bool = True) -> None:
    """Raise ConfigError naming the setting, its value and where it came from unless locust can run with
    ``settings``: numbers in range, a run time > 0, a known signature, a REST URL for the ensemble when given;
    with ``files``, photos and a readable labels file."""
    where = where or {}
    for key, (kind, accepted, expected) in NUMBERS.items():
        if key in settings:
            value = _number(kind, settings[key])
            options.require(value is not None and accepted(value), key, settings[key], expected, where.get(key, ""))
    weights = [_number(int, settings.get(k, "1")) or 0 for k in ("backbone-weight", "ensemble-weight")]
    options.require(sum(weights) > 0, "backbone-weight", settings.get("backbone-weight", "1"),
                    "a weight > 0 here or for ensemble-weight: with both 0 the users have nothing to call",
                    where.get("backbone-weight", ""))
    if "run-time" in settings:  # locust reads 0 as "no limit"
        seconds = options.timespan_s(settings["run-time"])
        options.require(seconds is not None and seconds > 0, "run-time", settings["run-time"],
                        "a run time > 0 such as 30s, 2m or 1h30m", where.get("run-time", ""))
    protocol.signature_input(settings.get("signature", "serving_default"))
    if settings.get("ensemble-rest-host"):
        rest_host_port(settings["ensemble-rest-host"], "ensemble-rest-host")
    if not files:
        return
    load_photos(settings.get("photo-folder", "data/sample"), limit=1)
    if settings.get("labels-file"):
        checks.read_labels(settings["labels-file"])


def reports_folder(settings: dict[str, str], flag: str) -> Path:
    """The folder of the CSV and HTML reports, created; ConfigError (naming ``flag``) when it cannot be."""
    reports = Path(settings.get("csv", "reports/loadtest/locust")).parent
    try:
        reports.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the reports folder {str(reports)!r}: {exc.strerror}", field=flag) from None
    return reports


def server_address(settings: dict[str, str]) -> srv.ServerAddress:
    """The REST host and port of ``host`` with the gRPC port of ``grpc-host`` (ConfigError naming the setting
    unless they read as http://HOST:PORT and HOST:PORT)."""
    host, rest_port = rest_host_port(settings.get("host", "http://127.0.0.1:8501"), "host")
    grpc_text = settings.get("grpc-host", "127.0.0.1:8500")
    grpc_host, _, grpc_port = grpc_text.rpartition(":")
    if "://" in grpc_text or not grpc_host or not grpc_port.isdigit() or not 0 < int(grpc_port) < 65536:
        raise ConfigError(f"expected HOST:PORT (no scheme, a port from 1 to 65535), received {grpc_text!r}",
                          field="grpc-host")
    return srv.ServerAddress(host, int(grpc_port), rest_port)


def rest_host_port(url: str, field: str) -> tuple[str, int]:
    """(host, port) of a REST base URL; ConfigError naming ``field`` unless it reads as http://HOST:PORT with a
    port from 1 to 65535."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise ConfigError(f"expected http://HOST:PORT (a port from 1 to 65535), received {url!r}", field=field)
    return parts.hostname, port


def same_host(settings: dict[str, str]) -> None:
    """ConfigError unless gRPC and REST are on one host, as a server started here listens on one."""
    rest_host = urlsplit(settings.get("host", "http://127.0.0.1:8501")).hostname
    grpc_host = settings.get("grpc-host", "127.0.0.1:8500").rpartition(":")[0]
    if grpc_host != rest_host:
        raise ConfigError(f"gRPC and REST must be on the same host to start a server, received "
                          f"{grpc_host!r} and {rest_host!r}", field="grpc-host")


def called_models(settings: dict[str, str]) -> dict[str, str]:
    """The models the run calls: {"backbone": name, "ensemble": name}, for the tasks whose weight is above 0."""
    called = {}
    if int(settings.get("backbone-weight", "1")) > 0:
        called["backbone"] = settings.get("target-model", "mobilenet_v2")
    if int(settings.get("ensemble-weight", "1")) > 0:
        called["ensemble"] = settings.get("ensemble-model", "car_ensemble")
    return called


HOW_TO_CHOOSE = {"backbone": "give --target-model NAME (or LOCUST_TARGET_MODEL=NAME)",
                 "ensemble": "give --ensemble-weight 0 to run without ensemble tasks"}


def check_served(address: srv.ServerAddress, called: dict[str, str], ensemble_rest_host: str = "") -> None:
    """Raise NotFound / Unavailable, naming the model and what the server has, unless every called model is
    AVAILABLE on the server already answering at ``address`` (the ensemble at ``ensemble_rest_host`` when
    given: a gateway in front of real TF Serving)."""
    for role, model in called.items():
        url = address.rest_url
        if role == "ensemble" and ensemble_rest_host:  # checked as an http://HOST:PORT by check_settings
            url = ensemble_rest_host.rstrip("/")
        state, message = srv.model_status(url, model)
        if state == "AVAILABLE":
            continue
        if state is None:
            raise Unavailable(f"nothing answers at {url}, where the {role} model {model!r} is called")
        served = srv.served_models(url)
        listing = f"; it serves {', '.join(served)}" if served else ""
        why = "does not serve" if state == "NOT_FOUND" else "has no AVAILABLE version of"
        detail = f" ({state}: {message})" if message and state != "NOT_FOUND" else ""
        error = NotFound if state == "NOT_FOUND" else Unavailable
        raise error(f"the server at {url} {why} the {role} model {model!r}{detail}{listing}; "
                    f"{HOW_TO_CHOOSE[role]}")


def check_grpc_served(settings: dict[str, str], called: dict[str, str]) -> None:
    """Raise Unavailable / NotFound, naming the gRPC address and the model, unless every called model is
    AVAILABLE over gRPC too (the REST check says nothing about a wrong ``grpc-host``)."""
    for role, model in called.items():
        target = settings.get("grpc-host", "127.0.0.1:8500")
        if role == "ensemble" and settings.get("ensemble-grpc-host"):
            target = settings["ensemble-grpc-host"]
        try:
            state, message = srv.grpc_model_status(target, model)
        except CarClfError as exc:
            raise type(exc)(f"gRPC at {target} (grpc-host): the {role} model {model!r}: {exc.message}") from None
        if state != "AVAILABLE":
            raise Unavailable(f"gRPC at {target} (grpc-host) has no AVAILABLE version of the {role} model "
                              f"{model!r} ({state}{': ' + message if message else ''})")


def check_repository(repository: str, served: list[str], called: dict[str, str], ensemble_config: str) -> None:
    """Before starting a server: raise ConfigError unless the repository holds the called backbone and enough
    of the ensemble's members (its quorum; all of them with failure_policy 'fail')."""
    listing = ", ".join(served) or "no model"
    if "backbone" in called and called["backbone"] not in served:
        raise ConfigError(f"target-model {called['backbone']!r} is not in the model repository {repository!r} "
                          f"(it holds {listing}); {HOW_TO_CHOOSE['backbone']}", field="target-model")
    if "ensemble" not in called:
        return
    if why := sources.why_not(ensemble_config, "file"):
        raise ConfigError(f"ensemble tasks are on but {ensemble_config!r} {why} "
                          f"({HOW_TO_CHOOSE['ensemble']})", field="ensemble-config")
    from carclf.ensemble.config import load_config

    config = load_config(ensemble_config)
    if config.name != called["ensemble"]:
        raise ConfigError(f"ensemble-model is {called['ensemble']!r} but {ensemble_config} declares "
                          f"{config.name!r}", field="ensemble-model")
    needed = config.members_needed
    missing = [m for m in config.member_names if m not in served]
    if len(config.members) - len(missing) < needed:
        raise ConfigError(f"{config.name} needs {needed} of its members {', '.join(config.member_names)}, but "
                          f"the model repository {repository!r} lacks {', '.join(missing)} (it holds {listing}); "
                          f"give --ensemble-config of an ensemble over these models, or "
                          f"{HOW_TO_CHOOSE['ensemble'].removeprefix('give ')}", field="ensemble-config")


def start_server(args, settings: dict[str, str], address: srv.ServerAddress, reports: Path) -> srv.EmbeddedServer:
    """Start ``carclf serve`` on ``address`` over the repository; wait until the models the run calls are
    AVAILABLE (refusing at once when the repository cannot serve them)."""
    if address.host not in LOCAL_HOSTS:
        raise Unavailable(f"no server answers at {address.rest_url} and it is not a local address to start one on")
    same_host(settings)
    repository = settings.get("model-repository", "model_repository")
    called = called_models(settings)
    if args.model_config:
        config = Path(args.model_config)
        if why := sources.why_not(config, "file"):
            raise ConfigError(f"{str(config)!r} {why}", field="model-config")
        served = [m for m in srv.config_model_names(config) if m in srv.repository_models(repository)]
    else:
        served = srv.repository_models(repository)
        if not served:
            raise ConfigError(f"no models to serve: {repository!r} holds no model with a version folder",
                              field="model-repository")
    check_repository(repository, served, called, args.ensemble_config)
    if not args.model_config:  # written once the run is sure to start: a refusal keeps the last run's file
        config = srv.write_models_config(reports / "models.config", repository, served)
    # As the deployments do (serving/models.config): labels may name versions not exported yet.
    flags = ["--allow_version_labels_for_unavailable_models"]
    if "ensemble" in called:
        flags += ["--ensemble_config_file", str(args.ensemble_config)]
    if Path(args.batching_config).is_file():
        flags += srv.batching_flags(args.batching_config)
    flags += tf_threads.server_flags(args.tensorflow_intra_op_parallelism)
    server = srv.EmbeddedServer(address, model_config_file=config, model_repository=repository, flags=flags,
                                log_path=reports / "server.log")
    waited = list(called.values())
    print(f"loadtest: starting the embedded server on {address.grpc_target} (gRPC) and {address.rest_url} "
          f"over {config}; waiting for {waited or 'it to answer'}", flush=True)
    server.start()
    try:
        server.wait_ready(waited, timeout=args.server_timeout)
    except BaseException:  # a refusal, or Ctrl-C while the models load
        server.stop()
        raise
    return server


def locust_command(args, settings: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "--config", str(args.config), "-f", str(LOCUSTFILE)]
    for key in (*FORWARDED.values(), "csv", "html"):
        if key in settings:
            cmd += [f"--{key}", settings[key]]
    extra = list(args.locust_args or [])
    return cmd + (extra[1:] if extra[:1] == ["--"] else extra)


STATS_CSV, HISTORY_CSV = "_stats.csv", "_stats_history.csv"  # locust's CSV files: <csv prefix><suffix>
CSV_SUFFIXES = (STATS_CSV, HISTORY_CSV, "_failures.csv", "_exceptions.csv")


def clear_reports(settings: dict[str, str]) -> None:
    """Remove an earlier run's CSV and HTML reports at this run's paths, so that a run which stops before
    locust writes its own (a bad locust flag, Ctrl-C at once) shows no figures but its own."""
    paths = [Path(settings["csv"] + suffix) for suffix in CSV_SUFFIXES] if settings.get("csv") else []
    paths += [Path(settings["html"])] if settings.get("html") else []
    for path in paths:
        path.unlink(missing_ok=True)


def summarize(csv_prefix: str) -> list[dict[str, str]]:
    """Rows of locust's ``<prefix>_stats.csv`` (one per request name, plus the Aggregated row)."""
    path = Path(csv_prefix + STATS_CSV)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def print_summary(rows: list[dict[str, str]]) -> None:
    print(f"{'type':6} {'name':48} {'reqs':>7} {'fails':>6} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}")
    for row in rows:
        print(f"{row['Type']:6} {row['Name'][:48]:48} {row['Request Count']:>7} {row['Failure Count']:>6} "
              f"{row['50%']:>8} {row['95%']:>8} {float(row['Requests/s']):>7.1f}")


def run(args: argparse.Namespace) -> int:
    options.thread_count(args.tensorflow_intra_op_parallelism, "--tensorflow-intra-op-parallelism")
    settings = resolve(args)
    check_settings(settings, origins(args))
    reports = reports_folder(settings, "--reports" if args.reports else "csv")
    address = server_address(settings)
    server = None
    try:
        state = srv.model_state(address.rest_url, settings.get("target-model", "mobilenet_v2"), FIRST_PROBE_S)
    except DeadlineExceeded as exc:  # a server is there: neither "nothing answers" nor a second one on its ports
        raise DeadlineExceeded(f"{exc.message}; no load test was run and no server started") from None
    if state is None:
        if args.no_start:
            raise Unavailable(f"no server answers at {address.rest_url} (and --no-start)")
        server = start_server(args, settings, address, reports)
    else:
        print(f"loadtest: using the server already answering at {address.rest_url}", flush=True)
        check_served(address, called_models(settings), settings.get("ensemble-rest-host", ""))
        check_grpc_served(settings, called_models(settings))
    try:
        clear_reports(settings)
        cmd = locust_command(args, settings)
        (reports / "run.json").write_text(json.dumps(
            {"settings": settings, "command": cmd, "started_server": server is not None,
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
        print("loadtest: " + " ".join(cmd), flush=True)
        try:
            code = srv.call_child(cmd)
        except KeyboardInterrupt:
            print("loadtest: interrupted; the figures up to then follow", flush=True)
            code = 130
    finally:
        if server is not None:
            server.stop()
    rows = summarize(settings.get("csv", ""))
    if rows:
        print_summary(rows)
    verdict, status = outcome(code)
    print(f"loadtest: {verdict}; reports in {reports}/", flush=True)
    return status


def outcome(code: int) -> tuple[str, int]:
    """The verdict line and this command's exit status for locust's exit status ``code``: a locust killed by
    a signal (a crash, the out-of-memory killer) judged nothing, so CRASHED, not FAILED."""
    if code < 0:
        return f"CRASHED (locust was {exits.describe(code)}; any figures above are partial)", exits.shell_status(code)
    verdict = "INTERRUPTED" if code == 130 else "PASSED" if code == 0 else "FAILED"
    return f"{verdict} (locust exit status {code})", code


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m carclf.loadtest.run", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CarClfError as exc:
        print(f"loadtest: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before locust ran (while a started server loaded its models): nothing to report
        print("loadtest: interrupted before the load test began; no load test was run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    options.exit_on_sigterm()  # what it started is stopped by its finally blocks
    sys.exit(main())
