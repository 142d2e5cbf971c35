"""``carclf crossval RUN_DIR...``: pool the fold runs of a k-fold cross-validation into one estimate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carclf.errors import InvalidInput
from carclf.train import crossval
from carclf.train.runs import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="the run folders of folds 0..K-1 (carclf train --folds K [--fold I])")
    parser.add_argument("--out", help="write the summary as JSON to this file")
    parser.add_argument("--compare", metavar="SUMMARY_JSON",
                        help="another cross-validation's summary over the same photos: paired counts and McNemar p")


def read_json_file(path: str, flag: str) -> dict:
    """A cross-validation summary written by ``carclf train --folds`` or ``carclf crossval --out``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{flag} {path!r} is not a readable JSON summary: {exc}") from None
    if not isinstance(data, dict) or "policies" not in data or "recipe" not in data:
        raise InvalidInput(f"{flag} {path!r} is not a cross-validation summary (no 'recipe' and 'policies')")
    return data


def run(args: argparse.Namespace) -> int:
    summary = crossval.summarize(args.runs)
    print(crossval.format_summary(summary))
    if args.compare:
        other = read_json_file(args.compare, "--compare")
        for policy in summary["policies"]:
            if policy in other.get("policies", {}):
                c = crossval.compare(summary, other, policy)
                print(f"{policy}: {c['first']} {c['first_correct']}/{c['photos']} vs {c['second']} "
                      f"{c['second_correct']}/{c['photos']}; only the first right on {c['only_first']}, only the "
                      f"second on {c['only_second']} (McNemar p = {c['mcnemar_p']:.3f})")
    if args.out:
        write_json(Path(args.out), summary)
        print(f"cross-validation summary: {args.out}")
    return 0
