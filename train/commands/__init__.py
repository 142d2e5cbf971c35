"""``carclf`` sub-commands of the training half: each exposes ``add_arguments(parser)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import logging


def setup_logging() -> None:
    """Plain one-line messages on stderr for the long-running commands."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def add_channel_order_argument(parser: argparse.ArgumentParser, default: str | None, extra_help: str = "") -> None:
    """``--channel-order``: how the photo files store colours (``bgr``: red and blue swapped, turned back on read)."""
    from carclf import imaging

    parser.add_argument("--channel-order", choices=imaging.CHANNEL_ORDERS, default=default,
                        help="how the photo files store colours: bgr for a data set saved with red and blue swapped "
                             f"(such as cars10), read back as RGB{extra_help or f' (default: {default})'}")


def channel_order_for(flag: str | None, folder_named: bool, declared: str | None) -> str | None:
    """The order to read photos in: ``--channel-order`` when given; else ``rgb`` for a folder named on the command
    line (a recipe's or model's declared order describes its own data, not another folder); else ``declared``."""
    return flag or ("rgb" if folder_named else declared)


def add_photo_prediction_arguments(parser: argparse.ArgumentParser, on_bad: str) -> None:
    """``--tta``, ``--channel-order`` and ``--on-bad``, shared by the commands that predict a folder of photos."""
    from carclf import tta
    from carclf.train.submit import ON_BAD

    parser.add_argument("--tta", default="hflip", choices=tuple(tta.POLICIES), help="TTA policy (default: hflip)")
    add_channel_order_argument(parser, default="rgb")
    parser.add_argument("--on-bad", choices=ON_BAD, default=on_bad,
                        help=f"what to do with a file that is not a usable image (default: {on_bad})")
