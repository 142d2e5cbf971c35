"""The pooled figures of a cross-validation summary, computed from the fold runs' own metrics."""

from __future__ import annotations

import math

import pytest

from carclf.train import crossval, runs


def _fold_run(root, fold: int, folds: int, correct: int, photos: list[str]):
    """A finished fold run as ``carclf train --folds`` leaves it: its split and its metrics."""
    run = root / f"r-fold{fold}of{folds}"
    run.mkdir(parents=True)
    share = len(photos) // folds
    val = photos[fold * share:(fold + 1) * share]
    runs.write_json(run / runs.SPLIT, {"folds": folds, "fold": fold, "seed": 1,
                                       "val": [[p, i % 2] for i, p in enumerate(val)],
                                       "train": [[p, i % 2] for i, p in enumerate(photos) if p not in val]})
    runs.write_json(run / runs.METRICS, {"recipe": "r", "policies": {
        "none": {"correct": correct, "count": len(val), "log_loss": 0.5}}})
    return run


def test_the_standard_error_is_the_binomial_one_of_the_pooled_accuracy(tmp_path):
    """standard_error = sqrt(p (1 - p) / n) for the pooled accuracy p over the n photos of all folds."""
    photos = [f"c{i % 2}/{i:03d}.jpg" for i in range(30)]
    folders = [_fold_run(tmp_path, fold, 3, correct, photos) for fold, correct in enumerate((7, 4, 9))]
    pooled = crossval.summarize(folders)["policies"]["none"]
    correct, count = 7 + 4 + 9, 30
    assert (pooled["correct"], pooled["count"]) == (correct, count)
    accuracy = correct / count
    assert pooled["accuracy"] == pytest.approx(accuracy)
    assert pooled["standard_error"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / count))
    assert pooled["per_fold_accuracy"] == pytest.approx([0.7, 0.4, 0.9])
