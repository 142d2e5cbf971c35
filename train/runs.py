"""The run folder: what every training run writes under ``runs/<recipe>-<timestamp>/`` and reads back.

Layout::

    config.yaml        resolved recipe (after command-line overrides)
    run.json           backbone, weights actually used, classes, image size, timings, split fingerprint
    labels.txt         class names in model output order; classes.json: class id -> name
    augmentation.json  the exact albumentations pipeline (A.save)
    scan.json, split.json
    history.csv, history.json, curves.png, tensorboard/
    checkpoints/       best-<stage>.weights.h5, last.weights.h5, state.json (for --resume)
    final.weights.h5   the trained classifier
    metrics.json, confusion_<policy>.png
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carclf import backbones
from carclf.errors import FailedPrecondition, NotFound
from carclf.imaging import Size, plain_size
from carclf.train.recipe import Recipe, parse_recipe

CONFIG = "config.yaml"
RUN_INFO = "run.json"
LABELS = "labels.txt"
CLASSES = "classes.json"
AUGMENTATION = "augmentation.json"
SCAN = "scan.json"
SPLIT = "split.json"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
LAST_WEIGHTS = "last.weights.h5"
OPTIMIZER_STATE = "optimizer.npz"
FINAL_WEIGHTS = "final.weights.h5"
METRICS = "metrics.json"
TENSORBOARD = "tensorboard"


def run_name(recipe: Recipe) -> str:
    """The run folder's prefix: the recipe name, plus ``-fold<k>of<n>`` for one fold of a k-fold split."""
    split = recipe.split
    return f"{recipe.name}-fold{split.fold}of{split.folds}" if split.folds else recipe.name


def new_run_dir(recipe_name: str, root: str | os.PathLike = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{recipe_name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    (path / CHECKPOINTS).mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def save_config(run_dir: Path, recipe: Recipe) -> None:
    (run_dir / CONFIG).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")


def load_config(run_dir: Path) -> Recipe:
    """The run's resolved recipe; pretrained weights are not needed to rebuild it (they are in the run)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise NotFound(f"{str(run_dir)!r} is not a run folder (no {CONFIG})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["weights"] = None
    return parse_recipe(data, source=str(path))


@dataclass
class TrainedRun:
    path: Path
    recipe: Recipe
    info: dict[str, Any]
    model: Any

    @property
    def image_size(self) -> Size:
        return plain_size(self.info["image_size"])

    @property
    def class_ids(self) -> list[str]:
        return list(self.info["class_ids"])

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])


def load_run(run_dir: str | os.PathLike, weights_file: str = FINAL_WEIGHTS) -> TrainedRun:
    """Rebuild a run's classifier from its config and load its trained weights."""
    from carclf.train.model import build_classifier

    path = Path(run_dir)
    recipe = load_config(path)
    info_path = path / RUN_INFO
    weights = path / weights_file
    if not info_path.is_file() or not weights.is_file():
        raise FailedPrecondition(f"run {str(path)!r} has not finished training (no {RUN_INFO} or {weights_file}); "
                                 f"resume it with: carclf train --resume {path}")
    info = read_json(info_path)
    spec = backbones.get(recipe.backbone)
    model, _ = build_classifier(spec, len(info["class_ids"]), recipe.head, plain_size(info["image_size"]),
                                weights=None)
    model.load_weights(str(weights))
    return TrainedRun(path, recipe, info, model)
