"""The classifier: float pixels [0, 255] -> backbone preprocessing -> backbone -> head -> softmax.

A pretrained backbone is called with ``training=False`` and its BatchNormalization layers are frozen, so
they stay in inference mode (ImageNet statistics) while it is fine-tuned. A backbone trained from random
initialisation must learn its statistics, so there (``freeze_batchnorm=False``) BatchNormalization trains
normally: with frozen identity statistics a deep random network saturates and gets no gradient.
This is the model ``train.export.export_model`` expects.
"""

from __future__ import annotations

import logging

import numpy as np

from carclf import backbones
from carclf.backbones import BackboneSpec, WeightsUnavailable
from carclf.errors import ConfigError
from carclf.imaging import Size, side_pair

log = logging.getLogger(__name__)

BACKBONE_LAYER = "backbone"


def build_head(features, num_classes: int, head):
    """Global pooling, BatchNormalization, dropout, dense layers with L2 and a softmax (``HeadConfig``)."""
    import keras

    from carclf.train.pooling import pooling_layer

    reg = keras.regularizers.L2(head.l2) if head.l2 > 0 else None
    x = pooling_layer(head.pooling)(features)
    if head.batchnorm:
        x = keras.layers.BatchNormalization(momentum=head.batchnorm_momentum, name="head_bn")(x)
    for i, units in enumerate(head.hidden_units):
        if head.dropout > 0:
            x = keras.layers.Dropout(head.dropout, name=f"head_dropout{i}")(x)
        x = keras.layers.Dense(units, activation=head.hidden_activation, kernel_regularizer=reg,
                               name=f"head_dense{i}")(x)
    if head.dropout > 0:
        x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    return keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg, dtype="float32",
                              name="probabilities")(x)


def build_backbone(spec: BackboneSpec, image_size: Size, weights: str | None, on_missing_weights: str = "fail"):
    """The headless backbone; a failed download or a missing file either stops (one clear line) or, when
    the recipe allows it, falls back to random initialisation with a warning."""
    try:
        return spec.build(image_size, weights), weights
    except (WeightsUnavailable, ConfigError) as exc:
        if on_missing_weights != "scratch" or weights is None:
            raise
        log.warning("WARNING: %s; training %s from scratch (weights=None) as the recipe allows",
                    exc.message, spec.name)
        return spec.build(image_size, None), None


def truncate(backbone, layer_name: str | None, backbone_name: str):
    """The backbone up to ``layer_name`` (the head's ``feature_layer``); the whole backbone for None."""
    import keras

    if layer_name is None:
        return backbone
    try:
        layer = backbone.get_layer(layer_name)
    except ValueError:
        raise ConfigError(f"{backbone_name} has no layer {layer_name!r} (a layer name of its Keras model)",
                          field="head.feature_layer") from None
    return keras.Model(backbone.input, layer.output)


def build_classifier(spec: BackboneSpec, num_classes: int, head, image_size: Size, weights: str | None = None,
                     on_missing_weights: str = "fail", name: str = "classifier", freeze_batchnorm: bool = True):
    """Returns ``(model, weights_used)``; the model maps float pixels [B, height, width, 3] in 0..255 to
    probabilities (``image_size``: one side, or (height, width))."""
    import keras

    backbone, used = build_backbone(spec, image_size, weights, on_missing_weights)
    backbone = truncate(backbone, head.feature_layer, spec.name)
    backbone.name = BACKBONE_LAYER  # one stable name whatever the architecture
    inputs = keras.Input((*side_pair(image_size), 3), name="pixels")
    x = backbones.preprocessing_layer(spec.preprocessing)(inputs)
    x = backbone(x, training=False) if freeze_batchnorm else backbone(x)
    outputs = build_head(x, num_classes, head)
    return keras.Model(inputs, outputs, name=name), used


def backbone_of(model):
    return model.get_layer(BACKBONE_LAYER)


def set_trainable(model, spec: BackboneSpec, unfreeze, freeze_batchnorm: bool = True) -> dict[str, int]:
    """Apply a stage's ``Unfreeze`` to the backbone; BatchNormalization layers stay frozen when
    ``freeze_batchnorm`` (pretrained backbones), else they follow their block.

    Returns counts of trainable / frozen backbone layers that own weights (for logs and tests).
    """
    import keras

    backbone = backbone_of(model)
    backbone.trainable = unfreeze.mode != "none"
    blocks = backbones.block_indices(spec, backbone)
    first = max(blocks.values()) - unfreeze.blocks + 1 if unfreeze.mode == "top_blocks" else 0
    for layer in backbone.layers:  # every layer explicitly: a stage never inherits the previous stage's flags
        wanted = unfreeze.mode == "all" or (unfreeze.mode == "top_blocks" and blocks[layer.name] >= first)
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = wanted and not (freeze_batchnorm and is_bn)
    counts = {"trainable_layers": 0, "frozen_layers": 0}
    for layer in backbone.layers:
        if layer.weights:
            counts["trainable_layers" if layer.trainable and backbone.trainable else "frozen_layers"] += 1
    return counts


def check_unfreeze(model, spec: BackboneSpec, stages, source: str) -> None:
    """Refuse a stage's ``top_blocks N`` with more blocks than the backbone has (the stem and its numbered
    blocks): it would quietly unfreeze everything, as 'all' says plainly. Checked once the backbone is built,
    before the first epoch."""
    blocks = backbones.num_blocks(spec, backbone_of(model)) + 1  # block 0 is the stem
    for i, stage in enumerate(stages):
        if stage.unfreeze.mode == "top_blocks" and stage.unfreeze.blocks > blocks:
            raise ConfigError(f"top_blocks {stage.unfreeze.blocks} is more than the {blocks} blocks of {spec.name} "
                              f"(its stem and {blocks - 1} numbered blocks): give at most {blocks}, or 'all'",
                              source=source, field=f"stages[{i}].unfreeze")


def transfer_weights(source, target) -> None:
    """Copy every weight between two models of the same architecture built at different input sizes."""
    target.set_weights(source.get_weights())


def head_batchnorm_layers(model) -> list:
    """The head's BatchNormalization layers, input to output (the backbone's own are not among them)."""
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def refresh_head_batchnorm(model, batches, steps: int) -> int:
    """Set each head BatchNormalization's moving mean and variance to the exact mean and variance of its
    input over ``steps`` batches of ``batches`` (images, labels), in inference mode.

    Averaged weights (``WeightAverage``) produce features that no epoch's moving statistics were measured
    on; this is SWA's BatchNorm update, with population statistics instead of a momentum. Returns the
    number of images seen.
    """
    import keras

    seen = 0
    for layer in head_batchnorm_layers(model):
        features = keras.Model(model.input, layer.input)
        total = total_sq = None
        seen = 0
        for images, _ in batches.take(steps):
            x = np.asarray(features(images, training=False), dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
            total_sq = (x * x).sum(axis=0) if total_sq is None else total_sq + (x * x).sum(axis=0)
            seen += x.shape[0]
        if not seen:
            raise ValueError("no batches to measure the head's BatchNormalization statistics on")
        mean = total / seen
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(np.maximum(total_sq / seen - mean * mean, 0.0).astype("float32"))
    return seen
