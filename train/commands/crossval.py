"""``carclf crossval RUN_DIR...``: pool the fold runs of a k-fold cross-validation into one estimate."""

from __future__ import annotations

import argparse
from pathlib import Path

from carclf.destinations import check_file
from carclf.train import crossval
from carclf.train.runs import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="the run folders of folds 0..K-1 (carclf train --folds K [--fold I])")
    parser.add_argument("--out", "--output", help="write the summary as JSON to this file")
    parser.add_argument("--compare", metavar="SUMMARY_JSON",
                        help="another cross-validation's summary over the same photos: paired counts and McNemar p")


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_file(args.out, "--out")
    summary = crossval.summarize(args.runs)
    print(crossval.format_summary(summary))
    if args.compare:
        other = crossval.read_summary(args.compare, "--compare")
        for policy in summary["policies"]:
            if policy in other.get("policies", {}):
                c = crossval.compare(summary, other, policy)
                print(f"{policy}: {c['first']} {c['first_correct']}/{c['photos']} vs {c['second']} "
                      f"{c['second_correct']}/{c['photos']}; only the first right on {c['only_first']}, only the "
                      f"second on {c['only_second']} (McNemar p = {c['mcnemar_p']:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), summary)
        print(f"cross-validation summary: {args.out}")
    return 0
