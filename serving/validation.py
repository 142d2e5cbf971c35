"""Check one request against a signature before anything is queued or run.

Messages follow TF Serving's where it has one (``input size does not match signature: ...``,
``Serving signature key "x" not found.``) and otherwise name the input, what was received and what
was expected. Every ``image_bytes`` element is probed (header only) so that empty files, non-images
and decompression bombs are refused with INVALID_ARGUMENT before the graph decodes a pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from carclf import contract
from carclf.errors import CarClfError, FailedPrecondition, InvalidInput
from carclf.imaging import probe_image
from carclf.serving.servable import Signature, TensorInfo
from carclf.tensors import tf_name_of

DEFAULT_SIGNATURE = "serving_default"  # TF's default serving signature key


def find_signature(signatures: Mapping[str, Signature], signature_name: str) -> Signature:
    name = signature_name or DEFAULT_SIGNATURE
    signature = signatures.get(name)
    if signature is None:
        raise FailedPrecondition(f'Serving signature key "{name}" not found.')
    return signature


def _names(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def _format_shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]" if shape is not None else "[?]"


def check_tensor(signature: Signature, info: TensorInfo, array) -> None:
    """dtype, rank and fixed dimensions of one input."""
    where = f"input '{info.name}' of signature '{signature.name}'"
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{where} must be a numpy array, received {type(array).__name__}")
    expected = np.dtype(info.dtype)
    if array.dtype != expected:
        raise InvalidInput(f"{where} expects {tf_name_of(expected)} but {tf_name_of(array.dtype)} was provided")
    if info.shape is None:
        return
    if array.ndim != len(info.shape) or any(want not in (-1, got) for want, got in zip(info.shape, array.shape, strict=True)):
        raise InvalidInput(f"{where} expects shape {_format_shape(info.shape)} but received shape "
                           f"{_format_shape(array.shape)}")


def check_strings(info: TensorInfo, array: np.ndarray) -> None:
    """String tensors hold bytes; ``image_bytes`` elements must be acceptable images."""
    probe = info.name == contract.INPUT_IMAGE_BYTES
    values = array.reshape(-1)
    for index, value in enumerate(values):
        if not isinstance(value, bytes):
            raise InvalidInput(f"{element_name(info.name, index, len(values))} must be bytes, received "
                               f"{type(value).__name__}")
        if probe:
            try:
                probe_image(value)
            except CarClfError as exc:
                raise InvalidInput(f"{element_name(info.name, index, len(values))}: {exc.message}") from None


def element_name(name: str, index: int, count: int) -> str:
    """How an error names one element of an input: "input 'image_bytes' element 1 (of 3)", the index 0-based as
    in the tensor."""
    return f"input '{name}' element {index} (of {count})"


def batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    """The shared first dimension of all inputs; InvalidInput when they disagree or one is a scalar."""
    sizes = {}
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidInput(f"input '{name}' is a scalar; inputs need a batch dimension")
        sizes[name] = array.shape[0]
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
        raise InvalidInput(f"inputs must share their first (batch) dimension, received {detail}")
    return next(iter(sizes.values()), 0)


def check_request(
    signatures: Mapping[str, Signature],
    signature_name: str,
    inputs: Mapping[str, np.ndarray],
    output_filter: Sequence[str] = (),
) -> Signature:
    """Validate a whole request; returns the signature it addresses."""
    signature = find_signature(signatures, signature_name)
    if set(inputs) != set(signature.inputs):
        extra = set(inputs) - set(signature.inputs)
        missing = set(signature.inputs) - set(inputs)
        if len(inputs) == len(signature.inputs):
            alias = sorted(extra)[0]
            raise InvalidInput(f"input tensor alias not found in signature: {alias}. Inputs expected to be in "
                               f"the set {_names(signature.inputs)}.")
        raise InvalidInput(
            f"input size does not match signature: {len(inputs)}!={len(signature.inputs)} "
            f"len({_names(inputs)}) != len({_names(signature.inputs)}). Sent extra: {_names(extra)}. "
            f"Missing but required: {_names(missing)}.")
    contract.check_output_filter(signature.outputs, output_filter)
    for name, info in signature.inputs.items():
        check_tensor(signature, info, inputs[name])
    if all(info.shape and info.shape[0] == -1 for info in signature.inputs.values()):
        if batch_size(inputs) == 0:
            raise InvalidInput(f"empty batch: the inputs of signature '{signature.name}' have 0 elements")
    for name, info in signature.inputs.items():
        if info.dtype == "object":
            check_strings(info, inputs[name])
    return signature
