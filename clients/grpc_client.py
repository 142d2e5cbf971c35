"""TF Serving gRPC client: PredictionService.Predict / GetModelMetadata and ModelService.GetModelStatus.

One channel per client, reused by every call (gRPC multiplexes concurrent calls over it), message limits
raised to what TF Serving accepts, reconnection within about 2 s of a server coming back, optional TLS, a
deadline on every call. Failed calls raise the ``carclf.errors`` type of the status code with the server's
message, but for one: a call ended CANCELLED that this client did not cancel (nor close) raises ``Unavailable``.
The server ended it before answering, as one does to a call sent in the instant after its shutdown began,
before the client read its GOAWAY; sent again, the call goes to a new connection, so callers that retry
UNAVAILABLE (``carclf predict``, the ensemble gateway) outlive a rolling update without a failed call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from carclf import contract
from carclf.cancel import CancelToken
from carclf.clients.base import (
    DEFAULT_TIMEOUT_S,
    ModelClient,
    ModelMetadata,
    PredictResult,
    SignatureSpec,
    TensorSpec,
    VersionStatus,
    as_input_array,
)
from carclf.errors import (
    Cancelled,
    CarClfError,
    Internal,
    InvalidInput,
    RequestTooLarge,
    Unavailable,
    error_for_code,
)
from carclf.tensors import make_proto, to_ndarray

# TF Serving accepts messages up to 2 GB; gRPC's own default is 4 MB, too small for stacked views.
MAX_MESSAGE_BYTES = 2**31 - 1

# After a server goes away, gRPC retries the connection with a backoff that grows to 120 s, and calls made
# meanwhile fail at once: a long-lived client (the ensemble gateway's member channels) kept failing up to
# two minutes after its server was back. Capped, it reconnects within about this long.
MAX_RECONNECT_BACKOFF_MS = 2000


# What grpc says when the client's own deadline ends a call (a server's DEADLINE_EXCEEDED says more).
LOCAL_DEADLINE_DETAILS = "Deadline Exceeded"


def error_from_rpc(exc, target: str = "", timeout: float | None = None, *, tls: bool | None = None) -> CarClfError:
    """The product's error for a failed gRPC call: same code name, the server's message (or, where grpc's
    own words say little, which server did not answer and within what time, or which scheme the port wants).
    ``tls``: whether the channel spoke TLS (None: not known)."""
    import grpc

    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    name = code.name if code is not None else "INTERNAL"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    text = details or ""  # grpc's words, matched below
    server = target or "the server"
    if name == "DEADLINE_EXCEEDED" and details == LOCAL_DEADLINE_DETAILS and timeout is not None:
        details = f"no answer from {server} within {timeout:.3g} s"
    elif "Trying to connect an http1.x server" in text:
        details = f"{server} answers HTTP/1.x, as a REST port does: give http://host:port for it"
    elif "WRONG_VERSION_NUMBER" in text:  # the TLS handshake met a peer that does not speak TLS
        details = f"{server} does not answer TLS, as a plaintext gRPC port does: give grpc://host:port for it"
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[-1].strip().removesuffix(": OK")
        details = (f"TLS certificate verification of {server} failed ({reason}): pass the server's root "
                   "certificates")
    elif name == "UNAVAILABLE" and tls is False and "failed to connect" in text and "Socket closed" in text:
        details = (f"{details} (server {server}; a port that requires TLS closes plaintext connections like "
                   "this: give grpcs://host:port if it is one)")  # a TLS port ends a plaintext handshake so
    elif name == "UNAVAILABLE" and target and target not in text:
        details = f"{details} (server {target})"
    if name == "RESOURCE_EXHAUSTED" and "message larger than max" in text:  # gRPC's size limit
        return RequestTooLarge(details)
    return error_for_code(name, details or name)


def to_tensor_proto(array: np.ndarray):
    """TensorProto of ``array`` (``str`` elements travel UTF-8 encoded), by the codec the server uses."""
    return make_proto(as_input_array(array))


def from_tensor_proto(proto, name: str = "") -> np.ndarray:
    """numpy array of a TensorProto; strings become ``str`` except outputs named ``*_bytes``."""
    array = to_ndarray(proto, name)
    if array.dtype == object and not name.endswith("_bytes"):
        array = np.vectorize(lambda x: x.decode("utf-8", "replace") if isinstance(x, bytes) else x,
                             otypes=[object])(array) if array.size else array
    return array


class GrpcClient(ModelClient):
    transport = "grpc"

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, object]] = (),
    ):
        import grpc

        from carclf.tfprotos import model_service_pb2_grpc, prediction_service_pb2_grpc

        super().__init__(target, timeout=timeout)
        self.tls = bool(tls or root_certificates is not None)
        defaults = [("grpc.max_send_message_length", int(max_message_bytes)),
                    ("grpc.max_receive_message_length", int(max_message_bytes)),
                    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        given = {key for key, _ in options}
        channel_options = [*(item for item in defaults if item[0] not in given), *options]
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    @property
    def channel(self):
        return self._channel

    def _model_spec(self, spec, model: str, signature_name: str | None, version, version_label) -> None:
        self._check_spec(version, version_label)
        spec.name = model
        if signature_name is not None:
            spec.signature_name = signature_name
        if version is not None:
            spec.version.value = int(version)
        elif version_label is not None:
            spec.version_label = version_label

    def _call(self, method, request, timeout: float | None, cancel: CancelToken | None = None):
        import grpc

        self._check_open()
        timeout = self._timeout(timeout)
        try:
            if cancel is None:
                return method(request, timeout=timeout)
            cancel.check(f"it was sent to {self.target}")
            call = method.future(request, timeout=timeout)
            cancel.on_cancel(call.cancel)  # ends the call here and on the server
            return call.result()
        except grpc.FutureCancelledError:
            raise Cancelled(f"the call to {self.target} was cancelled by its caller") from None
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, self.target, timeout, tls=self.tls)
            if isinstance(error, Cancelled) and not self._closed and not (cancel is not None and cancel.cancelled):
                error = Unavailable(f"{self.target} ended the call before answering it ({error.message}), as a "
                                    f"server that begins shutting down does; send it again")
            raise error from None

    def predict_request(self, model: str, inputs: Mapping[str, np.ndarray], *,
                        signature_name: str = contract.SIGNATURE_BYTES, version: int | None = None,
                        version_label: str | None = None, output_filter: Sequence[str] = ()):
        """The PredictRequest protobuf this client would send (also used by load tests)."""
        from carclf.tfprotos import predict_pb2

        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, model, signature_name, version, version_label)
        for name, array in inputs.items():
            request.inputs[name].CopyFrom(to_tensor_proto(array))
        request.output_filter.extend(output_filter)
        return request

    def predict(self, model, inputs=None, *, images=None, signature_name=contract.SIGNATURE_BYTES,
                version=None, version_label=None, output_filter=(), timeout=None,
                cancel: CancelToken | None = None) -> PredictResult:
        """``ModelClient.predict``; besides, cancelling ``cancel`` from another thread cancels the call (on
        the server too, which then never runs it if it is still queued there) and raises ``Cancelled``."""
        request = self.predict_request(model, self._inputs(inputs, images), signature_name=signature_name,
                                       version=version, version_label=version_label, output_filter=output_filter)
        start = time.perf_counter()
        response = self._call(self._predict_stub.Predict, request, timeout, cancel)
        latency = (time.perf_counter() - start) * 1000.0
        spec = response.model_spec
        try:
            outputs = {name: from_tensor_proto(t, name) for name, t in response.outputs.items()}
        except InvalidInput as exc:  # the server's answer, not the caller's input, is malformed
            raise Internal(f"the answer of {self.target} does not decode: {exc.message}") from None
        return PredictResult(
            model_name=spec.name or model,
            version=int(spec.version.value) if spec.HasField("version") else version,
            signature_name=spec.signature_name or signature_name,
            outputs=outputs,
            latency_ms=latency,
            transport=self.transport,
        )

    def metadata(self, model, *, version=None, version_label=None, timeout=None) -> ModelMetadata:
        from carclf.tfprotos import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, model, None, version, version_label)
        response = self._call(self._predict_stub.GetModelMetadata, request, timeout)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" in response.metadata:
            response.metadata["signature_def"].Unpack(sig_map)
        signatures = {name: _signature_spec(name, sig) for name, sig in sig_map.signature_def.items()}
        spec = response.model_spec
        return ModelMetadata(model_name=spec.name or model,
                             version=int(spec.version.value) if spec.HasField("version") else version,
                             signatures=signatures)

    def status(self, model, *, version=None, version_label=None, timeout=None) -> list[VersionStatus]:
        from carclf.tfprotos import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, model, None, version, version_label)
        response = self._call(self._model_stub.GetModelStatus, request, timeout)
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            VersionStatus(version=int(s.version), state=state_name(s.state),
                          error_code=_error_code_name(s.status.error_code), error_message=s.status.error_message)
            for s in response.model_version_status
        ]

    def _release(self) -> None:
        self._channel.close()


def _error_code_name(code: int) -> str:
    import grpc

    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _tensor_spec(name: str, info) -> TensorSpec:
    from carclf.tfprotos import types_pb2

    if info.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = tuple(int(d.size) for d in info.tensor_shape.dim)
    return TensorSpec(name=name, dtype=types_pb2.DataType.Name(info.dtype), shape=shape)


def _signature_spec(name: str, sig) -> SignatureSpec:
    return SignatureSpec(
        name=name,
        method_name=sig.method_name,
        inputs={k: _tensor_spec(k, v) for k, v in sig.inputs.items()},
        outputs={k: _tensor_spec(k, v) for k, v in sig.outputs.items()},
    )
