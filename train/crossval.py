"""Cross-validation: pool the k fold runs of one recipe into one estimate over every photo.

A hold-out split of 75 photos moves by several photos with the training seed alone; the k runs of a
stratified k-fold split (``split.folds``) validate on disjoint sets that together hold every photo once,
so their pooled accuracy is measured on k times as many photos. ``summarize`` checks that the runs
belong together (one recipe apart from the fold, one split seed, folds 0..k-1 each once, disjoint
validation sets covering the data) before it adds them up.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from carclf.errors import InvalidInput
from carclf.train import runs


@dataclass(frozen=True)
class FoldRun:
    path: Path
    recipe: str
    folds: int
    fold: int
    split_seed: int
    val: tuple[tuple[str, int], ...]  # (file, label) in the order the run evaluated them
    data_size: int
    policies: dict[str, dict[str, Any]]
    config: dict[str, Any]  # the resolved recipe without its fold: equal for the folds of one cross-validation
    cut_short: bool = False  # stopped by --time-budget before its last epoch (run.json), evaluated as it stood


def read_fold_run(path: str | Path, metrics_name: str = runs.METRICS) -> FoldRun:
    """One finished run of a k-fold split; InvalidInput naming the folder when it is not one. ``metrics_name`` is
    the file (relative to the run) whose figures to read: the run's own, or a later ``carclf evaluate --out``."""
    run = Path(path)
    metrics_file, split_file = run / metrics_name, run / runs.SPLIT
    if not metrics_file.is_file() or not split_file.is_file():
        raise InvalidInput(f"{run} is not a finished run folder (no {metrics_name} or {runs.SPLIT})")
    metrics, split = runs.read_json(metrics_file), runs.read_json(split_file)
    folds = int(split.get("folds", 0))
    if folds < 2:
        raise InvalidInput(f"{run} used a hold-out split, not a k-fold one (train it with --folds K)")
    policies = metrics.get("policies") or {}
    if not policies:
        raise InvalidInput(f"{metrics_file} holds no evaluated TTA policy")
    config = yaml.safe_load((run / runs.CONFIG).read_text(encoding="utf-8")) if (run / runs.CONFIG).is_file() else {}
    config.get("split", {}).pop("fold", None)
    config.pop("source", None)
    recipe = metrics.get("recipe") or config.get("name")
    info = runs.read_json(run / runs.RUN_INFO) if (run / runs.RUN_INFO).is_file() else {}
    return FoldRun(run, str(recipe), folds, int(split["fold"]), int(split["seed"]),
                   tuple((rel, int(label)) for rel, label in split["val"]), len(split["val"]) + len(split["train"]),
                   policies, config, cut_short="cut_short_by_time_budget_s" in info)


def read_summary(path: str | Path, what: str = "summary") -> dict[str, Any]:
    """A cross-validation summary written by ``carclf train --folds`` or ``carclf crossval --out``; InvalidInput
    naming ``what`` (e.g. the flag that gave it) and the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{what} {str(path)!r} is not a readable JSON summary: {exc}") from None
    if not isinstance(data, dict) or "policies" not in data or "recipe" not in data:
        raise InvalidInput(f"{what} {str(path)!r} is not a cross-validation summary (no 'recipe' and 'policies')")
    return data


def model_paths(items: Sequence[str]) -> list[str]:
    """Models named on a command line: a cross-validation summary (``.json``) stands for its fold runs, anything
    else (a run folder, a SavedModel) for itself."""
    return [str(run) for item in items for run in (summary_runs(item) if item.endswith(".json") else [item])]


def summary_runs(path: str | Path) -> list[Path]:
    """The fold run folders a summary lists, as written (relative to where training ran) or, when they are not
    there, beside the summary file (the runs folder that holds it)."""
    summary = read_summary(path)
    folders = []
    for run in summary.get("runs") or []:
        folder = Path(run) if Path(run).is_dir() else Path(path).parent / Path(run).name
        if not folder.is_dir():
            raise InvalidInput(f"{str(path)!r} lists the fold run {run!r}, which is neither there nor beside it")
        folders.append(folder)
    if not folders:
        raise InvalidInput(f"{str(path)!r} lists no fold runs")
    return folders


def summarize(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Pooled and per-fold accuracy (and log loss) of each TTA policy that every fold evaluated."""
    fold_runs = sorted((read_fold_run(p) for p in paths), key=lambda r: r.fold)
    if not fold_runs:
        raise InvalidInput("name the run folders of every fold")
    first = fold_runs[0]
    for run in fold_runs[1:]:
        for what in ("recipe", "folds", "split_seed", "data_size"):
            if getattr(run, what) != getattr(first, what):
                raise InvalidInput(f"{run.path} has {what} {getattr(run, what)!r}, {first.path} has "
                                   f"{getattr(first, what)!r}: they are not folds of one cross-validation")
        if run.config != first.config:
            differ = sorted(k for k in set(run.config) | set(first.config) if run.config.get(k) != first.config.get(k))
            raise InvalidInput(f"{run.path} and {first.path} were trained with different settings ({', '.join(differ)}): "
                               "they are not folds of one cross-validation")
    found = [r.fold for r in fold_runs]
    if found != list(range(first.folds)):
        raise InvalidInput(f"a {first.folds}-fold cross-validation needs folds 0..{first.folds - 1} once each, "
                           f"received {found}")
    seen: set[str] = set()
    for run in fold_runs:
        files = {rel for rel, _ in run.val}
        if seen & files:
            raise InvalidInput(f"{run.path} validates on photos another fold already holds: {sorted(seen & files)[:3]}")
        seen |= files
    if len(seen) != first.data_size:
        raise InvalidInput(f"the folds validate on {len(seen)} photos, the data has {first.data_size}")
    policies = [p for p in first.policies if all(p in r.policies for r in fold_runs)]
    summary: dict[str, Any] = {"recipe": first.recipe, "folds": first.folds, "split_seed": first.split_seed,
                               "photos": len(seen), "runs": [str(r.path) for r in fold_runs], "policies": {},
                               "cut_short_folds": [r.fold for r in fold_runs if r.cut_short]}
    for policy in policies:
        rows = [r.policies[policy] for r in fold_runs]
        correct, count = sum(int(x["correct"]) for x in rows), sum(int(x["count"]) for x in rows)
        per_fold = [int(x["correct"]) / int(x["count"]) for x in rows]
        losses = [x.get("log_loss") for x in rows]
        summary["policies"][policy] = {
            "correct": correct, "count": count, "accuracy": correct / count,
            # binomial standard error of the pooled accuracy: the noise of counting this many photos
            "standard_error": math.sqrt(correct / count * (1 - correct / count) / count),
            "per_fold_accuracy": per_fold, "per_fold_correct": [int(x["correct"]) for x in rows],
            "fold_std": statistics.stdev(per_fold) if len(per_fold) > 1 else 0.0,
            "log_loss": (sum(float(v) * int(x["count"]) for v, x in zip(losses, rows, strict=True)) / count
                         if all(v is not None for v in losses) else None),
        }
        if all(len(x.get("predicted") or ()) == len(r.val) for x, r in zip(rows, fold_runs, strict=True)):
            summary["policies"][policy]["photo_correct"] = {
                rel: int(pred == label) for x, r in zip(rows, fold_runs, strict=True)
                for (rel, label), pred in zip(r.val, x["predicted"], strict=True)}
    return summary


def compare(a: dict[str, Any], b: dict[str, Any], policy: str) -> dict[str, Any]:
    """Paired comparison of two cross-validations over the same photos (two summaries of ``summarize``):
    how many photos only one of them gets right, and the exact two-sided McNemar p-value of that split
    (a binomial test of the discordant photos at 1/2)."""
    for name, summary in (("first", a), ("second", b)):
        if "photo_correct" not in summary["policies"].get(policy, {}):
            raise InvalidInput(f"the {name} summary ({summary['recipe']}) has no per-photo results for policy "
                               f"{policy!r}; its runs predate them or did not evaluate that policy")
    left, right = a["policies"][policy]["photo_correct"], b["policies"][policy]["photo_correct"]
    if set(left) != set(right):
        raise InvalidInput(f"the two cross-validations validate on different photos ({len(set(left) ^ set(right))} "
                           "differ); compare runs of the same data and split seed")
    only_a = sum(1 for rel in left if left[rel] and not right[rel])
    only_b = sum(1 for rel in left if right[rel] and not left[rel])
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"policy": policy, "photos": len(left), "first": a["recipe"], "second": b["recipe"],
            "first_correct": sum(left.values()), "second_correct": sum(right.values()),
            "only_first": only_a, "only_second": only_b, "mcnemar_p": p}


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of ``summarize``'s result, its columns as wide as their widest cell."""
    rows = []
    for policy, p in summary["policies"].items():
        rows.append((policy, f"{p['accuracy']:.3f} ({p['correct']}/{p['count']})", f"{p['standard_error']:.3f}",
                     f"{p['log_loss']:.3f}" if p["log_loss"] is not None else "-",
                     " ".join(str(c) for c in p["per_fold_correct"])))
    header = ("policy", "pooled", "± s.e.", "log loss", "per fold (correct)")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return (f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:>{widths[2]}}  "
                f"{cells[3]:>{widths[3]}}  {cells[4]}")

    lines = [f"{summary['recipe']}: {summary['folds']}-fold cross-validation over {summary['photos']} photos "
             f"(split seed {summary['split_seed']})", "", line(header), *(line(row) for row in rows)]
    cut = summary.get("cut_short_folds") or []
    if cut:
        lines.append(f"fold{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))} of {summary['folds']} stopped "
                     f"at the time budget (each fold has its own): these figures are of the shortened "
                     f"run{'s' if len(cut) > 1 else ''}; finish with carclf train --resume RUN, then carclf crossval")
    return "\n".join(lines)
