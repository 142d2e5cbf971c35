"""The run folder: what every training run writes under ``runs/<recipe>-<timestamp>/`` and reads back.

Layout::

    config.yaml        resolved recipe (after command-line overrides)
    run.json           backbone, weights actually used, classes, image size, timings, split fingerprint
    labels.txt         class names in model output order; classes.json: class id -> name
    augmentation.json  the exact albumentations pipeline (A.save)
    scan.json, split.json
    history.csv, history.json, curves.png, tensorboard/
    checkpoints/       best-<stage>.weights.h5, last.weights.h5, optimizer.npz, state.json (for --resume)
    final.weights.h5   the trained classifier
    metrics.json, confusion_<policy>.png
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carclf import backbones, durable
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
    """Write ``data`` as JSON atomically (a temporary file beside it, then rename); nothing is left on failure."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        durable.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def best_weights(run_dir: Path, stage_name: str) -> Path:
    """The stage's best checkpoint (on the monitored metric)."""
    return Path(run_dir) / CHECKPOINTS / f"best-{stage_name}.weights.h5"


def partial_path(path: Path) -> Path:
    """Where a weights file is written before it is renamed into ``path`` (Keras wants the ``.weights.h5``
    suffix): ``last.weights.h5`` -> ``last.partial.weights.h5``."""
    stem = path.name.removesuffix(".weights.h5")
    return path.with_name(f"{stem}.partial.weights.h5")


def save_weights(model, path: Path) -> None:
    """``model.save_weights`` written aside and renamed into place, so an interrupt (Ctrl-C, a killed job)
    in the middle of the write leaves the previous file whole; synced before the rename, so a power cut does
    too (``carclf.durable``)."""
    partial = partial_path(path)
    model.save_weights(str(partial))
    durable.replace(partial, path)


def load_weights(model, path: Path) -> None:
    """``model.load_weights``; a file that cannot be read becomes a FailedPrecondition naming it."""
    try:
        model.load_weights(str(path))
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read the weights in {str(path)!r}: {str(exc).splitlines()[0][:200]}") \
            from None


def trim_history(run_dir: Path, last_epoch: int) -> list[dict[str, Any]]:
    """Drop what the logs recorded after epoch ``last_epoch`` (1-based, the last one the checkpoint holds):
    an interrupt between Keras's CSV logger and the checkpoint leaves the logs one epoch ahead, and the
    resumed run trains that epoch again. Returns the history kept."""
    history_json = run_dir / HISTORY_JSON
    history = [h for h in read_json(history_json) if int(h["epoch"]) <= last_epoch] if history_json.is_file() else []
    write_json(history_json, history)
    history_csv = run_dir / HISTORY_CSV
    if history_csv.is_file():
        with history_csv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows:  # the CSV logger's "epoch" column is 0-based
            column = rows[0].index("epoch") if "epoch" in rows[0] else 0
            kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[column])) < last_epoch]
            tmp = history_csv.with_suffix(".csv.tmp")
            with tmp.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(kept)
            durable.replace(tmp, history_csv)
    return history


def absolute_data_paths(recipe: Recipe) -> Recipe:
    """``recipe`` with its relative data paths (the training folder or CSV and image folder, the class-names
    file, each ``extra_train`` CSV and folder) made absolute against the working directory, which is what they
    are read against: saved so, a run's config names the same files wherever it is resumed or exported from."""

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else path

    data = recipe.data
    extra = tuple(dataclasses.replace(e, csv=absolute(e.csv), images=absolute(e.images)) for e in data.extra_train)
    return dataclasses.replace(recipe, data=dataclasses.replace(
        data, train=absolute(data.train), csv=absolute(data.csv), images=absolute(data.images),
        classes=absolute(data.classes), extra_train=extra))


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


def resume_point(run_dir: str | os.PathLike) -> tuple[Recipe, dict[str, Any]]:
    """The saved recipe and checkpoint state (``state.json``) a run resumes from, read without TensorFlow so that
    a missing folder, a run that stopped before its first epoch ended, or a finished run is refused at once."""
    path = Path(run_dir)
    if not path.is_dir():
        raise NotFound(f"no run folder at {str(path)!r}")
    recipe = load_config(path)
    state_file, last = path / CHECKPOINTS / STATE, path / CHECKPOINTS / LAST_WEIGHTS
    if not state_file.is_file() or not last.is_file():
        missing = state_file if not state_file.is_file() else last
        raise FailedPrecondition(f"run {str(path)!r} has no checkpoint to resume from ({missing} is missing: it "
                                 "stopped before its first epoch ended); start a new run")
    state = read_json(state_file)
    info_file = path / RUN_INFO
    if int(state["stage_index"]) >= len(recipe.stages) and info_file.is_file() and read_json(info_file).get(
            "finished"):
        raise FailedPrecondition(f"run {str(path)!r} finished training already (its results: "
                                 f"{path / METRICS}); evaluate it with 'carclf evaluate {path}' or start a "
                                 "new run")
    return recipe, state


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


def finished_training(run_dir: str | os.PathLike) -> bool:
    """Whether a run finished training: its final weights written and its run.json saying so (an interrupted
    run has neither; one cut short by a time budget says ``finished: false``)."""
    path = Path(run_dir)
    if not (path / RUN_INFO).is_file() or not (path / FINAL_WEIGHTS).is_file():
        return False
    try:
        return read_json(path / RUN_INFO).get("finished") is True
    except (OSError, ValueError, AttributeError):
        return False


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
    load_weights(model, weights)
    return TrainedRun(path, recipe, info, model)
