"""TensorProto <-> numpy and REST JSON <-> numpy, checked against TensorFlow's own conversions."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from carclf.clients.grpc_client import to_tensor_proto
from carclf.clients.rest_client import encode_value
from carclf.errors import InvalidInput
from carclf.serving import json_codec
from carclf.serving.servable import Signature, TensorInfo
from carclf.tensors import make_proto, to_ndarray

NUMERIC = ["float32", "float64", "int32", "int64", "uint8", "int8", "int16", "uint16", "uint32", "uint64", "bool",
           "float16", "complex64"]


@pytest.mark.parametrize("dtype", NUMERIC)
def test_numeric_round_trip_agrees_with_tensorflow(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    proto = make_proto(array)
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)       # TF reads what we write
    np.testing.assert_array_equal(to_ndarray(proto), array)
    np.testing.assert_array_equal(to_ndarray(tf.make_tensor_proto(array)), array)  # we read what TF writes


@pytest.mark.parametrize("dtype", [d for d in NUMERIC if np.dtype(d).itemsize > 1 and d != "bool"])
def test_a_big_endian_array_travels_as_its_values(dtype):
    """An array in the other byte order (as read from a big-endian file) is the same tensor as the native one,
    over gRPC (TensorProto) as over REST (JSON): both clients send what the user holds."""
    native = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    swapped = native.astype(native.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    np.testing.assert_array_equal(tf.make_ndarray(to_tensor_proto(swapped)), native)
    assert to_tensor_proto(swapped).SerializeToString() == to_tensor_proto(native).SerializeToString()
    if not dtype.startswith("complex"):  # JSON has no complex numbers
        assert encode_value(swapped, "x") == encode_value(native, "x")


def test_typed_value_fields_and_tf_fill_rule():
    for values in ([1.5, 2.5, 3.5, 4.5], [7.0]):
        proto = tf.make_tensor_proto(values, dtype=tf.float32, shape=[2, 2])
        proto.tensor_content = b""
        proto.float_val[:] = values
        np.testing.assert_array_equal(to_ndarray(proto), tf.make_ndarray(proto))
    half = tf.make_tensor_proto(np.array([1.5, -2.0], np.float16))
    np.testing.assert_array_equal(to_ndarray(half), [1.5, -2.0])


def test_strings_round_trip():
    array = np.array([[b"a", b"\x00\xff"], [b"", "é".encode()]], dtype=object)
    proto = make_proto(array)
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)
    np.testing.assert_array_equal(to_ndarray(tf.make_tensor_proto(array)), array)


@pytest.mark.parametrize("mutate,needle", [
    (lambda p: setattr(p, "tensor_content", b"\x00" * 3), "tensor_content"),
    (lambda p: p.tensor_shape.dim.add(size=-5), "negative"),
    (lambda p: setattr(p, "dtype", 20), "not supported"),  # DT_RESOURCE
    (lambda p: setattr(p.tensor_shape, "unknown_rank", True), "unknown rank"),
])
def test_malformed_protos_are_invalid_input(mutate, needle):
    proto = make_proto(np.zeros(4, np.float32))
    mutate(proto)
    with pytest.raises(InvalidInput, match=needle):
        to_ndarray(proto, "x")


@pytest.mark.parametrize("dtype", [tf.float32, tf.string])
def test_empty_tensor_with_an_impossible_shape_is_invalid_input(dtype):
    """A zero dimension makes the tensor empty, but numpy still refuses a shape whose other dimensions
    multiply past its size limit (found by the property test in tests/reliability)."""
    proto = tf.make_tensor_proto(np.zeros((0, 1, 1), dtype.as_numpy_dtype))
    proto.tensor_shape.dim[1].size = 10 ** 9
    proto.tensor_shape.dim[2].size = 2 ** 40
    with pytest.raises(InvalidInput, match=r"input 'x'.*shape \[0, 1000000000, 1099511627776\]"):
        to_ndarray(proto, "x")


def test_fill_bomb_is_refused():
    proto = tf.make_tensor_proto([1.0], dtype=tf.float32)
    proto.tensor_shape.dim[0].size = 10 ** 9
    with pytest.raises(InvalidInput, match="filled"):
        to_ndarray(proto, "x")


# ------------------------------------------------------------------------------------- REST JSON

PIXELS = Signature("serving_pixels", "tensorflow/serving/predict",
                   {"pixels": TensorInfo("pixels", "uint8", (-1, -1, -1, 3))}, {})
TWO_INPUTS = Signature("two", "tensorflow/serving/predict",
                       {"a": TensorInfo("a", "float32", (-1, 2)), "b": TensorInfo("b", "object", (-1,))}, {})


def decode(doc, signature):
    return json_codec.decode_inputs(json_codec.predict_body(doc), signature)


def test_row_and_columnar_give_the_same_tensors():
    rows = decode({"instances": [{"a": [1, 2.5], "b": {"b64": base64.b64encode(b"\x00x").decode()}},
                                 {"a": [3, 4], "b": "text"}]}, TWO_INPUTS)
    cols = decode({"inputs": {"a": [[1, 2.5], [3, 4]], "b": [{"b64": "AHg="}, "text"]}}, TWO_INPUTS)
    for got in (rows, cols):
        np.testing.assert_array_equal(got["a"], np.array([[1, 2.5], [3, 4]], np.float32))
        assert got["a"].dtype == np.float32
        assert got["b"].tolist() == [b"\x00x", b"text"]


@pytest.mark.parametrize("doc,needle", [
    ({"instances": ["x"]}, "plain list"),
    ({"instances": [{"a": [1, 2]}]}, "keys must be equal"),
    ({"instances": [{"a": [1, 2], "b": "x", "c": 1}]}, "named input: c"),
    ({"inputs": {"a": [[1, 2]]}}, "Missing named input: b"),
    ({"inputs": {"a": [[True, False]], "b": ["x"]}}, "DT_FLOAT"),
    ({"inputs": {"a": [[1, 2], [3]], "b": ["x", "y"]}}, "dense"),
    ({"inputs": {"a": [[1, 2], 3], "b": ["x", "y"]}}, "incorrect level"),
    ({"inputs": {"a": [[1, 2], [3, 4]], "b": [["x"], "y"]}}, "incorrect level"),
    ({"inputs": {"a": [[1, 1e39]], "b": ["x"]}}, "precision"),
    ({"inputs": {"a": [[1, 2]], "b": [5]}}, "DT_STRING"),
    ({"inputs": {"a": [[1, 2]], "b": [{"b64": "x", "extra": 1}]}}, "base64"),
])
def test_json_errors_name_the_problem(doc, needle):
    with pytest.raises(InvalidInput, match=needle):
        decode(doc, TWO_INPUTS)


def test_outputs_row_and_columnar():
    outputs = {"probabilities": np.array([[0.25, 0.75]], np.float32), "label": np.array([b"car"], dtype=object),
               "raw_bytes": np.array([b"\xff"], dtype=object)}
    row = json.loads(json_codec.encode_outputs(outputs, json_codec.ROW))
    assert row == {"predictions": [{"probabilities": [0.25, 0.75], "label": "car", "raw_bytes": {"b64": "/w=="}}]}
    col = json.loads(json_codec.encode_outputs({"label": outputs["label"]}, json_codec.COLUMNAR))
    assert col == {"outputs": ["car"]}


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4).map(
    lambda s: (*s[:3], 3))))
def test_pixels_survive_json_in_both_formats(pixels):
    for doc in ({"instances": pixels.tolist()}, {"inputs": pixels.tolist()}):
        body = json.loads(json.dumps(doc))
        np.testing.assert_array_equal(decode(body, PIXELS)["pixels"], pixels)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children,
                                                                                      max_size=3), max_leaves=20))
def test_any_json_value_decodes_or_is_invalid_input(value):
    """Whatever a client sends as 'instances'/'inputs', the answer is tensors or InvalidInput, nothing else."""
    for key in ("instances", "inputs"):
        try:
            body = json_codec.predict_body({key: value})
            arrays = json_codec.decode_inputs(body, PIXELS)
        except InvalidInput:
            continue
        assert arrays["pixels"].dtype == np.uint8


def test_a_single_output_answers_one_plain_value_per_row():
    """TF Serving's row format with one output tensor: "predictions" lists that tensor's rows, no names."""
    scores = np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)
    row = json.loads(json_codec.encode_outputs({"scores": scores}, json_codec.ROW))
    assert row == {"predictions": scores.tolist()}
    raw = np.array([b"\xff\x00", b"ok"], dtype=object)
    expected = [{"b64": base64.b64encode(value).decode()} for value in raw]
    assert json.loads(json_codec.encode_outputs({"raw_bytes": raw}, json_codec.ROW)) == {"predictions": expected}


@pytest.mark.parametrize("order", [("scores", "vocabulary"), ("vocabulary", "scores")])
def test_row_format_refuses_outputs_whose_batch_sizes_differ(order):
    """Rows cannot be formed when outputs disagree on the batch dimension: an error naming the tensor (as TF
    Serving), never a truncated answer or a server error; the columnar format answers them whole."""
    tensors = {"scores": np.zeros((2, 3), np.float32), "vocabulary": np.array([b"a", b"b", b"c"], dtype=object)}
    outputs = {name: tensors[name] for name in order}
    with pytest.raises(InvalidInput, match="inconsistent batch size"):
        json_codec.encode_outputs(outputs, json_codec.ROW)
    columnar = json.loads(json_codec.encode_outputs(outputs, json_codec.COLUMNAR))
    assert columnar == {"outputs": {"scores": [[0.0] * 3] * 2, "vocabulary": ["a", "b", "c"]}}


@pytest.mark.parametrize("value", [-1, 256])
@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_pixel_values_outside_uint8_are_refused_not_wrapped(key, value):
    """A uint8 input takes 0..255: -1 or 256 is an error, never silently wrapped to 255 or 0."""
    pixels = np.zeros((1, 2, 2, 3), int)
    pixels[0, 1, 1, 2] = value
    with pytest.raises(InvalidInput, match="outside the range of DT_UINT8"):
        decode({key: pixels.tolist()}, PIXELS)
