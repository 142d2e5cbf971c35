"""What a recipe's head, optimizer, loss and schedule fields build: each declared setting reaches the model,
the optimizer, the loss or the callbacks a run uses."""

from __future__ import annotations

import numpy as np
import pytest

from carclf import backbones
from carclf.train import loop
from carclf.train.callbacks import Timing
from carclf.train.model import build_classifier, head_batchnorm_layers
from carclf.train.pooling import pooling_layer
from carclf.train.recipe import HeadConfig, LossConfig, parse_recipe
from tests.train.conftest import tiny_recipe


def _classifier(**head):
    model, _ = build_classifier(backbones.get("mobilenet_v2"), 3, HeadConfig(**head), 32, weights=None)
    return model


def test_avg_pooling_is_the_mean_and_max_pooling_the_maximum_over_positions():
    features = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(pooling_layer("avg")(features)), features.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pooling_layer("max")(features)), features.max(axis=(1, 2)), rtol=1e-6)


def test_a_head_without_batchnorm_has_none_and_the_default_head_has_one():
    assert [layer.name for layer in head_batchnorm_layers(_classifier(hidden_units=(4,)))] == ["head_bn"]
    assert head_batchnorm_layers(_classifier(hidden_units=(4,), batchnorm=False)) == []


def test_head_dropout_comes_before_every_dense_layer_and_the_softmax():
    """head.dropout d: a Dropout of rate d in front of each hidden layer and in front of the probabilities."""
    model = _classifier(hidden_units=(8, 6), dropout=0.3, batchnorm=False)
    for dense, dropout in (("head_dense0", "head_dropout0"), ("head_dense1", "head_dropout1"),
                           ("probabilities", "head_dropout")):
        assert model.get_layer(dense).input is model.get_layer(dropout).output, dense
        assert model.get_layer(dropout).rate == pytest.approx(0.3)
    none = _classifier(hidden_units=(8,), dropout=0.0)
    assert not [layer for layer in none.layers if "dropout" in layer.name]


@pytest.mark.parametrize("activation", ["tanh", "elu"])
def test_hidden_layers_use_the_declared_activation(activation):
    """head.hidden_activation: a hidden layer's output is that activation of its affine map."""
    import keras

    model = _classifier(hidden_units=(8,), hidden_activation=activation, batchnorm=False, dropout=0.0)
    dense = model.get_layer("head_dense0")
    inputs = np.random.default_rng(1).normal(size=(4, int(dense.kernel.shape[0]))).astype("float32")
    affine = inputs @ np.asarray(dense.kernel) + np.asarray(dense.bias)
    expected = np.asarray(keras.activations.get(activation)(affine))
    np.testing.assert_allclose(np.asarray(dense(inputs)), expected, rtol=1e-4, atol=1e-4)  # float32 sums
    assert not np.allclose(expected, np.maximum(affine, 0.0))  # relu would give something else


def test_head_l2_penalises_the_head_kernels_and_zero_adds_no_penalty():
    """head.l2 = c adds c * sum(kernel**2) for each dense layer of the head (hidden and softmax) to the loss."""
    import keras

    model = _classifier(hidden_units=(8,), l2=0.01)
    kernels = [np.asarray(model.get_layer(name).kernel) for name in ("head_dense0", "probabilities")]
    expected = sum(0.01 * float(np.sum(k.astype(np.float64) ** 2)) for k in kernels)
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    assert penalty == pytest.approx(expected, rel=1e-5)
    assert _classifier(hidden_units=(8,), l2=0.0).losses == []


@pytest.mark.parametrize("declared,amsgrad", [({}, True), ({"amsgrad": False}, False), ({"amsgrad": True}, True)])
def test_the_adam_a_run_compiles_has_amsgrad_as_the_recipe_says(tmp_path, declared, amsgrad):
    """optimizer.amsgrad: True unless a recipe turns it off."""
    data = tiny_recipe(tmp_path)
    if declared:
        data["optimizer"] = declared
    recipe = parse_recipe(data, source="r.yaml")
    optimizer = loop.make_optimizer(recipe.optimizer, recipe.stages[0].lr)
    assert optimizer.amsgrad is amsgrad
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(recipe.stages[0].lr)


def test_a_mixing_stage_loss_applies_the_label_smoothing():
    """With soft targets (MixUp/CutMix), loss.label_smoothing e still moves e of each target to uniform 1/K."""
    import keras

    targets = np.array([[0.7, 0.3, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]], dtype="float32")
    probabilities = np.array([[0.6, 0.2, 0.1, 0.1], [0.1, 0.3, 0.4, 0.2]], dtype="float32")
    for smoothing in (0.0, 0.2):
        loss = loop.make_loss(LossConfig(label_smoothing=smoothing), 4, soft_targets=True)
        got = float(keras.ops.convert_to_numpy(loss(targets, probabilities)))
        smoothed = (1 - smoothing) * targets + smoothing / 4
        expected = float(np.mean(-(smoothed * np.log(probabilities)).sum(axis=1)))
        assert got == pytest.approx(expected, rel=1e-5), smoothing


def test_the_schedule_sets_early_stopping_and_the_plateau_cut(tmp_path):
    """schedule.early_stopping_patience drives EarlyStopping; plateau_factor, plateau_patience and min_lr drive
    ReduceLROnPlateau: each callback reads its own field."""
    import keras

    data = tiny_recipe(tmp_path)
    data["schedule"] = {"early_stopping_patience": 7, "plateau_patience": 3, "plateau_factor": 0.25,
                        "min_lr": 1e-5, "monitor": "val_loss"}
    recipe = parse_recipe(data, source="r.yaml")
    callbacks = loop._callbacks(recipe, tmp_path, "head", 0, 0, [], None, Timing(8), has_val=True)
    (stop,) = [c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)]
    (plateau,) = [c for c in callbacks if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
    assert (stop.patience, stop.monitor) == (7, "val_loss")
    assert (plateau.patience, plateau.factor, plateau.min_lr, plateau.monitor) == (3, 0.25, 1e-5, "val_loss")
