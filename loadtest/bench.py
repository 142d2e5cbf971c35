"""``carclf bench``: the one command behind docs/PERFORMANCE.md.

In ONE run, for one exported backbone, everything is measured side by side on this machine:

1. the in-process limit: the same signature called directly over a batch-size sweep (best batch wins),
   measured before and after the served runs (the higher is the yardstick);
2. served over gRPC and over REST (b64 JPEG), batching off and on, concurrency sweep, one photo per request,
   every answer checked; throughput and p50/p95/p99, each also as a ratio to the in-process figure;
3. the ensemble: served ``car_ensemble`` against its members run in-process one after another on the
   same TTA views;
4. payload cost per request (JPEG bytes, uint8 pixels, float JSON) and the served latency of each
   accepted path; server memory per loaded model (RSS delta through a config reload).

Servers are started on loopback ports chosen by the kernel and stopped at the end. Outputs: bench.json,
bench.md and bench.png in ``--out``. ``--quick`` makes a run of seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from carclf import contract, sources, tf_threads
from carclf.errors import CarClfError, ConfigError, DeadlineExceeded
from carclf.loadtest import checks, inprocess, loadgen, metrics, options, payload, protocol, report
from carclf.loadtest import server as srv
from carclf.loadtest.photos import Photo, load_photos

FULL = {"duration": 8.0, "warmup": 2.0, "concurrency": "1,2,4,8,16", "batch_sizes": "1,2,4,8,16,32",
        "inprocess_threads": "1,2", "ensemble_concurrency": "1,4", "photo_limit": 0, "payload_photos": 10,
        "pairs": 8, "pair_duration": 3.0, "pair_warmup": 0.5}
QUICK = {"duration": 1.0, "warmup": 0.3, "concurrency": "1,2", "batch_sizes": "1,4", "inprocess_threads": "1",
         "ensemble_concurrency": "1", "photo_limit": 4, "payload_photos": 2,
         "pairs": 1, "pair_duration": 0.6, "pair_warmup": 0.1}
DEFAULT_BATCHING = """# Written by carclf bench because no --batching-config was given and serving/batching.config is missing.
max_batch_size { value: %d }
batch_timeout_micros { value: 2000 }
num_batch_threads { value: %d }
max_enqueued_batches { value: 1000 }
"""
REQUEST_TIMEOUT_S = 60.0
METRICS_PATH = "/monitoring/prometheus/metrics"
MONITORING_CONFIG = f'prometheus_config {{ enable: true path: "{METRICS_PATH}" }}\n'
DEFAULT_ENSEMBLE_CONFIG = "ensemble/car_ensemble/config.pbtxt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mobilenet_v2", help="exported backbone to benchmark")
    parser.add_argument("--model-repository", default="model_repository", help="model repository folder")
    parser.add_argument("--photo-folder", default="data/sample", help="real photos to send")
    parser.add_argument("--photo-limit", type=int, help="use at most this many photos (0: all)")
    parser.add_argument("--signature", default=contract.SIGNATURE_BYTES, help="signature to call")
    parser.add_argument("--out", "--output",
                        default="reports/bench", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--concurrency", help="served concurrency sweep, e.g. 1,2,4,8,16")
    parser.add_argument("--batch-sizes", help="in-process batch sizes, e.g. 1,2,4,8,16,32")
    parser.add_argument("--inprocess-threads", help="in-process calling threads, e.g. 1,2 (the limit is the best "
                        "of every batch size and thread count)")
    parser.add_argument("--duration", type=float, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each point")
    parser.add_argument("--transports", default="grpc,rest", help="served transports: grpc,rest")
    parser.add_argument("--batching", default="off,on", help="server batching modes to measure: off,on")
    parser.add_argument("--batching-config", help="BatchingParameters file for batching on "
                        "(default: serving/batching.config if present, else one written to --out)")
    parser.add_argument("--early-dispatch", default="on", choices=("on", "off"),
                        help="on (as make serve): batching on runs with the embedded server's "
                             "--batching_early_dispatch; off: TF Serving's rule alone")
    for pool, where, make in (("intra", "inside one op", "; make bench passes make serve's TF_INTRA_OP"),
                              ("inter", "across ops", "")):
        parser.add_argument(f"--tensorflow-{pool}-op-parallelism", type=int, default=0, metavar="N",
                            help=f"TensorFlow threads {where}, for the in-process calls and the server alike "
                                 f"(the server's --tensorflow_{pool}_op_parallelism; 0: TensorFlow's default{make})")
    parser.add_argument("--ensemble-model", default="car_ensemble", help="ensemble served beside the backbone")
    parser.add_argument("--ensemble-config", help=f"the ensemble's config.pbtxt (default: {DEFAULT_ENSEMBLE_CONFIG}, "
                        "its case skipped when that file is absent; a file named here must exist and load)")
    parser.add_argument("--no-ensemble", action="store_true", help="skip the ensemble case")
    parser.add_argument("--ensemble-concurrency", help="served ensemble concurrencies, e.g. 1,4")
    parser.add_argument("--payload-photos", type=int, help="photos to size the payload formats on")
    parser.add_argument("--pairs", type=int, help="paired rounds (in-process and served slices alternating) "
                        "the targets are judged on")
    parser.add_argument("--pair-duration", type=float, help="measured seconds of each slice of a paired round")
    parser.add_argument("--pair-warmup", type=float, help="unmeasured seconds before each slice")
    parser.add_argument("--quick", action="store_true", help="seconds-long run: short points, fewer of them")
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for models to load")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap on requests per point")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def _ints(text: str, field: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, received {text!r}", field=field) from None
    if not values or min(values) < 1:
        raise ConfigError(f"expected integers >= 1, received {text!r}", field=field)
    return values


def _threads_flag(pool: str) -> str:
    """The bench's flag for a TensorFlow pool ("intra_op" -> "--tensorflow-intra-op-parallelism")."""
    return f"--tensorflow-{pool.replace('_', '-')}-parallelism"


def settings_from(args: argparse.Namespace) -> dict:
    """Resolved settings: explicit flags over the quick or full defaults, validated."""
    base = QUICK if args.quick else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    for key in ("duration", "pair_duration"):
        options.require(pick[key] > 0, "--" + key.replace("_", "-"), pick[key], "seconds > 0")
    for key in ("warmup", "pair_warmup"):
        options.require(pick[key] >= 0, "--" + key.replace("_", "-"), pick[key], "seconds >= 0")
    options.require(int(pick["pairs"]) >= 1, "--pairs", pick["pairs"],
                    "at least one paired round (the targets are judged on them)")
    options.require(int(pick["photo_limit"]) >= 0, "--photo-limit", pick["photo_limit"], "a count >= 0 (0: all)")
    options.require(int(pick["payload_photos"]) >= 1, "--payload-photos", pick["payload_photos"], "a count >= 1")
    options.require(args.max_requests >= 1, "--max-requests", args.max_requests, "a count >= 1")
    options.require(args.server_timeout > 0, "--server-timeout", args.server_timeout, "seconds > 0")
    protocol.signature_input(args.signature)
    threads = {pool: options.thread_count(getattr(args, f"tensorflow_{pool}_parallelism"), _threads_flag(pool))
               for pool in tf_threads.POOLS}
    for flag, named in (("--ensemble-config", args.ensemble_config), ("--batching-config", args.batching_config)):
        options.require(not named or Path(named).is_file(), flag, named, "an existing file")
    return {
        "model": args.model, "model_repository": str(args.model_repository), "photo_folder": str(args.photo_folder),
        "signature": args.signature, "out": str(args.out), "quick": bool(args.quick),
        "duration_s": float(pick["duration"]), "warmup_s": float(pick["warmup"]),
        "concurrency": _ints(pick["concurrency"], "--concurrency"),
        "batch_sizes": _ints(pick["batch_sizes"], "--batch-sizes"),
        "inprocess_threads": _ints(pick["inprocess_threads"], "--inprocess-threads"),
        "ensemble_concurrency": _ints(pick["ensemble_concurrency"], "--ensemble-concurrency"),
        "photo_limit": int(pick["photo_limit"]) or None, "payload_photos": int(pick["payload_photos"]),
        "pairs": max(0, int(pick["pairs"])), "pair_duration_s": float(pick["pair_duration"]),
        "pair_warmup_s": float(pick["pair_warmup"]),
        "transports": options.transports(args.transports),
        "batching": options.choices(args.batching, ("off", "on"), "--batching"),
        "early_dispatch": args.early_dispatch == "on",
        "tf_threads": threads,
        "ensemble_model": None if args.no_ensemble else args.ensemble_model,
        "ensemble_config": str(args.ensemble_config or DEFAULT_ENSEMBLE_CONFIG), "max_requests": int(args.max_requests),
        "server_timeout_s": float(args.server_timeout),
    }


def batching_file(args: argparse.Namespace, out: Path, max_concurrency: int) -> Path:
    """The batching parameters used for "batching on"."""
    if args.batching_config:  # checked to exist by settings_from
        return Path(args.batching_config)
    deployed = Path("serving/batching.config")
    if deployed.is_file():
        return deployed
    path = out / "batching.config"
    path.write_text(DEFAULT_BATCHING % (max(8, max_concurrency), os.cpu_count() or 1))
    return path


# ---------------------------------------------------------------------------------------------
# Served measurements
# ---------------------------------------------------------------------------------------------

Validator = Callable[[dict], None]


def grpc_workers(target: str, requests: Sequence, validate: Validator) -> loadgen.WorkerFactory:
    """One channel per worker sending the pre-built ``requests`` in turn, every answer checked."""
    import grpc

    from carclf.tfprotos import prediction_service_pb2_grpc

    def make(index: int):
        channel = grpc.insecure_channel(target, options=protocol.GRPC_CHANNEL_OPTIONS)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def send(i: int) -> loadgen.Check:
            response = stub.Predict(requests[(index + i) % len(requests)], timeout=REQUEST_TIMEOUT_S)
            outputs = protocol.grpc_outputs(response)
            return lambda: validate(outputs)

        return send, channel.close

    return make


def rest_workers(address: srv.ServerAddress, path: str, bodies: Sequence[bytes],
                 validate: Validator) -> loadgen.WorkerFactory:
    """One keep-alive HTTP connection per worker POSTing the pre-built ``bodies`` in turn."""

    def make(index: int):
        conn = http.client.HTTPConnection(address.host, address.rest_port, timeout=REQUEST_TIMEOUT_S)

        def send(i: int) -> loadgen.Check:
            conn.request("POST", path, body=bodies[(index + i) % len(bodies)],
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
            if reply.status != 200:
                raise checks.BadPrediction(f"HTTP {reply.status}: {data[:200]!r}")
            outputs = protocol.rest_outputs(json.loads(data))
            return lambda: validate(outputs)

        return send, conn.close

    return make


class Workload:
    """The pre-built requests of one model and signature, for both transports."""

    def __init__(self, model: str, signature: str, inputs: Sequence[dict[str, np.ndarray]], labels):
        self.model, self.signature = model, signature
        self.grpc = [protocol.grpc_request(model, signature, x) for x in inputs]
        self.rest = [protocol.rest_body(signature, x) for x in inputs]
        self.path = protocol.rest_path(model)
        self.validate: Validator = lambda outputs: checks.check_prediction(outputs, labels)

    @classmethod
    def of_photos(cls, model: str, repository: str | Path, photo_folder: str | Path,
                  limit: int | None = None) -> Workload:
        """One request per photo of ``photo_folder`` to ``serving_default`` (JPEG bytes), answers checked
        against the labels of the model's newest version in ``repository``."""
        photos = load_photos(photo_folder, limit)
        labels = checks.read_labels(inprocess.latest_version(repository, model) / "assets" / contract.LABELS_ASSET)
        inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, photo.data) for photo in photos]
        return cls(model, contract.SIGNATURE_BYTES, inputs, labels)

    def factory(self, transport: str, address: srv.ServerAddress) -> loadgen.WorkerFactory:
        if transport == "grpc":
            return grpc_workers(address.grpc_target, self.grpc, self.validate)
        return rest_workers(address, self.path, self.rest, self.validate)


def measured_server(folder: Path, repository: Path, models: dict[str, Path], flags: Sequence[str],
                    name: str) -> srv.EmbeddedServer:
    """An embedded server (not started) on free loopback ports, serving ``models`` ({name: base path}) with
    Prometheus metrics on ``METRICS_PATH`` and the extra ``flags``; its config files and its log
    (``models_<name>.config``, ``server_<name>.log``) are written to ``folder``."""
    from google.protobuf import text_format

    monitoring = folder / "monitoring.config"
    monitoring.write_text(MONITORING_CONFIG)
    config = folder / f"models_{name}.config"
    config.write_text(text_format.MessageToString(srv.models_config(models)))
    return srv.EmbeddedServer(srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port()),
                              model_config_file=config, model_repository=repository,
                              flags=["--monitoring_config_file", str(monitoring), *flags],
                              log_path=folder / f"server_{name}.log")


def cpu_probe(pid: int) -> Callable[[], float]:
    import psutil

    process = psutil.Process(pid)

    def seconds() -> float:
        times = process.cpu_times()
        return times.user + times.system

    return seconds


def measure_point(work: Workload, transport: str, server: srv.EmbeddedServer, concurrency: int,
                  settings: dict) -> dict:
    """One closed-loop point against the server, with CPU per photo and, from the server's metrics, where
    the time of a request went."""
    scrapes: dict[str, metrics.Samples | None] = {}  # at the window's two ends: the priming calls left out

    def scrape(edge: str) -> None:
        scrapes[edge] = metrics.scrape(server.address.rest_url, METRICS_PATH)

    result = loadgen.closed_loop(work.factory(transport, server.address), concurrency, settings["duration_s"],
                                 settings["warmup_s"], settings["max_requests"], cpu_probe(server.pid), scrape)
    before, after = scrapes.get("start"), scrapes.get("end")
    row = result.summary()
    done = max(1, result.requests)
    row["client_cpu_ms_per_photo"] = round(result.cpu_s * 1000 / done, 3)
    row["server_cpu_ms_per_photo"] = (None if result.server_cpu_s is None
                                      else round(result.server_cpu_s * 1000 / done, 3))
    if before is not None and after is not None:
        entrypoint = "GRPC" if transport == "grpc" else "REST"
        row["breakdown"] = metrics.with_outside(row, metrics.breakdown(before, after, work.model, entrypoint))
    print(f"bench: {work.model} {transport:4} c={concurrency:<3} {row['throughput']:8.1f}/s  "
          f"p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  errors {row['errors']}", flush=True)
    return row


def _available(rest_url: str, model: str) -> bool:
    """``model`` is AVAILABLE; False also while the server, busy loading it, lets a status probe time out."""
    try:
        return srv.model_state(rest_url, model) == "AVAILABLE"
    except DeadlineExceeded:
        return False


def probe_memory(server: srv.EmbeddedServer, served: dict[str, Path], model: str, work: Workload,
                 timeout: float) -> dict:
    """RSS delta of the server when ``model`` is loaded once more under another name.

    The whole config is replaced twice (HandleReloadConfigRequest): ``served`` plus the copy, then
    ``served`` again, so every model the server had stays loaded.
    """
    import grpc

    copy = f"{model}_rss_probe"
    base = dict(served)
    before = server.rss_bytes()
    try:
        srv.reload_config(server.address, srv.models_config({**base, copy: base[model]}), timeout)
        deadline = time.monotonic() + timeout
        while not _available(server.address.rest_url, copy):
            if time.monotonic() > deadline:
                raise CarClfError(f"{copy} not AVAILABLE after {timeout:.0f} s")
            time.sleep(0.2)
        send, close = grpc_workers(server.address.grpc_target, [_renamed(work.grpc[0], copy)], work.validate)(0)
        send(0)()  # the request, then the check of its answer
        close()
        after = server.rss_bytes()
        srv.reload_config(server.address, srv.models_config(base), timeout)
    except (CarClfError, grpc.RpcError) as exc:
        detail = exc.message if isinstance(exc, CarClfError) else f"{exc.code().name}: {exc.details()}"
        return {"server_rss_mb": round(before / 2**20, 1), "per_model_rss_mb": None,
                "per_model_note": f"not measured: config reload failed ({detail})"}
    return {"server_rss_mb": round(before / 2**20, 1),
            "per_model_rss_mb": round((after - before) / 2**20, 1),
            "per_model_note": "RSS delta after loading the same SavedModel again under a second name "
                              "(HandleReloadConfigRequest) and answering one request"}


def _renamed(request, model: str):
    copy = type(request)()
    copy.CopyFrom(request)
    copy.model_spec.name = model
    return copy


# ---------------------------------------------------------------------------------------------
# Ensemble
# ---------------------------------------------------------------------------------------------

def load_ensemble(settings: dict, repository: Path):
    """(config, reason): the ensemble config when its case can run, else None and why not."""
    if not settings["ensemble_model"]:
        return None, "--no-ensemble given"
    path = Path(settings["ensemble_config"])
    if why := sources.why_not(path, "file"):
        return None, f"ensemble config {str(path)!r} {why}"
    try:
        from carclf.ensemble.config import load_config
    except ImportError as exc:
        return None, f"carclf.ensemble cannot be imported ({exc})"
    try:
        config = load_config(path)
    except CarClfError as exc:
        return None, f"ensemble config invalid: {exc.message}"
    if config.name != settings["ensemble_model"]:
        return None, f"{path} declares {config.name!r}, not {settings['ensemble_model']!r}"
    missing = [m for m in config.member_names if not srv.repository_models(repository).count(m)]
    if missing:
        return None, f"members {missing} are not exported under {str(repository)!r}"
    return config, ""


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _ratio(value: float | None, base: float | None, *, minus_one: bool = False) -> float | None:
    if value is None or not base:
        return None
    return round(value / base - (1.0 if minus_one else 0.0), 4)


def _with_ratios(row: dict, limit: dict) -> dict:
    """Every served figure also relative to the in-process one measured in the same run.

    ``cpu_ratio`` compares CPU spent per photo (in-process at the best batch, against server plus client):
    unlike wall-clock throughput it does not depend on how much of a shared machine each side was given.
    """
    row["throughput_ratio"] = _ratio(row["throughput"], limit["throughput"])
    served_cpu = (row.get("server_cpu_ms_per_photo") or 0.0) + (row.get("client_cpu_ms_per_photo") or 0.0)
    row["cpu_ratio"] = _ratio(limit["cpu_ms_per_photo"], served_cpu) if row.get("server_cpu_ms_per_photo") else None
    row["added_cpu_ms_per_photo"] = (round(served_cpu - limit["cpu_ms_per_photo_batch1"], 3)
                                     if row.get("server_cpu_ms_per_photo") else None)
    for q in ("p50", "p95", "p99"):
        row[f"{q}_ratio"] = _ratio(row[f"{q}_ms"], limit[f"{q}_batch1_ms"])
    row["added_p50_ms"] = None if row["p50_ms"] is None else round(row["p50_ms"] - limit["p50_batch1_ms"], 3)
    return row


def checked_photos(folder: str | Path, limit: int | None) -> list[Photo]:
    """The photos to send, each one the model can decode (a benchmark of error answers measures nothing):
    ConfigError naming ``--photo-folder`` and the first photo that is not, before anything is measured."""
    from carclf.train.data import check_image_bytes

    photos = load_photos(folder, limit)
    for photo in photos:
        try:
            check_image_bytes(photo.data, min_side=1)
        except CarClfError as exc:
            raise ConfigError(f"photo {photo.name!r} under {str(folder)!r}: {exc.message}; a benchmark sends "
                              f"photos the model decodes: remove it or give --photo-folder of good ones",
                              field="--photo-folder") from None
    return photos


class Bench:
    """One benchmark run: its settings, the in-process model, the collected figures."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = settings_from(args)
        threads = self.settings["tf_threads"]
        refused = tf_threads.configure(**threads)
        if refused:  # the in-process side would run with other threads than the server: not a fair comparison
            pool = refused[0]
            raise ConfigError(f"TensorFlow already runs in this process with other thread counts, so the in-process "
                              f"calls cannot use {threads[pool]}; run carclf bench in a new process",
                              field=_threads_flag(pool))
        self.repository = Path(self.settings["model_repository"])
        self.ensemble_config, skip = load_ensemble(self.settings, self.repository)
        if skip and args.ensemble_config and not args.no_ensemble:  # named explicitly: it must be measured
            raise ConfigError(skip, field="--ensemble-config")
        self.photos = checked_photos(self.settings["photo_folder"], self.settings["photo_limit"])
        self.out = Path(self.settings["out"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.result: dict = {
            "command": shlex.join(["carclf", *sys.argv[1:]]) if Path(sys.argv[0]).name == "carclf"
            else shlex.join([sys.executable, *sys.argv]),
            "started_at": dt.datetime.now().isoformat(timespec="seconds"),
            "settings": self.settings,
            "environment": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                            "python": platform.python_version(), "platform": platform.platform()},
        }
        self.result["photos"] = [p.name for p in self.photos]
        self.signature = self.settings["signature"]
        self.inputs = [protocol.photo_inputs(self.signature, p.data) for p in self.photos]
        print(f"bench: loading {self.settings['model']} in-process (TensorFlow threads: "
              f"{tf_threads.describe(**threads)})", flush=True)
        self.model = inprocess.LoadedModel.load(self.repository, self.settings["model"])
        self.result["model_version"] = int(self.model.path.name)
        self.work = Workload(self.settings["model"], self.signature, self.inputs, self.model.labels)
        self.served: list[dict] = []
        self.rounds: list[dict] = []
        self.memory: dict = {"inprocess_load_rss_mb": round(self.model.rss_delta_bytes / 2**20, 1)}
        self.ensemble: dict = {"skipped": skip} if self.ensemble_config is None else {}
        self.reference: inprocess.EnsembleReference | None = None

    # In-process ---------------------------------------------------------------------------------

    def inprocess(self, batch_sizes: Sequence[int], threads: Sequence[int], duration: float | None = None,
                  warmup: float | None = None) -> list[dict]:
        s = self.settings
        return inprocess.measure_batches(self.model, self.signature, self.inputs, batch_sizes,
                                         duration or s["duration_s"], s["warmup_s"] if warmup is None else warmup,
                                         threads, s["max_requests"])

    def inprocess_sweep(self) -> None:
        batches = self.inprocess(self.settings["batch_sizes"], self.settings["inprocess_threads"])
        self.best = max(batches, key=lambda r: r["throughput"])
        self.batch1 = next((r for r in batches if r["batch_size"] == 1 and r["threads"] == 1), None)
        if self.batch1 is None:
            self.batch1 = self.inprocess([1], [1])[0]
        self.batches = batches
        print(f"bench: in-process best: batch {self.best['batch_size']} x {self.best['threads']} thread(s): "
              f"{self.best['throughput']:.1f} photos/s; batch 1 p50 {self.batch1['p50_ms']} ms", flush=True)

    def start_ensemble_reference(self) -> None:
        if self.ensemble_config is None:
            return
        print("bench: loading the ensemble's members in-process", flush=True)
        config = self.ensemble_config
        self.reference = inprocess.EnsembleReference(config, self.repository)
        self.ensemble.update({"model": config.name, "members": list(config.member_names), "tta": config.tta.name,
                              "views": len(config.tta), "aggregation": config.aggregation, "served": []})

    def reference_point(self, duration: float, warmup: float) -> dict:
        return self.reference.measure([p.data for p in self.photos], duration, warmup, self.settings["max_requests"])

    # Served -------------------------------------------------------------------------------------

    def server(self, mode: str, with_ensemble: bool) -> tuple[srv.EmbeddedServer, dict[str, Path]]:
        served_models = {self.settings["model"]: self.repository / self.settings["model"]}
        flags = tf_threads.server_flags(**self.settings["tf_threads"])
        if mode == "on":
            flags += srv.batching_flags(self.batching_path, early_dispatch=self.settings["early_dispatch"])
        if with_ensemble:
            served_models.update({m: self.repository / m for m in self.ensemble_config.member_names})
            flags += ["--ensemble_config_file", self.settings["ensemble_config"]]
        server = measured_server(self.out, self.repository, served_models, flags, f"batching_{mode}")
        return server, served_models

    def point(self, work: Workload, transport: str, server: srv.EmbeddedServer, concurrency: int,
              duration: float | None = None, warmup: float | None = None) -> dict:
        settings = dict(self.settings)
        if duration is not None:
            settings["duration_s"], settings["warmup_s"] = duration, warmup
        return measure_point(work, transport, server, concurrency, settings)

    def interleaved(self, transport: str, server: srv.EmbeddedServer, duration: float, warmup: float) -> dict:
        """One photo at a time, an in-process call and a served call in turn (the same photo): the p50 of
        each, and the served one's excess, with no drift of the machine between them."""
        signature, labels, inputs = self.signature, self.model.labels, self.inputs

        def local(i: int) -> loadgen.Check:
            outputs = self.model.predict(signature, inputs[i % len(inputs)])
            return lambda: checks.check_prediction(outputs, labels, batch=1)

        served, close = self.work.factory(transport, server.address)(0)
        try:
            here, there = loadgen.alternating([local, served], duration, warmup)
        finally:
            close()
        if here.errors or there.errors:
            print(f"bench: interleaved {transport} slice: {here.errors + there.errors} errors, first: "
                  f"{here.first_error or there.first_error}", flush=True)
        here_p50, there_p50 = here.summary()["p50_ms"], there.summary()["p50_ms"]
        return {"inprocess_p50_ms": here_p50, "served_p50_ms": there_p50, "added_p50_ms": _diff(there_p50, here_p50),
                "errors": here.errors + there.errors, "first_error": here.first_error or there.first_error}

    def paired_rounds(self, server: srv.EmbeddedServer, mode: str) -> None:
        """Targets measured side by side: in-process and served slices alternate, round after round, so
        both see the same load on a shared machine; each round gives one ratio per target."""
        s, best = self.settings, self.best
        for number in range(s["pairs"]):
            d, w = s["pair_duration_s"], s["pair_warmup_s"]
            limit = self.inprocess([best["batch_size"]], [best["threads"]], d, w)[0]
            c8 = {t: self.point(self.work, t, server, 8, d, w) for t in s["transports"]}
            one = self.inprocess([1], [1], d, w)[0]
            c1 = {t: self.point(self.work, t, server, 1, d, w) for t in s["transports"]}
            mixed = {t: self.interleaved(t, server, d, w) for t in s["transports"]}
            row: dict = {"round": number + 1, "batching": mode, "inprocess_limit": limit["throughput"],
                         "inprocess_limit_cpu_ms": limit["cpu_ms_per_photo"], "inprocess_p50_ms": one["p50_ms"],
                         "inprocess_cpu_ms": one["cpu_ms_per_photo"], "errors": 0, "first_error": ""}
            for t in s["transports"]:
                cpu8, cpu1 = _served_cpu(c8[t]), _served_cpu(c1[t])
                # a slice in which no request completed measured nothing: no ratio (not a ratio of 0)
                answered8 = c8[t]["p50_ms"] is not None
                parts = c1[t].get("breakdown") or {}
                row.update({f"{t}_c8_throughput": c8[t]["throughput"],
                            f"{t}_c8_ratio": _ratio(c8[t]["throughput"], limit["throughput"]) if answered8 else None,
                            f"{t}_c8_cpu_ratio": _ratio(limit["cpu_ms_per_photo"], cpu8),
                            f"{t}_c1_p50_ms": c1[t]["p50_ms"],
                            f"{t}_added_p50_ms": _diff(c1[t]["p50_ms"], one["p50_ms"]),
                            f"{t}_added_mean_ms": _diff(c1[t]["mean_ms"], parts.get("runtime_ms_per_batch")),
                            f"{t}_interleaved_added_p50_ms": mixed[t]["added_p50_ms"],
                            f"{t}_interleaved_served_p50_ms": mixed[t]["served_p50_ms"],
                            f"{t}_interleaved_inprocess_p50_ms": mixed[t]["inprocess_p50_ms"],
                            f"{t}_added_cpu_ms": _diff(cpu1, one["cpu_ms_per_photo"])})
                row["errors"] += c8[t]["errors"] + c1[t]["errors"] + mixed[t]["errors"]
                row["first_error"] = (row["first_error"] or c8[t]["first_error"] or c1[t]["first_error"]
                                      or mixed[t]["first_error"])
            self.rounds.append(row)

    def ensemble_rounds(self, server: srv.EmbeddedServer, mode: str) -> None:
        """The ensemble sweep, then paired rounds: in-process members one after another vs served, c=1."""
        s = self.settings
        work = Workload(self.ensemble_config.name, contract.SIGNATURE_BYTES,
                        [protocol.photo_inputs(contract.SIGNATURE_BYTES, p.data) for p in self.photos],
                        self.reference.labels)
        self.ensemble["batching"] = mode
        self.ensemble["inprocess"] = self.reference_point(s["duration_s"], s["warmup_s"])
        for transport in s["transports"]:
            for concurrency in s["ensemble_concurrency"]:
                row = self.point(work, transport, server, concurrency)
                self.ensemble["served"].append({"transport": transport, **row})
        rounds = []
        for number in range(s["pairs"]):
            d, w = s["pair_duration_s"], s["pair_warmup_s"]
            ref = self.reference_point(d, w)
            row = {"round": number + 1, "inprocess_p50_ms": ref["p50_ms"], "inprocess_cpu_ms": ref["cpu_ms_per_photo"],
                   "errors": 0, "first_error": ""}
            for t in s["transports"]:
                served = self.point(work, t, server, 1, d, w)
                row.update({f"{t}_p50_ms": served["p50_ms"],
                            f"{t}_overhead": _ratio(served["p50_ms"], ref["p50_ms"], minus_one=True),
                            f"{t}_cpu_overhead": _ratio(_served_cpu(served), ref["cpu_ms_per_photo"], minus_one=True)})
                row["errors"] += served["errors"]
                row["first_error"] = row["first_error"] or served["first_error"]
            rounds.append(row)
        self.ensemble["rounds"] = rounds

    def serve_and_measure(self) -> None:
        self.batching_path = batching_file(self.args, self.out, max(self.settings["concurrency"]))
        self.result["batching_parameters"] = self.batching_path.read_text()
        for mode in self.settings["batching"]:
            with_ensemble = self.reference is not None and mode == self.settings["batching"][-1]
            server, served_models = self.server(mode, with_ensemble)
            print(f"bench: starting the server, batching {mode}", flush=True)
            with server:
                t0 = time.monotonic()
                server.wait_ready([self.settings["model"]] + ([self.ensemble_config.name] if with_ensemble else []),
                                  self.settings["server_timeout_s"])
                self.memory[f"server_ready_s_batching_{mode}"] = round(time.monotonic() - t0, 1)
                if "server_rss_mb" not in self.memory:
                    self.memory.update(probe_memory(server, served_models, self.settings["model"], self.work,
                                                    self.settings["server_timeout_s"]))
                for transport in self.settings["transports"]:
                    for concurrency in self.settings["concurrency"]:
                        row = self.point(self.work, transport, server, concurrency)
                        self.served.append({"transport": transport, "batching": mode, **row})
                if mode == self.settings["batching"][0]:
                    sweep = [r for r in self.served if r["batching"] == mode]
                    self.result["payload"]["p50_c1_ms"] = payload_latencies(self.model, self.photos, server,
                                                                            self.settings, sweep)
                self.paired_rounds(server, mode)
                if with_ensemble:
                    self.ensemble_rounds(server, mode)
                self.memory[f"server_rss_mb_after_batching_{mode}"] = round(server.rss_bytes() / 2**20, 1)

    # Results ------------------------------------------------------------------------------------

    def finish(self) -> int:
        end = self.inprocess([self.best["batch_size"]], [self.best["threads"]])[0]
        best, batch1 = self.best, self.batch1
        limit = {"batch_size": best["batch_size"], "threads": best["threads"], "throughput_start": best["throughput"],
                 "throughput_end": end["throughput"], "throughput": max(best["throughput"], end["throughput"]),
                 "cpu_ms_per_photo": min(best["cpu_ms_per_photo"], end["cpu_ms_per_photo"]),
                 "cpu_ms_per_photo_batch1": batch1["cpu_ms_per_photo"], "p50_batch1_ms": batch1["p50_ms"],
                 "p95_batch1_ms": batch1["p95_ms"], "p99_batch1_ms": batch1["p99_ms"]}
        result, ensemble = self.result, self.ensemble
        result["inprocess"] = {"batches": self.batches, "limit": limit}
        result["served"] = [_with_ratios(row, limit) for row in self.served]
        result["paired"] = {"rounds": self.rounds, "summary": summarize_rounds(self.rounds, "batching")}
        if self.reference is not None:
            ref = ensemble["inprocess"]
            for row in ensemble["served"]:
                row["overhead_pct"] = (None if row["p50_ms"] is None or not ref["p50_ms"]
                                       else round((row["p50_ms"] / ref["p50_ms"] - 1) * 100, 1))
                row["throughput_ratio"] = _ratio(row["throughput"], ref["throughput"])
            ensemble["summary"] = summarize_rounds(ensemble["rounds"], None).get("all", {})
            self.reference.close()
        result["ensemble"] = ensemble
        result["memory"] = self.memory
        result["payload"]["recommendation"] = recommend(result["payload"])
        result["targets"] = report.judge_targets(result["paired"]["summary"], ensemble, self.settings["transports"])
        result["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        result["wall_s"] = round(time.monotonic() - self.started, 1)

        out = self.out
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench.md").write_text(report.markdown(result))
        report.plot(result, out / "bench.png")
        errors = (sum(r["errors"] for r in result["served"]) + sum(r["errors"] for r in self.rounds)
                  + sum(r["errors"] for r in ensemble.get("served", []) + ensemble.get("rounds", [])))
        print(f"bench: wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} "
              f"in {result['wall_s']} s", flush=True)
        for t in result["targets"]:
            print(f"bench: target {t['description']}: {t['value']} (second figure {t['second_value']}) -> "
                  f"{t['verdict']} ({t['basis']})")
        if errors:
            print(f"bench: {errors} requests failed; see first_error in {out / 'bench.json'}", file=sys.stderr)
            return 1
        return 0


def _served_cpu(row: dict) -> float | None:
    if row.get("server_cpu_ms_per_photo") is None:
        return None
    return row["server_cpu_ms_per_photo"] + (row.get("client_cpu_ms_per_photo") or 0.0)


def _diff(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else round(value - base, 3)


def summarize_rounds(rounds: Sequence[dict], group: str | None) -> dict:
    """Median, min and max over the rounds of every numeric figure, per ``group`` value (or "all")."""
    groups: dict[str, list[dict]] = {}
    for row in rounds:
        groups.setdefault(row[group] if group else "all", []).append(row)
    summary = {}
    for key, rows in groups.items():
        figures = {}
        for name in rows[0]:
            values = [r[name] for r in rows if isinstance(r.get(name), int | float) and not isinstance(r[name], bool)]
            if name in ("round", "errors") or not values:
                continue
            figures[name] = {"median": round(float(np.median(values)), 3), "min": round(min(values), 3),
                             "max": round(max(values), 3), "n": len(values)}
        summary[key] = figures
    return summary


def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    import tensorflow as tf

    bench.result["environment"]["tensorflow"] = tf.__version__
    bench.inprocess_sweep()
    bench.start_ensemble_reference()
    payload_photos = [p.data for p in bench.photos[: bench.settings["payload_photos"]]]
    bench.result["payload"] = payload.payload_table(bench.settings["model"], payload_photos, bench.model.size,
                                                     bench.model.resize)
    bench.result["payload"]["p50_c1_ms"] = {}
    bench.serve_and_measure()
    return bench.finish()


def payload_latencies(model: inprocess.LoadedModel, photos, server: srv.EmbeddedServer, settings: dict,
                      sweep: Sequence[dict]) -> dict:
    """Served p50 at concurrency 1 of each accepted format (JPEG bytes and uint8 pixels, both transports).

    JPEG at concurrency 1 is taken from the sweep just measured on the same server when it is there.
    """
    latencies = {}
    for key, transport in (("jpeg_grpc", "grpc"), ("jpeg_rest_b64", "rest")):
        row = next((r for r in sweep if r["transport"] == transport and r["concurrency"] == 1), None)
        if row is not None and settings["signature"] == contract.SIGNATURE_BYTES:
            latencies[key] = row["p50_ms"]
    pixels = [{contract.INPUT_PIXELS: payload.prepared_pixels(p.data, model.size, model.resize)} for p in photos]
    jpeg = [{contract.INPUT_IMAGE_BYTES: np.array([p.data], dtype=object)} for p in photos]
    cases = ((contract.SIGNATURE_BYTES, jpeg, ("jpeg_grpc", "jpeg_rest_b64")),
             (contract.SIGNATURE_PIXELS, pixels, ("uint8_grpc", "uint8_rest_json")))
    for signature, inputs, keys in cases:
        work = Workload(model.name, signature, inputs, model.labels)
        for key, transport in zip(keys, ("grpc", "rest"), strict=True):
            if transport in settings["transports"] and key not in latencies:
                latencies[key] = measure_point(work, transport, server, 1, settings)["p50_ms"]
    return latencies


def recommend(pay: dict) -> str:
    """Which request format users should send, derived from the measured sizes and latencies."""
    sizes, rel, lat = pay["mean_bytes"], pay["relative_to_jpeg_grpc"], pay.get("p50_c1_ms", {})
    accepted = ("jpeg_grpc", "jpeg_rest_b64", "uint8_grpc", "uint8_rest_json")
    smallest = min(accepted, key=lambda k: sizes[k])
    timed = [k for k in accepted if lat.get(k) is not None]
    fastest = min(timed, key=lambda k: lat[k]) if timed else None
    parts = [f"Per photo: JPEG {sizes['jpeg_grpc']} bytes over gRPC, {sizes['jpeg_rest_b64']} as b64 JSON; "
             f"uint8 pixels at {contract.size_text(pay['input_size'])} px {sizes['uint8_grpc']} over gRPC "
             f"(x{rel['uint8_grpc']}), "
             f"{sizes['uint8_rest_json']} as JSON (x{rel['uint8_rest_json']}); float JSON "
             f"{sizes['float_rest_json']} (x{rel['float_rest_json']})."]
    parts.append(f"Smallest accepted format: {smallest}" + (f"; fastest at concurrency 1: {fastest} "
                                                             f"({lat[fastest]} ms p50)." if fastest else "."))
    if smallest.startswith("jpeg"):
        parts.append("Recommendation: send the JPEG file's bytes to `serving_default` (gRPC, or b64 over REST); "
                     "use `serving_pixels` only when the client already holds decoded, resized views (as the "
                     "ensemble does for its TTA views); never send float JSON.")
    else:
        parts.append("At this model's input size, pixels are smaller than the JPEG files: clients that already "
                     "resize can send uint8 pixels to `serving_pixels`; JPEG bytes stay the simplest path, float "
                     "JSON is never worth it.")
    return " ".join(parts)
