"""Paired comparison of two recipes over the folds both have finished, before either cross-validation is complete.

    .venv/bin/python scripts/paired_folds.py runs/A-fold*of5-* --against runs/B-fold*of5-*
    # figures of a later `carclf evaluate RUN --out RUN/<folder>` instead of the runs' own metrics.json:
    .venv/bin/python scripts/paired_folds.py runs/A-fold*of5-* --metrics true_colour/eval.json --against runs/B-fold*of5-*

Runs are matched by fold (the latest run of each fold when there are several); each pair must validate on the
same photos. For every policy both evaluated: correct photos of each over the shared folds, per fold, the photos only one
of them gets right with the exact McNemar p-value (``carclf.train.crossval.compare``), and the log loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from carclf.errors import InvalidInput
from carclf.train import crossval, runs


def by_fold(paths: list[str], metrics: str = runs.METRICS) -> dict[int, crossval.FoldRun]:
    """Finished fold runs by fold; a run still training (no ``metrics`` file yet) is left out with a note."""
    found = {}
    for path in sorted(paths):  # by folder name, i.e. time stamp: the latest finished run of a fold wins
        if not (Path(path) / metrics).is_file():
            print(f"(left out: {path} has no {metrics})")
            continue
        run = crossval.read_fold_run(path, metrics)
        found[run.fold] = run
    return found


def pooled(runs: list[crossval.FoldRun], policy: str) -> dict:
    """The part of a ``crossval.summarize`` result that ``crossval.compare`` reads."""
    photo_correct = {}
    for run in runs:
        predicted = run.policies[policy].get("predicted") or ()
        if len(predicted) != len(run.val):
            raise InvalidInput(f"{run.path} has no per-photo results for policy {policy!r}")
        photo_correct.update({rel: int(p == label) for (rel, label), p in zip(run.val, predicted, strict=True)})
    return {"recipe": runs[0].recipe, "policies": {policy: {"photo_correct": photo_correct}}}


def log_loss(runs: list[crossval.FoldRun], policy: str) -> float:
    """Mean log loss over the photos of ``runs`` (each run's own mean, weighted by its photo count)."""
    return sum(float(r.policies[policy]["log_loss"]) * len(r.val) for r in runs) / sum(len(r.val) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="fold runs of the first recipe")
    parser.add_argument("--against", nargs="+", required=True, help="fold runs of the second recipe")
    parser.add_argument("--metrics", default=runs.METRICS, help="figures file of the first runs, relative to each run")
    parser.add_argument("--against-metrics", default=runs.METRICS, help="the same for the second runs")
    args = parser.parse_args()
    first, second = by_fold(args.runs, args.metrics), by_fold(args.against, args.against_metrics)
    folds = sorted(set(first) & set(second))
    if not folds:
        raise SystemExit("no fold was run by both recipes")
    for fold in folds:
        if first[fold].val != second[fold].val:
            raise SystemExit(f"fold {fold}: {first[fold].path} and {second[fold].path} validate on different photos")
    a, b = [first[f] for f in folds], [second[f] for f in folds]
    photos = sum(len(run.val) for run in a)
    print(f"{a[0].recipe} vs {b[0].recipe}: folds {folds} of {a[0].folds}, {photos} photos")
    for policy in [p for p in a[0].policies if all(p in r.policies for r in a + b)]:
        result = crossval.compare(pooled(a, policy), pooled(b, policy), policy)
        per_fold = " ".join(f"{int(x.policies[policy]['correct'])}/{int(y.policies[policy]['correct'])}"
                            for x, y in zip(a, b, strict=True))
        print(f"{policy:<12} {result['first_correct']} vs {result['second_correct']} of {photos} "
              f"(per fold {per_fold}); only the first right on {result['only_first']}, only the second on "
              f"{result['only_second']}, McNemar p = {result['mcnemar_p']:.3f}; log loss "
              f"{log_loss(a, policy):.3f} vs {log_loss(b, policy):.3f}")


if __name__ == "__main__":
    main()
