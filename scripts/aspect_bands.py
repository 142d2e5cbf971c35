"""Pooled cross-validation results by the photos' aspect ratio: which photos did a recipe gain or lose?

    .venv/bin/python scripts/aspect_bands.py runs/A-crossval5-*.json runs/B-crossval5-*.json \
        --data ../shared/data/cars10/train --bands 1.6,2.0,2.4

Reads the per-photo results (``photo_correct``) that ``carclf train --folds`` / ``carclf crossval`` write, and
each photo's width / height as it stands (EXIF orientation applied), and counts the correct photos of each
summary per aspect band, for every policy both summaries hold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

from carclf.train import crossval


def aspect(path: Path) -> float:
    with Image.open(path) as image:
        width, height = ImageOps.exif_transpose(image).size
    return width / height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs=2, help="two cross-validation summaries over the same photos")
    parser.add_argument("--data", required=True, help="the training folder the photos' relative paths start from")
    parser.add_argument("--bands", default="1.6,2.0,2.4", help="aspect ratios (width / height) between bands")
    args = parser.parse_args()
    first, second = (crossval.read_summary(path) for path in args.summaries)
    edges = [0.0, *(float(x) for x in args.bands.split(",")), float("inf")]
    policies = [p for p in first["policies"] if p in second["policies"]]
    photos = sorted(first["policies"][policies[0]]["photo_correct"])
    ratios = {rel: aspect(Path(args.data) / rel) for rel in photos}
    print(f"{first['recipe']} vs {second['recipe']}: correct photos per aspect band (width / height)")
    for policy in policies:
        a, b = first["policies"][policy]["photo_correct"], second["policies"][policy]["photo_correct"]
        if set(a) != set(b):
            raise SystemExit(f"the summaries do not cover the same photos for policy {policy!r}")
        cells = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            band = [rel for rel in photos if lo <= ratios[rel] < hi]
            cells.append(f"[{lo:g}, {hi:g}) {len(band)} photos: {sum(a[r] for r in band)} vs {sum(b[r] for r in band)}")
        print(f"{policy:12s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
