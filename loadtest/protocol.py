"""TF Serving's wire formats, as a load generator needs them: build a Predict once, read any answer.

Only the public TF Serving API is used (``tensorflow_serving.apis`` protos over gRPC, the REST JSON of
``/v1/models/<name>:predict``), so everything built here works unchanged against the embedded server and
against a real ``tensorflow_model_server``. Requests are built once per photo and re-sent, so the load
generator spends its CPU on sending, not on encoding.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from carclf import contract
from carclf.errors import InvalidInput

GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
)
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"

# A client whose call got no answer (nothing listening, connection lost, server draining) waits this long
# before its next call, as real clients back off: without it one load-test user loops thousands of times a
# second on refused connections, and those 1 ms failures drown the latencies of the calls answered.
UNANSWERED_BACKOFF_S = 0.5


def signature_input(signature: str) -> str:
    """The input name of one of the contract's signatures."""
    names = {contract.SIGNATURE_BYTES: contract.INPUT_IMAGE_BYTES, contract.SIGNATURE_PIXELS: contract.INPUT_PIXELS}
    if signature not in names:
        raise InvalidInput(f"signature must be one of {sorted(names)}, received {signature!r}")
    return names[signature]


def decode_pixels(data: bytes, what: str = "") -> np.ndarray:
    """uint8 [H, W, 3] pixels of encoded photo bytes, decoded by the product's one decoder (traced once);
    InvalidInput naming ``what`` when they do not decode."""
    from carclf import imaging

    return imaging.decode_checked(data, what).numpy()


def photo_inputs(signature: str, data: bytes, what: str = "") -> dict[str, np.ndarray]:
    """The named input tensors that send one photo (``what``, in errors) through ``signature`` (a batch of one)."""
    name = signature_input(signature)
    if name == contract.INPUT_IMAGE_BYTES:
        return {name: np.array([data], dtype=object)}
    return {name: decode_pixels(data, what)[np.newaxis]}


def grpc_request(model: str, signature: str, inputs: Mapping[str, np.ndarray], version: int | None = None):
    """A ``PredictRequest`` for ``model`` (latest version unless ``version``)."""
    from carclf.tensors import fill_proto
    from carclf.tfprotos import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for key, value in inputs.items():
        fill_proto(request.inputs[key], value)
    return request


def grpc_outputs(response) -> dict[str, np.ndarray]:
    """The output tensors of a ``PredictResponse`` as numpy arrays (the server's own converter, without TF)."""
    from carclf.tensors import to_ndarray

    return {key: to_ndarray(tensor) for key, tensor in response.outputs.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value] if value.dtype == object else value.tolist()
    return value


def rest_path(model: str, version: int | None = None) -> str:
    """The REST URL path of ``model``'s ``:predict``."""
    return f"/v1/models/{model}" + (f"/versions/{int(version)}" if version is not None else "") + ":predict"


def rest_body(signature: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A row-format (``instances``) JSON body; bytes travel as ``{"b64": ...}``."""
    batch = len(next(iter(inputs.values())))
    instances = [{key: _json_value(value[i]) for key, value in inputs.items()} for i in range(batch)]
    return json.dumps({"signature_name": signature, "instances": instances}, separators=(",", ":")).encode()


def rest_outputs(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The output tensors of a REST ``:predict`` answer (row or columnar form) as numpy arrays."""
    if "predictions" in body:
        rows = body["predictions"]
        if not isinstance(rows, list) or not rows:
            raise InvalidInput(f"'predictions' must be a non-empty list, received {str(rows)[:80]!r}")
        if not isinstance(rows[0], dict):  # a single output is returned bare
            return {contract.OUTPUT_PROBABILITIES: np.asarray(rows)}
        return {key: np.asarray([_from_json(row[key]) for row in rows]) for key in rows[0]}
    if "outputs" in body:
        outputs = body["outputs"]
        if not isinstance(outputs, dict):
            return {contract.OUTPUT_PROBABILITIES: np.asarray(outputs)}
        return {key: np.asarray(_from_json(value)) for key, value in outputs.items()}
    raise InvalidInput(f"answer has neither 'predictions' nor 'outputs': {str(body)[:120]!r}")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
