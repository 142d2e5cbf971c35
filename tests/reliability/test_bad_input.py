"""Every case of the bad-input table against a real server: right status, a message naming the problem,
the server still up and the next valid request on the same route answered correctly.

Valid-but-unusual uploads (grayscale, CMYK, RGBA, animated GIF, WebP) must be classified: their answer is
compared with the same SavedModel run in-process (backbone) or the ensemble run in-process through the
server's predictor (no transport), never with numbers written down here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from tests.reliability import images
from tests.reliability.bad_inputs import (
    CASES,
    GRPC,
    WEB,
    Case,
    GrpcRequest,
    RestRequest,
    Sample,
    b64,
    documented_table,
    grpc_predict,
    markdown_table,
    rest_json,
    strings,
    web_upload,
)
from tests.reliability.servers import BACKBONE, ENSEMBLE
from tests.serving.conftest import Rest
from tests.serving.test_grpc import outputs

LATEST_BACKBONE_VERSION = 2
ATOL = 1e-5


@dataclass
class Answer:
    status: int | str       # HTTP status or gRPC code name
    message: str            # the error message ("" on success)
    probabilities: np.ndarray | None = None


@dataclass
class Routes:
    rest: Rest
    page: Rest
    channel: grpc.Channel
    server: object
    sample: Sample
    repository: object
    _saved: dict

    def send(self, case: Case) -> Answer:
        request = case.build(self.sample)
        if isinstance(request, GrpcRequest):
            return self.send_grpc(request)
        return self.send_rest(self.page if case.transport == WEB else self.rest, request)

    def send_rest(self, client: Rest, request: RestRequest) -> Answer:
        headers = {"Content-Type": "application/json"} if request.body is not None else {}
        headers.update(request.headers)
        try:
            reply = client.request(request.method, request.path, request.body, headers)
        except (ConnectionResetError, BrokenPipeError) as exc:  # the server may close before reading it all
            return Answer(-1, f"{type(exc).__name__}: connection closed while sending")
        doc = json.loads(reply.body) if reply.body else {}
        if reply.status != 200:
            return Answer(reply.status, doc.get("error", reply.body.decode(errors="replace")))
        rows = doc.get("predictions")
        probs = (np.array([r["probabilities"] for r in rows]) if rows is not None
                 else np.array(doc["outputs"]["probabilities"]))
        return Answer(200, "", probs.astype(np.float32))

    def send_grpc(self, request: GrpcRequest) -> Answer:
        from tensorflow_serving.apis import predict_pb2

        raw = isinstance(request.message, bytes)
        call = self.channel.unary_unary(
            f"/tensorflow.serving.PredictionService/{request.method}",
            request_serializer=None if raw else predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString)
        try:
            response = call(request.message, timeout=60)
        except grpc.RpcError as exc:
            return Answer(exc.code().name, exc.details() or "")
        return Answer("OK", "", outputs(response)["probabilities"])

    def reference(self, model: str, data: list[bytes]) -> np.ndarray:
        """The answer computed without any transport: the SavedModel in-process (backbone), or the ensemble
        through the server's in-process predictor."""
        batch = np.array(data, dtype=object)
        if model == ENSEMBLE:
            return self.server.predictor.predict(ENSEMBLE, {"image_bytes": batch}).outputs["probabilities"]
        import tensorflow as tf

        if model not in self._saved:
            self._saved[model] = tf.saved_model.load(str(self.repository / model / str(LATEST_BACKBONE_VERSION)))
        return self._saved[model].signatures["serving_default"](image_bytes=tf.constant(batch))["probabilities"].numpy()


@pytest.fixture(scope="module")
def routes(reliability_server, server_rest, page_rest, grpc_channel, photo_bytes_list, tiny_repository_template):
    return Routes(server_rest, page_rest, grpc_channel, reliability_server,
                  Sample(photo_bytes_list[0], photo_bytes_list), tiny_repository_template, {})


def follow_up(routes: Routes, case: Case) -> Answer:
    """A valid request on the same route: the server must still be up and answer it correctly."""
    model = case.model if case.model in (BACKBONE, ENSEMBLE) else BACKBONE
    photo = routes.sample.photos[1]
    if case.transport == GRPC:
        answer = routes.send_grpc(grpc_predict(model, image_bytes=strings(photo)))
    elif case.transport == WEB:
        answer = routes.send_rest(routes.page, web_upload(photo))
    else:
        answer = routes.send_rest(routes.rest, rest_json(model, {"instances": [b64(photo)]}))
    assert answer.status in (200, "OK"), f"the valid request after {case.id} failed: {answer}"
    np.testing.assert_allclose(answer.probabilities, routes.reference(model, [photo]), atol=ATOL)
    return answer


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(routes: Routes, case: Case):
    answer = routes.send(case)
    assert answer.status == case.expect, f"{case.id}: expected {case.expect}, got {answer.status}: {answer.message}"
    assert case.needle.lower() in answer.message.lower(), f"{case.id}: message does not name the problem: " \
                                                          f"{answer.message!r}"
    if not case.valid:  # one line for the caller: no stack of the server's files (TF's "Detected at node ...")
        assert "\n" not in answer.message.strip() and 'File "' not in answer.message, \
            f"{case.id}: the message carries a stack: {answer.message!r}"
    if case.valid:
        data = case.build(routes.sample)
        sent = _images_sent(data)
        np.testing.assert_allclose(answer.probabilities, routes.reference(case.model, sent), atol=ATOL)
    follow_up(routes, case)


def _images_sent(request: RestRequest | GrpcRequest) -> list[bytes]:
    """The photos a valid case sent, read back from the request itself."""
    import base64

    from carclf.tensors import to_ndarray

    if isinstance(request, GrpcRequest):
        return list(to_ndarray(request.message.inputs["image_bytes"]))
    doc = json.loads(request.body if request.plain is None else request.plain)
    items = doc.get("instances") or doc["inputs"]["image_bytes"]
    return [base64.b64decode(item["b64"]) for item in items]


@pytest.mark.parametrize("unusual,twin", [(images.rgba_png, images.rgb_png),
                                          (images.animated_gif, images.first_frame_png)],
                         ids=["alpha_is_ignored", "first_gif_frame_is_used"])
def test_unusual_encodings_mean_what_they_show(routes: Routes, unusual, twin):
    """An RGBA PNG is classified as its RGB pixels, an animated GIF as its first frame: the same answer as
    the lossless PNG of those pixels, on the backbone and on the ensemble."""
    photo = routes.sample.photo
    for model in (BACKBONE, ENSEMBLE):
        np.testing.assert_allclose(routes.reference(model, [unusual(photo)]), routes.reference(model, [twin(photo)]),
                                   atol=ATOL)


def test_the_table_covers_the_issue():
    keys = {c.key for c in CASES}
    required = {"truncated_jpeg", "zero_bytes", "text_file", "decompression_bomb", "one_pixel", "grayscale_jpeg",
                "cmyk_jpeg", "rgba_png", "animated_gif", "wrong_dtype", "wrong_rank", "empty_batch",
                "batch_over_limit", "missing_input", "unknown_input_name", "bad_base64", "invalid_json",
                "deeply_nested_json", "non_utf8_body", "instances_with_inputs", "unknown_model", "unknown_version",
                "unknown_label", "unknown_signature", "negative_version", "illegal_label_characters",
                "oversized_body"}
    assert required <= keys, required - keys
    assert len([k for k in keys if not all(c.valid for c in CASES if c.key == k)]) >= 30
    assert {c.transport for c in CASES} == {"REST", "gRPC", "web upload"}


def test_docs_table_is_generated_from_the_cases():
    assert documented_table() == markdown_table(), \
        "docs/RELIABILITY.md is stale: run `python -m tests.reliability.bad_inputs --write`"
