"""What running the decoder and the TTA views as traced graphs saves `carclf submit` (and `carclf evaluate`,
which predicts through the same function): one submission written with the functions run eagerly, op by op (as
before commit e77e4d4: ``imaging.traced_decode`` and ``tta.traced_views`` patched back to the eager
functions), and with the traced ones, side by side in one process.

    .venv/bin/python scripts/offline_preprocess.py MODEL PHOTOS [--tta hflip] [--channel-order bgr] [--rounds 3]

Each round runs both ways, in an order that alternates by round: the up-front check of every photo (a full
decode), then the whole submission (check, decode, views, model). It prints the seconds of each and the
eager / traced ratios; the two ways' CSVs must be byte-identical (the script stops if not).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock


def eager_functions() -> contextlib.ExitStack:
    """The product with decode and views run eagerly: ``decode_checked`` and ``predict_policies`` as they were."""
    from carclf import imaging, tta

    def eager_views(policy, size, resize="squash", channel_order="rgb"):
        return lambda image: tta.make_views(imaging.to_rgb(image, channel_order), policy, size, resize)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(imaging, "traced_decode", lambda: imaging.decode_image))
    stack.enter_context(mock.patch.object(tta, "traced_views", eager_views))
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run folder or SavedModel, as `carclf submit` takes")
    parser.add_argument("photos", help="a folder of photos")
    parser.add_argument("--tta", default="hflip")
    parser.add_argument("--channel-order", default="rgb")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from carclf.train import data
    from carclf.train.evaluate import load_model
    from carclf.train.submit import usable_photos, write_submission

    model = load_model(args.model)
    photos = data.list_photos(args.photos)
    ways = {"eager": eager_functions, "traced": contextlib.ExitStack}
    with tempfile.TemporaryDirectory() as tmp:
        for way, functions in ways.items():  # warm up: trace, first calls
            with functions():
                write_submission(model, args.photos, Path(tmp) / f"warm_{way}.csv", args.tta, progress=False,
                                 channel_order=args.channel_order)
        print(f"{len(photos)} photos of {args.photos}, model {args.model}, --tta {args.tta}, "
              f"--channel-order {args.channel_order}")
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            seconds: dict[str, tuple[float, float]] = {}
            for way in order:
                with ways[way]():
                    start = time.perf_counter()
                    usable_photos(photos, "fail")
                    check = time.perf_counter() - start
                    start = time.perf_counter()
                    write_submission(model, args.photos, Path(tmp) / f"{way}.csv", args.tta, progress=False,
                                     channel_order=args.channel_order)
                    seconds[way] = (check, time.perf_counter() - start)
            if (Path(tmp) / "eager.csv").read_bytes() != (Path(tmp) / "traced.csv").read_bytes():
                raise SystemExit("the two ways wrote different submissions")
            (ec, es), (tc, ts) = seconds["eager"], seconds["traced"]
            print(f"round {round_ + 1} ({' then '.join(order)}): check {ec:.2f} s eager, {tc:.2f} s traced "
                  f"(x{ec / tc:.2f}); submission {es:.2f} s eager, {ts:.2f} s traced (x{es / ts:.2f}); "
                  "CSVs identical")


if __name__ == "__main__":
    main()
