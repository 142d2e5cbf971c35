"""Export to the model repository: next integer version, atomic, checked against the Keras model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carclf import contract, imaging
from carclf.errors import InvalidInput
from carclf.train.export import export_model
from tests.fixtures import TINY_SIZE, build_tiny_classifier


def _export(repo, model, labels, photos, **kwargs):
    return export_model(model, repository=repo, name="tiny", input_size=TINY_SIZE, labels=labels,
                        warmup_images=photos[:1], verify_images=photos[:2], **kwargs)


def test_versions_are_numbered_and_never_overwritten(tmp_path, labels, photos):
    model = build_tiny_classifier(len(labels))
    payload = [p.read_bytes() for p in photos[:2]]
    first = _export(tmp_path, model, labels, payload)
    second = _export(tmp_path, model, labels, payload)
    assert (first.name, second.name) == ("1", "2")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["1", "2"]  # no temporary folder left
    (tmp_path / "tiny" / "3").write_text("a stray file with the next version's name")
    assert _export(tmp_path, model, labels, payload).name == "4"  # skipped, not retried forever


def test_failed_check_or_bad_labels_publish_nothing(tmp_path, labels, photos):
    model = build_tiny_classifier(len(labels))
    payload = [p.read_bytes() for p in photos[:2]]
    with pytest.raises(InvalidInput, match="disagrees"):
        _export(tmp_path, model, labels, payload, atol=-1.0)
    with pytest.raises(InvalidInput, match="labels for a model with"):
        _export(tmp_path, model, labels[:3], payload)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_pixels_signature_resizes_like_training(tmp_path, labels, photos):
    import tensorflow as tf

    model = build_tiny_classifier(len(labels))
    payload = [p.read_bytes() for p in photos[:2]]
    version = _export(tmp_path, model, labels, payload)
    serve = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_PIXELS]
    image = imaging.decode_image(tf.constant(payload[0]))
    big = imaging.prepare(image, 57)[None]  # any size: resized in-graph with the one resize
    expected = model(tf.cast(imaging.prepare(big, TINY_SIZE), tf.float32), training=False)
    got = serve(**{contract.INPUT_PIXELS: big})[contract.OUTPUT_PROBABILITIES]
    np.testing.assert_allclose(got.numpy(), np.asarray(expected), atol=1e-5)


def test_warmup_records_cover_both_signatures_and_replay(tmp_path, labels, photos):
    """The exported warmup file holds JPEG requests for serving_default and prepared-pixel requests for
    serving_pixels; the server's own warmup replays every one of them against the version."""
    from carclf.serving.savedmodel import SavedModelServable
    from carclf.serving.warmup import read_warmup_requests, warmup_file

    payload = [p.read_bytes() for p in photos[:3]]
    version = export_model(build_tiny_classifier(len(labels)), repository=tmp_path, name="tiny",
                           input_size=TINY_SIZE, labels=labels, warmup_images=payload, verify_images=payload[:1])
    requests = read_warmup_requests(warmup_file(version))
    by_signature = {}
    for request in requests:
        by_signature.setdefault(request.signature_name, []).append(request.inputs)
    assert len(by_signature[contract.SIGNATURE_BYTES]) == 3
    assert [r[contract.INPUT_IMAGE_BYTES].tolist() for r in by_signature[contract.SIGNATURE_BYTES]] == \
        [[data] for data in payload]
    pixels = by_signature[contract.SIGNATURE_PIXELS]
    assert len(pixels) == 2
    for data, inputs in zip(payload, pixels, strict=False):
        expected = imaging.prepare(imaging.decode_image(data), TINY_SIZE).numpy()
        np.testing.assert_array_equal(inputs[contract.INPUT_PIXELS], expected[None])
    card = json.loads((version / "assets.extra" / contract.MODEL_CARD).read_text())
    assert card["warmup_records"] == len(requests) == 5
    assert SavedModelServable("tiny", 1, version).warmup() == 5


def test_a_letterbox_model_exports_its_resize_in_graph_and_card(tmp_path, labels, photos):
    """Served from JPEG bytes, a letterbox model sees exactly the letterboxed pixels it was trained on."""
    import tensorflow as tf

    from carclf.train.evaluate import load_model

    model = build_tiny_classifier(len(labels))
    payload = [p.read_bytes() for p in photos[:2]]
    version = _export(tmp_path, model, labels, payload, resize="letterbox")  # the export check passes
    card = json.loads((version / "assets.extra" / contract.MODEL_CARD).read_text())
    assert card["resize"] == "letterbox" and card["export_check_max_abs_diff"] <= 1e-4
    serve = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_BYTES]
    got = serve(**{contract.INPUT_IMAGE_BYTES: tf.constant(payload[:1])})[contract.OUTPUT_PROBABILITIES]
    image = imaging.decode_image(tf.constant(payload[0]))
    letterboxed = model(tf.cast(imaging.prepare(image, TINY_SIZE, "letterbox")[None], tf.float32), training=False)
    squashed = model(tf.cast(imaging.prepare(image, TINY_SIZE)[None], tf.float32), training=False)
    np.testing.assert_allclose(got.numpy(), np.asarray(letterboxed), atol=1e-5)
    assert not np.allclose(np.asarray(letterboxed), np.asarray(squashed), atol=1e-5)
    assert load_model(version).resize == "letterbox"
