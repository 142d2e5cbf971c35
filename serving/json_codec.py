"""TF Serving's REST JSON for tensors: request bodies -> numpy, numpy -> response bodies.

Row format ``{"instances": [...]}`` (one element per example, or an object of named inputs per
example) and columnar format ``{"inputs": ...}`` (a tensor, or an object of named tensors) are
decoded with the signature's input types, as TF Serving does. ``{"b64": "..."}`` stands for bytes
anywhere a string may; outputs whose name ends in ``_bytes`` are written the same way.
Messages follow TF Serving's (``JSON Parse error: ...``, ``Missing 'inputs' or 'instances' key``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from carclf.errors import InvalidInput
from carclf.serving.servable import Signature, TensorInfo
from carclf.tensors import tf_name_of

ROW = "row"
COLUMNAR = "columnar"
MAX_DEPTH = 32  # deeper JSON lists than this are no tensor this server serves
_B64 = "b64"
_BYTES_SUFFIX = "_bytes"


@dataclass(frozen=True)
class PredictBody:
    signature_name: str
    format: str          # ROW or COLUMNAR
    payload: Any         # the value of "instances" or "inputs"


def parse_json(body: bytes) -> dict:
    """Parse a request body; the top level must be an object."""
    if not body:
        raise InvalidInput("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"JSON Parse error: the body is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise InvalidInput("JSON Parse error: the document is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"JSON Value: {_short(doc)} Is not object")
    return doc


def signature_name_of(doc: Mapping) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise InvalidInput(f"JSON Value: {_short(doc)} not formatted correctly. "
                           "'signature_name' key must be a string value.")
    return name


def predict_body(doc: Mapping) -> PredictBody:
    """Which format the request uses (checked after the model is resolved, as TF Serving does)."""
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise InvalidInput("Not formatted correctly: expecting only one of 'inputs' or 'instances' keys to "
                           "exist, both were sent")
    if has_instances:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(f"Expecting 'instances' to be a list/array, received {_json_type(instances)}")
        if not instances:
            raise InvalidInput("No values in 'instances' array")
        return PredictBody(signature_name_of(doc), ROW, instances)
    if has_inputs:
        return PredictBody(signature_name_of(doc), COLUMNAR, doc["inputs"])
    raise InvalidInput("Missing 'inputs' or 'instances' key")


def decode_inputs(body: PredictBody, signature: Signature) -> dict[str, np.ndarray]:
    """Build one numpy array per signature input from the request's JSON."""
    infos = signature.inputs
    if not infos:
        raise InvalidInput(f"Failed to get input map for signature: {signature.name}")
    return _decode_rows(body.payload, infos) if body.format == ROW else _decode_columns(body.payload, infos)


def _decode_rows(instances: list, infos: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    named = _is_named_object(instances[0])
    if not named and len(infos) > 1:
        raise InvalidInput("instances is a plain list, but expecting list of objects as multiple input tensors "
                           f"required as per tensorinfo_map ({','.join(sorted(infos))})")
    if not named:
        for index, item in enumerate(instances):
            if _is_named_object(item):
                raise InvalidInput(f"Expecting value/list but got object at item {index} of input list")
        (name, info), = infos.items()
        return {name: _to_array(instances, info, "'instances' list")}
    columns: dict[str, list] = {name: [] for name in infos}
    for index, item in enumerate(instances):
        if not _is_named_object(item):
            raise InvalidInput(f"Expecting object but got {_json_type(item)} at item {index} of input list")
        for key in item:
            if key not in infos:
                raise InvalidInput(f"Failed to process element: {index} key: {key} of 'instances' list. "
                                   f"JSON object: does not have named input: {key}")
        if len(item) != len(infos):
            raise InvalidInput(f"Failed to process element: {index} of 'instances' list. JSON object keys "
                               f"must be equal to: {','.join(sorted(infos))}")
        for name in infos:
            columns[name].append(item[name])
    return {name: _to_array(columns[name], infos[name], "'instances' list") for name in infos}


def _decode_columns(value: Any, infos: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    if not _is_named_object(value):
        if len(infos) > 1:
            raise InvalidInput("inputs is a plain value/list, but expecting an object as multiple input tensors "
                               f"required as per tensorinfo_map ({','.join(sorted(infos))})")
        (name, info), = infos.items()
        return {name: _to_array(value, info, "'inputs'")}
    for key in value:
        if key not in infos:
            raise InvalidInput(f"input tensor alias not found in signature: {key}. Inputs expected to be in "
                               f"the set {{{','.join(sorted(infos))}}}.")
    arrays = {}
    for name, info in infos.items():
        if name not in value:
            raise InvalidInput(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = _to_array(value[name], info, "'inputs'")
    return arrays


# ---------------------------------------------------------------------------------------------
# JSON value -> numpy
# ---------------------------------------------------------------------------------------------

_NUMERIC_KINDS = {"f": "iuf", "c": "iufc", "i": "iu", "u": "iu", "b": "b"}


def _to_array(value: Any, info: TensorInfo, where: str) -> np.ndarray:
    dtype = np.dtype(info.dtype)
    if dtype.kind == "O":
        return _strings(value, info.name, where)
    try:
        fast = np.asarray(value)
    except (ValueError, OverflowError, TypeError):
        fast = None
    if fast is not None and fast.dtype.kind in _NUMERIC_KINDS.get(dtype.kind, "") and fast.ndim <= MAX_DEPTH:
        return _cast(fast, dtype, info.name)
    # The slow walk exists to say precisely what is wrong (ragged lists, wrong types, depth).
    flat, shape = _walk(value, info.name, where, lambda v: _scalar(v, dtype, info.name))
    return _cast(np.asarray(flat).reshape(shape), dtype, info.name)


def _cast(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise InvalidInput(f"input '{name}': a value is outside the range of {tf_name_of(dtype)} "
                               f"[{limits.min}, {limits.max}]")
    elif dtype.kind == "f":
        with np.errstate(over="ignore"):
            cast = array.astype(dtype)
        if array.dtype.kind == "f" and np.any(np.isinf(cast) & np.isfinite(array)):
            raise InvalidInput(f"input '{name}': cannot convert a JSON value to {dtype.name} without loss "
                               "of precision (out of range)")
        return cast
    return array.astype(dtype)


def _scalar(value: Any, dtype: np.dtype, name: str):
    kinds = _NUMERIC_KINDS.get(dtype.kind, "")
    kind = ("b" if isinstance(value, bool) else "i" if isinstance(value, int)
            else "f" if isinstance(value, float) else None)
    if kind is None or kind not in kinds:
        raise InvalidInput(f"input '{name}': JSON Value: {_short(value)} Type: {_json_type(value)} is not of "
                           f"expected type: {tf_name_of(dtype)}")
    if kind == "i" and not -(1 << 63) <= value < (1 << 64):
        raise InvalidInput(f"input '{name}': JSON Value: {_short(value)} does not fit {tf_name_of(dtype)}")
    return value


def _strings(value: Any, name: str, where: str) -> np.ndarray:
    flat, shape = _walk(value, name, where, lambda v: _string_scalar(v, name))
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def _string_scalar(value: Any, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        if not _is_b64(value):
            raise InvalidInput(f"input '{name}': JSON Value: {_short(value)} not formatted correctly for base64 "
                               'data (expected {"b64": "<base64 string>"})')
        try:
            return base64.b64decode(value[_B64], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"input '{name}': Unable to base64 decode the 'b64' value "
                               f"({len(value[_B64])} characters)") from None
    raise InvalidInput(f"input '{name}': JSON Value: {_short(value)} Type: {_json_type(value)} is not of "
                       "expected type: DT_STRING")


def _walk(value: Any, name: str, where: str, leaf) -> tuple[list, tuple[int, ...]]:
    """Flatten a dense nested list; its shape is read from the first elements, as TF Serving does."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if len(shape) > MAX_DEPTH:
            raise InvalidInput(f"input '{name}': {where} is nested deeper than {MAX_DEPTH} levels")
        if not probe:
            break
        probe = probe[0]
    flat: list = []

    def visit(item: Any, level: int) -> None:
        if not isinstance(item, list):
            if level != len(shape):
                raise InvalidInput(f"input '{name}': JSON Value: {_short(item)} found at incorrect level: "
                                   f"{level + 1} in the JSON DOM. Expected at level: {len(shape)} "
                                   "(lists must be dense)")
            flat.append(leaf(item))
            return
        if level >= len(shape):
            raise InvalidInput(f"input '{name}': Encountered list at unexpected level: {level} expected < "
                               f"{len(shape)} (lists must be dense)")
        if len(item) != shape[level]:
            raise InvalidInput(f"input '{name}': Encountered list at unexpected size: {len(item)} at level: "
                               f"{level} expected size: {shape[level]} (lists must be dense)")
        for child in item:
            visit(child, level + 1)

    visit(value, 0)
    return flat, tuple(shape)


# ---------------------------------------------------------------------------------------------
# numpy -> JSON
# ---------------------------------------------------------------------------------------------

def encode_outputs(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """``{"predictions": ...}`` for row requests, ``{"outputs": ...}`` for columnar ones."""
    if not outputs:
        raise InvalidInput("Cannot convert empty tensor map to JSON")
    if fmt == COLUMNAR:
        if len(outputs) == 1:
            ((name, array),) = outputs.items()
            doc: dict = {"outputs": _jsonable(array, name)}
        else:
            doc = {"outputs": {name: _jsonable(array, name) for name, array in outputs.items()}}
        return _dumps(doc)
    batch = None
    for name, array in outputs.items():
        if np.ndim(array) == 0:
            raise InvalidInput(f"Tensor name: {name} has no shape information ")
        if batch is not None and array.shape[0] != batch:
            raise InvalidInput(f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                               f"expecting: {batch}")
        batch = array.shape[0]
    columns = {name: _jsonable(array, name) for name, array in outputs.items()}
    if len(columns) == 1:
        (rows,) = columns.values()
    else:
        rows = [{name: column[i] for name, column in columns.items()} for i in range(batch or 0)]
    return _dumps({"predictions": rows})


def _jsonable(array: np.ndarray, name: str) -> Any:
    array = np.asarray(array)
    if array.dtype != object:
        if array.dtype.kind == "c":
            raise InvalidInput(f"Failed to write JSON value for tensor type: {tf_name_of(array.dtype)} ({name})")
        return array.tolist()
    as_b64 = name.endswith(_BYTES_SUFFIX)

    def convert(item: Any) -> Any:
        if isinstance(item, list):
            return [convert(x) for x in item]
        data = bytes(item) if isinstance(item, bytes | bytearray | memoryview) else str(item).encode()
        if as_b64:
            return {_B64: base64.b64encode(data).decode("ascii")}
        return data.decode("utf-8", errors="replace")

    return convert(array.tolist())


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def error_body(message: str) -> bytes:
    return _dumps({"error": message})


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_B64), str)


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | float):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, list):
        return "Array"
    return "Object"


def _short(value: Any, limit: int = 120) -> str:
    if isinstance(value, list | dict) and len(value) > 16:
        return f"<{_json_type(value)} of {len(value)} items>"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
