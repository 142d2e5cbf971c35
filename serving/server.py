"""The embedded TF-Serving-compatible model server, wired together; usable in-process.

    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer

    server = ModelServer(ServerOptions(model_config_file="models.config", model_repository="repo",
                                       port=0, rest_api_port=-1)).start()   # returns once serving
    server.grpc_port, server.rest_port        # bound ports
    server.predictor.predict("mobilenet_v2", {"image_bytes": batch})   # in-process, no serialization
    server.stop()                             # drain in-flight requests, then shut down

Startup mirrors tensorflow_model_server: models are loaded (warmup included) before the ports open.
gRPC runs on grpc's synchronous server: a Predict runs in its handler thread (or waits there for its
batch). REST runs on one asyncio loop in its own thread; its predictions run in the batch threads or a
worker pool, never on the loop. ``stop`` (and SIGTERM in ``carclf serve``) sends gRPC clients a GOAWAY (their
channels reconnect elsewhere), refuses new REST requests with 503, lets in-flight ones finish (up to
``--drain_timeout_seconds``) and then shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from carclf import tf_threads
from carclf.errors import CarClfError, ConfigError, Unavailable
from carclf.serving.batching import BatchScheduler
from carclf.serving.config import (
    BasePathResolver,
    BatchingConfig,
    ModelsConfig,
    MonitoringConfig,
    SslConfig,
    load_batching_config,
    load_models_config,
    load_monitoring_config,
    load_ssl_config,
    parse_models_config,
    single_model_config,
)
from carclf.serving.gate import TRANSPORT_GRACE_S, RequestGate
from carclf.serving.manager import ModelManager, State
from carclf.serving.metrics import ServingMetrics
from carclf.serving.options import ANY_PORT, REST_DISABLED, ServerOptions
from carclf.serving.predictor import Predictor, PredictResult
from carclf.serving.savedmodel import SavedModelServable
from carclf.serving.servable import Servable

__all__ = ["ModelServer", "PredictResult", "Predictor", "ServerOptions", "load_ensemble"]

log = logging.getLogger("carclf.serving")

# The upload page's request around the photo's base64: {"instances": [{"b64": ...}]} and headers, with room to spare.
PAGE_REQUEST_OVERHEAD_BYTES = 4096


def apply_tf_threading(options: ServerOptions) -> None:
    """--tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism (0 keeps TF's default)."""
    asked = tf_threads.counts(options.tensorflow_intra_op_parallelism, options.tensorflow_inter_op_parallelism)
    refused = tf_threads.configure(**asked)
    for pool in refused:
        log.warning("TensorFlow is already initialised in this process; --tensorflow_%s_parallelism=%d has no "
                    "effect", pool, asked[pool])
    if not refused:
        log.info("TensorFlow threads: %s", tf_threads.describe(**asked))


def _ensemble_hook(path: str):
    """The module behind ``--ensemble_config_file``: ``carclf.ensemble.servable``."""
    try:
        from carclf.ensemble import servable as ensemble_servable
    except ImportError as exc:
        raise ConfigError(f"serving an ensemble needs carclf.ensemble.servable, which cannot be imported ({exc})",
                          source=path, field="--ensemble_config_file") from None
    return ensemble_servable


def check_ensemble(path: str) -> str | None:
    """The hook's ``check(path)``, when it has one: the config alone, validated before any model loads; the
    name of the model it declares, when the hook says."""
    check = getattr(_ensemble_hook(path), "check", None)
    name = check(path) if check is not None else None
    return name if isinstance(name, str) else None


def check_model_names(ensembles: list[tuple[str, str | None]], config: ModelsConfig | None) -> None:
    """ConfigError unless every model name is served once: no two ensemble files (path, declared name)
    declaring one name, and no ensemble named like a model of the models config (found before anything
    loads, naming both sources)."""
    declared: dict[str, str] = {}
    for path, name in ensembles:
        if name is not None and name in declared:
            raise ConfigError(f"declares model {name!r}, as {declared[name]} does; give one of them another name",
                              source=path, field="name")
        if name is not None:
            declared[name] = path
    for model in config.models if config is not None else ():
        if model.name in declared:
            raise ConfigError(f"declares model {model.name!r}, which {config.source or 'the model config'} "
                              "serves too; give one of them another name",
                              source=declared[model.name], field="name")


def load_ensemble(path: str, predictor: Predictor) -> Servable:
    """The ensemble hook: ``carclf.ensemble.servable.load(path, predictor) -> Servable``."""
    servable = _ensemble_hook(path).load(path, predictor)
    if not isinstance(servable, Servable):
        raise ConfigError(f"carclf.ensemble.servable.load returned {type(servable).__name__}, not a Servable",
                          source=path)
    return servable


class ModelServer:
    """One server: model manager, batching, predictor, gRPC and REST transports, pollers."""

    def __init__(self, options: ServerOptions):
        self.options = options.validated()
        self.resolver = BasePathResolver(self.options.repository_root())
        self.metrics = ServingMetrics()
        self.gate = RequestGate()
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self.manager: ModelManager | None = None
        self.predictor: Predictor | None = None
        self.batcher: BatchScheduler | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.monitoring = MonitoringConfig()
        self.ssl: SslConfig | None = None       # --ssl_config_file: TLS on the gRPC port
        self._config_text: str | None = None   # the config file's text in force
        self._failed_text: str | None = None   # a text that failed to apply: tried again every poll
        self._failed_message: str | None = None  # and why, logged again only when it reads differently
        self._read_problem: str | None = None  # the last read error, logged once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_transports: asyncio.Event | None = None
        self._health = None
        self._health_names: set[str] = set()  # the model names given a health status
        self._grpc_server = None
        self._grpc_pool: ThreadPoolExecutor | None = None
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # -- startup -----------------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Load the models, open the ports and return once both transports serve."""
        opts = self.options
        try:
            apply_tf_threading(opts)
            if opts.monitoring_config_file:
                self.monitoring = load_monitoring_config(opts.monitoring_config_file)
            # TLS material is checked before minutes of model loading
            self.ssl = load_ssl_config(opts.ssl_config_file) if opts.ssl_config_file else None
            self.executor = ThreadPoolExecutor(opts.worker_threads(), thread_name_prefix="carclf-serving")
            self.manager = ModelManager(self._load_version,
                                        allow_labels_for_unavailable=opts.allow_version_labels_for_unavailable_models,
                                        on_state=self._on_state)
            if opts.enable_batching:
                batching = load_batching_config(opts.batching_parameters_file) if opts.batching_parameters_file \
                    else BatchingConfig()
                self.batcher = BatchScheduler(batching, self.metrics,
                                              on_runtime=lambda name, s: self.predictor.record_runtime(name, s),
                                              early_dispatch=opts.batching_early_dispatch)
            self.predictor = Predictor(self.manager, self.metrics, batcher=self.batcher, executor=self.executor)
            # a bad ensemble config, or a name served twice, fails before minutes of model loading
            ensembles = [(path, check_ensemble(path)) for path in opts.ensemble_config_file]
            models = self._read_models_config() if opts.model_config_file or opts.model_base_path else None
            check_model_names(ensembles, models)
            if models is not None:
                self.manager.apply_config(models)
            for servable in self.static_servables():
                self.manager.add_static(servable)
            self._start_transports()
            self._start_poller()
        except BaseException:
            self._shutdown(drain_timeout=0)
            raise
        tls = "" if self.ssl is None else " (TLS, client certificates required)" if self.ssl.client_verify \
            else " (TLS)"
        log.info("Running gRPC ModelServer at %s:%d%s ...", opts.host, self.grpc_port, tls)
        if self.rest_port is not None:
            log.info("Exporting HTTP/REST API at:%s:%d ...", opts.host, self.rest_port)
            if opts.web_ui_model and opts.web_ui_model not in self.manager.model_names(active_only=False):
                log.warning("the upload page (/ui) asks model %r, which this server does not serve (yet); "
                            "--web_ui_model NAME picks another, --web_ui_model '' turns the page off",
                            opts.web_ui_model)
        return self

    def static_servables(self) -> list[Servable]:
        """Servables that are not versions of a model folder, loaded once at start: the ensembles of
        ``--ensemble_config_file``, whose members this server runs in-process. A subclass may serve others
        (the gateway's ensembles call remote members)."""
        return [load_ensemble(path, self.predictor) for path in self.options.ensemble_config_file]

    def _read_models_config(self) -> ModelsConfig:
        opts = self.options
        if opts.model_config_file:
            self._config_text = Path(opts.model_config_file).read_text(encoding="utf-8")
            return load_models_config(opts.model_config_file, self.resolver)
        return single_model_config(opts.model_name, opts.model_base_path, self.resolver)

    def _load_version(self, name: str, version: int, path: Path) -> Servable:
        self.resolver.check_version_folder(path)
        servable = SavedModelServable(name, version, path,
                                      warmup_iterations=self.options.num_request_iterations_for_warmup)
        if self.options.enable_model_warmup:
            start, status, count = time.perf_counter(), "OK", 0
            try:
                count = servable.warmup()
            except CarClfError as exc:
                status = exc.code
                servable.close()
                raise
            finally:
                self.metrics.warmup_latency.labels(str(path), status).observe((time.perf_counter() - start) * 1e6)
                self.metrics.warmup_records.inc(str(path), amount=count)
        return servable

    def _on_state(self, model: str, version: int, state: State) -> None:
        self.metrics.version_state.labels(model, str(version)).set(int(state))
        self._update_health()

    def _update_health(self) -> None:
        """grpc.health.v1 follows readiness (extension): each model's name is SERVING while it has an
        AVAILABLE version, and "" (the server) while every configured model has one, as ``/v1/ready`` says.
        TF Serving opens its ports only once its models have loaded, so a probe of "" cannot pass earlier
        there either; here the ports open at once and the other models serve meanwhile."""
        if self._health is None or self.manager is None:
            return
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.manager.readiness()
        for name in self._health_names - set(ready):  # left the config
            self._health.set(name, not_serving)
        for name, ok in ready.items():
            self._health.set(name, serving if ok else not_serving)
        self._health_names |= set(ready)
        self._health.set("", serving if ready and all(ready.values()) else not_serving)

    # -- transports --------------------------------------------------------------------------------

    def _start_transports(self) -> None:
        self._start_grpc()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="carclf-serving-loop", daemon=True)
        self._loop_thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:  # as asyncio.run does: connections' tasks cut off at shutdown end here, not in the collector
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _start_grpc(self) -> None:
        import grpc

        from carclf.serving.grpc_service import UnparsableRequestInterceptor, add_services

        opts = self.options
        if opts.enable_grpc_healthcheck_service:
            from grpc_health.v1 import health

            refresh = self._update_health

            class ReadinessHealth(health.HealthServicer):
                """Checks read the statuses fresh (a reload may add a model with no version yet)."""

                def Check(self, request, context):  # noqa: N802 - the gRPC method's name
                    refresh()
                    return super().Check(request, context)

            self._health = ReadinessHealth()
            self._update_health()
        self._grpc_pool = ThreadPoolExecutor(opts.grpc_threads(), thread_name_prefix="carclf-grpc")
        given = opts.channel_arguments()  # --grpc_channel_arguments: after the server's own, as in TF Serving
        own = [("grpc.max_receive_message_length", opts.max_request_bytes), ("grpc.max_send_message_length", -1),
               ("grpc.so_reuseport", 0)]
        named = {name for name, _ in given}
        server = grpc.server(self._grpc_pool, interceptors=[UnparsableRequestInterceptor()],
                             options=[*(o for o in own if o[0] not in named), *given])
        self._grpc_server = server
        add_services(server, self.predictor, self.manager, self.resolver, self.gate, health=self._health)
        address = f"[{opts.host}]:{opts.port}" if ":" in opts.host else f"{opts.host}:{opts.port}"
        try:
            if self.ssl is None:
                self.grpc_port = server.add_insecure_port(address)
            else:  # as TF Serving: a client certificate is required (and verified) only with client_verify
                credentials = grpc.ssl_server_credentials(
                    [(self.ssl.server_key, self.ssl.server_cert)], root_certificates=self.ssl.custom_ca,
                    require_client_auth=self.ssl.client_verify)
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind the gRPC port {address}: {exc}", source="--port") from None
        if not self.grpc_port:
            raise ConfigError(f"cannot bind the gRPC port {address}", source="--port")
        server.start()

    async def _serve(self) -> None:
        from carclf.serving.rest import RestApi, start_rest

        opts = self.options
        self._stop_transports = asyncio.Event()
        runner = None
        try:
            if opts.rest_api_port != REST_DISABLED:
                api = RestApi(self.predictor, self.manager, self.gate, monitoring=self.monitoring,
                              max_request_bytes=opts.max_request_bytes, timeout_ms=opts.rest_api_timeout_in_ms,
                              executor=self.executor, extra_routes=_upload_page_routes(opts.web_ui_model,
                                                                                 opts.max_request_bytes))
                try:
                    runner, self.rest_port = await start_rest(
                        api, opts.host, 0 if opts.rest_api_port == ANY_PORT else opts.rest_api_port,
                        opts.rest_api_idle_timeout_seconds)
                except OSError as exc:
                    raise ConfigError(f"cannot bind the REST port {opts.host}:{opts.rest_api_port}: {exc}",
                                      source="--rest_api_port") from None
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
        self._started.set()
        if self._start_error is None:
            await self._stop_transports.wait()
        if runner is not None:
            await runner.cleanup()

    # -- polling -----------------------------------------------------------------------------------

    def _start_poller(self) -> None:
        opts = self.options
        fs_every = opts.file_system_poll_wait_seconds if opts.file_system_poll_wait_seconds > 0 else math.inf
        cfg_every = (opts.model_config_file_poll_wait_seconds
                     if opts.model_config_file and opts.model_config_file_poll_wait_seconds > 0 else math.inf)
        if math.isinf(fs_every) and math.isinf(cfg_every):
            return
        self._poller = threading.Thread(target=self._poll_forever, args=(fs_every, cfg_every),
                                        name="carclf-serving-poller", daemon=True)
        self._poller.start()

    def _poll_forever(self, fs_every: float, cfg_every: float) -> None:
        now = time.monotonic()
        next_fs, next_cfg = now + fs_every, now + cfg_every
        while not self._stop_polling.wait(max(0.0, min(next_fs, next_cfg) - time.monotonic())):
            now = time.monotonic()
            if now >= next_cfg:
                next_cfg = now + cfg_every
                self._reload_config_file()
            if now >= next_fs:
                next_fs = now + fs_every
                try:
                    self.manager.poll()
                except Exception:  # noqa: BLE001 - polling must go on
                    log.exception("file-system poll failed")

    def _reload_config_file(self) -> None:
        """Apply the config file when its text differs from the config in force. A text that was refused is
        tried again every poll, as TF Serving re-reads its file, so that it applies once what it waits for is
        there (a labelled version exported after the config was written); its refusal is logged again only
        when it reads differently. A read error is logged once until it changes."""
        path = self.options.model_config_file
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror or exc}"
            if problem != self._read_problem:
                log.error("%s; the current model config stays in force", problem)
                self._read_problem = problem
            return
        self._read_problem = None
        if text == self._config_text:
            return
        again = text == self._failed_text
        if not again:
            log.info("%s changed: reloading the model config", path)
        try:
            self.manager.apply_config(parse_models_config(text, self.resolver, source=path))
        except CarClfError as exc:
            if not again or exc.message != self._failed_message:
                log.error("config reload from %s failed; the previous config stays in force (tried again every "
                          "poll until it applies or the file changes): %s", path, exc.message)
            self._failed_text, self._failed_message = text, exc.message
            return
        if again:
            log.info("%s applied on a later try", path)
        self._config_text, self._failed_text, self._failed_message = text, None, None

    # -- shutdown ----------------------------------------------------------------------------------

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Refuse new requests, let in-flight ones finish (up to ``drain_timeout``, default
        ``--drain_timeout_seconds``; then requests still queued for a batch are refused unrun and running batches
        get as long again), shut everything down. True if every in-flight request finished within the timeout.

        When requests still run after both waits, the shutdown does not wait for them (TensorFlow cannot stop
        a running batch): their threads end on their own, and ``carclf serve`` exits 1 without joining them."""
        return self._shutdown(self.options.drain_timeout_seconds if drain_timeout is None else drain_timeout)

    def _shutdown(self, drain_timeout: float) -> bool:
        with self._stop_lock:
            if self._stopped.is_set():
                return True
            self.gate.start_draining()
            if self.batcher is not None:  # nothing new can join an open batch: it goes now, not at its timeout
                self.batcher.flush()
            if self._health is not None:
                self._health.enter_graceful_shutdown()
            if self._grpc_server is not None:
                # GOAWAY now, as the REST side closes its keep-alive connections: gRPC channels reconnect (through
                # a load balancer, to a replica still serving) instead of sending their next calls here. Calls
                # in flight keep the whole drain; the stop below shortens the grace once they have finished.
                self._grpc_server.stop(grace=2 * drain_timeout + 2 * TRANSPORT_GRACE_S)
            finished = drained = self.gate.wait_idle(drain_timeout)
            if not drained:
                inflight = self.gate.inflight
                refused = 0
                if self.batcher is not None:  # what has not started will not: its callers hear so at once
                    refused = self.batcher.refuse_queued(Unavailable(
                        f"server is shutting down: the request was still queued after the {drain_timeout:g} s "
                        "drain (--drain_timeout_seconds) and was not run; send it again"))
                log.warning("%d request(s) still in flight after %.1f s: %d refused unrun from the batching "
                            "queue; waiting up to %.1f s more for the batches that are running (they cannot be "
                            "stopped)", inflight, drain_timeout, refused, drain_timeout)
                finished = self.gate.wait_idle(drain_timeout)
                if not finished:  # nothing below waits for them: the process may exit while they run
                    log.warning("%d request(s) still running; shutting down without them", self.gate.inflight)
            self._stop_polling.set()
            if self._poller is not None:  # a version it is loading is not waited for: it is dropped once loaded
                self._poller.join(TRANSPORT_GRACE_S)
            if self._loop is not None and self._loop_thread is not None and self._loop_thread.is_alive():
                if self._stop_transports is not None:
                    self._loop.call_soon_threadsafe(self._stop_transports.set)
                self._loop_thread.join()
            if self._grpc_server is not None:
                self._grpc_server.stop(grace=TRANSPORT_GRACE_S).wait()
            if self._grpc_pool is not None:
                self._grpc_pool.shutdown(wait=finished)
            if self.batcher is not None:
                self.batcher.close(timeout=30.0 if finished else 0.0)
            if self.manager is not None:
                self.manager.close(timeout=max(drain_timeout, 1.0) if finished else 0.0)
            if self.executor is not None:
                self.executor.shutdown(wait=finished, cancel_futures=True)
            self._stopped.set()
            log.info("server stopped")
            return drained

    @property
    def still_loading(self) -> bool:
        """After ``stop``: a version load begun before it is still running (in a daemon thread)."""
        return self._poller is not None and self._poller.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _upload_page_routes(model: str, max_request_bytes: int):
    """The upload page of carclf.clients (GET /ui), asking ``model``; None when the page is off. The page
    refuses in the browser a photo whose request (base64 in JSON) would exceed ``max_request_bytes``."""
    if not model:
        return None
    from carclf import contract
    from carclf.clients.web.app import PageSettings, add_routes

    largest_photo = (max_request_bytes - PAGE_REQUEST_OVERHEAD_BYTES) * 3 // 4  # base64: 4 bytes per 3
    settings = PageSettings(model=model, max_bytes=max(1, min(contract.MAX_IMAGE_BYTES, largest_photo)))
    return lambda app: add_routes(app, settings)
