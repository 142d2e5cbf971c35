"""The pooled figures of a cross-validation summary, computed from the fold runs' own metrics."""

from __future__ import annotations

import math

import pytest

from carclf.errors import InvalidInput
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


def test_fold_runs_named_in_any_order_make_the_same_summary(tmp_path):
    """A shell glob lists fold10of12 before fold2of12: the runs are put in fold order, not refused."""
    photos = [f"c{i % 2}/{i:03d}.jpg" for i in range(30)]
    folders = [_fold_run(tmp_path, fold, 3, correct, photos) for fold, correct in enumerate((7, 4, 9))]
    in_order = crossval.summarize(folders)
    shuffled = crossval.summarize([folders[2], folders[0], folders[1]])
    assert shuffled == in_order and shuffled["policies"]["none"]["per_fold_correct"] == [7, 4, 9]


def test_folds_that_leave_a_photo_unvalidated_are_refused(tmp_path):
    """Three folds of ten validation photos each over 31 photos never validate one of them: refused, since the
    pooled accuracy would silently leave it out."""
    photos = [f"c{i % 2}/{i:03d}.jpg" for i in range(31)]
    folders = [_fold_run(tmp_path, fold, 3, 5, photos) for fold in range(3)]
    with pytest.raises(InvalidInput, match="the folds validate on 30 photos, the data has 31"):
        crossval.summarize(folders)


def test_the_pooled_log_loss_weighs_each_fold_by_its_photos(tmp_path):
    """Folds of 10, 10 and 11 photos: the pooled log loss is the mean over all 31 photos, not the mean of the three
    fold figures."""
    photos = [f"c{i % 2}/{i:03d}.jpg" for i in range(31)]
    folders = [_fold_run(tmp_path, fold, 3, 5, photos[:30]) for fold in range(3)]
    losses = (0.2, 0.4, 1.3)
    for folder, loss in zip(folders, losses, strict=True):
        split = runs.read_json(folder / runs.SPLIT)
        if split["fold"] == 2:  # the 31st photo validates in the last fold
            split["val"].append([photos[30], 0])
        else:
            split["train"].append([photos[30], 0])
        runs.write_json(folder / runs.SPLIT, split)
        runs.write_json(folder / runs.METRICS, {"recipe": "r", "policies": {
            "none": {"correct": 5, "count": len(split["val"]), "log_loss": loss}}})
    pooled = crossval.summarize(folders)["policies"]["none"]
    assert pooled["count"] == 31
    assert pooled["log_loss"] == pytest.approx((10 * 0.2 + 10 * 0.4 + 11 * 1.3) / 31)


@pytest.mark.parametrize("photos, correct", [(30, (7, 4, 9)), (3000, (700, 45, 999))])
def test_the_printed_table_keeps_its_columns_under_their_headings(tmp_path, photos, correct):
    """Counts of two digits or four: each figure ends in the column where its heading ends, so the table reads the
    same over 50 photos or a whole competition set."""
    names = [f"c{i % 2}/{i:04d}.jpg" for i in range(photos)]
    summary = crossval.summarize([_fold_run(tmp_path, fold, 3, c, names) for fold, c in enumerate(correct)])
    header, row = crossval.format_summary(summary).splitlines()[2:4]
    pooled = summary["policies"]["none"]
    cells = {"pooled": f"{pooled['accuracy']:.3f} ({pooled['correct']}/{pooled['count']})",
             "± s.e.": f"{pooled['standard_error']:.3f}", "log loss": f"{pooled['log_loss']:.3f}"}
    for heading, cell in cells.items():
        assert row.index(cell) + len(cell) == header.index(heading) + len(heading), (heading, header, row)
    assert row.startswith("none ") and row.endswith(" ".join(str(c) for c in correct))


def test_folds_cut_by_the_time_budget_are_named_under_the_table(tmp_path):
    """Each fold of `carclf train --folds K --time-budget M` has its own budget; a fold it stopped early is
    evaluated as it stood, so the pooled figures are of a shortened run and the summary says which."""
    photos = [f"c{i % 2}/{i:03d}.jpg" for i in range(30)]
    folders = [_fold_run(tmp_path, fold, 3, correct, photos) for fold, correct in enumerate((7, 4, 9))]
    for fold, info in enumerate(({"finished": True}, {"finished": False, "cut_short_by_time_budget_s": 60.0}, {})):
        runs.write_json(folders[fold] / runs.RUN_INFO, info)
    summary = crossval.summarize(folders)
    assert summary["cut_short_folds"] == [1]
    assert crossval.format_summary(summary).splitlines()[-1].startswith("fold 1 of 3 stopped at the time budget")
    runs.write_json(folders[1] / runs.RUN_INFO, {"finished": True})  # resumed to its end
    finished = crossval.summarize(folders)
    assert finished["cut_short_folds"] == [] and "time budget" not in crossval.format_summary(finished)
