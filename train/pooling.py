"""The head's pooling layers: how a backbone's feature map [B, H, W, C] becomes one vector per photo.

``avg`` and ``max`` are Keras's global poolings. ``bilinear`` is second-order pooling (Lin, RoyChowdhury and
Maji, "Bilinear CNN models for fine-grained visual recognition", ICCV 2015): the mean over positions of each
feature vector's outer product with itself, so the head sees which features occur *together* (a grille's
shape beside a badge's) and not only how strongly each occurs. Fine-grained classes such as car models differ
mostly in such co-occurrences.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="carclf")
class BilinearPooling(keras.layers.Layer):
    """[B, H, W, C] -> [B, C (C + 1) / 2]: the upper triangle of the mean outer product over the H x W positions,
    then a signed square root and L2 normalisation (the usual normalisation of bilinear features)."""

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape) -> None:
        channels = int(input_shape[-1])
        rows, cols = np.triu_indices(channels)
        self._channels = channels
        self._upper = (rows * channels + cols).astype("int32")  # flat indices of the upper triangle

    def call(self, features):
        x = ops.cast(features, "float32")
        positions = ops.shape(x)[1] * ops.shape(x)[2]
        x = ops.reshape(x, (-1, positions, self._channels))
        gram = ops.einsum("bpc,bpd->bcd", x, x) / ops.cast(positions, "float32")
        pairs = ops.take(ops.reshape(gram, (-1, self._channels * self._channels)), self._upper, axis=1)
        # epsilon keeps the square root's gradient finite where a pair's product is 0 (a fine-tuned backbone)
        rooted = ops.sign(pairs) * ops.sqrt(ops.abs(pairs) + self.epsilon)
        return rooted / (ops.norm(rooted, axis=-1, keepdims=True) + self.epsilon)

    def compute_output_shape(self, input_shape):
        channels = int(input_shape[-1])
        return (input_shape[0], channels * (channels + 1) // 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


def pooling_layer(kind: str, name: str = "head_pool") -> keras.layers.Layer:
    """The pooling layer a ``HeadConfig.pooling`` names."""
    if kind == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if kind == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)
    if kind == "bilinear":
        return BilinearPooling(name=name)
    raise ValueError(f"unknown pooling {kind!r}")  # recipes are validated against recipe.POOLINGS first
