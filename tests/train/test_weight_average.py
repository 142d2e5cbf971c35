"""Stochastic weight averaging over a stage's last epochs: the mean of exactly those epochs' weights, the
head's BatchNorm statistics measured anew on the averaged features, and a stage that ends on them."""

from __future__ import annotations

import numpy as np
import pytest

from carclf import backbones
from carclf.train import loop, runs
from carclf.train.callbacks import WeightAverage
from carclf.train.model import build_classifier, refresh_head_batchnorm, set_trainable
from carclf.train.recipe import HeadConfig, Unfreeze, parse_recipe
from tests.train.conftest import tiny_recipe


def _small_model():
    import keras

    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))


def test_average_is_the_mean_of_the_last_epochs_only():
    model = _small_model()
    averager = WeightAverage(3)
    averager.set_model(model)
    rng = np.random.default_rng(0)
    seen = []
    for epoch in range(5):
        weights = [rng.normal(size=w.shape).astype("float32") for w in model.get_weights()]
        model.set_weights(weights)
        seen.append(weights)
        averager.on_epoch_end(epoch)
    assert averager.count == 3 and averager.epochs == [3, 4, 5]
    for got, *kept in zip(averager.average(), *seen[2:], strict=True):
        np.testing.assert_allclose(got, np.mean(kept, axis=0), rtol=1e-6)
        assert got.dtype == np.float32


def test_average_without_an_epoch_is_an_error():
    with pytest.raises(ValueError, match="nothing to average"):
        WeightAverage(2).average()


def test_refresh_sets_the_head_statistics_to_those_of_its_inputs():
    import keras
    import tensorflow as tf

    spec = backbones.get("mobilenet_v2")
    model, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,)), 32, weights=None)
    set_trainable(model, spec, Unfreeze("none"))
    pixels = np.random.default_rng(1).uniform(0, 255, (10, 32, 32, 3)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((pixels, np.zeros(10, "int32"))).batch(4)
    assert refresh_head_batchnorm(model, batches, steps=3) == 10
    features = np.asarray(keras.Model(model.input, model.get_layer("head_pool").output)(pixels, training=False))
    bn = model.get_layer("head_bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), features.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), features.var(axis=0), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_a_stage_with_average_last_ends_on_the_mean_weights(tmp_path, two_class_data, monkeypatch):
    """Three epochs, the last two averaged: the final weights are the mean of the weights saved after epochs 2
    and 3 (trainable ones exactly; the head's BatchNorm statistics are measured anew)."""
    import keras

    recipe = tiny_recipe(two_class_data)
    recipe["stages"] = [{"name": "all", "epochs": 3, "lr": 1e-3, "batch_size": 4, "image_size": 32,
                         "unfreeze": "all", "average_last": 2}]
    recipe["schedule"] = {"early_stopping_patience": 10}
    parsed = parse_recipe(recipe, source="tiny")

    per_epoch: list[list[np.ndarray]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            per_epoch.append([np.array(w) for w in self.model.get_weights()])

    original = loop._callbacks
    monkeypatch.setattr(loop, "_callbacks", lambda *a, **k: original(*a, **k) + [Record()])
    run_dir = loop.train(parsed, runs_root=tmp_path / "runs", verbose=0)
    assert runs.read_json(run_dir / runs.RUN_INFO)["averaged_epochs"] == {"all": [2, 3]}
    spec = backbones.get(parsed.backbone)
    final, _ = build_classifier(spec, 2, parsed.head, 32, None, freeze_batchnorm=False)
    final.load_weights(str(run_dir / runs.FINAL_WEIGHTS))
    bn = final.get_layer("head_bn")
    stats = {id(bn.moving_mean), id(bn.moving_variance)}
    expected = [np.mean([per_epoch[1][i], per_epoch[2][i]], axis=0) for i in range(len(per_epoch[0]))]
    for variable, want in zip(final.weights, expected, strict=True):
        if id(variable) not in stats:
            np.testing.assert_allclose(np.asarray(variable), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(bn.moving_mean), expected[[id(v) for v in final.weights].index(
        id(bn.moving_mean))])
