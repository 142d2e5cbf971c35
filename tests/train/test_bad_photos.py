"""``carclf submit`` and ``carclf pseudo-label`` over a folder with broken photos: a truncated JPEG (its header is
whole, its data stops) is skipped like any unusable file when told to skip, and named when told to fail."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from carclf.cli import main as carclf_main
from tests.fixtures import SAMPLE_DIR

BROKEN = {"truncated.jpg", "notes.jpg"}


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((SAMPLE_DIR / "test_upload").glob("*.jpg"))[:4]
    for path in good:
        shutil.copy(path, folder / path.name)
    whole = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.jpg").write_text("not a photo")
    return folder


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_submit_skips_a_truncated_photo_when_told_and_names_it_otherwise(tiny_repository_template, photos,
                                                                          tmp_path, capsys, caplog):
    model = str(tiny_repository_template / "tiny_a")
    out = tmp_path / "submission.csv"
    good = sorted(p.name for p in photos.iterdir() if p.name not in BROKEN)

    assert carclf_main(["submit", model, str(photos), "--out", str(out), "--on-bad", "skip"]) == 0
    rows = _rows(out)
    assert rows[0] == ["Id", "Category"] and [r[0] for r in rows[1:]] == good
    assert f"{len(good)} rows, 2 skipped" in capsys.readouterr().out
    assert {name for name in BROKEN if any(f"skipping {name}" in r.getMessage() for r in caplog.records)} == BROKEN
    assert any("does not decode" in r.getMessage() for r in caplog.records if "truncated.jpg" in r.getMessage())

    (photos / "notes.jpg").unlink()
    refused = tmp_path / "refused.csv"
    assert carclf_main(["submit", model, str(photos), "--out", str(refused)]) == 2  # --on-bad fail by default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated.jpg: does not decode (truncated or corrupt)" in err[0], err
    assert not refused.exists()


def test_pseudo_label_skips_a_truncated_photo(tiny_repository_template, photos, tmp_path, capsys):
    out = tmp_path / "labels.csv"
    code = carclf_main(["pseudo-label", str(tiny_repository_template / "tiny_a"), str(photos), "--out", str(out),
                        "--min-confidence", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 of 4 photos" in printed and "(2 skipped" in printed, printed
    assert {r[0] for r in _rows(out)[1:]} == {p.name for p in photos.iterdir()} - BROKEN
