"""Benchmark: how long a training stage waits before its first batch is done, with and without
``carclf.train.loop.build_training_state`` (the optimizer's slots and the metrics' variables made before
``fit``, so TensorFlow traces the training step once, not twice).

Each measurement runs in a fresh process (no trace cached from an earlier one): the backbone is built at
the given size with random weights, its stage's layers unfrozen, compiled as the training loop compiles it,
and ``fit`` runs one step on a random batch. The two ways alternate in order from round to round. Prints
one JSON line per measurement and a summary line (also written to --out when given).

Usage: python scripts/first_step.py [--backbone efficientnet_b0] [--size 224] [--unfreeze all] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WAYS = ("lazy", "built")  # lazy: Keras creates the variables inside the first traced step (before)


def measure(backbone: str, size: int, unfreeze: str, batch: int, way: str) -> dict:
    import numpy as np
    import tensorflow as tf

    from carclf import backbones
    from carclf.train import loop
    from carclf.train.model import build_classifier, set_trainable
    from carclf.train.recipe import HeadConfig, LossConfig, OptimizerConfig, parse_unfreeze

    spec = backbones.get(backbone)
    classes = 10
    model, _ = build_classifier(spec, classes, HeadConfig(), size, None, freeze_batchnorm=False)
    set_trainable(model, spec, parse_unfreeze(unfreeze, "first_step", "--unfreeze"), freeze_batchnorm=False)
    model.compile(optimizer=loop.make_optimizer(OptimizerConfig(), 1e-4),
                  loss=loop.make_loss(LossConfig(), classes), metrics=["accuracy"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    stream = tf.data.Dataset.from_tensors((images, labels)).repeat()
    started = time.perf_counter()
    if way == "built":
        loop.build_training_state(model, classes, soft_targets=False)
    model.fit(stream, steps_per_epoch=1, epochs=1, verbose=0)
    first = time.perf_counter() - started
    return {"backbone": backbone, "size": size, "unfreeze": unfreeze, "batch": batch, "way": way,
            "first_step_s": round(first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--unfreeze", default="all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON lines here")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.backbone, args.size, args.unfreeze, args.batch, args.child)))
        return

    lines, results = [], {way: [] for way in WAYS}
    for round_index in range(args.rounds):
        for way in WAYS if round_index % 2 == 0 else WAYS[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", way, "--backbone", args.backbone,
                                  "--size", str(args.size), "--unfreeze", args.unfreeze,
                                  "--batch", str(args.batch)], check=True, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            lines.append(line)
            results[way].append(json.loads(line)["first_step_s"])
    lazy, built = sorted(results["lazy"]), sorted(results["built"])
    summary = {"backbone": args.backbone, "size": args.size, "unfreeze": args.unfreeze,
               "lazy_first_step_s": lazy, "built_first_step_s": built,  # each sorted; saved: fastest - fastest...
               "saved_s": [round(a - b, 2) for a, b in zip(lazy, built, strict=True)]}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join([*lines, json.dumps(summary)]) + "\n")


if __name__ == "__main__":
    main()
