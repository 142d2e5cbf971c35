"""Stages set the trainable flags they declare; BatchNormalization stays frozen and in inference mode."""

from __future__ import annotations

import numpy as np
import pytest

from carclf import backbones
from carclf.errors import ConfigError
from carclf.train.model import backbone_of, build_classifier, check_unfreeze, set_trainable, transfer_weights
from carclf.train.recipe import HeadConfig, Stage, Unfreeze


@pytest.fixture(scope="module")
def mobilenet():
    spec = backbones.get("mobilenet_v2")
    model, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,)), 32, weights=None)
    return spec, model


def _trainable_backbone_layers(model):
    """Backbone layers that own a variable which the model would update."""
    trainable = {id(v) for v in model.trainable_weights}
    return {layer.name for layer in backbone_of(model).layers if any(id(w) in trainable for w in layer.weights)}


def test_frozen_stage_trains_only_the_head(mobilenet):
    import keras

    spec, model = mobilenet
    set_trainable(model, spec, Unfreeze("none"))
    assert _trainable_backbone_layers(model) == set()
    trainable = {id(v) for v in model.trainable_weights}
    head = {layer.name for layer in model.layers if any(id(w) in trainable for w in layer.weights)}
    assert head == {"head_bn", "head_dense0", "probabilities"}
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                   for layer in backbone_of(model).layers)


@pytest.mark.parametrize("blocks", [1, 3])
def test_top_blocks_stage_unfreezes_exactly_the_top_blocks(mobilenet, blocks):
    import keras

    spec, model = mobilenet
    set_trainable(model, spec, Unfreeze("top_blocks", blocks))
    index = backbones.block_indices(spec, backbone_of(model))
    top = max(index.values())
    expected = {layer.name for layer in backbone_of(model).layers
                if layer.weights and index[layer.name] > top - blocks
                and not isinstance(layer, keras.layers.BatchNormalization)}
    assert _trainable_backbone_layers(model) == expected
    assert expected  # the top blocks own weights


def test_top_blocks_beyond_the_backbones_blocks_is_refused_naming_the_stage(mobilenet):
    """top_blocks counts the stem as the last block: every block is a valid count; one more would unfreeze the same
    layers as 'all' while reading like a part (as "the top 100 layers" of a Keras guide), so it is refused."""
    spec, model = mobilenet
    blocks = max(backbones.block_indices(spec, backbone_of(model)).values()) + 1  # the stem is block 0
    stages = [Stage("head", 1, 1e-3, 8, 32, Unfreeze("none")), Stage("top", 1, 1e-4, 8, 32, Unfreeze("top_blocks",
                                                                                                       blocks))]
    check_unfreeze(model, spec, stages, "r.yaml")  # all of them, the stem included
    set_trainable(model, spec, stages[1].unfreeze)
    everything = _trainable_backbone_layers(model)
    set_trainable(model, spec, Unfreeze("all"))
    assert everything == _trainable_backbone_layers(model)
    stages[1] = Stage("top", 1, 1e-4, 8, 32, Unfreeze("top_blocks", blocks + 1))
    with pytest.raises(ConfigError) as refused:
        check_unfreeze(model, spec, stages, "r.yaml")
    assert str(refused.value) == (f"r.yaml: field 'stages[1].unfreeze': top_blocks {blocks + 1} is more than the "
                                  f"{blocks} blocks of mobilenet_v2 (its stem and {blocks - 1} numbered blocks): "
                                  f"give at most {blocks}, or 'all'")


def test_all_stage_unfreezes_everything_but_batchnorm(mobilenet):
    import keras

    spec, model = mobilenet
    set_trainable(model, spec, Unfreeze("all"))
    layers = backbone_of(model).layers
    expected = {layer.name for layer in layers
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)}
    assert _trainable_backbone_layers(model) == expected


def _train_step(model):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"), np.array([0, 1, 0, 1]))


def _bn_and_head(model):
    import keras

    bn = next(layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization))
    return bn, model.get_layer("probabilities")


def test_fine_tuning_a_pretrained_backbone_keeps_batchnorm_statistics():
    """With every layer unfrozen, a training step changes the head but no BatchNorm moving statistics."""
    spec = backbones.get("tiny_cnn")
    model, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,)), 32, weights=None)
    set_trainable(model, spec, Unfreeze("all"))
    bn, head = _bn_and_head(model)
    before_bn, before_head = [np.array(w) for w in bn.weights], np.array(head.kernel)
    _train_step(model)
    for old, new in zip(before_bn, bn.weights, strict=True):
        np.testing.assert_array_equal(old, np.array(new))
    assert not np.allclose(before_head, np.array(head.kernel))


def test_training_from_scratch_learns_batchnorm_and_backbone():
    """Random initialisation: BatchNorm trains (frozen identity statistics would starve the gradient)."""
    spec = backbones.get("tiny_cnn")
    model, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,)), 32, weights=None, freeze_batchnorm=False)
    set_trainable(model, spec, Unfreeze("all"), freeze_batchnorm=False)
    bn, _ = _bn_and_head(model)
    conv = backbone_of(model).get_layer("block4_conv")  # its last convolution
    before_bn, before_conv = np.array(bn.moving_mean), np.array(conv.kernel)
    _train_step(model)
    assert not np.allclose(before_bn, np.array(bn.moving_mean))
    assert not np.allclose(before_conv, np.array(conv.kernel))


def test_progressive_resizing_carries_every_weight(mobilenet):
    spec, model = mobilenet
    bigger, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,)), 48, weights=None)
    transfer_weights(model, bigger)
    for a, b in zip(model.get_weights(), bigger.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert bigger.input_shape == (None, 48, 48, 3)


def test_label_smoothing_loss_matches_its_definition():
    """loss.label_smoothing = e: the target is (1 - e) on the true class plus e / K on every class."""
    import keras

    from carclf.train.loop import make_loss
    from carclf.train.recipe import LossConfig

    assert make_loss(LossConfig(), 4) == "sparse_categorical_crossentropy"
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]], dtype="float32")
    labels = np.array([0, 2])
    smoothed = make_loss(LossConfig(label_smoothing=0.2), 4)
    got = keras.ops.convert_to_numpy(smoothed(labels, probabilities))
    targets = np.full((2, 4), 0.2 / 4) + 0.8 * np.eye(4)[labels]
    expected = -(targets * np.log(probabilities)).sum(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_head_batchnorm_follows_the_features_at_its_declared_momentum(momentum):
    """head.batchnorm_momentum m: one training step moves the head's moving mean (1 - m) of the way to the
    batch's mean features, from its initial zeros."""
    import keras

    spec = backbones.get("tiny_cnn")
    model, _ = build_classifier(spec, 2, HeadConfig(hidden_units=(4,), batchnorm_momentum=momentum), 32,
                                weights=None)
    set_trainable(model, spec, Unfreeze("none"))
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    features = keras.Model(model.inputs, model.get_layer("head_pool").output)([pixels], training=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.train_on_batch(pixels, np.array([0, 1, 0, 1]))
    expected = (1 - momentum) * np.mean(np.array(features), axis=0)
    np.testing.assert_allclose(np.array(model.get_layer("head_bn").moving_mean), expected, rtol=1e-4, atol=1e-6)
