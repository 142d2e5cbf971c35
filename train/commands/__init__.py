"""``carclf`` sub-commands of the training half: each exposes ``add_arguments(parser)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import logging


def setup_logging() -> None:
    """Plain one-line messages on stderr for the long-running commands."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def add_photo_prediction_arguments(parser: argparse.ArgumentParser, on_bad: str) -> None:
    """``--tta`` and ``--on-bad``, shared by the commands that predict a folder of photos."""
    from carclf import tta
    from carclf.train.submit import ON_BAD

    parser.add_argument("--tta", default="hflip", help=f"TTA policy ({', '.join(tta.POLICIES)})")
    parser.add_argument("--on-bad", choices=ON_BAD, default=on_bad,
                        help=f"what to do with a file that is not a usable image (default: {on_bad})")
