"""The optimizer state that ``carclf train --resume`` restores: a resumed stage continues the same
Adam(amsgrad) trajectory (step count, learning rate, moments) instead of restarting it; and the best score
the resume state commits, which a resumed stage must beat before its best checkpoint is replaced."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from carclf.train import runs
from carclf.train.callbacks import restore_optimizer_state, save_optimizer_state
from carclf.train.loop import make_optimizer
from carclf.train.recipe import OptimizerConfig


def _csv_epochs(folder) -> list[int]:
    with (folder / runs.HISTORY_CSV).open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _model(units: int = 3, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation="softmax")])
    model.compile(optimizer=make_optimizer(OptimizerConfig(), 1e-2), loss="sparse_categorical_crossentropy")
    return model


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(8, 4)).astype("float32"), rng.integers(0, 3, size=8)


def test_restored_optimizer_continues_the_same_trajectory(tmp_path):
    original = _model()
    for step in range(3):
        original.train_on_batch(*_batch(step))
    original.optimizer.learning_rate.assign(4e-3)  # as ExponentialDecay / ReduceLROnPlateau would
    path = tmp_path / "optimizer.npz"
    save_optimizer_state(original.optimizer, path)

    resumed = _model(seed=99)
    resumed.set_weights(original.get_weights())
    assert restore_optimizer_state(resumed.optimizer, resumed.trainable_variables, path)
    assert int(resumed.optimizer.iterations.numpy()) == 3
    assert float(resumed.optimizer.learning_rate.numpy()) == np.float32(4e-3)

    fresh = _model(seed=99)
    fresh.set_weights(original.get_weights())
    for model in (original, resumed, fresh):
        model.train_on_batch(*_batch(10))
    for a, b in zip(original.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # a fresh optimizer takes a different step from the same weights: the test can tell them apart
    assert max(np.abs(a - b).max() for a, b in zip(original.get_weights(), fresh.get_weights(), strict=True)) > 1e-4


def test_state_of_another_model_is_refused_and_the_optimizer_stays_fresh(tmp_path):
    other = _model(units=5)
    other.train_on_batch(np.zeros((2, 4), "float32"), np.array([0, 4]))
    path = tmp_path / "optimizer.npz"
    save_optimizer_state(other.optimizer, path)
    model = _model()
    assert not restore_optimizer_state(model.optimizer, model.trainable_variables, path)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert not restore_optimizer_state(model.optimizer, model.trainable_variables, tmp_path / "missing.npz")


def test_trim_history_drops_epochs_the_checkpoint_does_not_hold(tmp_path):
    runs.write_json(tmp_path / runs.HISTORY_JSON, [{"stage": "a", "epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)])
    (tmp_path / runs.HISTORY_CSV).write_text("epoch,loss\r\n0,1.0\r\n1,0.5\r\n2,0.33\r\n")
    kept = runs.trim_history(tmp_path, 2)
    assert [h["epoch"] for h in kept] == [1, 2] == [h["epoch"] for h in runs.read_json(tmp_path / runs.HISTORY_JSON)]
    assert _csv_epochs(tmp_path) == [0, 1]


def _best_after_epochs(tmp_path, monitor: str, scores: list[float], best: float | None = None) -> list[float]:
    """The best score ``state.json`` commits after each epoch, when the epochs score ``scores`` on ``monitor``."""
    from carclf.train.callbacks import ResumeState

    model = _model()
    run_dir = tmp_path / monitor
    (run_dir / runs.CHECKPOINTS).mkdir(parents=True)
    state = ResumeState(run_dir, 0, 0, monitor, [], "head", best, runs.best_weights(run_dir, "head"))
    state.set_model(model)
    state.on_train_begin()
    committed = []
    for epoch, score in enumerate(scores):
        state.on_epoch_end(epoch, {monitor: score, "loss": 1.0})
        committed.append(runs.read_json(run_dir / runs.CHECKPOINTS / runs.STATE)["best"])
    return committed


@pytest.mark.parametrize("monitor,scores,running", [
    ("val_accuracy", [0.5, 0.1, 0.7, 0.6], np.maximum),
    ("val_loss", [0.9, 1.4, 0.3, 0.8], np.minimum),
])
def test_the_best_score_is_the_highest_accuracy_or_the_lowest_loss(tmp_path, monitor, scores, running):
    """The best score a resume restarts from (ModelCheckpoint's threshold) is the running maximum of an
    accuracy and the running minimum of a loss: a worse epoch never replaces it."""
    assert _best_after_epochs(tmp_path, monitor, scores) == list(running.accumulate(scores))


@pytest.mark.parametrize("monitor,best,scores,expected", [
    ("val_accuracy", 0.6, [0.5, 0.65], [0.6, 0.65]),
    ("val_loss", 0.4, [0.5, 0.35], [0.4, 0.35]),
])
def test_a_resumed_stage_keeps_its_best_until_an_epoch_beats_it(tmp_path, monitor, best, scores, expected):
    """A stage resumed with a best of 0.6 accuracy (0.4 loss) keeps it through a worse epoch."""
    assert _best_after_epochs(tmp_path, monitor, scores, best=best) == expected


def test_state_counts_the_epochs_done_inside_the_current_stage(tmp_path):
    """A second stage that begins after the first stage's 3 epochs: after its own 2nd epoch (Keras's epoch index
    4) state.json says 2 of this stage's epochs are done, 5 in all, so a resume runs only what is left of it."""
    from carclf.train.callbacks import ResumeState

    model = _model()
    (tmp_path / runs.CHECKPOINTS).mkdir()
    state = ResumeState(tmp_path, 1, 3, "val_accuracy", [], "top", None, runs.best_weights(tmp_path, "top"))
    state.set_model(model)
    state.on_train_begin()
    for done, epoch in enumerate((3, 4), start=1):
        state.on_epoch_end(epoch, {"val_accuracy": 0.5, "loss": 1.0})
        written = runs.read_json(tmp_path / runs.CHECKPOINTS / runs.STATE)
        assert (written["stage_index"], written["stage_epochs_done"]) == (1, done)
        assert written["global_epoch"] == epoch + 1
