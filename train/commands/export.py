"""``carclf export RUN_DIR --repository model_repository --name NAME``: the next SavedModel version.

Real validation photos of the run serve as TF Serving warmup records and as the export check (the
reloaded SavedModel must agree with the Keras model within 1e-4).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carclf import backbones
from carclf.destinations import check_folder
from carclf.errors import InvalidInput
from carclf.serving.repository import model_versions
from carclf.train import data, runs
from carclf.train.export import check_model_name, export_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished run folder (runs/<recipe>-<timestamp>)")
    parser.add_argument("--repository", default="model_repository", help="model repository root")
    parser.add_argument("--name", help="model name in the repository (default: the run's recipe name)")
    parser.add_argument("--warmup", type=int, default=4, help="number of real photos as warmup records")
    parser.add_argument("--verify", type=int, default=8, help="number of real photos for the export check")


def model_card(trained: runs.TrainedRun) -> dict:
    run_dir = trained.path.resolve()
    metrics_file = run_dir / runs.METRICS
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    spec = backbones.get(trained.recipe.backbone)
    return {
        "backbone": trained.recipe.backbone,
        "preprocessing": spec.preprocessing,
        "recipe": trained.recipe.name,
        "class_ids": trained.class_ids,
        "data_root": trained.info.get("data_root"),
        "data_csv": trained.recipe.data.csv,  # the Id,Category file of a CSV-layout run (None: class folders)
        "data_classes": trained.recipe.data.classes,
        "data_channel_order": trained.recipe.data.channel_order,  # how those photos store colours (read as RGB)
        "weights_used": trained.info.get("weights_used"),
        "run_dir": str(run_dir),
        "split_file": str(run_dir / runs.SPLIT),
        "val_fingerprint": trained.info.get("val_fingerprint"),
        "metrics": {name: {"accuracy": r["accuracy"], "count": r["count"]}
                    for name, r in metrics.get("policies", {}).items()},
        "train_seconds": trained.info.get("train_seconds"),
        "config": trained.recipe.to_dict(),
    }


def real_photos(trained: runs.TrainedRun, count: int) -> list[bytes]:
    """Validation photos of the run (training photos if it had no validation split)."""
    dataset = data.read_dataset(trained.recipe.data)  # either layout, as training read it
    split = data.load_split(trained.path / runs.SPLIT, dataset)
    samples = (split.val or split.train)[:count]
    return [Path(s.path).read_bytes() for s in samples]


def _refuse_a_models_folder(repository: Path) -> None:
    """``--repository model_repository/<name>``: one model's folder (its children are version folders holding
    SavedModels), not the repository; the export would go to <name>/<name>/1, a folder no server reads."""
    if versions := model_versions(repository):
        raise InvalidInput(f"--repository {str(repository)!r} is itself a model (its version folders {versions}): "
                           f"give the repository that holds it, here {str(repository.absolute().parent)!r}; the "
                           "export goes to <repository>/<name>/<next version>")


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0 or args.verify < 1:
        raise InvalidInput(f"--warmup must be >= 0 and --verify >= 1, received {args.warmup} and {args.verify}")
    if args.name is not None and not args.name.strip():
        raise InvalidInput("--name is empty; give a model name, or leave --name out for the run's recipe name")
    check_folder(args.repository, "--repository")
    _refuse_a_models_folder(Path(args.repository))
    # checked before the model is loaded: a recipe name may hold a '.', which a model name may not
    name = args.name if args.name is not None else runs.load_config(Path(args.run_dir)).name
    check_model_name(name, hint="" if args.name is not None else " (the run's recipe name): give --name")
    trained = runs.load_run(args.run_dir)
    photos = real_photos(trained, max(args.warmup, args.verify))
    version = export_model(trained.model, repository=args.repository, name=name, input_size=trained.image_size,
                           labels=trained.class_names, warmup_images=photos[: args.warmup],
                           verify_images=photos[: args.verify], card=model_card(trained),
                           resize=trained.recipe.resize)
    card = json.loads((version / "assets.extra" / "model_card.json").read_text(encoding="utf-8"))
    print(f"exported {version} (check on {min(len(photos), args.verify)} real photos: max |diff| "
          f"{card['export_check_max_abs_diff']:.2e})")
    return 0
