"""Bad input to the training commands gets one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import tiny_recipe

CARCLF = Path(sys.executable).parent / "carclf"


def _carclf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CARCLF), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("carclf")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_recipe():
    _assert_clean_error(_carclf("train", "no_such_recipe"), "unknown recipe 'no_such_recipe'", "mobilenet_v2")


def test_invalid_recipe_field_and_override(tmp_path):
    data = tiny_recipe(tmp_path)
    data["stages"][0]["batch_size"] = -4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    _assert_clean_error(_carclf("train", str(bad)), str(bad), "stages[0].batch_size", "received -4")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    _assert_clean_error(_carclf("train", str(good), "--val-fraction", "5"), "split.val_fraction", "received 5.0")
    _assert_clean_error(_carclf("train", str(good), "--fold", "2"), "split.fold", "needs split.folds")
    _assert_clean_error(_carclf("train", str(good), "--folds", "3", "--fold", "3"), "split.fold", "received 3")
    _assert_clean_error(_carclf("crossval", str(tmp_path)), "not a finished run folder")


def test_resume_refuses_options_that_would_change_the_saved_recipe(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("untouched")
    result = _carclf("train", "--resume", str(run_dir), "--extra-train", "labels.csv", "photos", "--seed", "3")
    _assert_clean_error(result, "--resume continues", "--extra-train, --seed", "start a new run")
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("args,needle", [
    (("evaluate", "/no/such/run"), "no run folder or SavedModel at '/no/such/run'"),
    (("export", "{tmp}"), "is not a run folder"),
    (("submit", "{tmp}", "/no/such/photos"), "no SavedModel at"),
    (("evaluate", "{tmp}", "--tta", "sideways"), "unknown TTA policy 'sideways'"),
])
def test_missing_or_wrong_paths(tmp_path, args, needle):
    _assert_clean_error(_carclf(*(a.replace("{tmp}", str(tmp_path)) for a in args)), needle)


def test_scan_reports_bad_files_and_writes_eda(tmp_path, two_class_data):
    (two_class_data / "train" / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "scan"
    result = _carclf("scan", str(two_class_data / "train"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "skip 1/broken.jpg" in result.stdout and "10 usable images, 1 skipped" in result.stdout
    assert {p.name for p in out.iterdir()} == {"scan.json", "eda.json", "eda.png"}
