"""Locust load test of a TF-Serving-compatible deployment over gRPC and REST.

Two users, one per protocol, each sending real photos to a backbone and to ``car_ensemble`` (weighted):

* ``GrpcPredictUser``: a ``tensorflow.serving.PredictionService`` stub on one channel per user, behind a
  client interceptor that reports every call through locust's ``events.request``;
* ``RestPredictUser``: ``{"instances": [{"image_bytes": {"b64": ...}}]}`` POSTed to ``:predict``.

Every answer is checked for content (probabilities form a distribution, the label is one of the model's
labels and names the most probable class), not only for its status. Only the public TF Serving API is used,
so the same file runs unchanged against the embedded server and against a real TF Serving (point
``--ensemble-grpc-host``/``--ensemble-rest-host`` at the ensemble gateway there).

    locust --config loadtest/locust.conf            # or: make loadtest
"""

from __future__ import annotations

# gRPC must run on gevent's loop (locust's concurrency model) before any channel is created.
import grpc  # isort: skip
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import contextlib  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import FastHttpUser, User, events, task  # noqa: E402
from locust import log as locust_log  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner  # noqa: E402

from carclf.errors import CarClfError, error_for_code  # noqa: E402
from carclf.loadtest import checks, protocol, thresholds  # noqa: E402
from carclf.loadtest.photos import load_photos  # noqa: E402

# TF Serving's protocol modules without TensorFlow's runtime (carclf.tfprotos): each locust process
# stays small, and building the workload at test start does not eat into --run-time.
from carclf.tfprotos import prediction_service_pb2_grpc  # noqa: E402

log = logging.getLogger("carclf.loadtest")


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("carclf", "What to load-test (each flag has an environment variable)")
    group.add_argument("--target-model", env_var="LOCUST_TARGET_MODEL", default="mobilenet_v2",
                       help="backbone model name to call")
    group.add_argument("--ensemble-model", env_var="LOCUST_ENSEMBLE_MODEL", default="car_ensemble",
                       help="ensemble model name to call")
    group.add_argument("--backbone-weight", env_var="LOCUST_BACKBONE_WEIGHT", type=int, default=3,
                       help="relative weight of the backbone tasks")
    group.add_argument("--ensemble-weight", env_var="LOCUST_ENSEMBLE_WEIGHT", type=int, default=1,
                       help="relative weight of the ensemble tasks (0: no ensemble calls)")
    group.add_argument("--photo-folder", env_var="LOCUST_PHOTO_FOLDER", default="data/sample",
                       help="folder of real photos (searched recursively)")
    group.add_argument("--signature", env_var="LOCUST_SIGNATURE", default="serving_default",
                       help="serving_default (JPEG bytes) or serving_pixels (uint8 pixels)")
    group.add_argument("--grpc-host", env_var="LOCUST_GRPC_HOST", default="127.0.0.1:8500",
                       help="host:port of the gRPC PredictionService (REST uses --host)")
    group.add_argument("--ensemble-grpc-host", env_var="LOCUST_ENSEMBLE_GRPC_HOST", default="",
                       help="host:port serving the ensemble over gRPC (default: --grpc-host)")
    group.add_argument("--ensemble-rest-host", env_var="LOCUST_ENSEMBLE_REST_HOST", default="",
                       help="http://host:port serving the ensemble over REST (default: --host)")
    group.add_argument("--labels-file", env_var="LOCUST_LABELS_FILE", default="",
                       help="labels.txt or classes.json answers are checked against "
                            "(default: the model's assets/labels.txt under --model-repository)")
    group.add_argument("--model-repository", env_var="LOCUST_MODEL_REPOSITORY", default="model_repository",
                       help="local model repository to read labels from (optional)")
    group.add_argument("--request-timeout", env_var="LOCUST_REQUEST_TIMEOUT", type=float, default=30.0,
                       help="seconds before one call fails")
    group.add_argument("--think-time", env_var="LOCUST_THINK_TIME", type=float, default=0.0,
                       help="seconds each user waits between calls (0: closed loop)")
    group.add_argument("--max-fail-ratio", env_var="LOCUST_MAX_FAIL_RATIO", type=float, default=0.0,
                       help="exit non-zero when the failure ratio is above this")
    group.add_argument("--max-p95-ms", env_var="LOCUST_MAX_P95_MS", type=float, default=0.0,
                       help="exit non-zero when the overall p95 latency is above this (0: off)")


@dataclass
class Workload:
    """Everything the users of one locust process share, built once from the parsed options."""

    options: object
    photos: list = field(default_factory=list)
    grpc_requests: dict = field(default_factory=dict)  # model -> [PredictRequest per photo]
    rest_bodies: dict = field(default_factory=dict)  # model -> [JSON body per photo]
    labels: dict = field(default_factory=dict)  # model -> labels or None

    @classmethod
    def build(cls, options) -> Workload:
        work = cls(options, load_photos(options.photo_folder))
        models = [options.target_model] + ([options.ensemble_model] if options.ensemble_weight > 0 else [])
        inputs = [protocol.photo_inputs(options.signature, p.data, f"photo {p.name!r} of {options.photo_folder}")
                  for p in work.photos]
        fallback = None
        for model in models:
            work.grpc_requests[model] = [protocol.grpc_request(model, options.signature, x) for x in inputs]
            work.rest_bodies[model] = [protocol.rest_body(options.signature, x) for x in inputs]
            labels = (checks.read_labels(options.labels_file) if options.labels_file
                      else checks.repository_labels(options.model_repository, model))
            fallback = fallback if labels is None else labels
            work.labels[model] = labels if labels is not None else fallback
        for model, labels in work.labels.items():
            if labels is None:
                log.warning("no labels for %r (give --labels-file): answers are checked for consistency only",
                            model)
        log.info("workload: %d photos from %s, models %s, signature %s", len(work.photos),
                 options.photo_folder, models, options.signature)
        return work

    def validate_grpc(self, request, response) -> None:
        outputs = protocol.grpc_outputs(response)
        checks.check_prediction(outputs, self.labels.get(request.model_spec.name))


_workload: Workload | None = None
_built_from: dict = {}
_unbuilt = False  # a worker whose workload could not be built (its master was told): its users stop at once
WORKLOAD_ERROR = "carclf_workload_error"  # the message a worker sends its master then


def workload() -> Workload:
    if _workload is None:
        if _unbuilt:
            raise StopUser()
        raise RuntimeError("the workload is built when locust starts (init) or at test start (workers)")
    return _workload


def _prepare(environment) -> None:
    """Build the shared requests and set the task weights, once per set of options."""
    global _workload, _built_from
    options = environment.parsed_options
    if _workload is not None and _built_from == vars(options):
        return  # options unchanged (the web UI may change them between runs)
    try:
        _workload, _built_from = Workload.build(options), dict(vars(options))
    except CarClfError:
        environment.process_exit_code = 2
        raise
    for user_class in (GrpcPredictUser, RestPredictUser):
        user_class.tasks = ([user_class.predict_backbone] * max(0, options.backbone_weight)
                            + [user_class.predict_ensemble] * max(0, options.ensemble_weight))
    RestPredictUser.network_timeout = RestPredictUser.connection_timeout = options.request_timeout


# parsed option (attribute) of each setting that run.check_settings checks, where the names differ
OPTION_NAMES = {"users": "num_users"}


def check_options(options, files: bool = True) -> None:
    """The checks ``python -m carclf.loadtest.run`` makes before it starts locust, for a plain ``locust`` run:
    ConfigError naming the setting and its value (numbers in range, a run time > 0, a known signature; with
    ``files`` also the photos and the labels file, which a distributed run's master may not have)."""
    from carclf.loadtest.run import NUMBERS, check_settings

    settings = {}
    for key in NUMBERS:
        value = getattr(options, OPTION_NAMES.get(key, key.replace("-", "_")), None)
        if value is not None:
            settings[key] = str(value)
    if getattr(options, "run_time", None) is not None:  # locust has parsed it to seconds; 0 would mean no limit
        settings["run-time"] = f"{options.run_time}s"
    settings.update({"photo-folder": options.photo_folder, "signature": options.signature,
                     "labels-file": options.labels_file, "ensemble-rest-host": options.ensemble_rest_host})
    check_settings(settings, files=files)


@events.init.add_listener
def _prepare_local(environment, **_kwargs) -> None:
    """A single-process run checks its options and builds its workload before the run time starts counting; a
    distributed run's master checks the options that do not name its workers' files. A bad setting ends it at
    once with one line and exit status 2, as under ``carclf.loadtest.run``."""
    runner = environment.runner
    if environment.parsed_options is None or isinstance(runner, WorkerRunner):
        return
    master = isinstance(runner, MasterRunner)
    try:
        check_options(environment.parsed_options, files=not master)
        if not master:
            _prepare(environment)
    except CarClfError as exc:
        log.error("cannot start the load test: %s", exc.message)
        if master:
            _stop_forked_workers()
        sys.exit(2)  # SystemExit passes through locust's event handler (it catches Exception only)
    if master:
        runner.register_message(WORKLOAD_ERROR, _on_workload_error)


def _stop_forked_workers() -> None:
    """Kill the workers ``--processes N`` forked from this master: locust's own clean-up at exit takes them for
    exited at once (it reads ``waitpid(pid, WNOHANG)``'s (0, 0) as an exit), and they would stay behind,
    ready to join the next master on the same port. They have done nothing yet."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            child.kill()


def _on_workload_error(environment, msg, **_kwargs) -> None:
    """Master: a worker could not build its workload (its photos or labels): the run ends with exit status 2."""
    log.error("cannot start the load test: worker %s: %s", msg.node_id, msg.data)
    environment.process_exit_code = 2
    gevent.spawn(environment.runner.quit)  # not from this greenlet: quit() kills the master's greenlets


@events.test_start.add_listener
def _prepare_worker(environment, **_kwargs) -> None:
    """Workers build theirs at test start, when the master's options have arrived (a single process again only
    if the web UI changed them). A worker that cannot says so in one line, tells its master (which ends the
    run with exit status 2), and its users stop at once."""
    global _unbuilt
    if isinstance(environment.runner, MasterRunner):
        return
    try:
        _prepare(environment)
    except CarClfError as exc:
        if not isinstance(environment.runner, WorkerRunner):
            log.error("cannot build the workload: %s", exc.message)
            raise
        log.error("cannot build the workload on this worker: %s", exc.message)
        _unbuilt = True
        environment.runner.send_message(WORKLOAD_ERROR, exc.message)


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    """The end of a run, in this order: users still running are stopped, the CSV files get their final pass,
    the thresholds decide the exit status. At the end of the run time the users have stopped already; on
    SIGTERM (how ``carclf.loadtest.run`` stops locust on Ctrl-C) locust fires this event while they still
    run and writes no HTML report, so the users are stopped here and the HTML written, and the CSV files, the
    printed table and the verdict all count the same requests."""
    if environment.parsed_options is None or isinstance(environment.runner, WorkerRunner):
        return
    stopped_here = environment.runner.state in (STATE_SPAWNING, STATE_RUNNING)
    if stopped_here:
        environment.runner.stop()
    _final_csv_rows(environment)
    if stopped_here and getattr(environment.parsed_options, "html_file", None):
        _write_html_report(environment)
    _enforce_thresholds(environment)


def _stop_csv_writer_before_its_files_close() -> None:
    """Locust (2.47) closes its CSV files at exit without stopping the greenlet that rewrites them every second;
    a ``--processes`` master then waits for its workers (a gevent sleep), and that greenlet, run again, ends in
    "ValueError: I/O operation on closed file" tracebacks after the verdict. The writer greenlet is remembered
    when it starts and stopped before its files close."""
    from locust.stats import StatsCSVFileWriter

    write, close = StatsCSVFileWriter.stats_writer, StatsCSVFileWriter.close_files

    def stats_writer(self) -> None:
        self.carclf_writer = gevent.getcurrent()
        write(self)

    def close_files(self) -> None:
        writer = getattr(self, "carclf_writer", None)
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=True, timeout=5)
        close(self)

    StatsCSVFileWriter.stats_writer, StatsCSVFileWriter.close_files = stats_writer, close_files


_stop_csv_writer_before_its_files_close()


def _final_csv_rows(environment) -> None:
    """Let locust's CSV writer (it rewrites the files once a second) take one more pass now that the users
    have stopped, so that the CSV files hold the same final counts as the printed table."""
    from locust.stats import CSV_STATS_INTERVAL_SEC

    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


def _write_html_report(environment) -> None:
    """Locust's HTML report at ``--html``, as locust writes it at the end of a run that was not stopped."""
    from locust.html import get_html_report, process_html_filename

    options = environment.parsed_options
    process_html_filename(options)
    path = Path(options.html_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(get_html_report(environment, show_download_link=False), encoding="utf-8")


def _enforce_thresholds(environment) -> None:
    """Decide a headless run's exit status by the thresholds: 1 when the failure ratio is above
    ``--max-fail-ratio`` or the p95 above ``--max-p95-ms``, 0 otherwise. (Left alone, locust exits 1 on any
    failed request, whatever the ratio allows.) A status already set (2: bad settings) and an exception raised
    in the users' own code still fail the run."""
    if environment.process_exit_code == 2:  # the run could not start as set: that, not its figures, decides
        return
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) if total.num_requests else None
    problems = thresholds.violations(total.num_requests, total.num_failures, p95,
                                     max_fail_ratio=environment.parsed_options.max_fail_ratio,
                                     max_p95_ms=environment.parsed_options.max_p95_ms)
    for problem in problems:
        log.error("load test failed: %s", problem)
    if problems:
        environment.process_exit_code = 1
    elif (environment.process_exit_code is None and not environment.runner.exceptions
          and not locust_log.unhandled_greenlet_exception):
        if total.num_failures:
            log.info("load test passed: %d of %d requests failed, within --max-fail-ratio %s",
                     total.num_failures, total.num_requests, environment.parsed_options.max_fail_ratio)
        environment.process_exit_code = 0


class ReportingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary gRPC call, checks its answer, and reports it once through ``events.request``."""

    def __init__(self, environment, validate: Callable[[object, object], None] | None = None):
        self.environment = environment
        self.validate = validate

    def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        model = getattr(getattr(request, "model_spec", None), "name", "")
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        response, exception = None, None
        try:
            response = call.result()
        except grpc.RpcError as exc:  # reported as the product's typed error: "NOT_FOUND: ..." in the stats
            exception = error_for_code(exc.code().name, f"{exc.code().name}: {exc.details()}")
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if exception is None and self.validate is not None:
            try:
                self.validate(request, response)
            except Exception as exc:  # noqa: BLE001 - any bad answer is a failed request
                exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=f"{method.rsplit('/', 1)[-1]} {model}".strip(),
            response_time=elapsed_ms, response_length=response.ByteSize() if response is not None else 0,
            response=response, context={}, exception=exception)
        return call


class GrpcPredictUser(User):
    """Calls ``PredictionService/Predict`` over one gRPC channel per user (per distinct host)."""

    def wait_time(self) -> float:
        return workload().options.think_time

    def on_start(self) -> None:
        if _unbuilt:
            return  # its first task stops it (StopUser), quietly; raised here, locust would log a traceback
        work = workload()
        self.rng = random.Random(id(self))
        interceptor = ReportingInterceptor(self.environment, work.validate_grpc)
        targets = {work.options.grpc_host, work.options.ensemble_grpc_host or work.options.grpc_host}
        self.channels = {t: grpc.insecure_channel(t, options=protocol.GRPC_CHANNEL_OPTIONS) for t in targets}
        self.stubs = {t: prediction_service_pb2_grpc.PredictionServiceStub(grpc.intercept_channel(c, interceptor))
                      for t, c in self.channels.items()}

    # No on_stop closing the channels: closing them under grpc's gevent mode is a known abort of the whole
    # process (gRPC issue 20299). A user's channel is one connection, released when the process ends.

    def _predict(self, model: str, target: str) -> None:
        request = self.rng.choice(workload().grpc_requests[model])
        try:
            self.stubs[target].Predict(request, timeout=workload().options.request_timeout)
        except grpc.RpcError as exc:  # already reported as a failure by the interceptor
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                gevent.sleep(protocol.UNANSWERED_BACKOFF_S)

    @task
    def predict_backbone(self) -> None:
        options = workload().options
        self._predict(options.target_model, options.grpc_host)

    @task
    def predict_ensemble(self) -> None:
        options = workload().options
        self._predict(options.ensemble_model, options.ensemble_grpc_host or options.grpc_host)


class RestPredictUser(FastHttpUser):
    """POSTs b64 JPEG instances to ``/v1/models/<model>:predict`` (locust's ``--host`` is the REST URL)."""

    def wait_time(self) -> float:
        return workload().options.think_time

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    def _predict(self, model: str, base_url: str) -> None:
        work = workload()
        path = protocol.rest_path(model)
        body = self.rng.choice(work.rest_bodies[model])
        with self.client.post(base_url.rstrip("/") + path, data=body, name=f"POST {path}",
                              headers={"Content-Type": "application/json"}, catch_response=True) as reply:
            if not reply.status_code:  # no HTTP answer: say why (refused, reset, timed out)
                error = reply.error
                reply.failure(f"no answer from {base_url or self.host}: {type(error).__name__}: {error}"
                              if error else f"no answer from {base_url or self.host}")
                gevent.sleep(protocol.UNANSWERED_BACKOFF_S)
                return
            if reply.status_code != 200:
                reply.failure(f"HTTP {reply.status_code}: {(reply.text or '')[:200]}")
                if reply.status_code == 503:
                    gevent.sleep(protocol.UNANSWERED_BACKOFF_S)
                return
            try:
                checks.check_prediction(protocol.rest_outputs(reply.json()), work.labels.get(model))
            except Exception as exc:  # noqa: BLE001 - any bad answer is a failed request
                reply.failure(f"{type(exc).__name__}: {exc}")

    @task
    def predict_backbone(self) -> None:
        self._predict(workload().options.target_model, "")

    @task
    def predict_ensemble(self) -> None:
        options = workload().options
        self._predict(options.ensemble_model, options.ensemble_rest_host)
