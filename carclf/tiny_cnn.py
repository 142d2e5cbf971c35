"""A convolutional backbone of about 13,000 weights for tests and smoke runs (timm registers ``test_*``
models for the same reason).

It has what the training loop relies on in a real backbone (a stem, numbered blocks with BatchNorm for staged
unfreezing, a feature map for the head to pool), built with the ``keras.applications`` signature so the
registry builds it like any other. A run of a few photos traces and trains it in about half the time
MobileNetV2 takes. It has no pretrained weights and learns nothing useful about cars.
"""

from __future__ import annotations


def TinyCNN(include_top: bool = False, weights: str | None = None, input_shape: tuple[int, int, int] | None = None,
            blocks: int = 4, width: int = 8, name: str = "tiny_cnn"):  # noqa: N802 - Keras applications' naming
    """Stem (stride 2) and ``blocks`` blocks of conv-BN-ReLU, the first three of stride 2; ``weights`` is None or
    a weights file this architecture saved."""
    import keras

    if include_top:
        raise ValueError("TinyCNN is a headless backbone: include_top must be False")
    inputs = keras.Input(input_shape or (32, 32, 3))
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i in range(1, blocks + 1):
        x = keras.layers.Conv2D(width * min(i, 4), 3, strides=2 if i <= 3 else 1, padding="same", use_bias=False,
                                name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
