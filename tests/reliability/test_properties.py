"""Property-based tests (hypothesis) of what every request goes through before the model: the REST JSON
codec (``carclf.serving.json_codec``) and TensorProto conversion (``carclf.tensors``).

Two kinds of properties: round trips (what the server writes, a client reads back unchanged, and the
other way round), and totality (whatever bytes or JSON a client sends, the answer is a tensor or
``carclf.errors.InvalidInput``: never another exception, which would be a 500 / INTERNAL).
``tests/serving/test_tensors.py`` holds the example-based tests of the same modules.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2, types_pb2

from carclf.errors import InvalidInput
from carclf.serving import json_codec
from carclf.serving.servable import Signature, TensorInfo
from carclf.tensors import make_proto, to_ndarray

# CARCLF_HYPOTHESIS_EXAMPLES=5000 for a deeper search than the suite's budget allows.
SETTINGS = settings(max_examples=int(os.environ.get("CARCLF_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

NUMERIC = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8, np.int16, np.uint16, np.bool_]
JSON_EXACT = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8, np.uint16, np.bool_]


def signature(**inputs: tuple[str, tuple[int, ...] | None]) -> Signature:
    return Signature("sig", "tensorflow/serving/predict",
                     {name: TensorInfo(name, dtype, shape) for name, (dtype, shape) in inputs.items()}, {})


SIGNATURES = [
    signature(image_bytes=("object", (-1,))),
    signature(pixels=("uint8", (-1, -1, -1, 3))),
    signature(x=("float32", (-1, 2))),
    signature(x=("int64", None)),
    signature(flag=("bool", (-1,))),
    signature(a=("float32", (-1, 2)), b=("object", (-1,))),
]

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=6))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["b64", "a", "b", "x", "pixels", "image_bytes", "flag"]) | st.text(max_size=3),
                      children, max_size=3),
    max_leaves=25)
b64_values = st.builds(lambda s: {"b64": s}, st.text(alphabet="AZaz09+/=%-_ ", max_size=12))
documents = st.dictionaries(
    st.sampled_from(["instances", "inputs", "signature_name", "other"]),
    json_values | b64_values | st.lists(b64_values, max_size=3),
    max_size=3)


# ---------------------------------------------------------------------------------------------
# Totality: any input decodes or is InvalidInput
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=200) | st.builds(lambda d: json.dumps(d).encode(), documents))
def test_any_body_parses_to_an_object_or_invalid_input(body):
    try:
        doc = json_codec.parse_json(body)
    except InvalidInput:
        return
    assert isinstance(doc, dict)


@SETTINGS
@given(documents, st.sampled_from(SIGNATURES))
def test_any_document_decodes_to_the_signature_types_or_invalid_input(doc, sig):
    """The REST path: body -> document -> format -> tensors, against several signatures."""
    body = json.dumps(doc).encode()
    try:
        parsed = json_codec.parse_json(body)
        json_codec.signature_name_of(parsed)
        arrays = json_codec.decode_inputs(json_codec.predict_body(parsed), sig)
    except InvalidInput:
        return
    assert set(arrays) == set(sig.inputs)
    for name, info in sig.inputs.items():
        assert arrays[name].dtype == np.dtype(info.dtype), (name, arrays[name].dtype)
        if info.dtype == "object":
            assert all(isinstance(v, bytes) for v in arrays[name].reshape(-1))


def _tensor_protos():
    dtypes = st.sampled_from([d for d in types_pb2.DataType.values() if d < 100] + [0, 23, 99, 12345])
    dims = st.lists(st.integers(-3, 5) | st.sampled_from([0, 10**9, 2**40]), max_size=4)
    numbers = st.lists(st.integers(-(2**70), 2**70), max_size=6)
    floats = st.lists(st.floats(allow_nan=True, width=32), max_size=6)

    def build(dtype, shape, content, ints, int64s, fl, strs, bools, half, unknown_rank):
        proto = tensor_pb2.TensorProto(dtype=dtype)
        for size in shape:
            proto.tensor_shape.dim.add(size=size)
        proto.tensor_shape.unknown_rank = unknown_rank
        if content:
            proto.tensor_content = content
        proto.int_val.extend(v for v in ints if -(2**31) <= v < 2**31)
        proto.int64_val.extend(v for v in int64s if -(2**63) <= v < 2**63)
        proto.float_val.extend(fl)
        proto.string_val.extend(strs)
        proto.bool_val.extend(bools)
        proto.half_val.extend(v for v in half if -(2**31) <= v < 2**31)
        return proto

    return st.builds(build, dtypes, dims, st.binary(max_size=24), numbers, numbers, floats,
                     st.lists(st.binary(max_size=4), max_size=3), st.lists(st.booleans(), max_size=4), numbers,
                     st.booleans())


@SETTINGS
@given(_tensor_protos())
def test_any_tensor_proto_decodes_to_its_shape_or_invalid_input(proto):
    """The gRPC path: whatever TensorProto arrives, ``to_ndarray`` gives an array of exactly the declared
    shape, or InvalidInput."""
    try:
        array = to_ndarray(proto, "x")
    except InvalidInput:
        return
    assert array.shape == tuple(d.size for d in proto.tensor_shape.dim)


@SETTINGS
@given(st.binary(max_size=64))
def test_any_parsable_bytes_as_tensor_proto_decode_or_invalid_input(data):
    from google.protobuf.message import DecodeError

    proto = tensor_pb2.TensorProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        return  # refused by protobuf itself (gRPC: INVALID_ARGUMENT from the server's interceptor)
    try:
        to_ndarray(proto, "x")
    except InvalidInput:
        pass


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def arrays(dtypes, max_dims: int = 3):
    return st.sampled_from(dtypes).flatmap(lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=4),
        elements=hnp.from_dtype(np.dtype(dtype), allow_nan=False, allow_infinity=False)
        if np.dtype(dtype).kind == "f" else None))


byte_arrays = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3).flatmap(
    lambda shape: st.lists(st.binary(max_size=8), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))).map(
        lambda items: _object_array(items, shape)))


def _object_array(items, shape) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


@SETTINGS
@given(arrays(NUMERIC + [np.float16, np.uint32, np.uint64, np.complex64]) | byte_arrays)
def test_tensor_proto_round_trip(array):
    """What the server writes into a response, a client reads back bit for bit (through the wire bytes)."""
    wire = make_proto(array).SerializeToString()
    back = to_ndarray(tensor_pb2.TensorProto.FromString(wire))
    assert back.dtype == array.dtype and back.shape == array.shape
    if array.dtype == object:
        assert back.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(back, array)


@SETTINGS
@given(arrays(JSON_EXACT) | byte_arrays, st.sampled_from([json_codec.ROW, json_codec.COLUMNAR]))
def test_json_round_trip(array, fmt):
    """A response tensor written as REST JSON, sent back as a request in the same format, is the same tensor
    (bytes travel as {"b64": ...} when the name ends in _bytes, as plain UTF-8-safe text otherwise)."""
    name = "value_bytes" if array.dtype == object else "value"
    dtype = "object" if array.dtype == object else array.dtype.name
    sig = signature(**{name: (dtype, tuple([-1] * array.ndim))})
    written = json.loads(json_codec.encode_outputs({name: array}, fmt))
    doc = {"instances": written["predictions"]} if fmt == json_codec.ROW else {"inputs": written["outputs"]}
    back = json_codec.decode_inputs(json_codec.predict_body(json_codec.parse_json(json.dumps(doc).encode())), sig)
    assert back[name].dtype == array.dtype and back[name].shape == array.shape
    if array.dtype == object:
        assert back[name].tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(back[name], array)


@pytest.mark.parametrize("dtype", ["float16", "uint8", "bool", "complex64"])
def test_out_of_range_typed_values_are_invalid_input(dtype):
    """Typed value fields that do not fit the declared dtype (e.g. half_val 70000) are InvalidInput."""
    proto = tensor_pb2.TensorProto(dtype=make_proto(np.zeros(1, dtype)).dtype)
    proto.tensor_shape.dim.add(size=1)
    field = {"float16": "half_val", "uint8": "int_val", "bool": "bool_val", "complex64": "scomplex_val"}[dtype]
    values = {"half_val": [70000], "int_val": [300], "bool_val": [True, False], "scomplex_val": [1.0]}[field]
    getattr(proto, field).extend(values)
    with pytest.raises(InvalidInput):
        to_ndarray(proto, "x")
