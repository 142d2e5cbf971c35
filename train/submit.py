"""Kaggle submissions: a folder of photos -> CSV ``Id,Category`` (file name, predicted class id)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from carclf import imaging
from carclf.errors import InvalidInput
from carclf.submission import write_submission as write_csv
from carclf.train import data
from carclf.train.evaluate import LoadedModel, predict_policies

log = logging.getLogger(__name__)
ON_BAD = ("fail", "skip")


def write_submission(model: LoadedModel | Sequence[LoadedModel], photos_dir: str | os.PathLike,
                     out_csv: str | os.PathLike, policy: str = "hflip", on_bad: str = "fail",
                     progress: bool = True) -> dict[str, int]:
    """Predict every photo of ``photos_dir`` with TTA ``policy`` and write the CSV (atomically).

    With several models (e.g. the fold runs of a cross-validation) each predicts with its own input size and
    resize, and their class probabilities are averaged; they must predict the same classes. A photo that is
    not a usable image stops the run (``on_bad="fail"``, naming the file) or is left out of the CSV with a
    warning (``on_bad="skip"``).
    """
    if on_bad not in ON_BAD:
        raise InvalidInput(f"on_bad must be one of {ON_BAD}, received {on_bad!r}")
    models = [model] if isinstance(model, LoadedModel) else list(model)
    if not models:
        raise InvalidInput("no model to predict with")
    for other in models[1:]:
        if other.class_ids != models[0].class_ids:
            raise InvalidInput(f"{other.path} predicts classes {other.class_ids}, {models[0].path} predicts "
                               f"{models[0].class_ids}: models averaged into one submission must share classes")
    photos = data.list_photos(photos_dir)
    usable: list[Path] = []
    payloads: list[bytes] = []
    skipped = 0
    for path in photos:
        payload = path.read_bytes()
        try:
            imaging.probe_image(payload)
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

        bar = tqdm(total=len(usable) * len(models), desc="submit", unit="img")
    try:
        probs = np.mean([predict_policies(m.predictor, payloads, [policy], m.input_size, progress=bar,
                                          names=[p.name for p in usable], resize=m.resize)[policy]
                         for m in models], axis=0)
    finally:
        if bar is not None:
            bar.close()
    class_ids = models[0].class_ids
    rows = [(p.name, class_ids[int(i)]) for p, i in zip(usable, probs.argmax(axis=1), strict=True)]
    write_csv(out_csv, rows)
    return {"rows": len(rows), "skipped": skipped}
