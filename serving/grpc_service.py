"""gRPC transport: tensorflow.serving.PredictionService and ModelService (+ grpc.health.v1).

Handlers only decode, call the shared core (``Predictor``, ``ModelManager``, ``apis``) and encode.
``GRPC_CODES`` is the one place where the product's errors become gRPC status codes.

The services run on grpc's synchronous server, one handler thread per request in flight, as TF Serving's
C++ server does: grpc's C core does the network work without the GIL, and a Predict runs in its handler
thread whenever the batch scheduler has a free slot and nothing to merge it with (no hand-off to another
thread and back); otherwise the handler waits for its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from carclf.cancel import CancelToken
from carclf.errors import CarClfError, InvalidInput, Unimplemented
from carclf.serving import apis
from carclf.serving.config import BasePathResolver, models_config_from_proto
from carclf.serving.gate import RequestGate
from carclf.serving.manager import ModelManager
from carclf.serving.metrics import ServingMetrics
from carclf.serving.predictor import Predictor, wait
from carclf.serving.validation import DEFAULT_SIGNATURE
from carclf.tensors import fill_proto, to_ndarray

log = logging.getLogger(__name__)

ENTRYPOINT = "GRPC"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

#: The product's error codes (google.rpc.Code names) -> gRPC status codes. The only such mapping.
GRPC_CODES: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def grpc_code(exc: CarClfError) -> grpc.StatusCode:
    return GRPC_CODES.get(exc.code, grpc.StatusCode.INTERNAL)


def _version_choice(spec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


#: grpc reports "no deadline" as a huge remaining time (or None); anything longer is no deadline.
NO_DEADLINE_S = 1e8


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining


class _Guarded:
    """Runs a handler inside the drain gate and the request metrics; errors become gRPC statuses."""

    def __init__(self, gate: RequestGate, metrics: ServingMetrics):
        self._gate, self._metrics = gate, metrics

    def _guard(self, context, model_name: str, api: str | None, body: Callable[[dict], object]):
        try:
            with self._gate.request():
                if api is None:
                    return body({})
                with self._metrics.track(model_name, api, ENTRYPOINT) as info:
                    return body(info)
        except CarClfError as exc:
            context.abort(grpc_code(exc), exc.message)
        except Exception as exc:  # noqa: BLE001 - never leak a traceback to the client
            log.exception("%s failed", api)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer, _Guarded):
    def __init__(self, predictor: Predictor, gate: RequestGate):
        _Guarded.__init__(self, gate, predictor.metrics)
        self._predictor = predictor

    def Predict(self, request: predict_pb2.PredictRequest, context):  # noqa: N802 - gRPC method name
        spec = request.model_spec

        def body(info: dict):
            if not request.HasField("model_spec"):
                raise InvalidInput("Missing ModelSpec")
            version, label = _version_choice(spec)
            deadline = _deadline(context)
            lease = self._predictor.acquire(spec.name, version, label)
            info["version"] = lease.version
            try:
                inputs = {name: to_ndarray(proto, name) for name, proto in request.inputs.items()}
            except BaseException:
                lease.release()
                raise
            # Cancelled when the call ends (done, cancelled, deadline, client gone): a request still waiting
            # is taken out (it never runs) and an ensemble's member calls end. grpc's server answers False when
            # the call has ended already; grpc.aio's context for synchronous handlers registers it and says None.
            cancel = CancelToken()
            if context.add_callback(cancel.cancel) is False:
                cancel.cancel()
            future = self._predictor.submit(lease, spec.signature_name, inputs,
                                            output_filter=list(request.output_filter), deadline=deadline,
                                            inline=True, cancel=cancel)
            result = wait(future, deadline)
            response = predict_pb2.PredictResponse()
            apis.fill_model_spec(response.model_spec, result.model_name, result.version, result.signature_name)
            for name, array in result.outputs.items():
                fill_proto(response.outputs[name], array)
            return response

        return self._guard(context, spec.name, "Predict", body)

    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context):  # noqa: N802
        spec = request.model_spec

        def body(info: dict):
            if not request.HasField("model_spec"):
                raise InvalidInput("Missing ModelSpec")
            with self._predictor.acquire(spec.name, *_version_choice(spec)) as lease:
                info["version"] = lease.version
                return apis.metadata_response(lease, list(request.metadata_field))

        return self._guard(context, spec.name, "GetModelMetadata", body)

    def Classify(self, request: classification_pb2.ClassificationRequest, context):  # noqa: N802
        return self._guard(context, request.model_spec.name, "Classify",
                                 lambda info: self._unsupported(request.model_spec, CLASSIFY_METHOD, info))

    def Regress(self, request: regression_pb2.RegressionRequest, context):  # noqa: N802
        return self._guard(context, request.model_spec.name, "Regress",
                                 lambda info: self._unsupported(request.model_spec, REGRESS_METHOD, info))

    def MultiInference(self, request: inference_pb2.MultiInferenceRequest, context):  # noqa: N802
        def body(info: dict):
            if not request.tasks:
                raise InvalidInput("MultiInferenceRequest has no tasks")
            names = {task.model_spec.name for task in request.tasks}
            if len(names) != 1:
                raise InvalidInput("All ModelSpecs in a MultiInferenceRequest must access the same model name")
            for task in request.tasks:
                self._unsupported(task.model_spec, task.method_name, info)

        model = request.tasks[0].model_spec.name if request.tasks else ""
        return self._guard(context, model, "MultiInference", body)

    def _unsupported(self, spec, method: str, info: dict):
        """What TF Serving answers for a model whose signatures are all Predict signatures."""
        with self._predictor.acquire(spec.name, *_version_choice(spec)) as lease:
            info["version"] = lease.version
            name = spec.signature_name or DEFAULT_SIGNATURE
            signature = lease.servable.signatures().get(name)
            if signature is None:
                raise InvalidInput(f"No signature was found with the name: {name}")
            kind = "classification" if method == CLASSIFY_METHOD else "regression"
            if method not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise InvalidInput(f"Unsupported signature method_name: {method}")
            if signature.method_name != method:
                raise InvalidInput(f"Expected {kind} signature method_name to be {method}. "
                                   f"Was: {signature.method_name}")
            raise Unimplemented(f"the embedded server runs Predict signatures only; {name} is a {kind} signature")


class ModelService(model_service_pb2_grpc.ModelServiceServicer, _Guarded):
    def __init__(self, manager: ModelManager, resolver: BasePathResolver, gate: RequestGate, metrics: ServingMetrics):
        _Guarded.__init__(self, gate, metrics)
        self._manager, self._resolver = manager, resolver

    def GetModelStatus(self, request, context):  # noqa: N802
        def body(_info: dict):
            if not request.HasField("model_spec"):
                raise InvalidInput("Missing ModelSpec")
            spec = request.model_spec
            return apis.status_response(self._manager, spec.name, *_version_choice(spec))

        return self._guard(context, request.model_spec.name, None, body)

    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):  # noqa: N802
        def body(_info: dict):
            if request.config.WhichOneof("config") != "model_config_list":
                raise InvalidInput("ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                                   "ModelConfigList is currently supported")
            config = models_config_from_proto(request.config, self._resolver, source="HandleReloadConfigRequest")
            self._manager.apply_config(config)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.error_code = 0
            return response

        return self._guard(context, "", None, body)


class _Unparsable:
    """Stands in for a request message that is not a valid protobuf of its type."""

    def __init__(self, message: str):
        self.message = message


class UnparsableRequestInterceptor(grpc.ServerInterceptor):
    """A unary request whose bytes are not a valid protobuf gets INVALID_ARGUMENT naming the method
    (grpc-python would answer UNKNOWN from its own deserializer, with a traceback in the server log)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # per method: built once, not per call

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client sent garbage
                return _Unparsable(f"{method}: the request is not a valid protobuf message "
                                   f"({type(exc).__name__}: {exc})")

        def call(request, context):
            if isinstance(request, _Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return behaviour(request, context)

        wrapped = grpc.unary_unary_rpc_method_handler(call, request_deserializer=deserialize,
                                                      response_serializer=handler.response_serializer)
        return self._wrapped.setdefault(method, wrapped)


def add_services(server: grpc.Server, predictor: Predictor, manager: ModelManager, resolver: BasePathResolver,
                 gate: RequestGate, *, health=None) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(predictor, gate), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager, resolver, gate, predictor.metrics), server)
    if health is not None:
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(health, server)
