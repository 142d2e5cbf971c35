"""k-fold cross-validation end to end: ``carclf train --folds 2`` trains both folds of real photos and pools
them; ``carclf crossval`` re-reads the run folders and refuses sets of runs that are not one cross-validation."""

from __future__ import annotations

import json

import pytest
import yaml

from carclf.cli import main as carclf_main
from carclf.errors import InvalidInput
from carclf.train import crossval, runs
from tests.train.conftest import make_two_class_data, tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    data_root = make_two_class_data(root / "data")
    recipe = tiny_recipe(data_root)
    recipe["stages"] = recipe["stages"][:1]  # one stage of one epoch is enough to have two fold runs
    recipe_file = root / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert carclf_main(["train", str(recipe_file), "--folds", "2", "--runs", str(root / "runs")]) == 0
    return root


def _fold_runs(root):
    return sorted(p for p in (root / "runs").iterdir() if p.is_dir())


def test_every_fold_is_trained_and_pooled(two_folds, capsys):
    folders = _fold_runs(two_folds)
    assert [p.name.split("-")[1] for p in folders] == ["fold0of2", "fold1of2"]
    splits = [runs.read_json(p / runs.SPLIT) for p in folders]
    photos = {rel for split in splits for rel, _ in split["val"]}
    assert {rel for rel, _ in splits[0]["val"]} & {rel for rel, _ in splits[1]["val"]} == set()
    assert photos == {rel for rel, _ in splits[0]["val"] + splits[0]["train"]}  # the folds cover every photo
    summary_files = list((two_folds / "runs").glob("tiny-crossval2-*.json"))
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    metrics = [runs.read_json(p / runs.METRICS) for p in folders]
    assert summary["photos"] == len(photos) and summary["folds"] == 2
    for policy in ("none", "hflip"):
        pooled = summary["policies"][policy]
        assert pooled["correct"] == sum(m["policies"][policy]["correct"] for m in metrics)
        assert pooled["count"] == len(photos)
        assert pooled["per_fold_correct"] == [m["policies"][policy]["correct"] for m in metrics]
        assert len(pooled["photo_correct"]) == len(photos) and sum(pooled["photo_correct"].values()) == pooled["correct"]
    # the command on the same folders reproduces the file (its folder made, as --out of every command), and
    # prints the pooled table
    out = two_folds / "summaries" / "again.json"
    assert carclf_main(["crossval", *map(str, folders), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["policies"] == summary["policies"]
    assert f"({summary['policies']['none']['correct']}/{len(photos)})" in capsys.readouterr().out


def test_runs_that_are_not_one_cross_validation_are_refused(two_folds, tmp_path):
    folders = _fold_runs(two_folds)
    with pytest.raises(InvalidInput, match=r"needs folds 0..1 once each, received \[0\]"):
        crossval.summarize(folders[:1])
    with pytest.raises(InvalidInput, match=r"received \[0, 0\]"):
        crossval.summarize([folders[0], folders[0]])
    other = tmp_path / "other"
    other.mkdir()
    for name in (runs.METRICS, runs.SPLIT):
        (other / name).write_bytes((folders[1] / name).read_bytes())
    split = runs.read_json(other / runs.SPLIT)
    split["seed"] += 1
    (other / runs.SPLIT).write_text(json.dumps(split))
    with pytest.raises(InvalidInput, match="has split_seed"):
        crossval.summarize([folders[0], other])
    split["seed"] -= 1
    split["folds"] = 0
    (other / runs.SPLIT).write_text(json.dumps(split))
    with pytest.raises(InvalidInput, match="hold-out split, not a k-fold one"):
        crossval.summarize([folders[0], other])
    split["folds"] = 2
    (other / runs.SPLIT).write_text(json.dumps(split))
    config = yaml.safe_load((folders[1] / runs.CONFIG).read_text())
    (other / runs.CONFIG).write_text(yaml.safe_dump({**config, "seed": config["seed"] + 1}))
    with pytest.raises(InvalidInput, match=r"different settings \(seed\)"):
        crossval.summarize([folders[0], other])
    (other / runs.CONFIG).write_text(yaml.safe_dump(config))
    assert crossval.summarize([folders[0], other])["photos"] == len(split["val"]) + len(split["train"])
    with pytest.raises(InvalidInput, match="not a finished run folder"):
        crossval.summarize([tmp_path])


def test_paired_comparison_counts_discordant_photos(two_folds, tmp_path, capsys):
    stats = pytest.importorskip("scipy.stats")
    summary = crossval.summarize(_fold_runs(two_folds))
    same = crossval.compare(summary, summary, "none")
    assert (same["only_first"], same["only_second"], same["mcnemar_p"]) == (0, 0, 1.0)
    other = json.loads(json.dumps(summary))
    flipped = sorted(other["policies"]["none"]["photo_correct"])[:3]
    for rel in flipped:
        other["policies"]["none"]["photo_correct"][rel] ^= 1
    result = crossval.compare(summary, other, "none")
    right_before = sum(summary["policies"]["none"]["photo_correct"][rel] for rel in flipped)
    assert (result["only_first"], result["only_second"]) == (right_before, len(flipped) - right_before)
    expected = stats.binomtest(min(right_before, 3 - right_before), 3, 0.5).pvalue
    assert result["mcnemar_p"] == pytest.approx(expected)
    # the command prints the comparison; a file that is not a summary gets one clear error
    saved = tmp_path / "other.json"
    saved.write_text(json.dumps(other))
    assert carclf_main(["crossval", *map(str, _fold_runs(two_folds)), "--compare", str(saved)]) == 0
    assert f"only the first right on {right_before}" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="not a cross-validation summary"):
        crossval_command_run(two_folds, tmp_path / "bad.json")
    del other["policies"]["none"]["photo_correct"]
    with pytest.raises(InvalidInput, match="no per-photo results for policy 'none'"):
        crossval.compare(summary, other, "none")


def crossval_command_run(root, compare_path):
    import argparse

    from carclf.train.commands import crossval as command

    return command.run(argparse.Namespace(runs=[str(p) for p in _fold_runs(root)], out=None, compare=str(compare_path)))


def test_a_submission_averages_the_fold_runs_of_a_summary(two_folds, tmp_path, capsys):
    """``carclf submit SUMMARY.json PHOTOS``: the fold runs' probabilities are averaged, photo by photo."""
    import csv

    import numpy as np

    from carclf.train.evaluate import load_model, predict_policies
    from tests.fixtures import SAMPLE_DIR

    summary_file = next((two_folds / "runs").glob("tiny-crossval2-*.json"))
    photos_dir = SAMPLE_DIR / "test_upload"
    out = tmp_path / "submission.csv"
    assert carclf_main(["submit", str(summary_file), str(photos_dir), "--out", str(out), "--tta", "none"]) == 0
    assert "(mean of 2 models)" in capsys.readouterr().out
    photos = sorted(photos_dir.glob("*.jpg"))
    payloads = [p.read_bytes() for p in photos]
    models = [load_model(p) for p in _fold_runs(two_folds)]
    probs = [predict_policies(m.predictor, payloads, ["none"], m.input_size)["none"] for m in models]
    expected = [models[0].class_ids[i] for i in np.mean(probs, axis=0).argmax(axis=1)]
    rows = list(csv.reader(out.open()))
    assert rows[1:] == [[p.name, c] for p, c in zip(photos, expected, strict=True)]
    # fold run folders given one by one make the same file
    again = tmp_path / "again.csv"
    assert carclf_main(["submit", *map(str, _fold_runs(two_folds)), str(photos_dir), "--out", str(again),
                        "--tta", "none"]) == 0
    assert again.read_text() == out.read_text()


def test_a_submission_refuses_models_of_other_classes_and_broken_summaries(two_folds, tmp_path):
    import dataclasses

    from carclf.train.evaluate import load_model
    from carclf.train.submit import write_submission
    from tests.fixtures import SAMPLE_DIR

    first, second = (load_model(p) for p in _fold_runs(two_folds))
    out = tmp_path / "submission.csv"
    out.write_text("the previous submission\n")
    with pytest.raises(InvalidInput, match="must share classes"):
        write_submission([first, dataclasses.replace(second, class_ids=["1", "0"])], SAMPLE_DIR / "test_upload",
                         out, progress=False)
    assert out.read_text() == "the previous submission\n"  # nothing lost, nothing half-written
    summary = json.loads(next((two_folds / "runs").glob("tiny-crossval2-*.json")).read_text())
    moved = two_folds / "runs" / "moved-summary.json"  # runs written relative to another folder: found beside it
    moved.write_text(json.dumps({**summary, "runs": [f"elsewhere/{p.name}" for p in _fold_runs(two_folds)]}))
    try:
        assert crossval.summary_runs(moved) == _fold_runs(two_folds)
    finally:
        moved.unlink()
    summary["runs"][1] = "runs/gone-fold1of2"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(summary))
    with pytest.raises(InvalidInput, match="lists the fold run 'runs/gone-fold1of2', which is neither there"):
        crossval.summary_runs(broken)
    assert carclf_main(["submit", str(broken), str(SAMPLE_DIR / "test_upload"), "--out", str(out)]) == 2
    assert out.read_text() == "the previous submission\n"
