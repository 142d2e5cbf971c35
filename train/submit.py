"""Kaggle submissions: a folder of photos -> CSV ``Id,Category`` (file name, predicted class id); and
pseudo-labels: the same predictions, only the confident ones, with their confidence, as extra training data."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclf import contract, imaging
from carclf.errors import InvalidInput
from carclf.submission import HEADER
from carclf.submission import write_submission as write_csv
from carclf.train import data
from carclf.train.evaluate import LoadedModel, predict_policies

log = logging.getLogger(__name__)
ON_BAD = ("fail", "skip")


def write_submission(model: LoadedModel | Sequence[LoadedModel], photos_dir: str | os.PathLike,
                     out_csv: str | os.PathLike, policy: str = "hflip", on_bad: str = "fail",
                     progress: bool = True, channel_order: str = "rgb") -> dict[str, int]:
    """Predict every photo of ``photos_dir`` with TTA ``policy`` and write the CSV (atomically).

    With several models (e.g. the fold runs of a cross-validation) each predicts with its own input size and
    resize, and their class probabilities are averaged; they must predict the same classes. A photo that is
    not a usable image (not an image, too large or small, or one that does not decode to the end) stops the
    run (``on_bad="fail"``, naming the file) or is left out of the CSV with a warning (``on_bad="skip"``). ``channel_order`` is how the photo files store colours
    (``imaging.CHANNEL_ORDERS``; ``bgr`` photos are read back as RGB).
    """
    found = predict_folder(model, photos_dir, policy, on_bad, progress, desc="submit", channel_order=channel_order)
    rows = [(p.name, found.class_ids[int(i)]) for p, i in zip(found.photos, found.probs.argmax(axis=1), strict=True)]
    write_csv(out_csv, rows)
    return {"rows": len(rows), "skipped": found.skipped}


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
    photos = data.list_photos(photos_dir)
    usable: list[Path] = []
    payloads: list[bytes] = []
    skipped = 0
    for path in photos:
        payload = path.read_bytes()
        try:
            data.check_image_bytes(payload, min_side=contract.MIN_IMAGE_SIDE)
        except InvalidInput as exc:
            if on_bad == "fail":
                raise InvalidInput(f"{path.name}: {exc.message}") from None
            log.warning("skipping %s: %s", path.name, exc.message)
            skipped += 1
            continue
        usable.append(path)
        payloads.append(payload)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(usable) * len(models), desc=desc, unit="img")
    try:
        probs = np.mean([predict_policies(m.predictor, payloads, [policy], m.input_size, progress=bar,
                                          names=[p.name for p in usable], resize=m.resize,
                                          channel_order=channel_order)[policy]
                         for m in models], axis=0)
    finally:
        if bar is not None:
            bar.close()
    return FolderPredictions(usable, probs, list(models[0].class_ids), skipped)
