"""``carclf scan DATA``: list the files training would skip, and write the EDA summary (JSON + PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carclf.destinations import check_folder
from carclf.errors import InvalidInput
from carclf.train import data, plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train", help="folder of class folders (Kaggle train/), or the image folder with --csv")
    parser.add_argument("--csv", help="Id,Category label file (then TRAIN is the image folder)")
    parser.add_argument("--classes", help="class-names file (classes.json or one name per line)")
    parser.add_argument("--min-side", type=int, default=32, help="smaller images are reported as tiny")
    parser.add_argument("--out", "--output",
                        default="reports/scan", help="folder for scan.json, eda.json and eda.png")


def run(args: argparse.Namespace) -> int:
    if args.min_side < 1:
        raise InvalidInput(f"--min-side must be >= 1 pixel, received {args.min_side}")
    check_folder(args.out, "--out")
    if args.csv:
        dataset = data.read_csv_layout(args.csv, args.train, args.classes)
    else:
        dataset = data.read_folder_layout(args.train, args.classes)
    report = data.scan_dataset(dataset, args.min_side, progress=True)
    summary = data.eda_summary(dataset, report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan.json").write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    (out / "eda.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plots.plot_eda(summary, [(g.width, g.height) for g in report.good], out / "eda.png")
    for bad in report.bad:
        print(f"skip {bad['file']}: {bad['reason']}")
    print(f"{summary['num_images']} usable images, {summary['num_bad']} skipped, "
          f"{len(summary['class_counts'])} classes {summary['class_counts']}; "
          f"width median {summary['width']['median']:.0f} px; report in {out}/")
    return 0
