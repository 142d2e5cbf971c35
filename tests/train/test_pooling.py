"""The head's pooling: bilinear (second-order) pooling and the backbone layer the head reads."""

from __future__ import annotations

import numpy as np
import pytest

from carclf import backbones, contract, imaging
from carclf.errors import ConfigError
from carclf.train import data, evaluate, loop, runs
from carclf.train.export import export_model
from carclf.train.model import build_classifier
from carclf.train.pooling import BilinearPooling
from carclf.train.recipe import HeadConfig, parse_recipe
from tests.train.conftest import make_two_class_data, tiny_recipe


def reference_bilinear(maps: np.ndarray) -> np.ndarray:
    """Bilinear pooling written out with numpy loops over the photo: the definition the layer must meet."""
    out = []
    for photo in maps.astype(np.float64):
        vectors = photo.reshape(-1, photo.shape[-1])
        gram = sum(np.outer(v, v) for v in vectors) / len(vectors)
        pairs = np.array([gram[i, j] for i in range(gram.shape[0]) for j in range(i, gram.shape[0])])
        rooted = np.sign(pairs) * np.sqrt(np.abs(pairs))
        out.append(rooted / np.linalg.norm(rooted))
    return np.stack(out)


def test_bilinear_pooling_is_the_normalised_mean_outer_product():
    maps = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype("float32")
    got = np.asarray(BilinearPooling()(maps))
    assert got.shape == (3, 6 * 7 // 2)
    np.testing.assert_allclose(got, reference_bilinear(maps), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bilinear_pooling_ignores_where_features_are():
    """Orderless: shuffling the positions of a feature map (or mirroring it) leaves the pooled vector as it is."""
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    shuffled = maps.reshape(2, 12, 5)[:, rng.permutation(12)].reshape(2, 3, 4, 5)
    pool = BilinearPooling()
    np.testing.assert_allclose(np.asarray(pool(shuffled)), np.asarray(pool(maps)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(pool(maps[:, :, ::-1])), np.asarray(pool(maps)), atol=1e-6)


def test_the_head_reads_the_named_backbone_layer():
    spec = backbones.get("mobilenet_v2")
    head = HeadConfig(pooling="bilinear", feature_layer="block_16_project_BN", hidden_units=())
    model, _ = build_classifier(spec, 3, head, (64, 96), None)
    backbone = model.get_layer("backbone")
    assert backbone.output.shape[-1] == 320 and "out_relu" not in {layer.name for layer in backbone.layers}
    assert model.get_layer("head_pool").output.shape[-1] == 320 * 321 // 2
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (2, 3)
    # the head is wired to the photo: two different photos get two different answers
    assert not np.allclose(probabilities[0], probabilities[1], atol=1e-6)


def test_an_unknown_feature_layer_or_pooling_names_the_field(tmp_path):
    spec = backbones.get("mobilenet_v2")
    with pytest.raises(ConfigError, match=r"head\.feature_layer.*'block_99'"):
        build_classifier(spec, 3, HeadConfig(feature_layer="block_99"), 64, None)
    recipe = tiny_recipe(tmp_path, head={"pooling": "second_order"})  # parsing does not read the data
    with pytest.raises(ConfigError, match=r"head\.pooling.*second_order"):
        parse_recipe(recipe, source="tiny")


@pytest.mark.slow
def test_a_bilinear_run_trains_exports_and_serves_the_same_answers(tmp_path, photos):
    """A frozen backbone with a bilinear head trains through the one loop and exports; its SavedModel answers
    JPEG bytes as the run's Keras model does, and the run re-evaluates to its recorded figures."""
    import tensorflow as tf

    data_root = make_two_class_data(tmp_path / "data")
    recipe = parse_recipe(tiny_recipe(
        data_root, head={"pooling": "bilinear", "feature_layer": "block3_bn", "hidden_units": [], "dropout": 0.0,
                         "l2": 1e-2},
        stages=[{"name": "head", "epochs": 2, "lr": 1e-3, "batch_size": 4, "image_size": 48, "unfreeze": "none"}]),
        source="tiny")
    run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)
    trained = runs.load_run(run_dir)
    assert isinstance(trained.model.get_layer("head_pool"), BilinearPooling)
    assert trained.model.get_layer("backbone").output.shape[-1] == 24  # block3's width; block4 ends on 32

    payload = [p.read_bytes() for p in photos[:3]]
    version = export_model(trained.model, repository=tmp_path / "repo", name="bilinear", input_size=48,
                           labels=trained.class_names, warmup_images=payload[:1], verify_images=payload)
    served = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_BYTES](
        **{contract.INPUT_IMAGE_BYTES: tf.constant(payload)})[contract.OUTPUT_PROBABILITIES].numpy()
    pixels = np.stack([imaging.prepare(imaging.decode_image(tf.constant(b)), 48).numpy() for b in payload])
    expected = np.asarray(trained.model(pixels.astype("float32"), training=False))
    np.testing.assert_allclose(served, expected, atol=1e-4)

    loaded = evaluate.load_model(run_dir)
    split = data.load_split(run_dir / runs.SPLIT, data.read_folder_layout(loaded.info["data_root"]))
    again = evaluate.evaluate_photos(loaded.predictor, [s.path for s in split.val], [s.label for s in split.val],
                                     loaded.input_size, ["none"], loaded.class_ids, loaded.class_names)
    stored = runs.read_json(run_dir / runs.METRICS)["policies"]["none"]
    assert again["none"]["confusion_matrix"] == stored["confusion_matrix"]
    assert again["none"]["log_loss"] == pytest.approx(stored["log_loss"], abs=1e-5)
