"""The Kaggle submission file (``Id,Category``): one row per photo of the folder, the class id the models predict
with the TTA policy asked for."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import pytest

from carclf import contract
from carclf.cli import main as carclf_main
from carclf.errors import InvalidInput
from carclf.train.evaluate import load_model, predict_policies
from carclf.train.submit import write_submission
from tests.fixtures import SAMPLE_DIR

PHOTOS = SAMPLE_DIR / "test_upload"


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _expected(model, policy: str, class_ids: list[str]) -> list[list[str]]:
    """Each photo of PHOTOS with the class id of the model's most probable class under ``policy``."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    images = [p.read_bytes() for p in photos]
    probs = predict_policies(model.predictor, images, [policy], model.input_size)[policy]
    return [[p.name, class_ids[int(i)]] for p, i in zip(photos, probs.argmax(axis=1), strict=True)]


def test_submit_predicts_with_the_tta_policy_it_is_given(tiny_repository_template, tmp_path, capsys):
    """``--tta hflip_crops`` changes the answer for some photos of this model; the CSV holds those answers."""
    folder = tiny_repository_template / "tiny_a" / "1"
    model = load_model(folder)
    expected = _expected(model, "hflip_crops", model.class_ids)
    assert expected != _expected(model, "none", model.class_ids)  # the policy matters for these photos
    out = tmp_path / "submission.csv"
    assert carclf_main(["submit", str(folder), str(PHOTOS), "--out", str(out), "--tta", "hflip_crops"]) == 0
    assert f"{len(expected)} rows, 0 skipped" in capsys.readouterr().out
    assert _rows(out) == [["Id", "Category"], *expected]


def test_the_category_is_the_class_id_not_the_output_position(tiny_repository_template, tmp_path):
    """A model whose category ids are not 0..N-1 (a label CSV naming categories 10..19) writes those ids."""
    model = load_model(tiny_repository_template / "tiny_a" / "1")
    ids = [str(10 + i) for i in range(len(model.class_ids))]
    renamed = dataclasses.replace(model, class_ids=ids)
    out = tmp_path / "submission.csv"
    write_submission(renamed, PHOTOS, out, policy="none", progress=False)
    assert _rows(out) == [["Id", "Category"], *_expected(model, "none", ids)]


def test_an_unknown_on_bad_choice_is_refused_before_anything_is_written(tiny_repository_template, tmp_path):
    """``on_bad`` is "fail" or "skip"; a misspelt choice is refused, not read as "skip" (which drops photos)."""
    out = tmp_path / "submission.csv"
    with pytest.raises(InvalidInput, match=r"on_bad must be one of \('fail', 'skip'\), received 'skp'"):
        write_submission(
            load_model(tiny_repository_template / "tiny_a" / "1"), PHOTOS, out, on_bad="skp", progress=False
        )
    assert not out.exists()


@pytest.mark.parametrize("card", [None, {"input_size": "large"}])
def test_a_version_without_a_usable_model_card_is_refused_by_name(tiny_repository_template, tmp_path, capsys, card):
    """The input size lives in the model card only; without it the command names the card and writes nothing."""
    version = tmp_path / "tiny_a" / "1"
    shutil.copytree(tiny_repository_template / "tiny_a" / "1", version)
    card_path = version / "assets.extra" / contract.MODEL_CARD
    if card is None:
        card_path.unlink()
    else:
        card_path.write_text(json.dumps({**json.loads(card_path.read_text()), **card}))
    out = tmp_path / "submission.csv"
    assert carclf_main(["submit", str(version), str(PHOTOS), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert f"model card {str(card_path)!r}" in err
    assert ("is missing: it records the model's input size" if card is None
            else "has no usable input_size (received 'large')") in err
    assert not out.exists()


def test_files_of_the_photo_folder_that_are_not_photos_are_named_once(tiny_repository_template, tmp_path, caplog):
    """A .tif scan and a text file beside the photos get no row: one warning names them (not one per look at
    the folder), hidden files and sub-folders aside, and the photos are all answered."""
    import logging
    import shutil

    folder = tmp_path / "test_upload"
    folder.mkdir()
    photos = sorted(PHOTOS.glob("*.jpg"))[:3]
    for photo in photos:
        shutil.copyfile(photo, folder / photo.name)
    (folder / "scan.tif").write_bytes(b"II*\x00")
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "more").mkdir()
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.WARNING):
        assert carclf_main(["submit", str(tiny_repository_template / "tiny_a" / "1"), str(folder), "--out", str(out),
                            "--tta", "none"]) == 0
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 1 and "2 files are not readable photo files" in said[0], said
    assert "'notes.txt', 'scan.tif'" in said[0] and str(folder) in said[0]
    assert [row[0] for row in _rows(out)[1:]] == [p.name for p in photos]
