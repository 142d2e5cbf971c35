"""A stage's learning-rate warm-up: a linear climb over its first steps, then the rate is left alone."""

from __future__ import annotations

import numpy as np

from carclf.train.callbacks import LinearWarmup


def _rates_seen(warmup: LinearWarmup, epochs: int, batches_per_epoch: int) -> list[float]:
    """The learning rate each training batch ran with, in a real ``fit`` on a small model."""
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.123), loss="sparse_categorical_crossentropy")
    seen: list[float] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    x = np.random.default_rng(0).normal(size=(4 * batches_per_epoch, 3)).astype("float32")
    y = np.zeros(len(x), "int32")
    model.fit(x, y, batch_size=4, epochs=epochs, callbacks=[warmup, Record()], verbose=0, shuffle=False)
    return seen


def test_the_rate_climbs_linearly_then_stays():
    rates = _rates_seen(LinearWarmup(0.01, steps=4), epochs=2, batches_per_epoch=3)
    np.testing.assert_allclose(rates, [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01], rtol=1e-6)


def test_a_resumed_stage_continues_the_climb():
    rates = _rates_seen(LinearWarmup(0.01, steps=4, done=3), epochs=1, batches_per_epoch=3)
    np.testing.assert_allclose(rates, [0.01, 0.01, 0.01], rtol=1e-6)
    rates = _rates_seen(LinearWarmup(0.01, steps=8, done=4), epochs=1, batches_per_epoch=3)
    np.testing.assert_allclose(rates, [0.005 + 0.00125 * k for k in range(1, 4)], rtol=1e-6)
