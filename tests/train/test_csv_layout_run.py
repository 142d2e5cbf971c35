"""A run trained on the CSV layout (``data: {csv, images}``) is exported and evaluated as training read it.

Export and evaluation used to re-read the run's photos as class folders, so a CSV-layout run, trained
without a complaint, could be neither exported nor evaluated ("has no class folders")."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from carclf.cli import main as carclf_main
from carclf.train import loop, runs
from carclf.train.recipe import parse_recipe
from tests.fixtures import SAMPLE_DIR
from tests.train.conftest import tiny_recipe

pytestmark = pytest.mark.slow


def make_csv_data(root):
    """root/images/<flat files> and root/train.csv (Id,Category) of the sample's real photos of two classes."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for cid in ("0", "1"):
        for photo in sorted((SAMPLE_DIR / "train" / cid).glob("*.jpg")):
            name = f"c{cid}_{photo.name}"
            shutil.copyfile(photo, images / name)
            rows.append((name, cid))
    with (root / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("Id", "Category"), *rows])
    names = json.loads((SAMPLE_DIR / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps({c: names[c] for c in ("0", "1")}))
    return root


def test_a_csv_layout_run_is_exported_and_evaluated(tmp_path):
    root = make_csv_data(tmp_path / "data")
    recipe = tiny_recipe(root, data={"csv": str(root / "train.csv"), "images": str(root / "images"),
                                     "classes": str(root / "classes.json")},
                         stages=[{"name": "head", "epochs": 1, "lr": 1e-3, "batch_size": 4, "image_size": 32,
                                  "unfreeze": "none"}])
    run_dir = loop.train(parse_recipe(recipe, source="csv"), runs_root=tmp_path / "runs", verbose=0)
    validation = runs.read_json(run_dir / runs.METRICS)["policies"]["none"]["count"]

    repo = tmp_path / "repository"
    assert carclf_main(["export", str(run_dir), "--repository", str(repo), "--name", "csv_run"]) == 0
    card = json.loads((repo / "csv_run" / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["data_csv"] == str(root / "train.csv") and card["warmup_records"] > 0

    for model, out in ((run_dir, tmp_path / "eval_run"), (repo / "csv_run", tmp_path / "eval_savedmodel")):
        assert carclf_main(["evaluate", str(model), "--tta", "none", "--out", str(out)]) == 0
        report = json.loads((out / "eval.json").read_text())
        assert report["photos"] == validation, report
