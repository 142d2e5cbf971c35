"""What a correct prediction looks like, checked on every answer a load test receives.

A 200 with a wrong answer is a failure: probabilities must form a distribution, and the label must be a
known label that agrees with the most probable class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from carclf import contract, sources
from carclf.errors import ConfigError, Internal

PROBABILITY_TOLERANCE = 1e-3


class BadPrediction(Internal):
    """The server answered, but the answer is not a valid prediction."""


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def check_prediction(outputs: Mapping[str, np.ndarray], labels: Sequence[str] | None = None,
                     *, batch: int = 1, tolerance: float = PROBABILITY_TOLERANCE) -> None:
    """Raise ``BadPrediction`` unless ``outputs`` hold ``batch`` valid predictions.

    Checks: ``probabilities`` is [batch, C] with values in [0, 1] summing to 1 within ``tolerance``;
    ``label`` (required) is one of ``labels`` (when known) and names the arg-max class; ``class_id``
    (when present) is that arg-max.
    """
    if contract.OUTPUT_PROBABILITIES not in outputs or contract.OUTPUT_LABEL not in outputs:
        raise BadPrediction(f"answer lacks '{contract.OUTPUT_PROBABILITIES}' or '{contract.OUTPUT_LABEL}'; "
                            f"received outputs {sorted(outputs)}")
    probs = np.asarray(outputs[contract.OUTPUT_PROBABILITIES], dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != batch:
        raise BadPrediction(f"probabilities must be [{batch}, classes], received shape {list(probs.shape)}")
    if labels is not None and probs.shape[1] != len(labels):
        raise BadPrediction(f"{probs.shape[1]} probabilities for {len(labels)} labels")
    if not np.all(np.isfinite(probs)) or probs.min() < -tolerance or probs.max() > 1 + tolerance:
        raise BadPrediction(f"probabilities outside [0, 1]: min {probs.min():.4g}, max {probs.max():.4g}")
    sums = probs.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > tolerance):
        raise BadPrediction(f"probabilities sum to {sums.tolist()}, expected 1 within {tolerance}")
    best = probs.argmax(axis=1)
    predicted = [_text(v) for v in np.asarray(outputs[contract.OUTPUT_LABEL]).reshape(-1)]
    if len(predicted) != batch:
        raise BadPrediction(f"{len(predicted)} labels for a batch of {batch}")
    if contract.OUTPUT_CLASS_ID in outputs:
        class_ids = np.asarray(outputs[contract.OUTPUT_CLASS_ID]).reshape(-1).astype(np.int64)
        ties = [i for i in range(batch) if probs[i, class_ids[i]] < probs[i, best[i]] - tolerance]
        if ties:
            raise BadPrediction(f"class_id {class_ids[ties[0]]} is not the most probable class {best[ties[0]]}")
    if labels is not None:
        for i, label in enumerate(predicted):
            if label not in labels:
                raise BadPrediction(f"label {label!r} is not one of the model's {len(labels)} labels")
            if probs[i, labels.index(label)] < probs[i, best[i]] - tolerance:
                raise BadPrediction(f"label {label!r} is not the most probable class {labels[best[i]]!r}")


def read_labels(path: str | os.PathLike) -> list[str]:
    """Labels from a ``labels.txt`` (one per line) or a ``classes.json`` ({"0": name, ...})."""
    path = Path(path)
    if why := sources.why_not(path, "file"):
        raise ConfigError(f"labels file {why}, received {str(path)!r}", field="labels_file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            mapping = json.loads(text)
            return [mapping[str(i)] for i in range(len(mapping))]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"expected a JSON object {{\"0\": name, ...}} in {str(path)!r} ({exc})",
                              field="labels_file") from None
    return [line for line in text.splitlines() if line.strip()]


def repository_labels(repository: str | os.PathLike, model: str) -> list[str] | None:
    """The labels of ``model``'s highest version in a local model repository, or None if not there."""
    base = Path(repository) / model
    versions = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()), reverse=True) if base.is_dir() else []
    for version in versions:
        path = base / str(version) / "assets" / contract.LABELS_ASSET
        if path.is_file():
            return read_labels(path)
    return None
