"""Export to the model repository: next integer version, atomic, checked against the Keras model."""

from __future__ import annotations

import json
import shutil

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


def test_the_export_stores_each_weight_of_the_model_once_and_nothing_else(tmp_path, labels, photos):
    """The SavedModel's variables are exactly the Keras model's weights (trainable and BatchNorm statistics),
    each stored once with its value: no copy, no Keras bookkeeping such as dropout seed states."""
    import keras
    import tensorflow as tf

    tiny = build_tiny_classifier(len(labels))
    inputs = keras.Input(tiny.input_shape[1:])
    model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=1)(tiny(inputs)))  # identity when serving
    version = _export(tmp_path, model, labels, [p.read_bytes() for p in photos[:2]])
    checkpoint = str(version / "variables" / "variables")
    stored = [tf.train.load_variable(checkpoint, name) for name, _ in tf.train.list_variables(checkpoint)
              if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]

    def key(value):
        return np.shape(value), np.asarray(value).tobytes()

    assert sorted(map(key, stored)) == sorted(key(w.numpy()) for w in model.weights)
    assert len(model.variables) > len(model.weights)  # the dropout's seed state, which the export leaves out


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


def test_the_labels_asset_lists_the_labels_in_output_order(tmp_path, labels, photos):
    """assets/labels.txt line i names output i, whatever the labels' alphabetical order."""
    import tensorflow as tf

    shuffled = list(reversed(labels))
    assert shuffled != sorted(shuffled)
    payload = [p.read_bytes() for p in photos[:2]]
    version = _export(tmp_path, build_tiny_classifier(len(labels)), shuffled, payload)
    asset = (version / "assets" / contract.LABELS_ASSET).read_text(encoding="utf-8").splitlines()
    assert asset == shuffled
    serve = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_BYTES]
    out = serve(**{contract.INPUT_IMAGE_BYTES: tf.constant(payload)})
    answers = zip(out[contract.OUTPUT_CLASS_ID].numpy(), out[contract.OUTPUT_LABEL].numpy(), strict=True)
    for class_id, label in answers:
        assert asset[int(class_id)] == label.decode("utf-8")


def _rectangular_classifier(num_classes: int, size: tuple[int, int]):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)  # position-dependent: a differently resized input gives other answers
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def test_pixels_matching_only_one_side_of_a_rectangular_model_are_resized(tmp_path, labels, photos):
    """serving_pixels passes pixels through only when both height and width are the model's; pixels with just the
    height (or just the width) right are resized in-graph like any other size."""
    import tensorflow as tf

    size = (32, 48)  # height, width
    model = _rectangular_classifier(len(labels), size)
    payload = [p.read_bytes() for p in photos[:2]]
    version = export_model(model, repository=tmp_path, name="rect", input_size=size, labels=labels,
                           verify_images=payload)
    serve = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_PIXELS]
    image = imaging.decode_image(tf.constant(payload[0]))
    for sent in ((32, 80), (60, 48), size):
        pixels = imaging.prepare(image, sent)[None]
        expected = model(tf.cast(imaging.prepare(pixels, size), tf.float32), training=False)
        got = serve(**{contract.INPUT_PIXELS: pixels})[contract.OUTPUT_PROBABILITIES]
        np.testing.assert_allclose(got.numpy(), np.asarray(expected), atol=1e-5, err_msg=str(sent))


def test_a_models_own_folder_given_as_the_repository_is_refused_before_the_run_loads(tiny_repository_template,
                                                                                     tmp_path, capsys):
    """``carclf export RUN --repository model_repository/tiny_a`` would write tiny_a/<name>/1, which no server
    reads as a version: refused, naming the repository to give, before the run is read (there is none here)."""
    from carclf.cli import main as carclf_main

    model = tmp_path / "repo" / "tiny_a"
    model.parent.mkdir()
    shutil.copytree(tiny_repository_template / "tiny_a", model)
    before = sorted(p.name for p in model.iterdir())
    assert carclf_main(["export", str(tmp_path / "no_run"), "--repository", str(model), "--name", "tiny_a"]) == 2
    versions = sorted(int(name) for name in before if name.isdigit())
    assert (f"--repository {str(model)!r} is itself a model (its version folders {versions}): give the repository "
            f"that holds it, here {str(model.parent)!r}") in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before
