"""Keras callbacks of the training loop that Keras does not ship: per-epoch LR decay that composes with
ReduceLROnPlateau, a linear warm-up, epoch timing, the resume state, and the average of the last epochs'
weights."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import keras
import numpy as np

from carclf import durable
from carclf.train import runs

log = logging.getLogger(__name__)


def _get_lr(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class ExponentialDecay(keras.callbacks.Callback):
    """``lr *= rate`` after every epoch, down to ``min_lr``. It multiplies the optimizer's current rate, so a
    reduction made by ReduceLROnPlateau is kept (a schedule object could not be changed by ReduceLROnPlateau).
    The floor holds a rate, never raises one: a rate already below ``min_lr`` (a stage's small lr under the
    default floor, a warm-up epoch) stays as it is, as ReduceLROnPlateau's ``min_lr`` does."""

    def __init__(self, rate: float, min_lr: float = 0.0):
        super().__init__()
        self.rate, self.min_lr = rate, min_lr

    def on_epoch_end(self, epoch, logs=None):
        lr = _get_lr(self.model)
        if logs is not None:
            logs["lr"] = lr  # the rate this epoch trained with
        self.model.optimizer.learning_rate.assign(max(lr * self.rate, min(self.min_lr, lr)))


class Timing(keras.callbacks.Callback):
    """Seconds per epoch and training images per second, added to the logs (and so to CSV/TensorBoard)."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.total = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self.total += seconds
        if logs is not None:
            logs["epoch_seconds"] = round(seconds, 2)
            logs["images_per_second"] = round(self.images_per_epoch / max(seconds, 1e-9), 2)


class ResumeState(keras.callbacks.Callback):
    """After every epoch: the weights, the optimizer, the stage, the epochs done and the best score, for
    ``--resume``.

    Every file is written aside and renamed into place, and ``state.json`` goes last: it is the commit, so
    an interrupt at any point leaves the previous epoch's checkpoint whole. The stage's ModelCheckpoint
    writes the best weights to ``best_partial``; they are renamed over the best file here, after Keras's
    write has finished.
    """

    def __init__(self, run_dir: Path, stage_index: int, epoch_offset: int, monitor: str, history: list[dict],
                 stage_name: str, best: float | None, best_file: Path):
        super().__init__()
        self.dir = run_dir / runs.CHECKPOINTS
        self.stage_index, self.offset, self.monitor = stage_index, epoch_offset, monitor
        self.history, self.stage_name, self.best = history, stage_name, best
        self.best_file, self.best_partial = best_file, runs.partial_path(best_file)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if "acc" in self.monitor else value < self.best

    def on_train_begin(self, logs=None):
        # Left by a write that an interrupt cut short: never to be taken for this run's best.
        self.best_partial.unlink(missing_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        if value is not None and self._better(float(value)):
            self.best = float(value)
        self.history.append({"stage": self.stage_name, "epoch": epoch + 1,
                             **{k: float(v) for k, v in logs.items()}})
        runs.save_weights(self.model, self.dir / runs.LAST_WEIGHTS)
        save_optimizer_state(self.model.optimizer, self.dir / runs.OPTIMIZER_STATE)
        if self.best_partial.is_file():
            durable.replace(self.best_partial, self.best_file)
        runs.write_json(self.dir.parent / runs.HISTORY_JSON, self.history)
        runs.write_json(self.dir / runs.STATE, {
            "stage_index": self.stage_index, "stage_epochs_done": epoch + 1 - self.offset,
            "global_epoch": epoch + 1, "best": self.best, "lr": _get_lr(self.model),
        })


class LinearWarmup(keras.callbacks.Callback):
    """The learning rate climbs linearly from ``lr / steps`` to ``lr`` over a stage's first ``steps`` training
    steps, then is left to the other callbacks. Adam's first steps move every newly unfrozen weight by about
    the learning rate whatever its gradient; starting small keeps them from wrecking the pretrained features.

    Per-epoch decay and plateau cuts apply from the end of the warm-up on. ``done`` steps were run before a
    resume.
    """

    def __init__(self, lr: float, steps: int, done: int = 0):
        super().__init__()
        self.lr, self.steps, self.step = lr, steps, done

    def on_train_batch_begin(self, batch, logs=None):
        if self.step < self.steps:
            self.model.optimizer.learning_rate.assign(self.lr * (self.step + 1) / self.steps)
        self.step += 1


class WeightAverage(keras.callbacks.Callback):
    """Keeps the weights of the last ``epochs`` epochs that ran (stochastic weight averaging over the tail of
    a stage); ``average()`` is their element-wise mean. Every weight is averaged, BatchNorm statistics
    included; ``model.refresh_head_batchnorm`` then measures the head's statistics for the averaged features.

    Unlike the best checkpoint, the average is chosen by no validation score. An early-stopped stage
    averages the last epochs it did run.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self._kept: deque[tuple[int, list[np.ndarray]]] = deque(maxlen=epochs)  # (epoch number, weights)

    @property
    def count(self) -> int:
        return len(self._kept)

    @property
    def epochs(self) -> list[int]:
        """The (1-based) epochs whose weights are kept."""
        return [epoch for epoch, _ in self._kept]

    def on_epoch_end(self, epoch, logs=None):
        self._kept.append((epoch + 1, [np.array(w, copy=True) for w in self.model.get_weights()]))

    def average(self) -> list[np.ndarray]:
        if not self._kept:
            raise ValueError("no epoch has ended: nothing to average")
        return [np.mean(np.stack(ws), axis=0, dtype=np.float64).astype(ws[0].dtype)
                for ws in zip(*(weights for _, weights in self._kept), strict=True)]


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the epoch during which the run's wall-clock budget ran out."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline
        self.expired = False

    def on_epoch_end(self, epoch, logs=None):
        if time.time() >= self.deadline:
            self.expired = True
            self.model.stop_training = True


def save_optimizer_state(optimizer, path: Path) -> None:
    """Every optimizer variable (step count, learning rate, moments) in order, written atomically."""
    values = {f"v{i:04d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(optimizer.variables)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **values)
    durable.replace(tmp, path)


def restore_optimizer_state(optimizer, trainable_variables, path: Path) -> bool:
    """Load what ``save_optimizer_state`` wrote into a freshly compiled optimizer of the same stage.

    Returns False (and the optimizer stays fresh) when the file is missing or does not fit these variables.
    """
    if not path.is_file():
        log.warning("no optimizer state in %s: the resumed stage starts with a fresh optimizer", path)
        return False
    optimizer.build(trainable_variables)
    with np.load(path) as saved:
        values = [saved[key] for key in sorted(saved.files)]
    variables = optimizer.variables
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values,
                                                                                       strict=True)):
        log.warning("optimizer state in %s does not fit this model (%d saved variables, %d expected): "
                    "starting the stage with a fresh optimizer", path, len(values), len(variables))
        return False
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    return True
