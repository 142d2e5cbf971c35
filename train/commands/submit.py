"""``carclf submit MODEL [MODEL ...] PHOTOS``: a Kaggle submission CSV (Id,Category) with a progress bar; several
models (or a cross-validation summary, for its fold runs) are averaged.

The rows are kept in <out>.partial.csv as they are predicted (64 photos at a time), so that a run stopped by any
means (Ctrl-C, a killed process, a photo that does not decode) loses at most those in hand: the same command with
--resume predicts only the photos that file lacks, then writes the whole CSV and removes it. The file records
the models (a digest of their weights), --tta and --channel-order; a resume with others is refused."""

from __future__ import annotations

import argparse

from carclf import tta
from carclf.destinations import check_file
from carclf.train import crossval
from carclf.train.commands import add_photo_prediction_arguments, setup_logging
from carclf.train.evaluate import load_model
from carclf.train.submit import check_before_loading, write_submission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="+",
                        help="a run folder, a SavedModel (model folder or version folder), or a cross-validation "
                             "summary (runs/<recipe>-crossvalK-*.json: its K fold runs); several are averaged")
    parser.add_argument("photos", help="folder of photos (e.g. Kaggle test_upload/)")
    parser.add_argument("--out", "--output",
                        default="submission.csv", help="CSV to write (default: submission.csv)")
    add_photo_prediction_arguments(parser, on_bad="fail")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run that stopped: the photos predicted in <out>.partial.csv are kept, "
                             "only the others are predicted (with the same models, --tta and --channel-order)")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    tta.get_policy(args.tta)
    check_file(args.out, "--out")  # these before any model loads (seconds to minutes for large ones)
    check_before_loading(args.photos, args.out, args.resume)
    paths = crossval.model_paths(args.model)
    models = [load_model(path) for path in paths]
    stats = write_submission(models, args.photos, args.out, policy=args.tta, on_bad=args.on_bad,
                             channel_order=args.channel_order, resume=args.resume)
    print(f"wrote {args.out}: {stats['rows']} rows, {stats['skipped']} skipped"
          + (f", {stats['resumed']} of them kept from the run that stopped" if stats["resumed"] else "")
          + (f" (mean of {len(models)} models)" if len(models) > 1 else ""))
    return 0
