"""Benchmark: tf.data input pipeline throughput vs training-step throughput for a recipe's stage.

The pipeline must deliver images at least twice as fast as the model trains on them, or training waits
on input. Both are measured in images per second on this machine:

* pipeline: the stage's training stream (cached decode+resize, shuffle, albumentations through
  tf.numpy_function, batch, prefetch) iterated on its own, after one warm-up pass that fills the cache;
* step: ``model.train_on_batch`` on one fixed batch at the stage's size with the stage's trainable flags.

Usage: python scripts/bench_pipeline.py [--recipe mobilenet_v2] [--stage -1] [--data DIR] [--batches 20]
Prints one JSON line (also written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="mobilenet_v2")
    parser.add_argument("--stage", type=int, default=-1, help="stage index (default: the last, the costliest)")
    parser.add_argument("--data", help="override the recipe's training folder")
    parser.add_argument("--weights", default="none", help="weights for the step benchmark (default: none)")
    parser.add_argument("--batches", type=int, default=20, help="pipeline batches to time")
    parser.add_argument("--steps", type=int, default=5, help="training steps to time")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args()

    import numpy as np

    from carclf import backbones
    from carclf.train import data, pipeline
    from carclf.train.augment import Augmenter
    from carclf.train.loop import make_optimizer
    from carclf.train.model import build_classifier, set_trainable
    from carclf.train.recipe import load_recipe

    recipe = load_recipe(args.recipe).with_overrides(train=args.data, weights=args.weights)
    stage = recipe.stages[args.stage]
    dataset = data.read_dataset(recipe.data)
    split = data.stratified_split(dataset.samples, recipe.split.val_fraction, recipe.split.seed)
    size, batch = stage.image_size, stage.batch_size

    prepared = pipeline.prepared_images(split.train, size, recipe.resize, channel_order=recipe.data.channel_order)
    t0 = time.perf_counter()
    for _ in prepared:  # fills the cache: decode + resize of every photo once
        pass
    first_pass = time.perf_counter() - t0
    augmenter = Augmenter(recipe.augmentation, size, seed=recipe.seed)
    stream = iter(pipeline.training_stream(prepared, len(split.train), batch, augmenter, seed=recipe.seed))
    next(stream)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(stream)
    pipeline_ips = args.batches * batch / (time.perf_counter() - t0)

    spec = backbones.get(recipe.backbone)
    model, _ = build_classifier(spec, dataset.num_classes, recipe.head, size, recipe.weights)
    set_trainable(model, spec, stage.unfreeze)
    model.compile(optimizer=make_optimizer(recipe.optimizer, stage.lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, dataset.num_classes, batch)
    model.train_on_batch(x, y)  # trace and warm up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    step_ips = args.steps * batch / (time.perf_counter() - t0)

    result = {
        "recipe": recipe.name, "stage": stage.name, "image_size": size, "batch_size": batch,
        "unfreeze": str(stage.unfreeze), "train_photos": len(split.train),
        "first_pass_decode_resize_s": round(first_pass, 1),
        "pipeline_images_per_s": round(pipeline_ips, 1), "train_step_images_per_s": round(step_ips, 1),
        "ratio": round(pipeline_ips / step_ips, 2), "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
