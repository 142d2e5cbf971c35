"""REST transport (aiohttp): TF Serving's /v1 API, Prometheus metrics, readiness and liveness.

Paths follow TF Serving's two patterns, matched case-insensitively::

    POST /v1/models/<name>[/versions/<N> | /labels/<L>]:(predict|classify|regress)
    GET  /v1/models/<name>[/versions/<N> | /labels/<L>][/metadata]

Other /v1 paths answer 400 ``Malformed request``, other paths 404. Every error body is
``{"error": "<message>"}``; ``HTTP_STATUS`` is the one place where error codes become HTTP statuses.
Extensions: ``GET /v1/ready`` (200 when every model has an AVAILABLE version and the server is not
draining, else 503) and ``GET /v1/live`` (200 while the process answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from urllib.parse import unquote

from aiohttp import web

from carclf.cancel import CancelToken
from carclf.errors import CarClfError, InvalidInput, NotFound, RequestTooLarge, Unimplemented
from carclf.serving import apis, content_coding, json_codec
from carclf.serving.config import MonitoringConfig
from carclf.serving.gate import TRANSPORT_GRACE_S, BodyTimeout, RequestGate
from carclf.serving.manager import ModelManager
from carclf.serving.metrics import CONTENT_TYPE, ServingMetrics
from carclf.serving.predictor import Predictor, result_of
from carclf.serving.validation import DEFAULT_SIGNATURE

log = logging.getLogger(__name__)

ENTRYPOINT = "REST"
JSON = "application/json"
# Bodies larger than this are decoded off the event loop (a float-list image is slow JSON).
OFFLOAD_DECODE_BYTES = 256 * 1024

PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)",
                          re.IGNORECASE)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
                         re.IGNORECASE)
READY_PATH, LIVE_PATH = "/v1/ready", "/v1/live"

#: TF Serving's HTTP status for each error code (http_server.cc). The only such mapping.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def http_status(exc: CarClfError) -> int:
    if isinstance(exc, RequestTooLarge):
        return 413  # a body over the size limit: retrying later will not help, unlike other 429s
    if isinstance(exc, BodyTimeout):
        return 408  # the client's upload was too slow: nothing ran, unlike a 504
    return HTTP_STATUS.get(exc.code, 500)


def _json_response(doc: dict | bytes, status: int = 200) -> web.Response:
    body = doc if isinstance(doc, bytes) else json.dumps(doc, indent=1).encode()
    return web.Response(body=body, status=status, content_type=JSON)


def _error_response(exc: CarClfError) -> web.Response:
    return web.Response(body=json_codec.error_body(exc.message), status=http_status(exc), content_type=JSON)


class RestApi:
    def __init__(self, predictor: Predictor, manager: ModelManager, gate: RequestGate, *, monitoring: MonitoringConfig,
                 max_request_bytes: int, timeout_ms: int, executor: Executor | None = None,
                 extra_routes: Callable[[web.Application], None] | None = None):
        self._predictor, self._manager, self._gate = predictor, manager, gate
        self._extra_routes = extra_routes
        self._metrics: ServingMetrics = predictor.metrics
        self._monitoring = monitoring
        self._max_bytes = max_request_bytes
        self._timeout = timeout_ms / 1000.0
        self._executor = executor

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_bytes)
        if self._extra_routes is not None:  # e.g. the upload page; before the catch-all, which matches last
            self._extra_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._handle(request)
        if self._gate.draining:  # keep-alive ends: the client's next request opens a connection elsewhere
            response.force_close()
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.raw_path.split("?", 1)[0]
        method = request.method
        try:
            if self._monitoring.prometheus_enabled and path == self._monitoring.prometheus_path and method == "GET":
                return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})
            lower = path.lower()
            if lower == READY_PATH and method == "GET":
                return self._ready()
            if lower == LIVE_PATH and method == "GET":
                return _json_response({"live": True})
            if not lower.startswith("/v1/"):
                raise NotFound(f"Not found: {method} {path}")
            # The body is read before the request counts as in flight: an upload that stalls holds no drain
            body = await self._receive(request) if method == "POST" else b""
            with self._gate.request():
                return await self._dispatch(request, method, path, body)
        except CarClfError as exc:
            return _error_response(exc)
        except ConnectionError:  # the client left before its request arrived (aiohttp: "Connection lost")
            log.info("REST %s %s: the client closed the connection before its request body arrived", method, path)
            return web.Response(status=HTTP_STATUS["CANCELLED"])  # nobody reads it; nothing was run or counted
        except Exception as exc:  # noqa: BLE001 - never leak a traceback to the client
            log.exception("REST %s %s failed", method, path)
            return _json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)

    async def _dispatch(self, request: web.Request, method: str, path: str, body: bytes) -> web.Response:
        malformed = InvalidInput(f"Malformed request: {method} {path}")
        if method == "POST":
            match = PREDICT_PATH.fullmatch(path)
            if not match:
                raise malformed
            name, version, label = _model_info(*match.groups()[:3])
            verb = match.group(4).lower()
            api = {"predict": "Predict", "classify": "Classify", "regress": "Regress"}[verb]
            with self._metrics.track(name, api, ENTRYPOINT) as info:
                if verb == "predict":
                    return await self._predict(name, version, label, body, info)
                return await self._classify_or_regress(name, version, label, body, verb, info)
        if method == "GET":
            match = STATUS_PATH.fullmatch(path)
            if not match:
                raise malformed
            name, version, label = _model_info(*match.groups()[:3])
            if not name:
                raise InvalidInput("Missing model name in request.")
            if (match.group(4) or "").lower() == "metadata":
                with self._metrics.track(name, "GetModelMetadata", ENTRYPOINT) as info:
                    with self._predictor.acquire(name, version, label) as lease:
                        info["version"] = lease.version
                        return _json_response(apis.metadata_json(apis.metadata_response(lease, ["signature_def"])))
            return _json_response(apis.status_json(apis.status_response(self._manager, name, version, label)))
        raise malformed

    async def _receive(self, request: web.Request) -> bytes:
        """The request body, at most ``--max_request_bytes`` as sent and once inflated (``content_coding``),
        arrived within ``--rest_api_timeout_in_ms``."""
        length = request.content_length
        if length is not None and length > self._max_bytes:
            raise RequestTooLarge(f"request body is {length} bytes, larger than the limit of {self._max_bytes} "
                                  "bytes (--max_request_bytes)")
        # Where the host's runner let aiohttp inflate the body already (``auto_decompress``), it is plain here.
        inflated = getattr(request.content, "total_compressed_bytes", None) is not None
        applied = [] if inflated else content_coding.codings(request.headers.get("Content-Encoding"))
        try:
            body = await asyncio.wait_for(request.read(), self._timeout)
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLarge(f"request body is larger than the limit of {self._max_bytes} bytes "
                                  "(--max_request_bytes)") from None
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self._timeout:g} s "
                              "(--rest_api_timeout_in_ms); nothing was run") from None
        if not applied:
            return body
        # Off the loop whatever the body's size: a small body may inflate to the whole limit.
        return await self._in_worker(content_coding.decode, body, applied, self._max_bytes)

    async def _off_loop(self, size: int, function: Callable, *args):
        """Run CPU-heavy decoding in a worker thread when the body is large; inline otherwise."""
        if size < OFFLOAD_DECODE_BYTES:
            return function(*args)
        return await self._in_worker(function, *args)

    async def _in_worker(self, function: Callable, *args):
        """``function(*args)`` in the executor (inline where the API was given none)."""
        if self._executor is None:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _predict(self, name: str, version: int | None, label: str | None, body: bytes, info: dict):
        deadline = time.monotonic() + self._timeout
        doc = await self._off_loop(len(body), json_codec.parse_json, body)
        signature_name = json_codec.signature_name_of(doc) or DEFAULT_SIGNATURE
        lease = self._predictor.acquire(name, version, label)
        info["version"] = lease.version
        try:
            signature = lease.servable.signatures().get(signature_name)
            if signature is None:
                raise InvalidInput(f'Serving signature name: "{signature_name}" not found in signature def')
            parsed = json_codec.predict_body(doc)
            inputs = await self._off_loop(len(body), json_codec.decode_inputs, parsed, signature)
        except BaseException:
            lease.release()
            raise
        # Cancelled however the request ends (client gone, timeout, answered): whatever still works for it stops
        # (a queued request leaves its queue, an ensemble's member calls end).
        cancel = CancelToken()
        future = self._predictor.submit(lease, signature_name, inputs, deadline=deadline, cancel=cancel)
        try:
            result = await result_of(future, deadline)
        finally:
            cancel.cancel()
        return _json_response(json_codec.encode_outputs(result.outputs, parsed.format))

    async def _classify_or_regress(self, name, version, label, body: bytes, verb: str, info: dict):
        doc = json_codec.parse_json(body)
        signature_name = json_codec.signature_name_of(doc) or DEFAULT_SIGNATURE
        examples = doc.get("examples")
        if examples is None:
            raise InvalidInput(f"When method is {verb}, key 'examples' is expected and was not found")
        if not isinstance(examples, list) or not examples:
            raise InvalidInput("Expecting 'examples' value to be a non-empty list/array")
        with self._predictor.acquire(name, version, label) as lease:
            info["version"] = lease.version
            signature = lease.servable.signatures().get(signature_name)
            if signature is None:
                raise InvalidInput(f"No signature was found with the name: {signature_name}")
            kind, method = (("classification", "tensorflow/serving/classify") if verb == "classify"
                            else ("regression", "tensorflow/serving/regress"))
            if signature.method_name != method:
                raise InvalidInput(f"Expected {kind} signature method_name to be {method}. "
                                   f"Was: {signature.method_name}")
            raise Unimplemented(f"the embedded server runs Predict signatures only; {signature_name} is a {kind} "
                                "signature")

    def _ready(self) -> web.Response:
        models = self._manager.readiness()
        waiting = sorted(name for name, ok in models.items() if not ok)
        if self._gate.draining:
            return _json_response({"ready": False, "error": "server is shutting down", "models": models}, 503)
        if waiting or not models:
            error = f"no AVAILABLE version yet for: {', '.join(waiting)}" if waiting else "no model is configured"
            return _json_response({"ready": False, "error": error, "models": models}, 503)
        return _json_response({"ready": True, "models": models})


def _model_info(name: str | None, version: str | None, label: str | None) -> tuple[str, int | None, str | None]:
    parsed_version = None
    if version:
        try:
            parsed_version = int(version)
        except ValueError:
            raise InvalidInput(f"Failed to convert version: {version} to numeric.") from None
        if parsed_version >= 1 << 63:
            raise InvalidInput(f"Failed to convert version: {version} to numeric.")
    return unquote(name or ""), parsed_version, (unquote(label) if label else None)


async def start_rest(api: RestApi, host: str, port: int, idle_timeout_s: float) -> tuple[web.AppRunner, int]:
    """Bind and start; returns the runner and the bound port (``port`` 0 picks a free one). A connection with
    no request running for ``idle_timeout_s`` is closed, whether it idles between requests or has sent part of
    its headers (a request whose headers arrived is bounded by the REST timeout instead)."""
    # aiohttp's default would wait up to 60 s for handlers at shutdown; the server's drain has waited already.
    # handler_cancellation: a client that closes its connection cancels its handler, which takes its request
    # out of the batching queue or the worker pool if it has not started (a run already started finishes).
    # auto_decompress=False: bodies arrive as sent and RestApi inflates them within the size limit.
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, shutdown_timeout=TRANSPORT_GRACE_S,
                           keepalive_timeout=idle_timeout_s, handler_cancellation=True, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)

