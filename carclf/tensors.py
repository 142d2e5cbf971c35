"""TensorProto <-> numpy, without TensorFlow ops and without needless copies.

Numeric tensors travel as ``tensor_content`` (one memory copy into the protobuf, read back with
``np.frombuffer``); the typed repeated fields (``float_val``...) are read too, including TF's rule
that fewer values than elements repeat the last one. Strings are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from carclf.errors import InvalidInput
from carclf.tfprotos import tensor_pb2, tensor_shape_pb2, types_pb2

# A tensor filled from fewer values than it has elements (TF's repeat-the-last-value rule) may not
# allocate more than this many elements: a 10-byte proto must not ask for gigabytes.
MAX_FILLED_ELEMENTS = 1 << 24
#: No tensor may have a shape of more elements than this (its dimensions other than zero multiplied).
MAX_SHAPE_ELEMENTS = 1 << 40


@dataclass(frozen=True)
class DType:
    enum: int           # tensorflow DataType
    numpy: np.dtype     # object for strings
    field: str          # TensorProto repeated field holding values


_TABLE = [
    DType(types_pb2.DT_FLOAT, np.dtype(np.float32), "float_val"),
    DType(types_pb2.DT_DOUBLE, np.dtype(np.float64), "double_val"),
    DType(types_pb2.DT_INT32, np.dtype(np.int32), "int_val"),
    DType(types_pb2.DT_UINT8, np.dtype(np.uint8), "int_val"),
    DType(types_pb2.DT_INT16, np.dtype(np.int16), "int_val"),
    DType(types_pb2.DT_INT8, np.dtype(np.int8), "int_val"),
    DType(types_pb2.DT_UINT16, np.dtype(np.uint16), "int_val"),
    DType(types_pb2.DT_STRING, np.dtype(object), "string_val"),
    DType(types_pb2.DT_INT64, np.dtype(np.int64), "int64_val"),
    DType(types_pb2.DT_BOOL, np.dtype(np.bool_), "bool_val"),
    DType(types_pb2.DT_HALF, np.dtype(np.float16), "half_val"),
    DType(types_pb2.DT_UINT32, np.dtype(np.uint32), "uint32_val"),
    DType(types_pb2.DT_UINT64, np.dtype(np.uint64), "uint64_val"),
    DType(types_pb2.DT_COMPLEX64, np.dtype(np.complex64), "scomplex_val"),
    DType(types_pb2.DT_COMPLEX128, np.dtype(np.complex128), "dcomplex_val"),
]
_BY_ENUM = {d.enum: d for d in _TABLE}
_BY_NUMPY = {d.numpy: d for d in _TABLE}


def datatype_name(enum: int) -> str:
    """'DT_FLOAT' for 1, as TF Serving names types in messages."""
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"DataType({enum})"


def numpy_dtype_name(enum: int) -> str:
    """The numpy dtype name a TF DataType travels as ('object' for strings)."""
    entry = _BY_ENUM.get(enum)
    if entry is None:
        raise InvalidInput(f"tensor type {datatype_name(enum)} is not supported by this server")
    return entry.numpy.name


def datatype_of(dtype: str | np.dtype) -> int:
    """TF DataType enum for a numpy dtype (or its name); strings are numpy ``object``."""
    entry = _BY_NUMPY.get(np.dtype(dtype))
    if entry is None:
        raise InvalidInput(f"numpy dtype {np.dtype(dtype).name} has no TensorFlow equivalent here")
    return entry.enum


def tf_name_of(dtype: str | np.dtype) -> str:
    """'DT_STRING' for numpy object, 'DT_UINT8' for uint8, ... (for messages and metadata)."""
    try:
        return datatype_name(datatype_of(dtype))
    except InvalidInput:
        return np.dtype(dtype).name


def shape_proto(shape: tuple[int, ...] | None) -> tensor_shape_pb2.TensorShapeProto:
    proto = tensor_shape_pb2.TensorShapeProto()
    if shape is None:
        proto.unknown_rank = True
    else:
        for size in shape:
            proto.dim.add(size=int(size))
    return proto


def shape_of_proto(proto: tensor_shape_pb2.TensorShapeProto) -> tuple[int, ...] | None:
    return None if proto.unknown_rank else tuple(int(d.size) for d in proto.dim)


def to_ndarray(proto: tensor_pb2.TensorProto, name: str = "") -> np.ndarray:
    """Decode one TensorProto; raises InvalidInput naming ``name`` when it is malformed."""
    label = f"input '{name}'" if name else "tensor"
    entry = _BY_ENUM.get(proto.dtype)
    if entry is None:
        raise InvalidInput(f"{label}: tensor type {datatype_name(proto.dtype)} is not supported by this server")
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"{label}: tensor parsing error: the shape has an unknown rank")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise InvalidInput(f"{label}: tensor parsing error: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if math.prod(size for size in shape if size) > MAX_SHAPE_ELEMENTS:
        # Even an empty tensor (a zero dimension) cannot have such a shape: numpy refuses to reshape into it.
        raise InvalidInput(f"{label}: tensor parsing error: shape {list(shape)} has more than "
                           f"{MAX_SHAPE_ELEMENTS} elements")

    if entry.enum == types_pb2.DT_STRING:
        values = proto.string_val
        if len(values) != count:
            raise InvalidInput(f"{label}: tensor parsing error: shape {list(shape)} needs {count} strings, "
                               f"received {len(values)}")
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)

    if proto.tensor_content:
        content = proto.tensor_content
        expected = count * entry.numpy.itemsize
        if len(content) != expected:
            raise InvalidInput(f"{label}: tensor parsing error: tensor_content has {len(content)} bytes, "
                               f"shape {list(shape)} of {datatype_name(entry.enum)} needs {expected}")
        return np.frombuffer(content, dtype=entry.numpy).reshape(shape)

    values = getattr(proto, entry.field)
    if entry.enum == types_pb2.DT_HALF:
        try:  # half_val holds the float16 bit patterns as int32s
            flat = np.array(values, dtype=np.uint16).view(np.float16)
        except OverflowError:
            raise InvalidInput(f"{label}: tensor parsing error: a half_val is not a 16-bit pattern") from None
    elif entry.enum in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        pairs = np.array(values, dtype=np.float32 if entry.enum == types_pb2.DT_COMPLEX64 else np.float64)
        if len(pairs) % 2:
            raise InvalidInput(f"{label}: tensor parsing error: complex values come in (real, imaginary) pairs")
        flat = pairs.view(entry.numpy)
    else:
        try:
            flat = np.array(values, dtype=entry.numpy)
        except OverflowError:
            raise InvalidInput(f"{label}: tensor parsing error: a value does not fit "
                               f"{datatype_name(entry.enum)}") from None
    if len(flat) == count:
        return flat.reshape(shape)
    if len(flat) > count:
        raise InvalidInput(f"{label}: tensor parsing error: {len(flat)} values for shape {list(shape)}")
    if count > MAX_FILLED_ELEMENTS:
        raise InvalidInput(f"{label}: tensor parsing error: shape {list(shape)} ({count} elements) would be "
                           f"filled from {len(flat)} values; at most {MAX_FILLED_ELEMENTS} elements may be filled")
    filled = np.zeros(count, dtype=entry.numpy)
    if len(flat):
        filled[: len(flat)] = flat
        filled[len(flat):] = flat[-1]
    return filled.reshape(shape)


def fill_proto(proto: tensor_pb2.TensorProto, array: np.ndarray) -> tensor_pb2.TensorProto:
    """Write ``array`` into ``proto`` (e.g. ``response.outputs[name]``, avoiding a CopyFrom)."""
    array = np.asarray(array)
    if not array.dtype.isnative:  # a big-endian array (e.g. read from a file) travels in native order
        array = array.astype(array.dtype.newbyteorder("="))
    entry = _BY_NUMPY.get(array.dtype)
    if entry is None:
        if array.dtype.kind in "US":
            array = np.vectorize(lambda s: s if isinstance(s, bytes) else str(s).encode(), otypes=[object])(array)
            entry = _BY_NUMPY[np.dtype(object)]
        else:
            raise InvalidInput(f"numpy dtype {array.dtype.name} has no TensorFlow equivalent here")
    proto.dtype = entry.enum
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if entry.enum == types_pb2.DT_STRING:
        proto.string_val.extend(
            v if isinstance(v, bytes) else (bytes(v) if isinstance(v, bytearray | memoryview) else str(v).encode())
            for v in array.reshape(-1))
    else:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def make_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    return fill_proto(tensor_pb2.TensorProto(), array)
