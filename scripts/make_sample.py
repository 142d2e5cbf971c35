"""Build data/sample/ from ../shared/data/cars10: a few real photos per class, downscaled (< 5 MB), in true colour.

cars10's files store red and blue swapped (``--channel-order bgr``, the default); the copies are written in RGB,
as every real photo is.

Usage: python scripts/make_sample.py [--source ../shared/data/cars10] [--per-class 5] [--max-side 320]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

from PIL import Image, ImageOps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="../shared/data/cars10")
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--test-count", type=int, default=10)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--channel-order", choices=("rgb", "bgr"), default="bgr",
                        help="how the source files store colours (default: bgr, as cars10 does)")
    args = parser.parse_args()
    src, out = Path(args.source), Path(args.out)
    if out.exists():
        shutil.rmtree(out / "train", ignore_errors=True)
        shutil.rmtree(out / "test_upload", ignore_errors=True)
    (out / "train").mkdir(parents=True, exist_ok=True)

    def save(path: Path, dest: Path) -> None:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        if args.channel_order == "bgr":
            red, green, blue = img.split()
            img = Image.merge("RGB", (blue, green, red))
        img.thumbnail((args.max_side, args.max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        dest.write_bytes(buf.getvalue())

    for class_dir in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        dest = out / "train" / class_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for photo in sorted(class_dir.glob("*.jpg"))[: args.per_class]:
            save(photo, dest / photo.name)
    (out / "test_upload").mkdir(exist_ok=True)
    for photo in sorted((src / "test_upload").glob("*.jpg"))[: args.test_count]:
        save(photo, out / "test_upload" / photo.name)
    shutil.copy(src / "classes.json", out / "classes.json")
    print(json.dumps({"out": str(out), "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}))


if __name__ == "__main__":
    main()
