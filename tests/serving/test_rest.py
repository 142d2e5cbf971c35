"""REST conformance: TF Serving's /v1 API over a real socket (embedded server or, via env vars, the real one)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.serving.conformance_setup import CANARY, ECHO_MODEL, MODEL, OTHER_MODEL, STABLE
from tests.serving.conftest import Rest

LATEST = max(STABLE, CANARY)


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def probabilities(rows) -> np.ndarray:
    return np.array([row["probabilities"] for row in rows], dtype=np.float32)


# ------------------------------------------------------------------------------------- status, metadata

def test_status_lists_every_version_available(rest):
    reply = rest.get(f"/v1/models/{MODEL}")
    assert reply.status == 200, reply.body
    versions = {v["version"]: v for v in reply.json["model_version_status"]}
    assert set(versions) >= {str(STABLE), str(CANARY)}
    for entry in versions.values():
        assert entry["state"] == "AVAILABLE"
        assert entry["status"] == {"error_code": "OK", "error_message": ""}


@pytest.mark.parametrize("path", [
    f"/v1/models/{MODEL}/versions/{STABLE}",
    f"/V1/MODELS/{MODEL}/VERSIONS/{STABLE}",
    f"/v1/Models/{MODEL}/Labels/stable",
])
def test_status_of_one_version_any_case(rest, path):
    reply = rest.get(path)
    assert reply.status == 200, reply.body
    states = {v["version"]: v["state"] for v in reply.json["model_version_status"]}
    assert states[str(STABLE)] == "AVAILABLE"


@pytest.mark.parametrize("path,version", [
    (f"/v1/models/{MODEL}/metadata", LATEST),
    (f"/v1/models/{MODEL}/versions/{STABLE}/metadata", STABLE),
    (f"/v1/models/{MODEL}/labels/canary/metadata", CANARY),
])
def test_metadata_describes_the_signatures(rest, path, version):
    reply = rest.get(path)
    assert reply.status == 200, reply.body
    doc = reply.json
    assert doc["model_spec"]["name"] == MODEL and doc["model_spec"]["version"] == str(version)
    signatures = doc["metadata"]["signature_def"]["signature_def"]
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert default["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
    assert signatures["serving_pixels"]["inputs"]["pixels"]["dtype"] == "DT_UINT8"


# ------------------------------------------------------------------------------------- predict

def test_row_format_b64_matches_in_process(rest, reference, jpegs):
    reply = rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(j) for j in jpegs]})
    assert reply.status == 200, reply.body
    rows = reply.json["predictions"]
    expected = reference(MODEL, LATEST, image_bytes=np.array(jpegs, dtype=object))
    np.testing.assert_allclose(probabilities(rows), expected["probabilities"], atol=1e-5)
    assert [r["class_id"] for r in rows] == expected["class_id"].tolist()
    assert [r["label"] for r in rows] == [s.decode() for s in expected["label"]]


def test_row_format_named_inputs(rest, reference, jpegs):
    reply = rest.post(f"/v1/models/{MODEL}:predict", {"instances": [{"image_bytes": b64(j)} for j in jpegs[:2]]})
    assert reply.status == 200, reply.body
    expected = reference(MODEL, LATEST, image_bytes=np.array(jpegs[:2], dtype=object))
    np.testing.assert_allclose(probabilities(reply.json["predictions"]), expected["probabilities"], atol=1e-5)


@pytest.mark.parametrize("inputs", ["named", "plain"])
def test_columnar_format(rest, reference, jpegs, inputs):
    values = [b64(j) for j in jpegs[:3]]
    body = {"inputs": {"image_bytes": values} if inputs == "named" else values}
    reply = rest.post(f"/v1/models/{MODEL}:predict", body)
    assert reply.status == 200, reply.body
    outputs = reply.json["outputs"]
    expected = reference(MODEL, LATEST, image_bytes=np.array(jpegs[:3], dtype=object))
    np.testing.assert_allclose(np.array(outputs["probabilities"]), expected["probabilities"], atol=1e-5)
    assert outputs["class_id"] == expected["class_id"].tolist()


@pytest.mark.parametrize("path,version", [
    (f"/v1/models/{MODEL}/versions/{STABLE}:predict", STABLE),
    (f"/v1/models/{MODEL}/versions/{CANARY}:predict", CANARY),
    (f"/v1/models/{MODEL}/labels/stable:predict", STABLE),
    (f"/v1/models/{MODEL}/labels/canary:predict", CANARY),
    (f"/V1/Models/{MODEL}/Labels/canary:predict", CANARY),
])
def test_versions_and_labels_answer_from_that_version(rest, reference, jpegs, path, version):
    reply = rest.post(path, {"instances": [b64(jpegs[0])]})
    assert reply.status == 200, reply.body
    got = probabilities(reply.json["predictions"])
    expected = reference(MODEL, version, image_bytes=np.array(jpegs[:1], dtype=object))["probabilities"]
    other = reference(MODEL, STABLE + CANARY - version, image_bytes=np.array(jpegs[:1], dtype=object))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, other["probabilities"], atol=1e-5), "the two versions must be told apart"


def test_pixels_signature_from_json_lists(rest, reference):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    body = {"signature_name": "serving_pixels", "instances": pixels.tolist()}
    reply = rest.post(f"/v1/models/{OTHER_MODEL}:predict", body)
    assert reply.status == 200, reply.body
    expected = reference(OTHER_MODEL, 1, "serving_pixels", pixels=pixels)
    np.testing.assert_allclose(probabilities(reply.json["predictions"]), expected["probabilities"], atol=1e-5)


def test_bytes_outputs_come_back_as_b64(rest):
    data = [b"\x00\xffbinary\x80", "ünïcode".encode()]
    reply = rest.post(f"/v1/models/{ECHO_MODEL}:predict", {"instances": [b64(d) for d in data]})
    assert reply.status == 200, reply.body
    rows = reply.json["predictions"]
    assert [base64.b64decode(r["echo_bytes"]["b64"]) for r in rows] == data
    assert [r["length"] for r in rows] == [len(d) for d in data]
    columnar = rest.post(f"/v1/models/{ECHO_MODEL}:predict", {"inputs": {"data_bytes": [b64(d) for d in data]}})
    assert [base64.b64decode(v["b64"]) for v in columnar.json["outputs"]["echo_bytes"]] == data


def test_plain_json_strings_are_utf8(rest):
    reply = rest.post(f"/v1/models/{ECHO_MODEL}:predict", {"instances": ["voiture", "ünï"]})
    assert reply.status == 200, reply.body
    assert [base64.b64decode(r["echo_bytes"]["b64"]).decode() for r in reply.json["predictions"]] == ["voiture", "ünï"]


# ------------------------------------------------------------------------------------- errors

def _error(reply, status: int, needle: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    doc = reply.json
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    assert needle.lower() in doc["error"].lower(), doc["error"]


@pytest.mark.parametrize("path,status,needle", [
    ("/v1/models/no_such_model:predict", 404, "Servable not found"),
    (f"/v1/models/{MODEL}/versions/99:predict", 404, "Servable not found"),
    (f"/v1/models/{MODEL}/labels/no_such_label:predict", 400, "Unrecognized servable version label"),
    (f"/v1/models/{MODEL}/versions/-1:predict", 400, "Malformed request"),
    ("/v1/models/bad/name:predict", 400, "Malformed request"),
])
def test_unknown_model_version_label(rest, jpegs, path, status, needle):
    _error(rest.post(path, {"instances": [b64(jpegs[0])]}), status, needle)


@pytest.mark.parametrize("body,needle", [
    ({"signature_name": "no_such_signature", "instances": ["x"]}, "no_such_signature"),
    ({"instances": [{"wrong_name": "x"}]}, "wrong_name"),
    ({"inputs": {"wrong_name": ["x"]}}, "image_bytes"),
    ({"instances": [1.5, 2.5]}, "string"),                       # TF: "string", here "DT_STRING"
    ({"signature_name": "serving_pixels", "instances": [["a", "b"]]}, "uint8"),
    ({"signature_name": "serving_pixels", "instances": [[[1, 2, 3]]]}, ""),  # wrong rank
    ({"signature_name": "serving_pixels", "instances": [[[[1, 2, 3]]], [[[1, 2]]]]}, ""),
    ({"instances": ["x"], "inputs": ["x"]}, "instances"),
    ({"instances": []}, "instances"),
    ({"signature_name": 5, "instances": ["x"]}, "signature_name"),
    ({"nothing": 1}, "Missing 'inputs' or 'instances' key"),
    ({"instances": [{"b64": "@@not base64@@"}]}, "base64"),
])
def test_bad_request_bodies(rest, body, needle):
    _error(rest.post(f"/v1/models/{MODEL}:predict", body), 400, needle)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"instances": [1,]}'])
def test_malformed_json(rest, raw):
    _error(rest.post(f"/v1/models/{MODEL}:predict", raw), 400, "")


@pytest.mark.extension
def test_deeply_nested_json_is_refused(rest, embedded_only):
    _error(rest.post(f"/v1/models/{MODEL}:predict", b'{"instances": ' + b"[" * 100000), 400, "JSON")


def test_unknown_paths(rest):
    _error(rest.get("/v1/nothing/here"), 400, "Malformed request")
    _error(rest.get("/v1/models"), 400, "Missing model name")
    assert rest.get("/not/v1").status == 404
    _error(rest.get("/v1/models/no_such_model"), 404, "no_such_model")


def test_classify_and_regress_without_such_signatures(rest):
    for verb in ("classify", "regress"):
        _error(rest.post(f"/v1/models/{MODEL}:{verb}", {"examples": [{"x": 1.0}]}), 400, "method_name")


def test_truncated_jpeg_is_invalid_argument(rest, jpegs):
    _error(rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[0][: len(jpegs[0]) // 2])]}), 400,
           "jpeg")


def test_an_8_bit_palette_bmp_is_answered_like_the_png_of_its_pixels(rest, jpegs):
    """The exported graph looks 8-bit BMP indices up in the file's palette (TensorFlow's decoder alone reads
    them as grey levels and the model would answer confidently about the wrong picture)."""
    import io

    from PIL import Image

    paletted = Image.open(io.BytesIO(jpegs[2])).convert("P", palette=Image.ADAPTIVE, colors=64)
    encoded = {}
    for fmt in ("BMP", "PNG"):
        buf = io.BytesIO()
        paletted.save(buf, fmt)
        encoded[fmt] = buf.getvalue()
    assert encoded["BMP"][28] == 8  # bits per pixel: a palette BMP
    replies = [rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(encoded[fmt])]}) for fmt in encoded]
    assert all(reply.status == 200 for reply in replies), [reply.body for reply in replies]
    bmp, png = (probabilities(reply.json["predictions"]) for reply in replies)
    np.testing.assert_allclose(bmp, png, atol=1e-5)


def test_server_keeps_answering_after_errors(rest, reference, jpegs):
    for raw in (b"{", b'{"instances": [1]}', b'{"instances": [{"b64": "%%"}]}'):
        assert rest.post(f"/v1/models/{MODEL}:predict", raw).status == 400
    reply = rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[1])]})
    assert reply.status == 200
    expected = reference(MODEL, LATEST, image_bytes=np.array(jpegs[1:2], dtype=object))
    np.testing.assert_allclose(probabilities(reply.json["predictions"]), expected["probabilities"], atol=1e-5)


# ------------------------------------------------------------------------------------- metrics

def test_prometheus_metrics_use_tf_serving_names(rest, jpegs):
    assert rest.post(f"/v1/models/{OTHER_MODEL}:predict", {"instances": [b64(jpegs[0])]}).status == 200
    reply = rest.get("/monitoring/prometheus/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    assert f':tensorflow:serving:request_count{{model_name="{OTHER_MODEL}",status="OK"}}' in text
    assert ":tensorflow:serving:request_latency_bucket{" in text and 'entrypoint="REST"' in text


# ------------------------------------------------------------------------------------- extensions

@pytest.mark.extension
@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"this is a text file, not a photo", "not a recognised image"),
])
def test_images_are_probed_before_decoding(rest, embedded_only, data, needle):
    _error(rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(data)]}), 400, needle)


@pytest.mark.extension
def test_image_variants_tensorflow_cannot_decode_are_named_not_called_corrupt(rest, embedded_only, jpegs):
    import io

    from PIL import Image

    photo = Image.open(io.BytesIO(jpegs[0]))
    variants = {"BMP with 1 bit(s) per pixel is not supported": (photo.convert("1"), "BMP", {}),
                "animated WebP (2 frames) is not supported": (photo, "WEBP", {"save_all": True,
                                                                             "append_images": [photo.rotate(90)]})}
    for needle, (image, fmt, options) in variants.items():
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        _error(rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(buf.getvalue())]}), 400, needle)


@pytest.mark.extension
def test_decompression_bomb_is_refused_before_decoding(rest, embedded_only):
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (60_000).to_bytes(4, "big") + (60_000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    _error(rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(bytes(data))]}), 400, "pixels")


@pytest.mark.extension
def test_empty_columnar_batch_is_refused(rest, embedded_only):
    _error(rest.post(f"/v1/models/{MODEL}:predict", {"inputs": {"image_bytes": []}}), 400, "empty batch")


@pytest.mark.extension
def test_readiness_and_liveness(rest, embedded_only):
    ready = rest.get("/v1/ready")
    assert ready.status == 200 and ready.json["ready"] is True
    assert ready.json["models"][MODEL] is True
    assert rest.get("/v1/live").json == {"live": True}


@pytest.mark.extension
def test_per_version_latency_metric(rest, embedded_only, jpegs):
    assert rest.post(f"/v1/models/{MODEL}/versions/{STABLE}:predict", {"instances": [b64(jpegs[0])]}).status == 200
    text = rest.get("/monitoring/prometheus/metrics").body.decode()
    assert (f'carclf_serving_request_latency_by_version_count{{API="Predict",entrypoint="REST",'
            f'model_name="{MODEL}",model_version="{STABLE}"}}') in text


@pytest.mark.extension
def test_shape_errors_name_both_shapes(rest, embedded_only):
    reply = rest.post(f"/v1/models/{MODEL}:predict", {"signature_name": "serving_pixels", "instances": [[[1, 2, 3]]]})
    _error(reply, 400, "expects shape [-1,-1,-1,3] but received shape [1,1,3]")


@pytest.mark.extension
def test_a_body_of_exactly_max_request_bytes_is_answered_and_one_byte_more_is_413(private_server,
                                                                                   conformance_repository, jpegs):
    """--max_request_bytes is the largest request accepted (serving/README.md): a body padded to exactly the
    limit is answered; one byte more is refused with 413 and a JSON error."""
    body = json.dumps({"instances": [b64(jpegs[0])]}).encode()
    limit = len(body) + 1000
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            max_request_bytes=limit, enable_model_warmup=False)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    exact = body + b" " * (limit - len(body))  # JSON allows trailing whitespace
    reply = rest.post(f"/v1/models/{OTHER_MODEL}:predict", exact)
    assert reply.status == 200, reply.body
    assert len(reply.json["predictions"]) == 1
    _error(rest.post(f"/v1/models/{OTHER_MODEL}:predict", exact + b" "), 413, "larger than the limit")
