"""Runs at the edges: data with no photo to train on, a run cut by its time budget and resumed, and a run whose
recipe names its data relative to the folder it was started from, used from another folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from carclf.cli import main as carclf_main
from carclf.train import loop, runs
from carclf.train.recipe import ExtraSource, parse_recipe
from tests.train.conftest import tiny_recipe


def _stage(name: str, epochs: int) -> dict:
    return {"name": name, "epochs": epochs, "lr": 1e-3, "batch_size": 4, "image_size": 32, "unfreeze": "none"}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("carclf train: error:")]


def _not_images(root: Path) -> None:
    for cid, name in (("0", "a.jpg"), ("1", "b.jpg")):
        (root / "train" / cid).mkdir(parents=True)
        (root / "train" / cid / name).write_text(f"not a photo {cid}\n")


@pytest.mark.parametrize("case", ["not_images", "all_below_min_side"])
def test_data_without_a_usable_photo_is_refused_in_one_line_and_leaves_no_run_folder(two_class_data, tmp_path,
                                                                                    capsys, case):
    data_root, overrides = two_class_data, {}
    if case == "not_images":
        data_root = tmp_path / "empty"
        _not_images(data_root)
    else:
        overrides = {"min_side": 100_000}
    recipe = tiny_recipe(data_root, stages=[_stage("head", 1)])
    recipe["data"] = {"train": str(data_root / "train"), **overrides}
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    files = sorted(p for p in (data_root / "train").rglob("*") if p.is_file())
    runs_root = tmp_path / "runs"

    assert carclf_main(["train", str(recipe_file), "--runs", str(runs_root), "--verbose", "0"]) == 2
    captured = capsys.readouterr()
    (line,) = _error_lines(captured.err)
    assert "no usable training photos" in line and str((data_root / "train").resolve()) in line
    assert f"{len(files)} files" in line
    assert "Traceback" not in captured.err + captured.out
    assert not runs_root.exists()  # nothing made for a run that could not start


def test_a_split_that_holds_out_every_usable_photo_is_refused(two_class_data, tmp_path, capsys):
    """One photo per class and val_fraction 0.6: each class's only photo validates, none is left to train on."""
    for cid in ("0", "1"):
        for extra in sorted((two_class_data / "train" / cid).iterdir())[1:]:
            extra.unlink()
    recipe = tiny_recipe(two_class_data, stages=[_stage("head", 1)], split={"val_fraction": 0.6, "seed": 1})
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    runs_root = tmp_path / "runs"

    assert carclf_main(["train", str(recipe_file), "--runs", str(runs_root), "--verbose", "0"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "no training photos" in line and "split.val_fraction 0.6" in line
    assert not runs_root.exists()


@pytest.mark.slow
def test_a_run_cut_by_its_time_budget_resumes_inside_the_cut_stage(two_class_data, tmp_path, monkeypatch, caplog):
    """A budget that runs out in the first epoch cuts stage "head" (2 epochs) after 1: the checkpoint and the log
    say so, the run is not finished, and --resume trains every remaining epoch of "head", then all of "top", each
    once."""
    import keras
    import numpy as np

    real_fit = keras.Model.fit
    fits: list[dict] = []  # the weights each Keras fit started and ended on

    def fit(model, *args, **kwargs):
        fits.append({"start": [np.array(w) for w in model.get_weights()]})
        history = real_fit(model, *args, **kwargs)
        fits[-1]["end"] = [np.array(w) for w in model.get_weights()]
        return history

    monkeypatch.setattr(keras.Model, "fit", fit)
    stages = [_stage("head", 2), _stage("top", 1)]
    recipe = parse_recipe(tiny_recipe(two_class_data, tta=["none"], stages=stages), source="tiny")
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0, time_budget_s=1e-3)

    cut_history = runs.read_json(run_dir / runs.HISTORY_JSON)
    done = len(cut_history)
    assert 0 < done < stages[0]["epochs"] and {h["stage"] for h in cut_history} == {"head"} and len(fits) == 1
    assert f"time budget of 0 s spent after epoch {done} of {stages[0]['epochs']} of stage 'head': stopping here " \
           f"(continue with carclf train --resume {run_dir})" in caplog.messages
    state = runs.read_json(run_dir / runs.CHECKPOINTS / runs.STATE)
    assert (state["stage_index"], state["stage_epochs_done"], state["global_epoch"]) == (0, done, done)
    info = runs.read_json(run_dir / runs.RUN_INFO)
    assert not info["finished"] and info["cut_short_by_time_budget_s"] == 1e-3
    assert (run_dir / runs.FINAL_WEIGHTS).is_file() and (run_dir / runs.METRICS).is_file()  # evaluated as it stands

    loop.resume(run_dir, verbose=0)
    monkeypatch.undo()
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    expected, epoch = [], 0
    for stage in stages:
        for _ in range(stage["epochs"]):
            epoch += 1
            expected.append((stage["name"], epoch))
    assert [(h["stage"], h["epoch"]) for h in history] == expected
    assert history[:done] == cut_history  # the cut run's epochs are kept, not trained again
    info = runs.read_json(run_dir / runs.RUN_INFO)
    assert info["finished"] and "cut_short_by_time_budget_s" not in info
    # The resumed stage starts on the weights the cut run's last epoch ended on.
    for started, ended in zip(fits[1]["start"], fits[0]["end"], strict=True):
        np.testing.assert_array_equal(started, ended)


def test_saved_config_names_the_data_by_absolute_paths(tmp_path, monkeypatch):
    """Every data path of the recipe (either layout, the class names, extra training sources with their {fold})
    means in the run folder what it meant where the run was started."""
    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe(tiny_recipe(Path("data"), stages=[_stage("head", 1)], split={"folds": 2, "fold": 1}),
                          source="tiny")
    csv_recipe = recipe.with_overrides(train="", csv="data/train.csv", images="data/images",
                                       extra_train=(ExtraSource(csv="pseudo/fold{fold}.csv", images="../photos"),))
    for given in (recipe, csv_recipe):
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        runs.save_config(run_dir, runs.absolute_data_paths(given))
        monkeypatch.chdir("/")
        saved = runs.load_config(run_dir).data
        monkeypatch.chdir(tmp_path)
        for name in ("train", "csv", "images", "classes"):
            value = getattr(given.data, name)
            assert getattr(saved, name) == (str(tmp_path / value) if value else value)
        assert [(e.csv, e.images) for e in saved.extra_train] == [
            (str(tmp_path / "pseudo" / "fold{fold}.csv"), str(tmp_path.parent / "photos"))
            for _ in given.data.extra_train]


@pytest.mark.slow
def test_a_run_started_with_relative_data_paths_exports_from_another_folder(two_class_data, tmp_path, monkeypatch):
    work = two_class_data.parent
    recipe = tiny_recipe(two_class_data, stages=[_stage("head", 1)], tta=["none"])
    recipe["data"] = {"train": "somewhere/else", "classes": "data/classes.json"}  # --data replaces train
    (work / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    assert carclf_main(["train", "tiny.yaml", "--data", "data/train", "--runs", "runs", "--verbose", "0"]) == 0
    (run_dir,) = (work / "runs").iterdir()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    repo = tmp_path / "repo"
    assert carclf_main(["export", str(run_dir), "--repository", str(repo), "--name", "tiny"]) == 0
    assert (repo / "tiny" / "1" / "saved_model.pb").is_file()
    saved = yaml.safe_load((run_dir / runs.CONFIG).read_text())["data"]
    assert (saved["train"], saved["classes"]) == (str(work / "data" / "train"), str(work / "data" / "classes.json"))
