"""The bad-input table: every malformed (or merely unusual) request, where it is sent and the answer it must get.

One ``Case`` per (input, transport, model). ``tests/reliability/test_bad_input.py`` sends each one to a real
server and checks the status, that the message names the problem, and that the next valid request on the
same transport and model is answered correctly. The table in docs/RELIABILITY.md is generated from this
list and checked against it:

    python -m tests.reliability.bad_inputs            # print the markdown table
    python -m tests.reliability.bad_inputs --write    # rewrite it in docs/RELIABILITY.md
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.reliability import images
from tests.reliability.servers import BACKBONE, ENSEMBLE, MAX_REQUEST_BYTES

REST, GRPC, WEB = "REST", "gRPC", "web upload"
OK = "OK"
DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
TABLE_START, TABLE_END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
BATCH_LIMIT = 16          # max_batch_size of the shipped serving/batching.config
ENSEMBLE_BATCH_LIMIT = 64  # max_batch_size of the ensemble config


@dataclass(frozen=True)
class Sample:
    """What the builders are given: one real photo and the whole sample set."""

    photo: bytes
    photos: list[bytes]


@dataclass(frozen=True)
class RestRequest:
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    plain: bytes | None = None  # the body before its Content-Encoding, where it has one


@dataclass(frozen=True)
class GrpcRequest:
    message: object            # a PredictRequest, or raw bytes that are not a protobuf at all
    method: str = "Predict"


@dataclass(frozen=True)
class Case:
    key: str                   # the input, one docs row per key
    input: str                 # what is sent, in words
    transport: str             # REST, gRPC or web upload
    model: str
    build: Callable[[Sample], RestRequest | GrpcRequest]
    expect: int | str          # HTTP status (REST, web) or gRPC status code name; 200 / "OK" = must succeed
    needle: str = ""           # the message must contain this (case-insensitive)
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.key}[{self.transport.replace(' ', '_')}-{self.model}]"

    @property
    def valid(self) -> bool:
        return self.expect in (200, OK)


# ---------------------------------------------------------------------------------------------
# Request builders
# ---------------------------------------------------------------------------------------------

def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def predict_path(model: str, suffix: str = "") -> str:
    return f"/v1/models/{model}{suffix}:predict"


def rest_json(model: str, doc, suffix: str = "") -> RestRequest:
    return RestRequest("POST", predict_path(model, suffix), json.dumps(doc).encode())


def rest_raw(model: str, body: bytes) -> RestRequest:
    return RestRequest("POST", predict_path(model), body)


def rest_coded(model: str, plain: bytes, coding: str, encode: Callable[[bytes], bytes]) -> RestRequest:
    """A predict body sent with ``Content-Encoding: coding``, ``encode`` applied to ``plain``."""
    return RestRequest("POST", predict_path(model), encode(plain), (("Content-Encoding", coding),), plain)


def raw_deflate(data: bytes) -> bytes:
    """Deflate data without zlib's header and checksum, as some clients send ``Content-Encoding: deflate``."""
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def first_half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def web_upload(data: bytes) -> RestRequest:
    """Exactly what clients/web/app.js posts for one chosen file."""
    doc = {"signature_name": "serving_default", "inputs": {"image_bytes": [b64(data)]}}
    return RestRequest("POST", predict_path(ENSEMBLE), json.dumps(doc).encode())


def grpc_predict(model: str, *, version=None, label=None, signature="", output_filter=(), **inputs) -> GrpcRequest:
    from tests.serving.test_grpc import predict_request

    return GrpcRequest(predict_request(model, version=version, label=label, signature=signature,
                                       output_filter=output_filter, **inputs))


def grpc_mutated(model: str, mutate: Callable, **inputs) -> GrpcRequest:
    request = grpc_predict(model, **inputs).message
    mutate(request)
    return GrpcRequest(request)


def strings(*items: bytes) -> np.ndarray:
    return np.array(list(items), dtype=object)


def nested(levels: int, leaf) -> list:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

INVALID = ("INVALID_ARGUMENT", 400)


def image_cases(key: str, what: str, build: images.Builder, needle: str = "", why: str = "",
                valid: bool = False) -> Iterator[Case]:
    """One upload, on every route: REST and gRPC to a backbone and to the ensemble, and the upload page."""
    for model in (BACKBONE, ENSEMBLE):
        yield Case(key, what, REST, model, lambda s, m=model: rest_json(m, {"instances": [b64(build(s.photo))]}),
                   200 if valid else 400, needle, why)
        yield Case(key, what, GRPC, model, lambda s, m=model: grpc_predict(m, image_bytes=strings(build(s.photo))),
                   OK if valid else "INVALID_ARGUMENT", needle, why)
    yield Case(key, what, WEB, ENSEMBLE, lambda s: web_upload(build(s.photo)), 200 if valid else 400, needle, why)


def both(key: str, what: str, model: str, rest: Callable[[Sample], RestRequest],
         grpc: Callable[[Sample], GrpcRequest], status: int, code: str, needle: str, why: str = "",
         grpc_needle: str | None = None) -> Iterator[Case]:
    yield Case(key, what, REST, model, rest, status, needle, why)
    yield Case(key, what, GRPC, model, grpc, code, needle if grpc_needle is None else grpc_needle, why)


def _cases() -> Iterator[Case]:
    # --- uploads: broken files are refused by name, unusual but valid photos are classified -----------------
    yield from image_cases("truncated_jpeg", "JPEG cut in half (header intact, data stops)", images.truncated_jpeg,
                           "Invalid JPEG data", "the header probe passes; the decoder's own error is returned as "
                           "INVALID_ARGUMENT, never a 500")
    yield from image_cases("zero_bytes", "empty file (0 bytes)", images.zero_bytes, "empty (0 bytes)")
    yield from image_cases("text_file", "a text file sent as a photo", images.text_file, "not a recognised image")
    yield from image_cases("decompression_bomb", f"70-byte PNG declaring {images.BOMB_SIDE}x{images.BOMB_SIDE} "
                           "pixels", images.decompression_bomb, "refused before decoding",
                           "header probe (PIL, no pixel decoded) against the 40 M pixel limit")
    yield from image_cases("one_pixel", "1x1 PNG", images.one_pixel, "smaller than 8 px",
                           "no car can be recognised in fewer than 8 px a side; resizing it up would answer a "
                           "confident 200 about nothing")
    yield from image_cases("tiff", "TIFF photo", images.tiff, "TIFF is not supported",
                           "the serving graph cannot decode TIFF; the message lists the formats it can")
    valid = "a real photo in an unusual encoding: decoded to RGB and classified like any other"
    yield from image_cases("grayscale_jpeg", "grayscale (L) JPEG", images.grayscale_jpeg,
                           why=valid + " (gray replicated to 3 channels)", valid=True)
    yield from image_cases("cmyk_jpeg", "CMYK JPEG", images.cmyk_jpeg, why=valid, valid=True)
    yield from image_cases("rgba_png", "PNG with an alpha channel", images.rgba_png,
                           why=valid + " (alpha ignored: same answer as the RGB PNG)", valid=True)
    yield from image_cases("animated_gif", "animated GIF (2 frames)", images.animated_gif,
                           why=valid + " (first frame: same answer as that frame as PNG)", valid=True)
    yield from image_cases("webp", "WebP photo", images.webp, why=valid, valid=True)

    # --- REST bodies -----------------------------------------------------------------------------------------
    m = BACKBONE
    yield Case("invalid_json", "body is not JSON", REST, m, lambda s: rest_raw(m, b'{"instances": [1,}'), 400,
               "JSON Parse error")
    yield Case("empty_body", "empty body", REST, m, lambda s: rest_raw(m, b""), 400, "document is empty")
    yield Case("non_utf8_body", "body with invalid UTF-8 bytes", REST, m,
               lambda s: rest_raw(m, b'{"instances": ["\xff\xfe\xfa"]}'), 400, "not UTF-8")
    yield Case("deeply_nested_json", "100 000 nested '[' (parser recursion)", REST, m,
               lambda s: rest_raw(m, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
               "nested too deeply", "refused by the JSON parser's recursion limit, no stack overflow")
    yield Case("nested_too_deep_for_a_tensor", "40 nested lists around one string", REST, m,
               lambda s: rest_json(m, {"instances": nested(40, "x")}), 400, "nested deeper than 32")
    yield Case("not_an_object", "JSON array at the top level", REST, m, lambda s: rest_raw(m, b"[1, 2]"), 400,
               "Is not object")
    yield Case("instances_with_inputs", "both 'instances' and 'inputs'", REST, m,
               lambda s: rest_json(m, {"instances": [b64(s.photo)], "inputs": [b64(s.photo)]}), 400,
               "only one of 'inputs' or 'instances'")
    yield Case("no_instances_nor_inputs", "neither 'instances' nor 'inputs'", REST, m,
               lambda s: rest_json(m, {"signature_name": "serving_default"}), 400,
               "Missing 'inputs' or 'instances' key")
    yield Case("instances_not_a_list", "'instances' is an object", REST, m,
               lambda s: rest_json(m, {"instances": {"image_bytes": b64(s.photo)}}), 400,
               "to be a list/array")
    yield Case("empty_instances", "'instances': []", REST, m, lambda s: rest_json(m, {"instances": []}), 400,
               "No values in 'instances'")
    yield Case("bad_base64", "'b64' value that is not base64", REST, m,
               lambda s: rest_json(m, {"instances": [{"b64": "not*base64!"}]}), 400, "base64 decode")
    yield Case("bad_base64", "'b64' value that is not base64", WEB, ENSEMBLE,
               lambda s: rest_json(ENSEMBLE, {"inputs": {"image_bytes": [{"b64": "%%%"}]}}), 400, "base64 decode")
    yield Case("b64_object_with_extra_keys", "{'b64': ..., 'x': 1}", REST, m,
               lambda s: rest_json(m, {"instances": [{**b64(s.photo), "x": 1}]}), 400,
               "does not have named input: b64")
    yield Case("signature_name_not_a_string", "'signature_name': 5", REST, m,
               lambda s: rest_json(m, {"signature_name": 5, "instances": [b64(s.photo)]}), 400,
               "'signature_name' key must be a string")
    yield Case("version_not_a_number", "/versions/abc", REST, m,
               lambda s: RestRequest("POST", "/v1/models/tiny_a/versions/abc:predict", b"{}"), 400,
               "Malformed request")
    yield Case("version_overflow", "/versions/99999999999999999999", REST, m,
               lambda s: rest_json(m, {"instances": [b64(s.photo)]}, "/versions/99999999999999999999"), 400,
               "Failed to convert version")
    yield Case("unknown_verb", ":explode instead of :predict", REST, m,
               lambda s: RestRequest("POST", "/v1/models/tiny_a:explode", b"{}"), 400, "Malformed request")
    yield Case("wrong_method", "DELETE on a model", REST, m,
               lambda s: RestRequest("DELETE", "/v1/models/tiny_a"), 400, "Malformed request")
    yield Case("pixels_float_into_uint8", "serving_pixels with 1.5 in a uint8 tensor", REST, m,
               lambda s: rest_json(m, {"signature_name": "serving_pixels",
                                       "inputs": np.full((1, 8, 8, 3), 1.5).tolist()}), 400,
               "not of expected type: DT_UINT8")
    yield Case("pixels_out_of_range", "serving_pixels with 300 in a uint8 tensor", REST, m,
               lambda s: rest_json(m, {"signature_name": "serving_pixels",
                                       "inputs": np.full((1, 8, 8, 3), 300).tolist()}), 400,
               "outside the range of DT_UINT8")
    yield Case("pixels_ragged", "serving_pixels rows of different lengths", REST, m,
               lambda s: rest_json(m, {"signature_name": "serving_pixels",
                                       "inputs": [[[[1, 2, 3]] * 8, [[1, 2, 3]] * 7]]}), 400, "dense")
    yield Case("json_null_image", "null where a photo belongs", REST, m,
               lambda s: rest_json(m, {"instances": [None]}), 400, "DT_STRING")

    # --- tensors: both transports ----------------------------------------------------------------------------
    yield from both("wrong_dtype", "a number where the JPEG bytes belong", m,
                    lambda s: rest_json(m, {"instances": [1.5]}),
                    lambda s: grpc_predict(m, image_bytes=np.array([1.5], np.float32)),
                    400, "INVALID_ARGUMENT", "DT_STRING", grpc_needle="expects DT_STRING but DT_FLOAT")
    yield from both("wrong_rank", "image_bytes of shape [1, 1] instead of [batch]", m,
                    lambda s: rest_json(m, {"instances": [[b64(s.photo)]]}),
                    lambda s: grpc_predict(m, image_bytes=strings(s.photo).reshape(1, 1)),
                    400, "INVALID_ARGUMENT", "expects shape [-1] but received shape [1,1]")
    yield from both("pixels_four_channels", "serving_pixels of shape [1, 8, 8, 4]", m,
                    lambda s: rest_json(m, {"signature_name": "serving_pixels",
                                            "inputs": np.zeros((1, 8, 8, 4), int).tolist()}),
                    lambda s: grpc_predict(m, signature="serving_pixels", pixels=np.zeros((1, 8, 8, 4), np.uint8)),
                    400, "INVALID_ARGUMENT", "expects shape [-1,-1,-1,3] but received shape [1,8,8,4]")
    yield from both("empty_batch", "a batch of 0 photos", m,
                    lambda s: rest_json(m, {"inputs": []}),
                    lambda s: grpc_predict(m, image_bytes=strings()),
                    400, "INVALID_ARGUMENT", "empty batch")
    yield from both("batch_over_limit", f"{BATCH_LIMIT + 1} photos (batching max_batch_size {BATCH_LIMIT})", m,
                    lambda s: rest_json(m, {"instances": [b64(p) for p in images_n(s, BATCH_LIMIT + 1)]}),
                    lambda s: grpc_predict(m, image_bytes=strings(*images_n(s, BATCH_LIMIT + 1))),
                    400, "INVALID_ARGUMENT", f"larger than maximum input batch size {BATCH_LIMIT}",
                    "TF Serving's batching answer; split the request or raise max_batch_size")
    yield from both("missing_input", "no input tensor at all", m,
                    lambda s: rest_json(m, {"inputs": {}}),
                    lambda s: grpc_predict(m),
                    400, "INVALID_ARGUMENT", "Missing named input: image_bytes",
                    grpc_needle="Missing but required: {image_bytes}")
    yield from both("unknown_input_name", "input named 'image' instead of 'image_bytes'", m,
                    lambda s: rest_json(m, {"inputs": {"image": [b64(s.photo)]}}),
                    lambda s: grpc_predict(m, image=strings(s.photo)),
                    400, "INVALID_ARGUMENT", "input tensor alias not found in signature: image")
    yield from both("unknown_signature", "signature 'nope'", m,
                    lambda s: rest_json(m, {"signature_name": "nope", "instances": [b64(s.photo)]}),
                    lambda s: grpc_predict(m, signature="nope", image_bytes=strings(s.photo)),
                    400, "FAILED_PRECONDITION", "nope", "TF Serving's codes: REST 400, gRPC FAILED_PRECONDITION")
    yield from both("unknown_model", "model 'no_such_model'", "no_such_model",
                    lambda s: rest_json("no_such_model", {"instances": [b64(s.photo)]}),
                    lambda s: grpc_predict("no_such_model", image_bytes=strings(s.photo)),
                    404, "NOT_FOUND", "Servable not found for request: Latest(no_such_model)")
    yield from both("unknown_version", "version 99", m,
                    lambda s: rest_json(m, {"instances": [b64(s.photo)]}, "/versions/99"),
                    lambda s: grpc_predict(m, version=99, image_bytes=strings(s.photo)),
                    404, "NOT_FOUND", "Specific(tiny_a, 99)")
    yield from both("unknown_label", "label 'nope'", m,
                    lambda s: rest_json(m, {"instances": [b64(s.photo)]}, "/labels/nope"),
                    lambda s: grpc_predict(m, label="nope", image_bytes=strings(s.photo)),
                    400, "INVALID_ARGUMENT", "Unrecognized servable version label: nope",
                    "TF Serving's code for an unknown label")
    yield from both("negative_version", "version -1", m,
                    lambda s: rest_json(m, {"instances": [b64(s.photo)]}, "/versions/-1"),
                    lambda s: grpc_predict(m, version=-1, image_bytes=strings(s.photo)),
                    400, "INVALID_ARGUMENT", "Malformed request", "REST: the path does not match; "
                    "gRPC: refused before any lookup", grpc_needle="must be >= 0, received -1")
    yield from both("illegal_label_characters", "label '../etc' (URL-encoded on REST)", m,
                    lambda s: rest_json(m, {"instances": [b64(s.photo)]}, "/labels/..%2Fetc"),
                    lambda s: grpc_predict(m, label="../etc", image_bytes=strings(s.photo)),
                    400, "INVALID_ARGUMENT", "Unrecognized servable version label: ../etc",
                    "labels are only looked up in the loaded config, never used as paths")
    yield from both("oversized_body", f"request over --max_request_bytes ({MAX_REQUEST_BYTES} bytes)", m,
                    lambda s: rest_raw(m, b'{"instances": ["' + b"x" * MAX_REQUEST_BYTES + b'"]}'),
                    lambda s: grpc_predict(m, image_bytes=strings(b"x" * MAX_REQUEST_BYTES)),
                    413, "RESOURCE_EXHAUSTED", "larger than the limit", "refused from Content-Length before the "
                    "body is read (REST); by gRPC's receive limit", grpc_needle="larger than max")
    yield Case("oversized_body", f"request over --max_request_bytes ({MAX_REQUEST_BYTES} bytes)", WEB, ENSEMBLE,
               lambda s: web_upload(b"x" * MAX_REQUEST_BYTES), 413, "larger than the limit")

    # --- REST bodies with a Content-Encoding -----------------------------------------------------------------
    def photo_json(s: Sample) -> bytes:
        return json.dumps({"instances": [b64(s.photo)]}).encode()

    yield Case("gzip_body", "photo JSON sent gzip-compressed", REST, m,
               lambda s: rest_coded(m, photo_json(s), "gzip", gzip.compress), 200,
               why="inflated within --max_request_bytes, as TF Serving inflates gzip bodies")
    yield Case("deflate_body", "photo JSON sent as raw deflate (no zlib header)", REST, m,
               lambda s: rest_coded(m, photo_json(s), "deflate", raw_deflate), 200,
               why="zlib-wrapped and raw deflate are both read")
    yield Case("gzip_bomb", "gzip body inflating to 64 x --max_request_bytes", REST, m,
               lambda s: rest_coded(m, b'{"instances": ["' + b"x" * (64 * MAX_REQUEST_BYTES) + b'"]}', "gzip",
                                    gzip.compress), 413, "inflates to more than the limit",
               "inflating stops one byte past the limit: no more memory or time than a plain body of that size")
    yield Case("corrupt_gzip", "'Content-Encoding: gzip' on a body that is not gzip", REST, m,
               lambda s: rest_coded(m, photo_json(s), "gzip", lambda b: b), 400, "not valid gzip data")
    yield Case("cut_short_gzip", "gzip body cut in half", REST, m,
               lambda s: rest_coded(m, photo_json(s), "gzip", lambda b: first_half(gzip.compress(b))),
               400, "ends before its compressed data does")
    yield Case("unsupported_encoding", "'Content-Encoding: br'", REST, m,
               lambda s: rest_coded(m, photo_json(s), "br", lambda b: b), 400, "unsupported Content-Encoding 'br'")

    # --- gRPC messages -------------------------------------------------------------------------------------
    yield Case("missing_model_spec", "PredictRequest without model_spec", GRPC, m,
               lambda s: grpc_mutated(m, lambda r: r.ClearField("model_spec"), image_bytes=strings(s.photo)),
               "INVALID_ARGUMENT", "Missing ModelSpec")
    yield Case("scalar_input", "image_bytes as a scalar (shape [])", GRPC, m,
               lambda s: grpc_predict(m, image_bytes=np.array(s.photo, dtype=object)), "INVALID_ARGUMENT",
               "expects shape [-1] but received shape []")
    yield Case("extra_input", "image_bytes plus an unknown 'extra' tensor", GRPC, m,
               lambda s: grpc_predict(m, image_bytes=strings(s.photo), extra=strings(b"x")), "INVALID_ARGUMENT",
               "Sent extra: {extra}")
    yield Case("string_count_mismatch", "shape [2] with one string", GRPC, m,
               lambda s: grpc_mutated(m, lambda r: setattr(r.inputs["image_bytes"].tensor_shape.dim[0], "size", 2),
                                      image_bytes=strings(s.photo)), "INVALID_ARGUMENT", "needs 2 strings, received 1")
    yield Case("tensor_content_size", "pixels whose tensor_content is 3 bytes short", GRPC, m,
               lambda s: grpc_mutated(m, lambda r: setattr(r.inputs["pixels"], "tensor_content",
                                                           r.inputs["pixels"].tensor_content[:-3]),
                                      signature="serving_pixels", pixels=np.zeros((1, 8, 8, 3), np.uint8)),
               "INVALID_ARGUMENT", "tensor_content has 189 bytes")
    yield Case("negative_dimension", "a dimension of -5", GRPC, m,
               lambda s: grpc_mutated(m, lambda r: setattr(r.inputs["pixels"].tensor_shape.dim[1], "size", -5),
                                      signature="serving_pixels", pixels=np.zeros((1, 8, 8, 3), np.uint8)),
               "INVALID_ARGUMENT", "negative dimension")
    yield Case("fill_bomb", "12-byte tensor declaring 10^9 elements", GRPC, m,
               lambda s: GrpcRequest(_fill_bomb(m)), "INVALID_ARGUMENT", "at most 16777216 elements")
    yield Case("unsupported_dtype", "a DT_RESOURCE tensor", GRPC, m,
               lambda s: grpc_mutated(m, lambda r: setattr(r.inputs["image_bytes"], "dtype", 20),
                                      image_bytes=strings(s.photo)), "INVALID_ARGUMENT", "DT_RESOURCE is not supported")
    yield Case("unknown_output_filter", "output_filter 'nope'", GRPC, m,
               lambda s: grpc_predict(m, output_filter=["nope"], image_bytes=strings(s.photo)), "INVALID_ARGUMENT",
               "output tensor alias not found in signature: nope")
    yield Case("not_a_protobuf", "random bytes instead of a PredictRequest", GRPC, m,
               lambda s: GrpcRequest(b"\xff\x00 this is not a protobuf"), "INVALID_ARGUMENT",
               "not a valid protobuf message", "grpc-python alone would answer UNKNOWN; an interceptor turns "
               "the parse error into INVALID_ARGUMENT")

    # --- the ensemble ------------------------------------------------------------------------------------------
    e = ENSEMBLE
    yield from both("batch_over_limit", f"{ENSEMBLE_BATCH_LIMIT + 1} photos (ensemble max_batch_size "
                    f"{ENSEMBLE_BATCH_LIMIT})", e,
                    lambda s: rest_json(e, {"instances": [b64(p) for p in images_n(s, ENSEMBLE_BATCH_LIMIT + 1)]}),
                    lambda s: grpc_predict(e, image_bytes=strings(*images_n(s, ENSEMBLE_BATCH_LIMIT + 1))),
                    400, "INVALID_ARGUMENT", f"more than max_batch_size {ENSEMBLE_BATCH_LIMIT}")
    yield from both("batch_at_ensemble_limit", f"{ENSEMBLE_BATCH_LIMIT} photos: x2 TTA views = "
                    f"{2 * ENSEMBLE_BATCH_LIMIT} rows per member, over the members' batch limit", e,
                    lambda s: rest_json(e, {"instances": [b64(p) for p in images_n(s, ENSEMBLE_BATCH_LIMIT)]}),
                    lambda s: grpc_predict(e, image_bytes=strings(*images_n(s, ENSEMBLE_BATCH_LIMIT))),
                    200, OK, "", "valid: member calls are split into chunks the batcher accepts")
    yield from both("empty_batch", "a batch of 0 photos", e,
                    lambda s: rest_json(e, {"inputs": []}),
                    lambda s: grpc_predict(e, image_bytes=strings()),
                    400, "INVALID_ARGUMENT", "empty batch")
    yield from both("unknown_signature", "signature 'serving_pixels' (backbones only)", e,
                    lambda s: rest_json(e, {"signature_name": "serving_pixels", "instances": [b64(s.photo)]}),
                    lambda s: grpc_predict(e, signature="serving_pixels", image_bytes=strings(s.photo)),
                    400, "FAILED_PRECONDITION", "serving_pixels")
    yield from both("unknown_input_name", "input named 'pixels'", e,
                    lambda s: rest_json(e, {"inputs": {"pixels": [[[[0, 0, 0]]]]}}),
                    lambda s: grpc_predict(e, pixels=np.zeros((1, 8, 8, 3), np.uint8)),
                    400, "INVALID_ARGUMENT", "input tensor alias not found in signature: pixels")
    yield from both("unknown_version", "version 7 of the ensemble", e,
                    lambda s: rest_json(e, {"instances": [b64(s.photo)]}, "/versions/7"),
                    lambda s: grpc_predict(e, version=7, image_bytes=strings(s.photo)),
                    404, "NOT_FOUND", f"Specific({e}, 7)")
    yield from both("unknown_label", "label 'canary' (the ensemble has none)", e,
                    lambda s: rest_json(e, {"instances": [b64(s.photo)]}, "/labels/canary"),
                    lambda s: grpc_predict(e, label="canary", image_bytes=strings(s.photo)),
                    400, "INVALID_ARGUMENT", "Unrecognized servable version label: canary")
    yield from both("wrong_dtype", "a number where the JPEG bytes belong", e,
                    lambda s: rest_json(e, {"instances": [7]}),
                    lambda s: grpc_predict(e, image_bytes=np.array([7], np.int64)),
                    400, "INVALID_ARGUMENT", "DT_STRING")
    yield from both("one_bad_photo_in_a_batch", "3 photos, the 2nd a text file", e,
                    lambda s: rest_json(e, {"instances": [b64(s.photo), b64(b"hello"), b64(s.photo)]}),
                    lambda s: grpc_predict(e, image_bytes=strings(s.photo, b"hello", s.photo)),
                    400, "INVALID_ARGUMENT", "element 1", "the whole request is refused and the photo named by "
                    "its index; no partial 200")


def images_n(sample: Sample, n: int) -> list[bytes]:
    return [sample.photos[i % len(sample.photos)] for i in range(n)]


def _fill_bomb(model: str):
    from tensorflow.core.framework import tensor_pb2, types_pb2

    from tests.serving.test_grpc import predict_request

    request = predict_request(model, signature="serving_pixels")
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, int_val=[7])
    for size in (1000, 1000, 1000, 3):
        proto.tensor_shape.dim.add(size=size)
    request.inputs["pixels"].CopyFrom(proto)
    return request


CASES: list[Case] = list(_cases())


# ---------------------------------------------------------------------------------------------
# The docs table
# ---------------------------------------------------------------------------------------------

def _answer(case: Case) -> str:
    if case.valid:
        return "200 / OK, classified"
    code = case.expect if case.transport == GRPC else f"HTTP {case.expect}"
    return f"{code}: `{case.needle}`"


def markdown_table(cases: list[Case] = CASES) -> str:
    """One row per distinct input: where it was sent and the answers (generated; do not edit by hand)."""
    rows: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        rows.setdefault((case.key, case.input), []).append(case)
    lines = ["| # | input | sent to | answer (status: the message contains) | why |", "|---|---|---|---|---|"]
    for number, ((key, what), group) in enumerate(rows.items(), 1):
        models: dict[str, list[str]] = {}
        for case in group:
            models.setdefault(case.model, []).append(case.transport)
        routes = "; ".join(f"{model}: {', '.join(transports)}" for model, transports in models.items())
        answers = " · ".join(dict.fromkeys(_answer(c) for c in group))
        why = next((c.why for c in group if c.why), "")
        lines.append(f"| {number} | **{key}**: {what} | {routes} | {answers} | {why} |")
    return "\n".join(lines)


def documented_table(doc: Path = DOC) -> str | None:
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if TABLE_START not in text or TABLE_END not in text:
        return None
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def write_table(doc: Path = DOC) -> None:
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC}")
    args = parser.parse_args()
    if args.write:
        write_table()
        print(f"wrote {len(CASES)} cases ({len({c.key for c in CASES})} inputs) to {DOC}")
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
