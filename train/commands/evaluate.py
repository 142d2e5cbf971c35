"""``carclf evaluate RUN_DIR|SAVEDMODEL``: accuracy, per-class report, confusion matrix, per TTA policy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carclf import contract, sources, tta
from carclf.destinations import check_folder
from carclf.errors import InvalidInput
from carclf.train import data, evaluate
from carclf.train.commands import add_channel_order_argument, channel_order_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run folder, or a SavedModel (model folder or version folder)")
    parser.add_argument("--tta", default="none,hflip,hflip_crops",
                        help=f"comma-separated TTA policies (known: {', '.join(tta.POLICIES)})")
    parser.add_argument("--split", help="split.json whose validation photos to use (default: the model's own)")
    parser.add_argument("--data", help="labelled folder of class folders (default: the model's training data)")
    parser.add_argument("--all", action="store_true", help="evaluate every usable photo of the data")
    add_channel_order_argument(parser, default=None, extra_help=" (default: as the model's training data recorded "
                                                                "it when --data is not given, else rgb)")
    parser.add_argument("--out", "--output", help="folder for eval.json and confusion PNGs "
                                      "(default: the run folder, or reports/evaluate/<model>/<version>)")


def run(args: argparse.Namespace) -> int:
    policies = tta.policy_names(args.tta, "--tta")
    if args.all and args.split:
        raise InvalidInput(f"give --all (every usable photo of the data) or --split {args.split!r}, not both")
    if args.out:
        check_folder(args.out, "--out")  # before the model loads and the photos are read
    model = evaluate.load_model(args.model)
    data_root = args.data or model.info.get("data_root")
    channel_order = channel_order_for(args.channel_order, bool(args.data), model.info.get("data_channel_order", "rgb"))
    if not data_root:
        raise InvalidInput(f"{args.model} names no training data; pass --data FOLDER")
    if not args.data and model.info.get("data_csv"):  # a CSV-layout run: its Id,Category file and image folder
        dataset = data.read_csv_layout(model.info["data_csv"], data_root, model.info.get("data_classes"))
    else:
        dataset = data.read_folder_layout(data_root)
    if dataset.class_ids != model.class_ids:
        raise InvalidInput(f"data {data_root} has classes {dataset.class_ids}, the model has {model.class_ids}")
    if args.data and (names_file := data.classes_beside(args.data)):  # the same ids may be other cars
        named = data.load_class_names(names_file, dataset.class_ids)
        for cid, ours, theirs in zip(model.class_ids, model.class_names, named, strict=True):
            if ours != cid and ours != theirs:
                raise InvalidInput(f"{names_file} names class {cid} {theirs!r}, the model {ours!r}: --data holds "
                                   "another data set's classes under the same ids")
    split_path = None if args.all else (args.split or model.info.get("split_file"))
    if split_path:
        if why := sources.why_not(split_path, "file"):
            raise InvalidInput(f"split file {str(split_path)!r} {why}; pass --split FILE or --all")
        samples = data.load_split(split_path, dataset).val
        if not samples:
            raise InvalidInput(f"split {str(split_path)!r} holds no validation photos (the run trained on all of "
                               "them): pass --all with --data FOLDER of other labelled photos")
    else:
        samples = data.clean_samples(dataset, data.scan_dataset(dataset))
    results = evaluate.evaluate_photos(model.predictor, [s.path for s in samples], [s.label for s in samples],
                                       model.input_size, policies, model.class_ids, model.class_names,
                                       show_progress=True, resize=model.resize, channel_order=channel_order)
    default_out = model.path if model.kind == "run" else _report_folder(model.path)
    path = evaluate.write_results(results, Path(args.out or default_out), model.class_ids, prefix="eval",
                                  extra={"model": str(model.path), "photos": len(samples),
                                         "split": str(split_path) if split_path else "all",
                                         "channel_order": channel_order})
    for name, r in results.items():
        print(f"{name:<12} accuracy {r['accuracy']:.4f} ({r['correct']}/{r['count']})  log-loss {r['log_loss']:.4f}")
    worst = min(results[policies[-1]]["per_class"], key=lambda row: row["f1"])
    print(f"weakest class ({policies[-1]}): {worst['class_id']} {worst['name']} f1 {worst['f1']:.3f}")
    print(f"report: {path}")
    print(json.dumps({n: round(r["accuracy"], 4) for n, r in results.items()}))
    return 0


def _report_folder(savedmodel: Path) -> Path:
    """``reports/evaluate/<model>/<version>`` for a version folder of a model repository (the name alone would
    put every model's version 1 in one folder), else ``reports/evaluate/<folder>``."""
    if contract.version_number(savedmodel.name) is not None and savedmodel.parent.name:
        return Path("reports/evaluate") / savedmodel.parent.name / savedmodel.name
    return Path("reports/evaluate") / savedmodel.name
