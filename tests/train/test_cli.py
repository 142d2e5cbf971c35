"""Bad input to the training commands gets one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures import SAMPLE_DIR
from tests.train.conftest import tiny_recipe

PHOTOS = SAMPLE_DIR / "test_upload"

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
    (("submit", "{tmp}", "{photos}"), "no SavedModel at"),
    (("submit", "{tmp}", "/no/such/photos"), "photo folder '/no/such/photos' does not exist"),  # before the model
    (("evaluate", "{tmp}", "--tta", "sideways"), "unknown TTA policy 'sideways'"),
    (("scan", "{photos}/../classes.json"), "training folder '{photos}/../classes.json' is a file, not a folder"),
])
def test_missing_or_wrong_paths(tmp_path, args, needle):
    _assert_clean_error(_carclf(*(a.replace("{tmp}", str(tmp_path)).replace("{photos}", str(PHOTOS)) for a in args)),
                        needle.replace("{photos}", str(PHOTOS)))


def test_scan_reports_bad_files_and_writes_eda(tmp_path, two_class_data):
    (two_class_data / "train" / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "scan"
    result = _carclf("scan", str(two_class_data / "train"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "skip 1/broken.jpg" in result.stdout and "10 usable images, 1 skipped" in result.stdout
    assert {p.name for p in out.iterdir()} == {"scan.json", "eda.json", "eda.png"}


def _lr_zero(recipe: dict) -> None:
    recipe["stages"][0]["lr"] = 0


def _epochs_misspelt(recipe: dict) -> None:
    recipe["stages"][0]["epocs"] = recipe["stages"][0].pop("epochs")


def _stage_name_escapes(recipe: dict) -> None:
    recipe["stages"][1]["name"] = "../../top"


def _scratch_allowed(recipe: dict) -> None:
    recipe["on_missing_weights"] = "scratch"


@pytest.mark.parametrize("args,change,needles", [
    (("--seed", "-5"), None, ("field 'seed'", "expected a value >= 0, received -5")),
    (("--split-seed", "-5"), None, ("field 'split.seed'", "received -5")),
    (("--name", "../outside"), None, ("field 'name'", "plain file name", "'../outside'")),
    ((), _lr_zero, ("stages[0].lr", "expected a value > 0, received 0.0")),
    ((), _epochs_misspelt, ("stages[0].epochs", "is required", "'epocs' is unknown")),
    ((), _stage_name_escapes, ("stages[1].name", "plain file name", "'../../top'")),
    (("--folds", "11"), None, ("split.folds 11 is more than the 10 usable photos", "at most 10 folds")),
    # not HDF5 at all: refused before TensorFlow starts, even where a missing file would mean training from scratch
    (("--weights", "{tmp}/bad.h5"), _scratch_allowed, ("field 'weights'", "bad.h5", "has no HDF5 signature")),
    (("--weights", "{tmp}/other.h5"), None, ("weights file", "other.h5", "does not load into backbone 'tiny_cnn'")),
    (("--weights", "{tmp}/typo.h5"), _scratch_allowed, ("field 'weights'", "an existing weights file", "typo.h5")),
    (("--data", "{tmp}/empty"), None, ("has no class folders",)),
], ids=["seed", "split_seed", "name_escapes_runs", "lr_zero", "stage_field_typo", "stage_name_escapes",
        "more_folds_than_photos", "weights_not_hdf5", "weights_of_another_model", "explicit_weights_missing",
        "empty_data"])
def test_a_refused_run_names_the_problem_and_leaves_no_folder(tmp_path, two_class_data, args, change, needles):
    import h5py

    (tmp_path / "bad.h5").write_text("not an HDF5 file")
    with h5py.File(tmp_path / "other.h5", "w") as f:  # real HDF5, but no layers of this backbone
        f.create_dataset("x", data=np.zeros(3))
    (tmp_path / "empty").mkdir()
    recipe = tiny_recipe(two_class_data)
    if change:
        change(recipe)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    data_before = sorted((p.relative_to(two_class_data), p.stat().st_size) for p in two_class_data.rglob("*"))
    runs_root = tmp_path / "runs"
    result = _carclf("train", str(recipe_file), "--runs", str(runs_root),
                     *(a.replace("{tmp}", str(tmp_path)) for a in args))
    _assert_clean_error(result, *needles)
    assert not runs_root.exists(), sorted(runs_root.rglob("*"))
    assert sorted((p.relative_to(two_class_data), p.stat().st_size) for p in two_class_data.rglob("*")) == data_before


def test_resume_of_a_missing_folder_says_so(tmp_path):
    _assert_clean_error(_carclf("train", "--resume", str(tmp_path / "nope")), "no run folder at")


# runs one carclf command in a fresh process; its last line: the exit status, and whether TensorFlow was imported
_TENSORFLOW_STARTED = """import json, sys
from carclf.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, "tensorflow" in sys.modules]))
"""


@pytest.mark.parametrize("args,needle", [
    (("train", "--resume", "{tmp}/nope"), "no run folder at"),
    (("train", "--resume", "{tmp}/unstarted"), "has no checkpoint to resume from"),
    (("train", "{tmp}/recipe.yaml", "--data", "{tmp}/empty"), "has no class folders"),
    (("submit", "{tmp}/empty", str(PHOTOS)), "no SavedModel at"),
    (("train", "{tmp}/recipe.yaml", "--weights", "{tmp}/bad.h5"), "has no HDF5 signature"),
], ids=["resume_missing_folder", "resume_without_checkpoint", "data_without_classes", "submit_without_savedmodel",
        "weights_not_hdf5"])
def test_refusals_that_need_no_model_come_before_tensorflow_starts(tmp_path, args, needle):
    """TensorFlow's start-up takes seconds: a wrong path is named without it."""
    from carclf.train import runs
    from carclf.train.recipe import parse_recipe

    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.h5").write_bytes(b"PK\x03\x04 a zip, not HDF5")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    (tmp_path / "unstarted").mkdir()  # a run folder whose process stopped before its first epoch ended
    runs.save_config(tmp_path / "unstarted", parse_recipe(tiny_recipe(tmp_path), source="tiny"))
    result = subprocess.run([sys.executable, "-c", _TENSORFLOW_STARTED, *(a.replace("{tmp}", str(tmp_path))
                                                                          for a in args)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [2, False], result.stderr[-3000:]
    assert needle in result.stderr


def test_scan_of_the_layouts_root_points_at_its_train_folder(two_class_data):
    _assert_clean_error(_carclf("scan", str(two_class_data)), "holds a train/ folder", str(two_class_data / "train"))


@pytest.mark.parametrize("args,needle", [
    (("evaluate", "{tmp}", "--all", "--split", "{tmp}/split.json"), "give --all (every usable photo of the data) or "
                                                                    "--split"),
    (("train", "demo_mobilenet_v2", "--folds", "5", "--val-fraction", "0", "--runs", "{tmp}"),
     "--val-fraction 0.0 does not apply with --folds 5"),
    (("scan", "{tmp}", "--min-side", "-5"), "--min-side must be >= 1 pixel, received -5"),
    (("export", "{tmp}", "--name", " "), "--name is empty"),
    (("submit", "{tmp}", "{tmp}", "--tta", "bogus"), "argument --tta: invalid choice: 'bogus'"),
])
def test_flags_that_contradict_or_make_no_sense_are_refused_not_ignored(tmp_path, capsys, args, needle):
    """In-process: each refusal comes before any model, photo or run is read (the paths name an empty folder)."""
    from carclf.cli import main

    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    except SystemExit as exc:  # argparse's own refusal (an invalid choice)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_bad_transform_is_refused_before_a_run_folder_or_model_is_made(tmp_path, two_class_data, monkeypatch):
    from carclf.errors import ConfigError
    from carclf.train import loop
    from carclf.train.recipe import parse_recipe

    built = []
    monkeypatch.setattr(loop, "build_classifier", lambda *a, **k: built.append(a))
    data = tiny_recipe(two_class_data)
    data["augmentation"] = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "HorizFlipper", "p": 0.5}]
    with pytest.raises(ConfigError, match=r"augmentation\[1\].name.*unknown albumentations transform 'HorizFlipper'"):
        loop.train(parse_recipe(data, source="r.yaml"), runs_root=tmp_path / "runs")
    assert built == [] and not (tmp_path / "runs").exists()


def test_pseudo_label_keeps_the_confidence_its_help_states_by_default(capsys):
    """``carclf pseudo-label --help`` states the default --min-confidence; a command without the flag uses it."""
    from carclf.cli import build_parser

    parser = build_parser("pseudo-label")
    with pytest.raises(SystemExit):
        parser.parse_args(["pseudo-label", "--help"])
    stated = re.search(r"--min-confidence.*?\(default:\s+([0-9.]+)\)", capsys.readouterr().out, re.S)
    assert stated, "the help states no default"
    args = parser.parse_args(["pseudo-label", "run", "photos", "--out", "labels.csv"])
    assert args.min_confidence == float(stated.group(1))


def test_scan_skips_photos_smaller_than_its_min_side(tmp_path, capsys):
    """``carclf scan --min-side 50`` lists a 40-pixel photo as one training would skip (the default of 32 keeps it)."""
    import json

    from carclf.cli import main
    from tests.train.conftest import jpeg_bytes, noise_image

    train = tmp_path / "train"
    (train / "0").mkdir(parents=True)
    (train / "0" / "small.jpg").write_bytes(jpeg_bytes(noise_image(40, 40)))
    (train / "0" / "large.jpg").write_bytes(jpeg_bytes(noise_image(60, 60)))
    out = tmp_path / "scan"
    assert main(["scan", str(train), "--min-side", "50", "--out", str(out)]) == 0
    assert "skip 0/small.jpg: image is 40x40, smaller than 50 px" in capsys.readouterr().out
    report = json.loads((out / "scan.json").read_text())
    assert [g["rel"] for g in report["good"]] == ["0/large.jpg"]
    assert [b["file"] for b in report["bad"]] == ["0/small.jpg"]


def _to_float(recipe: dict) -> None:
    recipe["augmentation"].append({"name": "ToFloat"})


def _crop_half_the_time(recipe: dict) -> None:
    recipe["augmentation"] = [{"name": "RandomCrop", "height": 24, "width": 24, "p": 0.5}]


def _no_tta(recipe: dict) -> None:
    recipe["tta"] = []


def _lr_nan(recipe: dict) -> None:
    recipe["stages"][0]["lr"] = float("nan")


@pytest.mark.parametrize("args,change,needles", [
    ((), _to_float, ("field 'augmentation[2]'", "ToFloat", "must keep uint8 images", "float32")),
    ((), _crop_half_the_time, ("field 'augmentation[0]'", "RandomCrop", "32x32x3", "uint8[24, 24, 3]")),
    ((), _no_tta, ("field 'tta'", "expected a non-empty list", "received []")),
    ((), _lr_nan, ("field 'stages[0].lr'", "expected a finite number, received nan")),
    (("--val-fraction", "nan"), None, ("field 'split.val_fraction'", "expected a finite number, received nan")),
    (("--val-fraction=-inf",), None, ("field 'split.val_fraction'", "expected a finite number, received -inf")),
    (("--time-budget", "nan"), None, ("--time-budget", "finite", "received nan")),
    (("--time-budget", "inf"), None, ("--time-budget", "finite", "received inf")),
], ids=["augmentation_to_float", "augmentation_crop_p0.5", "tta_empty", "lr_nan",
        "val_fraction_nan", "val_fraction_minus_inf", "time_budget_nan", "time_budget_inf"])
def test_a_recipe_or_flag_that_would_spoil_the_run_is_refused_before_a_run_folder(
        tmp_path, two_class_data, capsys, monkeypatch, args, change, needles):
    """In-process: refused with one line and status 2 before a run folder or a model is made (a run that got as
    far as building the model finds none: the stand-in records the call)."""
    from carclf.cli import main
    from carclf.train import loop

    built = []
    monkeypatch.setattr(loop, "build_classifier", lambda *a, **k: built.append(a))
    recipe = tiny_recipe(two_class_data)
    if change:
        change(recipe)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    runs_root = tmp_path / "runs"
    try:
        code = main(["train", str(recipe_file), "--runs", str(runs_root), *args])
    except Exception as exc:  # the unguarded value reached training
        pytest.fail(f"not refused up front: {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("carclf")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert built == [] and not runs_root.exists(), sorted(runs_root.rglob("*"))


def test_resume_of_a_run_saved_with_an_empty_tta_list_names_the_field(tmp_path, two_class_data, capsys):
    """A run folder whose saved config has ``tta: []`` (accepted before) is refused at once on --resume, naming
    the field, rather than training to the end and failing in evaluation again."""
    from carclf.cli import main
    from carclf.train import runs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.CONFIG).write_text(yaml.safe_dump(tiny_recipe(two_class_data, tta=[])))
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / runs.CONFIG}: field 'tta'" in err and "received []" in err, err


@pytest.mark.parametrize("name_flag,needle", [
    ((), "received 'tiny.v2' (the run's recipe name): give --name"),
    (("--name", "caf\u00e9"), "received 'caf\u00e9'"),
], ids=["recipe_name_with_a_dot", "non_ascii_name"])
def test_export_refuses_a_model_name_before_loading_the_run(tmp_path, two_class_data, capsys, monkeypatch, name_flag,
                                                            needle):
    """A recipe may be named 'tiny.v2'; a model may not. The default export name was refused only after the
    model had been rebuilt and its weights loaded; now at once (the run folder needs no weights to say so)."""
    from carclf.cli import main
    from carclf.train import runs

    loaded = []
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: loaded.append(a))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.CONFIG).write_text(yaml.safe_dump(tiny_recipe(two_class_data, name="tiny.v2")))
    repository = tmp_path / "repository"
    assert main(["export", str(run_dir), "--repository", str(repository), *name_flag]) == 2
    err = capsys.readouterr().err
    assert "model name must be ASCII letters, digits, '_' or '-'" in err and needle in err, err
    assert loaded == [] and not any(repository.glob("*/*"))


@pytest.mark.parametrize("layout,extra,expected", [
    ("beside", ("--data", "{root}/train"), "{root}/classes.json"),   # the Kaggle layout: classes.json next to train/
    ("inside", ("--data", "{root}/train"), "{root}/train/classes.json"),
    ("none", ("--data", "{root}/train"), None),                       # no names file: the class folders' names
    ("beside", ("--data", "{root}/train", "--classes", "{root}/other.json"), "{root}/other.json"),
    ("beside", (), "recipe"),                                         # the recipe's own data, its own names
])
def test_a_data_folder_brings_its_own_class_names_not_the_recipes(tmp_path, layout, extra, expected):
    """The recipe's data.classes names the classes of its own data set (cars10's models); another folder's
    class 0 may be another car (sf-dl's is a Lada Priora), so its names come from beside it or from its folders."""
    from carclf.cli import build_parser
    from carclf.train.commands.train import recipe_from
    from carclf.train.recipe import load_recipe

    (tmp_path / "train" / "0").mkdir(parents=True)
    if layout != "none":
        (tmp_path / ("classes.json" if layout == "beside" else "train/classes.json")).write_text('{"0": "car"}')
    argv = ["train", "mobilenet_v2_224x448", *(a.replace("{root}", str(tmp_path)) for a in extra)]
    classes = recipe_from(build_parser("train").parse_args(argv)).data.classes
    if expected == "recipe":
        assert classes == load_recipe("mobilenet_v2_224x448").data.classes and classes
    else:
        assert classes == (expected.replace("{root}", str(tmp_path)) if expected else None)
