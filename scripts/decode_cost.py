"""What the BMP palette step adds to ``carclf.imaging.decode_image`` for the photos the server gets (JPEG):
the product's traced decoder against the same decoder without that step, side by side in one process.

    .venv/bin/python scripts/decode_cost.py --rounds 5 --calls 200

Each round times ``--calls`` decodes of every photo of ``--photo-folder`` with each decoder in turn (the order
alternates by round) and prints the per-photo medians and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo-folder", default="../shared/data/sfdl_samples")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    import tensorflow as tf

    from carclf import imaging

    def without_palette(data):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        return imaging.apply_orientation(image, imaging._exif_orientation(data))

    spec = [tf.TensorSpec([], tf.string)]
    decoders = {"decode_image": tf.function(imaging.decode_image, input_signature=spec),
                "without the palette step": tf.function(without_palette, input_signature=spec)}
    photos = [tf.constant(p.read_bytes()) for p in sorted(Path(args.photo_folder).rglob("*.jpg"))]
    for decode in decoders.values():  # trace and warm up
        for photo in photos:
            decode(photo)
    for round_ in range(args.rounds):
        names = list(decoders) if round_ % 2 == 0 else list(reversed(decoders))
        medians = {}
        for name in names:
            times = []
            for i in range(args.calls):
                photo = photos[i % len(photos)]
                start = time.perf_counter()
                decoders[name](photo)
                times.append(time.perf_counter() - start)
            medians[name] = statistics.median(times) * 1e3
        a, b = medians["decode_image"], medians["without the palette step"]
        print(f"round {round_}: decode_image {a:.3f} ms, without the palette step {b:.3f} ms, "
              f"difference {a - b:+.3f} ms ({len(photos)} photos, {args.calls} calls each)")


if __name__ == "__main__":
    main()
