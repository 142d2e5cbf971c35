"""The per-epoch learning-rate decay: after every epoch the optimizer's rate is multiplied by the stage's
``decay_per_epoch`` (never below ``min_lr``), and each epoch's log records the rate it trained with."""

from __future__ import annotations

import numpy as np

from carclf.train.callbacks import ExponentialDecay


def _fit(decay: ExponentialDecay, lr: float, epochs: int):
    """A real ``fit`` of a small model with the callback: the logged rates and the optimizer's rate after."""
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.zeros(len(x), "int32")
    history = model.fit(x, y, batch_size=4, epochs=epochs, callbacks=[decay], verbose=0, shuffle=False)
    return history.history["lr"], float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def test_the_rate_is_multiplied_by_the_decay_after_every_epoch():
    """After n epochs the rate is lr * decay**n, and epoch k (0-based) trained with lr * decay**k."""
    logged, final = _fit(ExponentialDecay(0.5), lr=0.08, epochs=4)
    np.testing.assert_allclose(logged, [0.08 * 0.5 ** k for k in range(4)], rtol=1e-6)
    np.testing.assert_allclose(final, 0.08 * 0.5 ** 4, rtol=1e-6)


def test_the_decay_stops_at_min_lr():
    """0.08 halves to 0.04 and 0.02; half of 0.02 is below the floor 0.015, which then holds the rate."""
    logged, final = _fit(ExponentialDecay(0.5, min_lr=0.015), lr=0.08, epochs=4)
    np.testing.assert_allclose(logged, [0.08, 0.04, 0.02, 0.015], rtol=1e-6)
    np.testing.assert_allclose(final, 0.015, rtol=1e-6)


def test_a_floor_above_the_rate_holds_it_and_never_raises_it():
    """A stage's lr (1e-5) under a higher floor (the default 1e-6 under a 1e-7 stage, or a floor set above it):
    the rate was raised to the floor after the first epoch (1000x here); it stays where it is."""
    logged, final = _fit(ExponentialDecay(0.5, min_lr=1e-2), lr=1e-5, epochs=3)
    np.testing.assert_allclose(logged, [1e-5] * 3, rtol=1e-6)
    np.testing.assert_allclose(final, 1e-5, rtol=1e-6)
    logged, final = _fit(ExponentialDecay(0.5, min_lr=0.03), lr=0.08, epochs=3)  # decays to the floor, then holds
    np.testing.assert_allclose(logged, [0.08, 0.04, 0.03], rtol=1e-6)
    np.testing.assert_allclose(final, 0.03, rtol=1e-6)
