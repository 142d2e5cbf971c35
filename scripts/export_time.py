"""Benchmark: how long ``carclf.train.export.export_model`` takes for one backbone, how large the version
folder is, and how long ``tf.saved_model.load`` of it takes, in this checkout.

The classifier is built with random weights (no download) at the given size and exported ``--repeats``
times into a temporary repository, each export with two warm-up records and a two-photo check against the
Keras model, as ``carclf export`` does. Compare two commits by running this at each, in turn.

Usage: python scripts/export_time.py [--backbone efficientnet_b0] [--size 224] [--repeats 2]
Prints one JSON line per export.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "data" / "sample" / "test_upload"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import tensorflow as tf

    from carclf import backbones
    from carclf.train.export import export_model
    from carclf.train.model import build_classifier
    from carclf.train.recipe import HeadConfig

    model, _ = build_classifier(backbones.get(args.backbone), 10, HeadConfig(), args.size, None)
    photos = [p.read_bytes() for p in sorted(SAMPLE_PHOTOS.glob("*.jpg"))[:2]]
    labels = [f"class_{i}" for i in range(10)]
    with tempfile.TemporaryDirectory() as repository:
        for _ in range(args.repeats):
            started = time.perf_counter()
            version = export_model(model, repository=repository, name="m", input_size=args.size, labels=labels,
                                   warmup_images=photos, verify_images=photos)
            exported = time.perf_counter() - started
            started = time.perf_counter()
            tf.saved_model.load(str(version))
            loaded = time.perf_counter() - started
            size = sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
            print(json.dumps({"backbone": args.backbone, "size": args.size, "export_s": round(exported, 2),
                              "load_s": round(loaded, 2), "folder_mb": round(size / 1e6, 2)}), flush=True)


if __name__ == "__main__":
    main()
