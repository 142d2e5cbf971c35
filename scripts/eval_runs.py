"""Score finished run folders on their validation photos: at other input sizes than they trained at, and as
an average of their probabilities (an ensemble of runs, no server involved).

    .venv/bin/python scripts/eval_runs.py runs/A runs/B --sizes 320,352,384,416   # each run at each size
    .venv/bin/python scripts/eval_runs.py runs/A runs/B --average                # the runs averaged
    .venv/bin/python scripts/eval_runs.py runs/A --sizes 288,320,352 --average-sizes  # multi-scale TTA per run

Every figure goes through the product's evaluation path (``carclf.train.evaluate``: decode, TTA views with
each run's resize mode, the mean over views). The runs must share their validation split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from carclf import backbones
from carclf.train import data, evaluate, runs
from carclf.train.model import build_classifier

POLICIES = ("none", "hflip", "hflip_crops")


def _validation(run: Path):
    recipe = runs.load_config(run)
    split = data.load_split(run / runs.SPLIT, data.read_dataset(recipe.data))
    return recipe, split


def _probabilities(run: Path, size: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    trained = runs.load_run(run)
    recipe, split = _validation(run)
    model = trained.model
    if size is not None and size != trained.image_size:
        model, _ = build_classifier(backbones.get(recipe.backbone), len(trained.class_ids), recipe.head, size, None)
        model.load_weights(str(run / runs.FINAL_WEIGHTS))
    probs = evaluate.predict_policies(evaluate.keras_predictor(model), (Path(s.path).read_bytes() for s in split.val),
                                      POLICIES, size or trained.image_size, resize=recipe.resize,
                                      channel_order=recipe.data.channel_order)
    return probs, np.array([s.label for s in split.val]), split.fingerprint()


def _line(name: str, probs: dict[str, np.ndarray], labels: np.ndarray) -> str:
    cells = []
    for policy in POLICIES:
        p = probs[policy]
        log_loss = -np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0)))
        cells.append(f"{policy} {int((p.argmax(1) == labels).sum())}/{len(labels)} (log loss {log_loss:.3f})")
    return f"{name}: " + ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sizes", help="comma-separated input sizes to score each run at")
    parser.add_argument("--average-sizes", action="store_true",
                        help="with --sizes: also score each run's mean over those sizes (multi-scale TTA)")
    parser.add_argument("--average", action="store_true", help="score the mean of the runs' probabilities")
    args = parser.parse_args()
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
        for run in args.runs:
            scored = []
            for size in sizes:
                probs, labels, _ = _probabilities(run, size)
                scored.append(probs)
                print(_line(f"{run.name} at {size} px", probs, labels), flush=True)
            if args.average_sizes:
                mean = {p: np.mean([probs[p] for probs in scored], axis=0) for p in POLICIES}
                print(_line(f"{run.name}, mean over {'+'.join(map(str, sizes))} px", mean, labels), flush=True)
    if args.average:
        members = [_probabilities(run) for run in args.runs]
        if len({fingerprint for _, _, fingerprint in members}) != 1:
            raise SystemExit("the runs do not share their validation split")
        for run, (probs, labels, _) in zip(args.runs, members, strict=True):
            print(_line(run.name, probs, labels), flush=True)
        mean = {p: np.mean([probs[p] for probs, _, _ in members], axis=0) for p in POLICIES}
        print(_line(f"mean of {len(members)} runs", mean, members[0][1]))


if __name__ == "__main__":
    main()
