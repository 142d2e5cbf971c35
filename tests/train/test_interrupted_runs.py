"""A run interrupted while it writes a checkpoint resumes from the last whole one; its logs agree with it.

The interrupt is a real KeyboardInterrupt raised inside Keras's weights write, after part of the file is
written: what Ctrl-C (or a killed job) does halfway through an epoch's end.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from carclf.errors import FailedPrecondition, NotFound
from carclf.train import loop, runs
from carclf.train.recipe import parse_recipe
from tests.train.conftest import tiny_recipe

pytestmark = pytest.mark.slow

STAGES = [
    {"name": "head", "epochs": 2, "lr": 1e-3, "batch_size": 4, "image_size": 32, "unfreeze": "none"},
    {"name": "top", "epochs": 1, "lr": 1e-4, "batch_size": 4, "image_size": 32, "unfreeze": "top_blocks 1"},
]


def _csv_epochs(run_dir: Path) -> list[int]:
    with (run_dir / runs.HISTORY_CSV).open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _interrupt_write(monkeypatch, file_name: str, nth: int) -> dict:
    """Make the ``nth`` Keras write to ``file_name`` stop halfway with a KeyboardInterrupt; returns what the
    real file held at that moment."""
    import keras

    real = keras.Model.save_weights
    seen = {"calls": 0, "before": None}

    def save_weights(model, filepath, *args, **kwargs):
        if Path(filepath).name == file_name:
            seen["calls"] += 1
            if seen["calls"] == nth:
                whole = Path(filepath).parent / file_name.replace(".partial", "")
                seen["before"] = whole.read_bytes() if whole.is_file() else None
                Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a started, unfinished file
                raise KeyboardInterrupt
        return real(model, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)
    return seen


def _assert_whole(run_dir: Path, file_name: str, seen: dict, epochs_kept: int) -> None:
    """After an interrupted write: the file in place is what it was before, and the state and the history
    stop at the last whole epoch."""
    whole = run_dir / runs.CHECKPOINTS / file_name.replace(".partial", "")
    if seen["before"] is None:
        assert not whole.exists()  # never half-written in place
    else:
        assert whole.read_bytes() == seen["before"]
    assert runs.read_json(run_dir / runs.CHECKPOINTS / runs.STATE)["global_epoch"] == epochs_kept
    assert [h["epoch"] for h in runs.read_json(run_dir / runs.HISTORY_JSON)] == list(range(1, epochs_kept + 1))


def test_interrupts_during_checkpoint_writes_resume_from_the_last_whole_epoch(two_class_data, tmp_path,
                                                                              monkeypatch):
    recipe = parse_recipe(tiny_recipe(two_class_data, stages=STAGES), source="tiny")
    root = tmp_path / "runs"
    # The end of the 2nd epoch, after the CSV logger wrote its row: the last checkpoint's write is cut.
    seen = _interrupt_write(monkeypatch, "last.partial.weights.h5", 2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe, runs_root=root, verbose=0)
    monkeypatch.undo()
    (run_dir,) = root.iterdir()
    _assert_whole(run_dir, "last.partial.weights.h5", seen, 1)
    assert _csv_epochs(run_dir) == [0, 1]  # the logger is one epoch ahead of the checkpoint

    # Resumed, it is cut again in the first best checkpoint of stage 2.
    seen = _interrupt_write(monkeypatch, "best-top.partial.weights.h5", 1)
    with pytest.raises(KeyboardInterrupt):
        loop.resume(run_dir, verbose=0)
    monkeypatch.undo()
    _assert_whole(run_dir, "best-top.partial.weights.h5", seen, 2)

    loop.resume(run_dir, verbose=0)
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [(h["stage"], h["epoch"]) for h in history] == [("head", 1), ("head", 2), ("top", 3)]
    assert _csv_epochs(run_dir) == [0, 1, 2]  # one row per epoch: no interrupted epoch's row is doubled
    checkpoints = run_dir / runs.CHECKPOINTS
    assert not list(checkpoints.glob("*.partial.*"))
    assert runs.read_json(run_dir / runs.RUN_INFO)["finished"]
    assert runs.load_run(run_dir).class_ids == ["0", "1"]  # the final weights read back

    with pytest.raises(FailedPrecondition, match="finished training already"):
        loop.resume(run_dir, verbose=0)

    # A checkpoint damaged outside the run (a full disk, a bad copy) is reported, not a traceback.
    state_file = checkpoints / runs.STATE
    runs.write_json(state_file, {**runs.read_json(state_file), "stage_index": 1, "stage_epochs_done": 0})
    last = checkpoints / runs.LAST_WEIGHTS
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(FailedPrecondition, match="cannot read the weights in .*last.weights.h5"):
        loop.resume(run_dir, verbose=0)
    with pytest.raises(NotFound, match="no run folder at"):
        loop.resume(tmp_path / "no_such_run", verbose=0)


def test_a_run_without_validation_trains_on_every_photo(two_class_data, tmp_path, capsys):
    recipe = parse_recipe(tiny_recipe(two_class_data, stages=STAGES[:1], split={"val_fraction": 0.0, "seed": 1}),
                          source="tiny")
    run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)
    info = runs.read_json(run_dir / runs.RUN_INFO)
    photos = len(list((two_class_data / "train").rglob("*.jpg")))
    assert info["finished"] and (info["num_train"], info["num_val"]) == (photos, 0)
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [h["epoch"] for h in history] == [1, 2] and not any("val_accuracy" in h for h in history)
    assert (run_dir / "checkpoints" / "best-head.weights.h5").is_file()  # chosen by the training accuracy

    from carclf.cli import main as carclf_main

    assert carclf_main(["evaluate", str(run_dir), "--tta", "none"]) == 2
    assert "holds no validation photos" in capsys.readouterr().err
