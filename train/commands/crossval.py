"""``carclf crossval RUN_DIR...``: pool the fold runs of a k-fold cross-validation into one estimate."""

from __future__ import annotations

import argparse
from pathlib import Path

from carclf.train import crossval
from carclf.train.runs import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="the run folders of folds 0..K-1 (carclf train --folds K [--fold I])")
    parser.add_argument("--out", help="write the summary as JSON to this file")


def run(args: argparse.Namespace) -> int:
    summary = crossval.summarize(args.runs)
    print(crossval.format_summary(summary))
    if args.out:
        write_json(Path(args.out), summary)
        print(f"cross-validation summary: {args.out}")
    return 0
