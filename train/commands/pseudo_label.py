"""``carclf pseudo-label MODEL [MODEL ...] PHOTOS --out CSV``: the confident predictions for a folder of unlabelled
photos, as a CSV ``Id,Category,Confidence`` that a recipe's ``data.extra_train`` trains on.

With ``--per-fold`` and a cross-validation summary (or its fold runs) each fold run labels the photos alone,
into ``--out`` with ``{fold}`` replaced by its fold: a recipe reading ``...-fold{fold}.csv`` then trains fold I
only on labels from a model that never saw fold I's validation photos.
"""

from __future__ import annotations

import argparse

from carclf import tta
from carclf.destinations import check_file
from carclf.errors import InvalidInput
from carclf.train import crossval, data
from carclf.train.commands import add_photo_prediction_arguments, setup_logging
from carclf.train.evaluate import load_model
from carclf.train.recipe import FOLD_PLACEHOLDER
from carclf.train.submit import write_pseudo_labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="+",
                        help="a run folder, a SavedModel, or a cross-validation summary (its fold runs); several "
                             "are averaged unless --per-fold")
    parser.add_argument("photos", help="folder of unlabelled photos (e.g. Kaggle test_upload/)")
    parser.add_argument("--out", "--output", required=True,
                        help=f"CSV to write; with --per-fold it must hold {FOLD_PLACEHOLDER}")
    parser.add_argument("--min-confidence", type=float, default=0.7,
                        help="keep photos whose top probability is at least this (default: 0.7)")
    parser.add_argument("--per-fold", action="store_true",
                        help="one CSV per fold run, each labelled by that run alone")
    add_photo_prediction_arguments(parser, on_bad="skip")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    tta.get_policy(args.tta)
    if not 0.0 <= args.min_confidence <= 1.0:
        raise InvalidInput(f"--min-confidence must be in [0, 1], received {args.min_confidence}")
    if args.per_fold and FOLD_PLACEHOLDER not in args.out:
        raise InvalidInput(f"--per-fold writes one CSV per fold: --out must hold {FOLD_PLACEHOLDER}, "
                           f"received {args.out!r}")
    if FOLD_PLACEHOLDER in args.out and not args.per_fold:
        raise InvalidInput(f"--out {args.out!r} holds {FOLD_PLACEHOLDER}, which only --per-fold fills (one CSV per "
                           "fold run)")
    check_file(args.out.replace(FOLD_PLACEHOLDER, "0"), "--out")  # these before any model loads
    data.list_photos(args.photos, warn=False)  # said when the photos are read for the run
    paths = crossval.model_paths(args.model)
    if not args.per_fold:
        _label([load_model(p) for p in paths], args.out, args)
        return 0
    folds = [crossval.read_fold_run(p) for p in paths]  # each must be a finished run of a k-fold split
    for fold_run in folds:
        _label([load_model(fold_run.path)], args.out.replace(FOLD_PLACEHOLDER, str(fold_run.fold)), args)
    return 0


def _label(models, out: str, args: argparse.Namespace) -> None:
    stats = write_pseudo_labels(models, args.photos, out, args.min_confidence, policy=args.tta, on_bad=args.on_bad,
                                channel_order=args.channel_order)
    per_class = " ".join(f"{cid}:{n}" for cid, n in stats["per_class"].items())
    print(f"wrote {out}: {stats['rows']} of {stats['photos']} photos at confidence >= {args.min_confidence} "
          f"({stats['skipped']} skipped; per class {per_class})")
