"""Evaluation with and without TTA, for a Keras model or an exported SavedModel.

Every prediction goes through one path: decode (``imaging.decode_image``) -> views (``tta.make_views``),
both run as graphs (``imaging.traced_decode``, ``tta.traced_views``) -> a *pixel predictor* (uint8
[N, S, S, 3] -> probabilities [N, C]) -> the mean over each policy's views. A SavedModel is predicted through
its ``serving_pixels`` signature, so the ensemble and the server can reuse this exact code. Each distinct view
is predicted once and shared by the policies that use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carclf import contract, imaging, tta
from carclf.errors import InvalidInput, NotFound

PixelPredictor = Callable[[np.ndarray], np.ndarray]


def keras_predictor(model, batch_size: int = 32) -> PixelPredictor:
    """Float pixels into the Keras model (exactly what the exported graph does)."""
    import tensorflow as tf

    def predict(pixels: np.ndarray) -> np.ndarray:
        outs = [np.asarray(model(tf.cast(pixels[i:i + batch_size], tf.float32), training=False))
                for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outs).astype(np.float32)

    return predict


@dataclass
class SavedModelInfo:
    predictor: PixelPredictor
    input_size: contract.Size
    labels: list[str]
    card: dict[str, Any]
    resize: str = "squash"
    folder: Path | None = None  # the version folder loaded


def load_savedmodel(path: str | os.PathLike, batch_size: int = 32) -> SavedModelInfo:
    """A SavedModel version folder (or a model folder: its highest version) as a pixel predictor."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "saved_model.pb").exists():
        versions = sorted((n for p in folder.iterdir() if (n := contract.version_number(p.name)) is not None),
                          reverse=True)
        if versions:
            folder = folder / str(versions[0])
    if not (folder / "saved_model.pb").exists():
        raise NotFound(f"no SavedModel at {str(path)!r} (expected saved_model.pb or integer version folders)")
    card_path = folder / "assets.extra" / contract.MODEL_CARD
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.exists() else None
    size = contract.required_input_size(card, card_path)
    labels = (folder / "assets" / contract.LABELS_ASSET).read_text(encoding="utf-8").splitlines()
    import tensorflow as tf  # after the checks above: a wrong path is named without TensorFlow's start-up

    loaded = tf.saved_model.load(str(folder))
    signature = loaded.signatures[contract.SIGNATURE_PIXELS]

    def predict(pixels: np.ndarray) -> np.ndarray:
        outs = [signature(**{contract.INPUT_PIXELS: tf.constant(pixels[i:i + batch_size], tf.uint8)})
                [contract.OUTPUT_PROBABILITIES].numpy() for i in range(0, len(pixels), batch_size)]
        return np.concatenate(outs).astype(np.float32)

    predict.loaded = loaded  # keep the SavedModel alive with the function
    return SavedModelInfo(predict, size, [line for line in labels if line], card,
                          imaging.check_resize(contract.card_resize(card)), folder)


def predict_policies(predictor: PixelPredictor, images: Iterable[bytes], policies: Sequence[str | tta.TTAPolicy],
                     size: contract.Size, chunk: int = 8, progress: Any = None,
                     names: Sequence[str] | None = None, resize: str = "squash",
                     channel_order: str = "rgb") -> dict[str, np.ndarray]:
    """Probabilities [N, C] per TTA policy name, for photos given as encoded bytes (``names`` label errors);
    ``resize`` is the model's resize mode (``imaging.RESIZE_MODES``), ``channel_order`` the photos' own
    (``imaging.CHANNEL_ORDERS``)."""
    resolved = [tta.get_policy(p) for p in policies]
    views: list[tta.View] = []
    for policy in resolved:
        views.extend(v for v in policy.views if v not in views)
    union = tta.TTAPolicy("union", tuple(views))
    columns = {p.name: [views.index(v) for v in p.views] for p in resolved}

    views_of = tta.traced_views(union, size, resize, channel_order)
    per_view: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            probs = predictor(np.concatenate(pending))
            per_view.append(probs.reshape(len(pending), len(views), -1))
            pending.clear()

    for i, data in enumerate(images):
        image = imaging.decode_checked(data, names[i] if names is not None else f"photo #{i}")
        pending.append(views_of(image).numpy())
        if progress is not None:
            progress.update(1)
        if len(pending) >= chunk:
            flush()
    flush()
    if not per_view:
        raise InvalidInput("no photos to predict")
    all_views = np.concatenate(per_view)  # [N, V, C]
    return {name: all_views[:, idx, :].mean(axis=1) for name, idx in columns.items()}


@dataclass
class LoadedModel:
    """A trained classifier from a run folder or a SavedModel, as a pixel predictor plus its classes."""

    kind: str  # "run" | "savedmodel"
    path: Path
    predictor: PixelPredictor
    input_size: contract.Size
    class_ids: list[str]
    class_names: list[str]
    info: dict[str, Any]
    resize: str = "squash"


def load_model(path: str | os.PathLike) -> LoadedModel:
    from carclf.train import runs

    source = Path(path)
    if not source.exists():
        raise NotFound(f"no run folder or SavedModel at {str(source)!r}")
    if (source / runs.CONFIG).is_file():
        trained = runs.load_run(source)
        info = {**trained.info, "split_file": str(source / runs.SPLIT),
                "data_channel_order": trained.recipe.data.channel_order, "data_csv": trained.recipe.data.csv,
                "data_classes": trained.recipe.data.classes}
        return LoadedModel("run", source, keras_predictor(trained.model), trained.image_size, trained.class_ids,
                           trained.class_names, info, trained.recipe.resize)
    loaded = load_savedmodel(source)
    class_ids = [str(c) for c in loaded.card.get("class_ids", range(len(loaded.labels)))]
    return LoadedModel("savedmodel", loaded.folder or source, loaded.predictor, loaded.input_size, class_ids, loaded.labels,
                       loaded.card, loaded.resize)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def classification_report(matrix: np.ndarray, class_ids: Sequence[str], class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    rows = []
    for i, (cid, name) in enumerate(zip(class_ids, class_names, strict=True)):
        tp = int(matrix[i, i])
        support = int(matrix[i].sum())
        predicted = int(matrix[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class_id": cid, "name": name, "precision": round(precision, 4), "recall": round(recall, 4),
                     "f1": round(f1, 4), "support": support})
    return rows


def metrics_for(probs: np.ndarray, labels: np.ndarray, class_ids: Sequence[str],
                class_names: Sequence[str]) -> dict[str, Any]:
    pred = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, pred, len(class_ids))
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "correct": int((pred == labels).sum()),
        "count": int(len(labels)),
        "log_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)))),
        "per_class": classification_report(matrix, class_ids, class_names),
        "confusion_matrix": matrix.tolist(),
        "predicted": pred.tolist(),  # per photo, in the order evaluated (a run's split.json "val" order)
    }


def evaluate_photos(predictor: PixelPredictor, paths: Sequence[str | os.PathLike], labels: Sequence[int],
                    size: contract.Size, policies: Sequence[str], class_ids: Sequence[str], class_names: Sequence[str],
                    show_progress: bool = False, resize: str = "squash",
                    channel_order: str = "rgb") -> dict[str, dict[str, Any]]:
    """Metrics per TTA policy for labelled photo files that store colours in ``channel_order``."""
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(paths), desc="evaluate", unit="img")
    try:
        probs = predict_policies(predictor, (Path(p).read_bytes() for p in paths), policies, size,
                                 progress=progress, names=[str(p) for p in paths], resize=resize,
                                 channel_order=channel_order)
    finally:
        if progress is not None:
            progress.close()
    y = np.asarray(labels, dtype=np.int64)
    return {name: metrics_for(p, y, class_ids, class_names) for name, p in probs.items()}


def summary_line(results: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{name}: {r['accuracy']:.4f} ({r['correct']}/{r['count']})" for name, r in results.items())


def write_results(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike, class_ids: Sequence[str],
                  prefix: str = "eval", extra: dict[str, Any] | None = None) -> Path:
    """``<prefix>.json`` plus one confusion-matrix PNG per policy."""
    from carclf.train.plots import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        plot_confusion(np.asarray(r["confusion_matrix"]), class_ids,
                       f"{name}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['count']})",
                       out / f"{prefix}_confusion_{name}.png")
    path = out / f"{prefix}.json"
    path.write_text(json.dumps({**(extra or {}), "policies": results}, indent=1), encoding="utf-8")
    return path
