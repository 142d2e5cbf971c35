"""Pseudo-labels: ``carclf pseudo-label`` keeps the confident predictions for unlabelled photos, and a recipe's
``data.extra_train`` trains on them, never validating on them; a photo that would leak a validation label is
refused before any training."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from carclf.cli import main as carclf_main
from carclf.errors import ConfigError, InvalidInput
from carclf.train import data, runs
from carclf.train.recipe import ExtraSource
from tests.fixtures import SAMPLE_DIR
from tests.train.conftest import jpeg_bytes, make_two_class_data, noise_image, tiny_recipe

PHOTOS = SAMPLE_DIR / "test_upload"


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _write_labels(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["Id", "Category"], *rows])


@pytest.fixture
def split_of_two_classes(tmp_path):
    """The two-class sample data, scanned and split in two folds (fold 0 validates)."""
    root = make_two_class_data(tmp_path / "data")
    dataset = data.read_folder_layout(root / "train", root / "classes.json")
    return dataset, data.stratified_split(dataset.samples, 0.2, seed=1, folds=2, fold=0)


# ---------------------------------------------------------------------------------------------
# Reading extra training photos (no training)
# ---------------------------------------------------------------------------------------------

def test_extra_photos_join_training_with_the_datasets_classes(split_of_two_classes, tmp_path):
    dataset, split = split_of_two_classes
    photos = sorted(PHOTOS.glob("*.jpg"))[:3]
    _write_labels(tmp_path / "labels.csv", [[photos[0].name, "1"], [photos[1].name, "0"], [photos[2].name, "1"]])
    samples, skipped = data.extra_training_samples([ExtraSource(str(tmp_path / "labels.csv"), str(PHOTOS))],
                                                   dataset, split)
    assert skipped == []
    by_name = {p.name: p for p in photos}
    assert [(s.path, dataset.class_ids[s.label]) for s in samples] == [
        (str(by_name[name].resolve()), cid) for name, cid in sorted(
            [(photos[0].name, "1"), (photos[1].name, "0"), (photos[2].name, "1")])]
    split.extra = samples
    assert split.training == split.train + samples
    saved = tmp_path / "split.json"
    data.save_split(split, saved)
    again = data.load_split(saved, dataset)
    assert again.extra == samples and again.fingerprint() == split.fingerprint()  # validation is unchanged


def test_a_copy_of_a_validation_photo_is_refused_and_copies_of_training_photos_skipped(split_of_two_classes,
                                                                                          tmp_path):
    dataset, split = split_of_two_classes
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(split.train[0].path, images / "copy_of_train.jpg")
    (images / "broken.jpg").write_bytes(jpeg_bytes(noise_image(64, 64))[:200])
    shutil.copy(next(PHOTOS.glob("*.jpg")), images / "new.jpg")
    _write_labels(tmp_path / "labels.csv", [["copy_of_train.jpg", "0"], ["broken.jpg", "1"], ["new.jpg", "1"]])
    sources = [ExtraSource(str(tmp_path / "labels.csv"), str(images))]
    samples, skipped = data.extra_training_samples(sources, dataset, split)
    assert [s.path for s in samples] == [str((images / "new.jpg").resolve())]
    reasons = {row["file"]: row["reason"] for row in skipped}
    assert reasons["copy_of_train.jpg"] == "data.extra_train[0]: already a training photo"
    assert reasons["broken.jpg"].startswith("data.extra_train[0]: ")
    val_photo = split.val[0]
    shutil.copy(val_photo.path, images / "renamed.jpg")
    _write_labels(tmp_path / "labels.csv", [["new.jpg", "1"], ["renamed.jpg", "0"]])
    with pytest.raises(InvalidInput, match=rf"renamed.jpg is the validation photo '{val_photo.rel}'"):
        data.extra_training_samples(sources, dataset, split)
    _write_labels(tmp_path / "labels.csv", [["new.jpg", "7"]])
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\].csv.*categories \['7'\]"):
        data.extra_training_samples(sources, dataset, split)


def test_an_image_folder_without_any_of_the_listed_photos_is_refused_not_trained_without(split_of_two_classes,
                                                                                          tmp_path):
    """A pseudo-label CSV given with the wrong image folder: each photo would be skipped as unreadable and the run
    would train on none of them, so it is refused naming the folder; a folder missing only some is trained on."""
    dataset, split = split_of_two_classes
    photos = sorted(PHOTOS.glob("*.jpg"))[:2]
    _write_labels(tmp_path / "labels.csv", [[photos[0].name, "1"], [photos[1].name, "0"]])
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    with pytest.raises(ConfigError) as refused:
        data.extra_training_samples([ExtraSource(str(tmp_path / "labels.csv"), str(wrong))], dataset, split)
    assert refused.value.message == (
        f"{tmp_path / 'labels.csv'}: field 'data.extra_train[0].images': none of the 2 photos it lists is in "
        f"{str(wrong)!r} (the first: {photos[0].name!r}); give the folder that holds them")
    shutil.copy(photos[1], wrong / photos[1].name)
    samples, skipped = data.extra_training_samples([ExtraSource(str(tmp_path / "labels.csv"), str(wrong))],
                                                   dataset, split)
    assert [s.path for s in samples] == [str((wrong / photos[1].name).resolve())]
    assert [row["file"] for row in skipped] == [photos[0].name]


# ---------------------------------------------------------------------------------------------
# End to end: fold runs label the photos, and a second cross-validation trains on them
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_cross_validation(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    data_root = make_two_class_data(root / "data")
    recipe = tiny_recipe(data_root)
    recipe["stages"] = recipe["stages"][:1]
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert carclf_main(["train", str(root / "tiny.yaml"), "--folds", "2", "--runs", str(root / "runs")]) == 0
    return root


@pytest.mark.slow
def test_each_fold_run_labels_the_photos_alone_and_the_next_cross_validation_trains_on_them(
        first_cross_validation, capsys):
    from carclf.train.evaluate import load_model, predict_policies

    root = first_cross_validation
    summary = next((root / "runs").glob("tiny-crossval2-*.json"))
    fold_runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir())
    payloads = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    probs = [predict_policies(load_model(run).predictor, payloads, ["none"], 32)["none"] for run in fold_runs]
    threshold = float(np.median(probs[0].max(axis=1)))  # keeps about half of fold 0's photos
    out = root / "labels" / "tiny-fold{fold}.csv"
    assert carclf_main(["pseudo-label", str(summary), str(PHOTOS), "--per-fold", "--out", str(out),
                        "--min-confidence", str(threshold), "--tta", "none"]) == 0
    printed = capsys.readouterr().out
    names = [p.name for p in sorted(PHOTOS.glob("*.jpg"))]
    class_ids = load_model(fold_runs[0]).class_ids
    for fold, p in enumerate(probs):
        expected = [[name, class_ids[int(row.argmax())], f"{row.max():.4f}"]
                    for name, row in zip(names, p, strict=True) if row.max() >= threshold]
        assert _rows(root / "labels" / f"tiny-fold{fold}.csv") == [["Id", "Category", "Confidence"], *expected]
        assert f"tiny-fold{fold}.csv: {len(expected)} of {len(names)} photos" in printed

    # the same recipe trained again with those labels: fold I trains on fold I's file, validates as before
    assert carclf_main(["train", str(root / "tiny.yaml"), "--folds", "2", "--runs", str(root / "again"),
                        "--name", "tiny_pl", "--extra-train", str(out), str(PHOTOS)]) == 0
    again = sorted(p for p in (root / "again").iterdir() if p.is_dir())
    for fold, (before, after) in enumerate(zip(fold_runs, again, strict=True)):
        labels = _rows(root / "labels" / f"tiny-fold{fold}.csv")[1:]
        split = runs.read_json(after / runs.SPLIT)
        assert split["extra_train"] == [[str((PHOTOS / name).resolve()), class_ids.index(cid)]
                                        for name, cid, _ in sorted(labels)]
        assert split["val"] == runs.read_json(before / runs.SPLIT)["val"]
        assert runs.read_json(after / runs.RUN_INFO)["num_extra_train"] == len(labels)
        assert yaml.safe_load((after / runs.CONFIG).read_text())["data"]["extra_train"] == [
            {"csv": str(out), "images": str(PHOTOS)}]
    pooled = json.loads(next((root / "again").glob("tiny_pl-crossval2-*.json")).read_text())
    assert pooled["photos"] == sum(len(runs.read_json(r / runs.SPLIT)["val"]) for r in again)


@pytest.mark.slow
def test_pseudo_label_refuses_bad_arguments_and_writes_nothing(first_cross_validation, tmp_path, capsys):
    root = first_cross_validation
    summary = next((root / "runs").glob("tiny-crossval2-*.json"))
    assert carclf_main(["pseudo-label", str(summary), str(PHOTOS), "--per-fold", "--out",
                        str(tmp_path / "labels.csv")]) == 2
    assert "--out must hold {fold}" in capsys.readouterr().err
    assert carclf_main(["pseudo-label", str(summary), str(PHOTOS), "--out", str(tmp_path / "labels-{fold}.csv")]) == 2
    assert "holds {fold}, which only --per-fold fills" in capsys.readouterr().err
    assert carclf_main(["pseudo-label", str(summary), str(PHOTOS), "--out", str(tmp_path / "labels.csv"),
                        "--min-confidence", "1.5"]) == 2
    assert "--min-confidence must be in [0, 1], received 1.5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # a recipe whose extra photo is a validation photo stops before training, naming both
    run = sorted(p for p in (root / "runs").iterdir() if p.is_dir())[0]
    val_rel = runs.read_json(run / runs.SPLIT)["val"][0][0]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(root / "data" / "train" / val_rel, images / "leak.jpg")
    _write_labels(tmp_path / "leak.csv", [["leak.jpg", val_rel.split("/")[0]]])
    assert carclf_main(["train", str(root / "tiny.yaml"), "--folds", "2", "--fold", "0", "--runs",
                        str(tmp_path / "runs"), "--extra-train", str(tmp_path / "leak.csv"), str(images)]) == 2
    err = capsys.readouterr().err
    assert f"leak.jpg is the validation photo '{val_rel}'" in err
    assert not (tmp_path / "runs").exists()  # the refused run leaves no folder, nor the --runs it made
