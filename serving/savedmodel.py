"""One SavedModel version as a Servable: loaded once, its signature functions reused for every request.

Signatures are read from ``saved_model.pb`` (exact SignatureDefs: dtypes, shapes, tensor names,
method names) and called through ``tf.saved_model.load(...).signatures`` concrete functions, which are
never re-traced. Requests are validated before the graph runs (``Servable.validate``); TF runtime
errors that still happen (a truncated JPEG body, say) come back as typed ``carclf.errors``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from carclf import contract, imaging
from carclf.cancel import CancelToken
from carclf.errors import (
    CarClfError,
    DeadlineExceeded,
    Internal,
    InvalidInput,
    error_for_code,
    runtime_message,
)
from carclf.serving.repository import SAVED_MODEL_FILES
from carclf.serving.servable import Servable, Signature, TensorInfo
from carclf.serving.validation import element_name
from carclf.serving.warmup import read_warmup_requests, warmup_file
from carclf.tensors import numpy_dtype_name, shape_of_proto

SERVE_TAG = "serve"
_INTERNAL_SIGNATURES = ("__saved_model_init_op",)


def read_signature_defs(path: Path) -> dict:
    """SignatureDef protos of the ``serve`` meta graph, by name."""
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    binary, text = (path / name for name in SAVED_MODEL_FILES)
    saved_model = saved_model_pb2.SavedModel()
    try:
        if binary.is_file():
            saved_model.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(), saved_model)
        else:
            raise InvalidInput(f"{path} holds no saved_model.pb")
    except (DecodeError, text_format.ParseError) as exc:
        raise InvalidInput(f"{path}/saved_model.pb is not a SavedModel: {exc}") from None
    if not saved_model.meta_graphs:  # an empty file parses as an empty message
        raise InvalidInput(f"{path}/saved_model.pb holds no meta graph (an empty or unfinished file?)")
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return {name: sig for name, sig in meta_graph.signature_def.items() if name not in _INTERNAL_SIGNATURES}
    raise InvalidInput(f"{path}: no meta graph tagged '{SERVE_TAG}'")


def signature_from_def(name: str, signature_def) -> Signature:
    def infos(tensors) -> dict[str, TensorInfo]:
        return {alias: TensorInfo(alias, numpy_dtype_name(info.dtype), shape_of_proto(info.tensor_shape), info.name)
                for alias, info in sorted(tensors.items())}

    return Signature(name, signature_def.method_name, infos(signature_def.inputs), infos(signature_def.outputs))


def typed_error(exc: Exception, context: str) -> CarClfError:
    """A TF runtime error as the product's error type, keeping TF's status code."""
    import tensorflow as tf
    from tensorflow.core.protobuf import error_codes_pb2

    if isinstance(exc, CarClfError):
        return exc
    if isinstance(exc, tf.errors.OpError):
        message = runtime_message(exc.message or "") or type(exc).__name__
        return error_for_code(error_codes_pb2.Code.Name(exc.error_code), f"{context}: {message}")
    if isinstance(exc, TypeError | ValueError):
        return InvalidInput(f"{context}: {exc}")
    return Internal(f"{context}: {type(exc).__name__}: {exc}")


def _undecodable_photo(inputs: Mapping[str, np.ndarray]) -> str | None:
    """After a refused run of a model that decodes photos in its graph (the product's ``image_bytes``
    input): which photo does not decode, which TF's message does not say. Only on the error path, so eagerly:
    a first trace of the decoder would hold the error answer up by a second or more."""
    photos = inputs.get(contract.INPUT_IMAGE_BYTES)
    if photos is None:
        return None
    for index, data in enumerate(np.ravel(photos)):
        try:
            imaging.decode_checked(data, element_name(contract.INPUT_IMAGE_BYTES, index, len(photos)), traced=False)
        except InvalidInput as exc:
            return exc.message
    return None


class SavedModelServable(Servable):
    """A TensorFlow SavedModel version (``<base_path>/<version>/``)."""

    batchable = True

    def __init__(self, name: str, version: int, path: str | Path, *, warmup_iterations: int = 1):
        import tensorflow as tf

        self.name = name
        self.version = int(version)
        self.path = Path(path)
        self.warmup_iterations = max(1, int(warmup_iterations))
        defs = read_signature_defs(self.path)
        try:
            self._module = tf.saved_model.load(str(self.path), tags=[SERVE_TAG])
        except Exception as exc:  # noqa: BLE001 - any loader failure is this version's status, not a crash
            raise typed_error(exc, f"loading SavedModel {self.path}") from None
        loaded = self._module.signatures
        self._functions = {sig: loaded[sig] for sig in defs if sig in loaded}
        self._signatures = {sig: signature_from_def(sig, defs[sig]) for sig in self._functions}
        if not self._signatures:
            raise InvalidInput(f"{self.path}: the SavedModel has no callable serving signature")

    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        output_filter: Sequence[str] = (),
        deadline: float | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, np.ndarray]:
        """One TF run; ``cancel`` is not looked at (a run cannot be stopped once started)."""
        signature = self.validate(signature_name, inputs, output_filter)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline passed before {self.name} version {self.version} ran")
        outputs = self.run(signature.name, inputs)
        return {k: outputs[k] for k in output_filter} if output_filter else outputs

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        function = self._functions[signature_name]
        try:
            result = function(**inputs)
        except Exception as exc:  # noqa: BLE001 - typed below
            error = typed_error(exc, f"{self.name} version {self.version} signature {signature_name}")
            if isinstance(error, InvalidInput):
                error = InvalidInput(_undecodable_photo(inputs) or error.message)
            raise error from None
        return {alias: tensor.numpy() for alias, tensor in result.items()}

    def warmup(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (each record ``warmup_iterations`` times)."""
        path = warmup_file(self.path)
        if not path.is_file():
            return 0
        requests = read_warmup_requests(path)
        for index, request in enumerate(requests):
            for _ in range(self.warmup_iterations):
                try:
                    self.predict(request.signature_name, request.inputs)
                except CarClfError as exc:
                    raise InvalidInput(f"warmup record {index} of {path} failed: {exc.message}") from None
        return len(requests)

    def close(self) -> None:
        self._functions = {}
        self._module = None
