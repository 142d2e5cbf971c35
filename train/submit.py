"""Kaggle submissions: a folder of photos -> CSV ``Id,Category`` (file name, predicted class id); and
pseudo-labels: the same predictions, only the confident ones, with their confidence, as extra training data.

Photos are predicted a chunk at a time (every model on one chunk, then the next), so that only a chunk's
photos are held in memory and a submission keeps each chunk's rows in ``<out>.partial.csv`` as they come
(``carclf.partial``): a run stopped by any means loses at most one chunk, and ``resume`` predicts the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclf import contract, imaging
from carclf.errors import InvalidInput
from carclf.partial import PartialSubmission, RunLine, check_start, one_line
from carclf.submission import HEADER
from carclf.submission import write_submission as write_csv
from carclf.train import data, runs
from carclf.train.evaluate import LoadedModel, predict_policies

log = logging.getLogger(__name__)
ON_BAD = ("fail", "skip")
CHUNK = 64  # photos predicted (by every model) before their rows are kept: a multiple of predict_policies' 8
VERB = "predict"  # what a resumed run does to the photos its partial file lacks


def check_before_loading(photos_dir: str | os.PathLike, out_csv: str | os.PathLike, resume: bool) -> None:
    """What ``write_submission`` refuses that needs no model (a photo folder missing or without photos, a
    stopped run's partial file without ``resume``), for a command to ask before it loads its models."""
    data.list_photos(photos_dir, warn=False)  # said when the photos are read for the run
    check_start(Path(out_csv), resume, VERB)


def write_submission(model: LoadedModel | Sequence[LoadedModel], photos_dir: str | os.PathLike,
                     out_csv: str | os.PathLike, policy: str = "hflip", on_bad: str = "fail",
                     progress: bool = True, channel_order: str = "rgb", resume: bool = False,
                     chunk: int = CHUNK) -> dict[str, int]:
    """Predict every photo of ``photos_dir`` with TTA ``policy`` and write the CSV (atomically).

    With several models (e.g. the fold runs of a cross-validation) each predicts with its own input size and
    resize, and their class probabilities are averaged; they must predict the same classes. A photo that is
    not a usable image (not an image, too large or small, or one that does not decode to the end) stops the
    run before any prediction (``on_bad="fail"``, naming the file) or is left out of the CSV with a warning
    (``on_bad="skip"``). ``channel_order`` is how the photo files store colours (``imaging.CHANNEL_ORDERS``;
    ``bgr`` photos are read back as RGB).

    Each ``chunk`` of photos' rows is kept in ``<out_csv>.partial.csv`` as it is predicted; a run that stops
    leaves that file, which ``resume`` continues (predicting only the photos it lacks) and which is refused
    without it. Its first line records the models (their weights' digests), the policy and the channel order:
    a resume with others is refused. Returns the row, skipped and resumed counts.
    """
    models = checked_models(model, on_bad, channel_order)
    if chunk < 1:
        raise InvalidInput(f"chunk must be >= 1, received {chunk}")
    photos = data.list_photos(photos_dir)
    kept = PartialSubmission(Path(out_csv), photos, describe_submission(models, policy, channel_order), resume)
    if kept.resuming:
        log.info(kept.resuming)
    usable, skipped = usable_photos(kept.rest, on_bad)
    if not usable and not kept.answered:
        raise InvalidInput(f"no usable photos in {str(photos_dir)!r}")
    class_ids = models[0].class_ids
    with kept.keeping(log.warning), progress_bar(progress, len(models) * (kept.resumed + len(usable)),
                                                 len(models) * kept.resumed, "submit") as bar:
        for part, probs in predict_chunks(models, usable, policy, channel_order, bar, chunk):
            kept.add([(path.name, class_ids[int(i)]) for path, i in zip(part, probs.argmax(axis=1), strict=True)])
    return {"rows": kept.finish(), "skipped": skipped, "resumed": kept.resumed}


def describe_submission(models: Sequence[LoadedModel], policy: str, channel_order: str) -> RunLine:
    """What decides a submission's rows, as its partial file's first line records it: each model (its name and
    the digest of what it predicts with; in name order, as their mean does not depend on it), the TTA policy
    and the photos' channel order."""
    named = sorted(f"{model_name(m)}@sha256:{model_digest(m)}" for m in models)
    return RunLine("carclf submit", one_line(" ".join([*named, f"--tta {policy}", f"--channel-order {channel_order}"])),
                   named="models, --tta and --channel-order", output_flag="--out", verb=VERB)


def model_name(model: LoadedModel) -> str:
    """``<run folder>``, or ``<model>/<version>`` for a SavedModel version folder."""
    path = model.path.resolve()
    return f"{path.parent.name}/{path.name}" if contract.version_number(path.name) is not None else path.name


def model_digest(model: LoadedModel) -> str:
    """The first 12 hex digits of a digest of what decides a model's predictions: its weights (a run's weights
    file; a SavedModel's graph and variable index, which holds a checksum of every variable), input size,
    resize and class ids."""
    files = ([runs.CONFIG, runs.FINAL_WEIGHTS] if model.kind == "run"
             else ["saved_model.pb", "variables/variables.index"])
    digest = hashlib.sha256(json.dumps([model.input_size, model.resize, list(model.class_ids)]).encode())
    for name in files:
        path = model.path / name
        if path.is_file():
            with path.open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:12]


def write_pseudo_labels(model: LoadedModel | Sequence[LoadedModel], photos_dir: str | os.PathLike,
                        out_csv: str | os.PathLike, min_confidence: float, policy: str = "hflip",
                        on_bad: str = "skip", progress: bool = True, channel_order: str = "rgb") -> dict[str, Any]:
    """Label the photos of an unlabelled folder with the models' prediction, keeping those predicted with
    at least ``min_confidence`` (the mean top probability): a CSV ``Id,Category,Confidence`` that a recipe's
    ``data.extra_train`` reads. Returns the counts, per class too."""
    if not 0.0 <= min_confidence <= 1.0:
        raise InvalidInput(f"min_confidence must be in [0, 1], received {min_confidence}")
    found = predict_folder(model, photos_dir, policy, on_bad, progress, desc="pseudo-label",
                           channel_order=channel_order)
    confidence = found.probs.max(axis=1)
    rows = [(p.name, found.class_ids[int(i)], f"{c:.4f}")
            for p, i, c in zip(found.photos, found.probs.argmax(axis=1), confidence, strict=True)
            if c >= min_confidence]
    write_csv(out_csv, rows, header=(*HEADER, "Confidence"))
    per_class = {cid: sum(1 for _, c, _ in rows if c == cid) for cid in found.class_ids}
    return {"rows": len(rows), "photos": len(found.photos), "skipped": found.skipped, "per_class": per_class}


@dataclass
class FolderPredictions:
    photos: list[Path]   # the usable photos, in name order
    probs: np.ndarray    # [photos, classes], the models' mean
    class_ids: list[str]
    skipped: int


def predict_folder(model: LoadedModel | Sequence[LoadedModel], photos_dir: str | os.PathLike, policy: str,
                   on_bad: str = "fail", progress: bool = True, desc: str = "predict",
                   channel_order: str = "rgb") -> FolderPredictions:
    """Mean class probabilities of one or more models (same classes) for every usable photo of a folder whose
    files store colours in ``channel_order``."""
    models = checked_models(model, on_bad, channel_order)
    usable, skipped = usable_photos(data.list_photos(photos_dir), on_bad)
    if not usable:
        raise InvalidInput(f"no usable photos in {str(photos_dir)!r}")
    with progress_bar(progress, len(models) * len(usable), 0, desc) as bar:
        probs = np.concatenate([probs for _, probs in predict_chunks(models, usable, policy, channel_order, bar)])
    return FolderPredictions(usable, probs, list(models[0].class_ids), skipped)


def checked_models(model: LoadedModel | Sequence[LoadedModel], on_bad: str, channel_order: str) -> list[LoadedModel]:
    """The models to average (at least one, all predicting the same classes), once the options are checked."""
    if on_bad not in ON_BAD:
        raise InvalidInput(f"on_bad must be one of {ON_BAD}, received {on_bad!r}")
    if channel_order not in imaging.CHANNEL_ORDERS:
        raise InvalidInput(f"channel_order must be one of {list(imaging.CHANNEL_ORDERS)}, received {channel_order!r}")
    models = [model] if isinstance(model, LoadedModel) else list(model)
    if not models:
        raise InvalidInput("no model to predict with")
    for other in models[1:]:
        if other.class_ids != models[0].class_ids:
            raise InvalidInput(f"{other.path} predicts classes {other.class_ids}, {models[0].path} predicts "
                               f"{models[0].class_ids}: models averaged into one result must share classes")
    return models


def usable_photos(photos: Sequence[Path], on_bad: str) -> tuple[list[Path], int]:
    """The photos that are usable images, checked before any prediction (each decoded once, then let go), and
    how many were skipped; with ``on_bad="fail"`` the first unusable one stops the run, naming it."""
    usable: list[Path] = []
    skipped = 0
    for path in photos:
        try:
            data.check_image_bytes(path.read_bytes(), min_side=contract.MIN_IMAGE_SIDE)
        except InvalidInput as exc:
            if on_bad == "fail":
                raise InvalidInput(f"{path.name}: {exc.message}") from None
            log.warning("skipping %s: %s", path.name, exc.message)
            skipped += 1
            continue
        usable.append(path)
    return usable, skipped


def predict_chunks(models: Sequence[LoadedModel], photos: Sequence[Path], policy: str, channel_order: str,
                   bar: Any = None, chunk: int = CHUNK) -> Iterator[tuple[Sequence[Path], np.ndarray]]:
    """``chunk`` photos at a time, read from disk: the photos and the models' mean probabilities [photos, classes]."""
    for start in range(0, len(photos), chunk):
        part = photos[start:start + chunk]
        payloads = [path.read_bytes() for path in part]
        yield part, np.mean([predict_policies(m.predictor, payloads, [policy], m.input_size, progress=bar,
                                              names=[p.name for p in part], resize=m.resize,
                                              channel_order=channel_order)[policy]
                             for m in models], axis=0)


def progress_bar(shown: bool, total: int, initial: int, desc: str) -> contextlib.AbstractContextManager[Any]:
    """A tqdm bar counting predicted images (photos x models), or nothing."""
    if not shown:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img")
