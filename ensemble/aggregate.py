"""Combining the members' class probabilities: pure numpy functions, no I/O, no TensorFlow.

Every function takes member probabilities stacked as ``[members, batch, classes]`` and per-member weights,
and returns ``[batch, classes]`` rows that sum to 1. Members that did not answer are simply left out of
the stack by the caller (weights are renormalised over those present).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from carclf.errors import InvalidInput

# Probabilities are clipped here before logs are taken, so one member's hard zero cannot veto a class.
LOG_FLOOR = 1e-7


def _check(probabilities, weights) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 3:
        raise InvalidInput(f"member probabilities must be [members, batch, classes], received shape {probs.shape}")
    if probs.shape[0] == 0:
        raise InvalidInput("no member probabilities to aggregate")
    w = np.ones(probs.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (probs.shape[0],):
        raise InvalidInput(f"{w.shape[0] if w.ndim == 1 else w.shape} weights for {probs.shape[0]} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise InvalidInput(f"weights must be finite, >= 0 and not all 0, received {w.tolist()}")
    w = w / w.max()  # first: finite weights whose sum overflows still share the vote
    return probs, w / w.sum()


def mean(probabilities, weights: Sequence[float] | None = None) -> np.ndarray:
    """Arithmetic mean of the members' probabilities (weights ignored)."""
    probs, _ = _check(probabilities, None)
    return probs.mean(axis=0).astype(np.float32)


def weighted_mean(probabilities, weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted arithmetic mean: sum_m w_m p_m with weights normalised to sum to 1."""
    probs, w = _check(probabilities, weights)
    return np.tensordot(w, probs, axes=1).astype(np.float32)


def geometric_mean(probabilities, weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted geometric mean, renormalised: softmax of sum_m w_m log p_m (a product of experts)."""
    probs, w = _check(probabilities, weights)
    logs = np.tensordot(w, np.log(np.clip(probs, LOG_FLOOR, 1.0)), axes=1)
    logs -= logs.max(axis=-1, keepdims=True)
    out = np.exp(logs)
    return (out / out.sum(axis=-1, keepdims=True)).astype(np.float32)


AGGREGATORS: dict[str, Callable[..., np.ndarray]] = {
    "mean": mean,
    "weighted_mean": weighted_mean,
    "geometric_mean": geometric_mean,
}


def aggregate(method: str, probabilities, weights: Sequence[float] | None = None) -> np.ndarray:
    """Apply the aggregation named in the ensemble config."""
    try:
        fn = AGGREGATORS[method]
    except KeyError:
        raise InvalidInput(f"unknown aggregation {method!r}; expected one of {sorted(AGGREGATORS)}") from None
    return fn(probabilities, weights)


def top_k(probabilities, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and probabilities of the k most likely classes per row, best first (ties: lower id first)."""
    probs = np.asarray(probabilities)
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return order.astype(np.int64), np.take_along_axis(probs, order, axis=-1)


def fit_weights(
    probabilities,
    labels,
    *,
    method: str = "weighted_mean",
    step: float = 0.05,
) -> np.ndarray:
    """Member weights on the simplex that minimise the log loss of ``method`` on labelled rows.

    An exhaustive grid with ``step`` (deterministic, no optimiser state): fine for the handful of members an
    ensemble has. Ties keep the grid point closest to equal weights. Never score the result on the rows
    it was fit on.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    members = probs.shape[0]
    if members == 1:
        return np.ones(1)
    n = int(round(1.0 / step))
    best, best_loss, best_spread = None, np.inf, np.inf
    for combo in _compositions(n, members):
        if 0 in combo:
            continue  # every member keeps some say; dropping one is a different ensemble
        w = np.asarray(combo, dtype=np.float64) / n
        p = aggregate(method, probs, w)
        loss = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], LOG_FLOOR, 1.0)))
        spread = float(np.abs(w - 1.0 / members).sum())
        if loss < best_loss - 1e-12 or (abs(loss - best_loss) <= 1e-12 and spread < best_spread):
            best, best_loss, best_spread = w, loss, spread
    return best


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative integers summing to ``total``."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)
