"""How well frozen ImageNet features separate a data set's classes, with its photos read as stored and with red and
blue swapped: a cheap check of a data set's channel order (``data.channel_order``) before any training, and of a
head's pooling (``--pooling bilinear --layer block_16_project_BN``) before training it.

A backbone's pooled features are computed once per reading (and per mirrored view), then a softmax regression is
fit on the training part of each fold of the recipe's k-fold split and scored on the fold's validation photos.
Features pretrained on true-colour photos separate true-colour photos better, so the reading with the lower pooled
log loss is the data's true colour.

    .venv/bin/python scripts/linear_probe.py --data ../shared/data/cars10/train \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \
        --sizes 224x448,288x576,224x224,320x320
    .venv/bin/python scripts/linear_probe.py --data ../shared/data/cars10/train --weights ... \
        --sizes 224x448 --pooling bilinear --layer block_16_project_BN --solver lbfgs --l2 0.05
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from carclf import backbones, imaging
from carclf.train import data
from carclf.train.recipe import POOLINGS

READINGS = ("rgb", "bgr")  # how the files are read: as stored, or with red and blue swapped


def feature_model(spec, weights: str, size: tuple[int, int], pooling: str = "avg", layer: str | None = None):
    """Pixels [N, height, width, 3] in [0, 255] -> pooled features [N, D] of the backbone (up to ``layer``), as a
    head with that ``pooling`` would see them, preprocessing included."""
    import keras

    from carclf.train.model import truncate
    from carclf.train.pooling import pooling_layer

    inputs = keras.Input((*size, 3))
    backbone = truncate(spec.build(size, weights), layer, spec.name)
    pooled = pooling_layer(pooling)(backbone(backbones.preprocessing_layer(spec.preprocessing)(inputs)))
    return keras.Model(inputs, pooled)


def features(model, decoded: list, size: tuple[int, int], order: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features [N, D] of the photos prepared (once) at ``size`` and read in ``order``: as they are, and
    mirrored."""
    pixels = np.stack([imaging.prepare(imaging.to_rgb(image, order), size).numpy()
                       for image in decoded]).astype("float32")
    return (model.predict(pixels, batch_size=16, verbose=0),
            model.predict(pixels[:, :, ::-1], batch_size=16, verbose=0))


def _fit_adam(x_fit: np.ndarray, y_fit: np.ndarray, classes: int, l2: float, steps: int) -> tuple:
    """``steps`` full-batch Adam steps (lr 0.01) from zero: enough for pooled features of about a thousand
    dimensions."""
    import tensorflow as tf

    w = tf.Variable(tf.zeros([x_fit.shape[1], classes]))
    b = tf.Variable(tf.zeros([classes]))
    optimizer = tf.keras.optimizers.Adam(0.01)
    x, targets = tf.constant(x_fit), tf.one_hot(y_fit, classes)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            logits = tf.matmul(x, w) + b
            objective = (tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
                         + l2 * tf.reduce_sum(w * w))
        optimizer.apply_gradients(zip(tape.gradient(objective, [w, b]), [w, b], strict=True))
    return w.numpy(), b.numpy()


def _fit_lbfgs(x_fit: np.ndarray, y_fit: np.ndarray, classes: int, l2: float) -> tuple:
    """The same objective minimised to convergence by L-BFGS: needed for bilinear features (51,360 dimensions),
    where 300 Adam steps stop far from the minimum."""
    from scipy.optimize import minimize

    x = x_fit.astype(np.float64)
    targets = np.eye(classes)[y_fit]
    dims = x.shape[1]

    def objective(params):
        w, b = params[:-classes].reshape(dims, classes), params[-classes:]
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        error = (np.exp(log_probs) - targets) / len(x)
        value = -(targets * log_probs).sum() / len(x) + l2 * (w * w).sum()
        return value, np.concatenate([(x.T @ error + 2 * l2 * w).ravel(), error.sum(axis=0)])

    result = minimize(objective, np.zeros(dims * classes + classes), jac=True, method="L-BFGS-B",
                      options={"maxiter": 2000})
    return result.x[:-classes].reshape(dims, classes), result.x[-classes:]


def probe(feats: np.ndarray, labels: np.ndarray, folds: np.ndarray, l2: float, steps: int = 300,
          solver: str = "adam") -> dict:
    """Out-of-fold accuracy and log loss of an L2-regularised softmax regression on standardised features."""
    classes = int(labels.max()) + 1
    correct, loss = 0, 0.0
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        mean, std = feats[fit].mean(0), feats[fit].std(0) + 1e-6
        x_fit, x_held = (feats[fit] - mean) / std, (feats[held] - mean) / std
        if solver == "lbfgs":
            w, b = _fit_lbfgs(x_fit, labels[fit], classes, l2)
        else:
            w, b = _fit_adam(x_fit, labels[fit], classes, l2, steps)
        logits = x_held @ w + b
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        correct += int((probs.argmax(1) == labels[held]).sum())
        loss -= float(np.log(np.clip(probs[np.arange(held.sum()), labels[held]], 1e-7, 1.0)).sum())
    return {"correct": correct, "count": int(len(labels)), "accuracy": round(correct / len(labels), 4),
            "log_loss": round(loss / len(labels), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="train/<class id>/<photo> folder")
    parser.add_argument("--weights", required=True, help="ImageNet weights of the backbone (a local file)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sizes", default="224x448", help="comma-separated HEIGHTxWIDTH (or one side)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="split seed (42: the recipes' cross-validation folds)")
    parser.add_argument("--l2", type=float, default=3e-3)
    parser.add_argument("--pooling", default="avg", choices=POOLINGS, help="the head's pooling")
    parser.add_argument("--layer", help="the backbone layer to pool (a head's feature_layer); default: its output")
    parser.add_argument("--solver", default="adam", choices=("adam", "lbfgs"),
                        help="adam: 300 steps (the channel-order figures); lbfgs: to convergence (bilinear features)")
    parser.add_argument("--readings", default=",".join(READINGS), help="rgb (as stored), bgr (swapped), or both")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args()

    import tensorflow as tf

    spec = backbones.get(args.backbone)
    samples = data.read_folder_layout(args.data).samples
    fold_of = {}
    for k in range(args.folds):
        for s in data.stratified_split(samples, 0.2, args.seed, folds=args.folds, fold=k).val:
            fold_of[s.path] = k
    folds = np.array([fold_of[s.path] for s in samples])
    labels = np.array([s.label for s in samples])
    decoded = [imaging.decode_image(tf.io.read_file(s.path)) for s in samples]
    results = []
    for text in args.sizes.split(","):
        size = imaging.side_pair(tuple(int(v) for v in text.lower().split("x")) if "x" in text else int(text))
        model = feature_model(spec, args.weights, size, args.pooling, args.layer)
        for order in args.readings.split(","):
            plain, mirrored = features(model, decoded, size, order)
            for view, feats in (("full", plain), ("full + mirrored, mean", (plain + mirrored) / 2)):
                row = {"size": imaging.size_text(size), "read_as": order, "view": view,
                       **probe(feats, labels, folds, args.l2, solver=args.solver)}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"data": args.data, "backbone": args.backbone, "pooling": args.pooling, "layer": args.layer,
                       "folds": args.folds, "seed": args.seed, "l2": args.l2, "solver": args.solver,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
