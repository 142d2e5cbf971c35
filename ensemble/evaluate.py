"""Score the ensemble and each member, with and without TTA, on the training runs' validation split.

    python -m carclf.ensemble.evaluate --config ensemble/car_ensemble/config.pbtxt \
        --model-repository model_repository --train ../shared/data/cars10/train \
        --classes ../shared/data/cars10/classes.json --split runs/<run>/split.json \
        --out results/cars10_ensemble_eval.json --per-view --test ../shared/data/cars10/test_upload \
        --submission results/cars10_ensemble_submission.csv

Every figure comes from the ensemble runtime itself (``EnsembleRuntime`` over the SavedModels, same
decode, views, batching and aggregation as the served ensemble). Weighted-mean weights are fit by
stratified k-fold cross-validation over the validation photos: each photo is scored with weights fit on
the other folds only, so no photo is scored by weights that saw it.

Every argument (split file, policies, folds, output paths, test folder) is checked before any member loads:
a fault is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from carclf import contract, imaging
from carclf.cli import CommandParser
from carclf.destinations import check_file
from carclf.ensemble import aggregate as agg
from carclf.ensemble.config import EnsembleConfig, load_config
from carclf.ensemble.members import SavedModelMemberCaller
from carclf.ensemble.runtime import EnsembleRuntime
from carclf.errors import CarClfError, ConfigError, InvalidInput, os_error_line
from carclf.submission import write_submission as write_csv

CHUNK = 16  # photos per ensemble request


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> np.ndarray:
    """Fold index of every row: each class dealt round-robin over k folds after a seeded shuffle."""
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        rng.shuffle(rows)
        folds[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)  # keeps folds balanced in size across classes
    return folds


def cross_validated(member_probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, method: str
                    ) -> tuple[np.ndarray, list[list[float]]]:
    """Out-of-fold ensemble probabilities with weights fit on the other folds, and each fold's weights."""
    out = np.zeros(member_probs.shape[1:], np.float32)
    weights = []
    for f in np.unique(folds):
        held, fit = folds == f, folds != f
        w = agg.fit_weights(member_probs[:, fit], labels[fit], method=method)
        out[held] = agg.aggregate(method, member_probs[:, held], w)
        weights.append([round(float(x), 4) for x in w])
    return out, weights


def read_photo(path: Path, channel_order: str = "rgb") -> bytes:
    """One photo's bytes as the ensemble takes them: RGB (``bgr`` files are re-encoded, ``imaging.rgb_encoded``).
    A file that is not a usable photo (unreadable, refused by the header probe, or not decoding to the end) is
    refused naming the file."""
    from carclf.train.data import check_image_bytes

    try:
        data = path.read_bytes()
        check_image_bytes(data, min_side=contract.MIN_IMAGE_SIDE)  # the header's limits, then a whole decode
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc.message}") from None
    return imaging.rgb_encoded(data, channel_order)


def read_photos(paths: Sequence[Path], channel_order: str = "rgb") -> list[bytes]:
    """``read_photo`` of every path, in order."""
    return [read_photo(p, channel_order) for p in paths]


def run_policy(runtime: EnsembleRuntime, photos: Sequence[bytes], progress: bool = True
               ) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """(member probabilities [M, N, C], ensemble probabilities [N, C], member versions) through the runtime, for
    encoded photos (``read_photos``)."""
    from tqdm import tqdm

    members, ensemble, versions = [], [], None
    with tqdm(total=len(photos), desc=f"TTA {runtime.config.tta.name}", unit="photo", file=sys.stderr,
              disable=not progress) as bar:
        for start in range(0, len(photos), CHUNK):
            chunk = photos[start:start + CHUNK]
            result = runtime.predict(list(chunk))
            if result.degraded:
                missing = [f"{m.name}: {m.error.message}" for m in result.members if not m.answered]
                raise CarClfError(f"a member did not answer during evaluation: {missing}")
            members.append(np.stack([m.probabilities for m in result.members]))
            ensemble.append(result.probabilities)
            versions = [m.version for m in result.members]
            bar.update(len(chunk))
    return np.concatenate(members, axis=1), np.concatenate(ensemble), versions


def score(probs: np.ndarray, labels: np.ndarray) -> dict:
    pred = probs.argmax(-1)
    return {
        "accuracy": round(float((pred == labels).mean()), 4),
        "correct": int((pred == labels).sum()),
        "count": int(len(labels)),
        "log_loss": round(float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)))), 4),
    }


def evaluate(config: EnsembleConfig, repository: str | os.PathLike, photos: Sequence[bytes], labels: np.ndarray,
             policies: Sequence[str], folds: int, seed: int, progress: bool = True) -> dict:
    caller = SavedModelMemberCaller(repository)
    rows: list[dict] = []
    fitted: dict[str, list[float]] = {}
    versions: list[int | None] = []
    fold_of = stratified_folds(labels, folds, seed)
    for policy in policies:
        runtime = EnsembleRuntime(config.with_overrides(tta=policy, aggregation="mean", deadline_s=600.0), caller,
                                  owns_caller=False)
        runtime.prepare()
        start = time.monotonic()
        member_probs, mean_probs, versions = run_policy(runtime, photos, progress)
        seconds = time.monotonic() - start
        # The runtime's own aggregation must be the pure function's.
        np.testing.assert_allclose(mean_probs, agg.mean(member_probs), rtol=1e-5, atol=1e-6)
        for j, name in enumerate(config.member_names):
            rows.append({"model": name, "tta": policy, **score(member_probs[j], labels)})
        rows.append({"model": "ensemble (mean)", "tta": policy, **score(mean_probs, labels)})
        rows.append({"model": "ensemble (geometric mean)", "tta": policy,
                     **score(agg.geometric_mean(member_probs), labels)})
        for method in ("weighted_mean", "geometric_mean"):
            cv_probs, fold_weights = cross_validated(member_probs, labels, fold_of, method)
            title = "weighted mean" if method == "weighted_mean" else "weighted geometric mean"
            rows.append({"model": f"ensemble ({title}, {folds}-fold CV weights)", "tta": policy,
                         **score(cv_probs, labels), "fold_weights": fold_weights})
            fitted[f"{policy}/{method}"] = [round(float(x), 4)
                                            for x in agg.fit_weights(member_probs, labels, method=method)]
        rows[-1]["seconds"] = round(seconds, 1)
        runtime.close()
    caller.close()
    return {"rows": rows, "weights_fit_on_all_validation": fitted, "member_versions": versions}


def per_view(config: EnsembleConfig, repository: str | os.PathLike, photos: Sequence[bytes], labels: np.ndarray,
             policy: str = "hflip_crops", progress: bool = True) -> dict:
    """Each member on each single view of ``policy`` (why a TTA policy helps or hurts), plus a paired sign
    test of the mirrored full view against the full view on the true class's probability."""
    from math import comb

    from carclf.tta import TTAPolicy, get_policy

    caller = SavedModelMemberCaller(repository)
    true_prob: dict[str, dict[str, np.ndarray]] = {m: {} for m in config.member_names}
    out: dict = {"policy": policy, "views": {}}
    for view in get_policy(policy).views:
        single = TTAPolicy(view.name, (view,))
        runtime = EnsembleRuntime(config.with_overrides(tta=single, deadline_s=600.0), caller, owns_caller=False)
        runtime.prepare()
        member_probs, _, _ = run_policy(runtime, photos, progress)
        runtime.close()
        out["views"][view.name] = {name: score(member_probs[j], labels) for j, name in enumerate(config.member_names)}
        for j, name in enumerate(config.member_names):
            true_prob[name][view.name] = member_probs[j][np.arange(len(labels)), labels]
    caller.close()
    n = len(labels)
    out["mirror_sign_test"] = {}
    for name, probs in true_prob.items():
        if "full" in probs and "full_flip" in probs:
            lower = int((probs["full_flip"] < probs["full"]).sum())
            out["mirror_sign_test"][name] = {
                "mirrored_view_lowers_true_class_probability": f"{lower}/{n}",
                "mean_change": round(float((probs["full_flip"] - probs["full"]).mean()), 4),
                "one_sided_p": float(f"{sum(comb(n, k) for k in range(lower, n + 1)) / 2 ** n:.2g}"),
            }
    return out


def verdict(report: dict, policy: str) -> dict:
    """Does the ensemble with TTA beat its best member with TTA (accuracy, then log loss)?"""
    rows = [r for r in report["rows"] if r["tta"] == policy]
    members = [r for r in rows if not r["model"].startswith("ensemble")]
    best = max(members, key=lambda r: (r["accuracy"], -r["log_loss"]))
    out = {"policy": policy, "best_member": best["model"], "best_member_accuracy": best["accuracy"],
           "best_member_log_loss": best["log_loss"]}
    for r in rows:
        if r["model"].startswith("ensemble"):
            out[r["model"]] = {"accuracy": r["accuracy"], "log_loss": r["log_loss"],
                               "beats_best_member": (r["accuracy"], -r["log_loss"]) > (best["accuracy"],
                                                                                      -best["log_loss"])}
    return out


def markdown(report: dict) -> str:
    lines = ["| model | TTA | accuracy | correct | log loss |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['tta']} | {r['accuracy']:.4f} | {r['correct']}/{r['count']} | "
                     f"{r['log_loss']:.4f} |")
    return "\n".join(lines)


def per_view_markdown(data: dict) -> str:
    members = list(next(iter(data["views"].values())))
    lines = ["| view | " + " | ".join(members) + " |", "|---|" + "---|" * len(members)]
    for view, scores in data["views"].items():
        lines.append(f"| {view} | " + " | ".join(f"{scores[m]['accuracy']:.4f}" for m in members) + " |")
    for name, test in data.get("mirror_sign_test", {}).items():
        lines.append(f"\n{name}: mirrored view lowers the true class's probability on "
                     f"{test['mirrored_view_lowers_true_class_probability']} photos (mean change "
                     f"{test['mean_change']:+.4f}, one-sided sign test p = {test['one_sided_p']})")
    return "\n".join(lines)


def write_submission(config: EnsembleConfig, repository, folder: Path, class_ids: Sequence[str], out: Path,
                     progress: bool = True, channel_order: str = "rgb") -> int:
    """Kaggle CSV (Id,Category) for a folder of photos, through the configured ensemble."""
    from carclf.train.data import list_photos

    photos = list_photos(folder, warn=False)  # main() has checked every photo (check_test_folder) and named the rest
    runtime = EnsembleRuntime(config.with_overrides(deadline_s=600.0), SavedModelMemberCaller(repository))
    runtime.prepare()
    ids = []
    from tqdm import tqdm

    with tqdm(total=len(photos), desc="submission", unit="photo", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(photos), CHUNK):
            chunk = photos[start:start + CHUNK]
            result = runtime.predict(read_photos(chunk, channel_order))
            if result.degraded:
                raise CarClfError("a member did not answer while writing the submission")
            ids.extend(result.class_ids.tolist())
            bar.update(len(chunk))
    runtime.close()
    return write_csv(out, ((p.name, class_ids[i]) for p, i in zip(photos, ids, strict=True)))


def parse_policies(text: str) -> list[str]:
    """The TTA policy names of ``--policies``: each known, at least one, none repeated (a repeat would
    give duplicate rows and weight keys)."""
    from carclf.tta import policy_names

    names = policy_names(text, "--policies")
    if len(set(names)) < len(names):
        raise ConfigError(f"--policies {text!r} names a policy twice")
    return names


def check_test_folder(folder: Path, channel_order: str = "rgb") -> None:
    """Refuse, before any work, a ``--test`` that is not a folder of photos, or holds a file that is not a
    usable photo (named)."""
    from carclf.train.data import list_photos

    try:
        for photo in list_photos(folder):
            read_photo(photo, channel_order)
    except CarClfError as exc:
        raise ConfigError(f"--test: {exc.message}") from None


DEFAULT_SUBMISSION = Path("results/cars10_ensemble_submission.csv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m carclf.ensemble.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("ensemble/car_ensemble/config.pbtxt"),
                        help="the ensemble's config.pbtxt (default: %(default)s)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="where its members' SavedModels are (<name>/<version>/; default: %(default)s)")
    parser.add_argument("--train", type=Path, required=True, help="train/<class id>/<photo> folder")
    parser.add_argument("--classes", type=Path, default=None, help="classes.json")
    parser.add_argument("--split", type=Path, required=True, help="split.json written by the training run(s)")
    parser.add_argument("--policies", default="none,hflip,hflip_crops",
                        help="comma-separated TTA policies to score (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5,
                        help="folds of the validation photos over which weighted-mean weights are fit, each photo "
                             "scored by weights fit on the others (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of those folds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results/cars10_ensemble_eval.json"),
                        help="the report as JSON, with a Markdown table beside it (.md) (default: %(default)s)")
    parser.add_argument("--test", type=Path, default=None, help="unlabelled photo folder for a submission")
    parser.add_argument("--submission", type=Path, default=None,
                        help=f"where the --test submission goes (default: {DEFAULT_SUBMISSION})")
    parser.add_argument("--per-view", action="store_true",
                        help="also score every member on each single view of hflip_crops (why TTA helps or not)")
    parser.add_argument("--channel-order", choices=imaging.CHANNEL_ORDERS, default="rgb",
                        help="how the photo files (--train and --test) store colours: bgr for a data set saved with red "
                             "and blue swapped, such as cars10 (default: rgb)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        from carclf.train.data import load_split, read_folder_layout

        policies = parse_policies(args.policies)
        if args.folds < 2:
            raise ConfigError(f"--folds must be >= 2, received {args.folds}")
        check_file(args.out, "--out")
        check_file(args.out.with_suffix(".md"), "--out")
        if args.submission is not None and args.test is None:
            raise ConfigError(f"--submission {str(args.submission)!r} needs --test, the photo folder to predict")
        if args.test is not None:
            args.submission = args.submission or DEFAULT_SUBMISSION
            check_test_folder(args.test, args.channel_order)
            check_file(args.submission, "--submission")
        config = load_config(args.config)
        dataset = read_folder_layout(args.train, args.classes)
        split = load_split(args.split, dataset)
        if not split.val:
            raise ConfigError(f"--split {str(args.split)!r} holds no validation photos (its run trained on all of "
                              "them): there is nothing to score")
        if args.folds > len(split.val):
            raise ConfigError(f"--folds {args.folds} is more than the {len(split.val)} validation photos of --split "
                              f"{str(args.split)!r}: some folds would hold no photo (choose at most {len(split.val)})")
        photos = read_photos([Path(s.path) for s in split.val], args.channel_order)
        labels = np.asarray([s.label for s in split.val], dtype=np.int64)
        report = evaluate(config, args.model_repository, photos, labels, policies, args.folds, args.seed,
                          progress=not args.quiet)
        report.update({
            "config": str(args.config), "split": str(args.split), "validation_photos": len(photos),
            "members": list(config.member_names), "folds": args.folds, "fold_seed": args.seed,
            "channel_order": args.channel_order,
            "verdicts": [verdict(report, p) for p in policies],
        })
        if args.per_view:
            report["per_view"] = per_view(config, args.model_repository, photos, labels, progress=not args.quiet)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        table = markdown(report)
        if "per_view" in report:
            table += "\n\n" + per_view_markdown(report["per_view"])
        args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
        print(table)
        for v in report["verdicts"]:
            print(json.dumps(v))
        print(f"weights fit on the whole validation split (for deployment): {report['weights_fit_on_all_validation']}")
        if args.test is not None:
            n = write_submission(config, args.model_repository, args.test, dataset.class_ids, args.submission,
                                 progress=not args.quiet, channel_order=args.channel_order)
            print(f"wrote {n} rows to {args.submission} with {config.name} as configured "
                  f"(tta {config.tta.name}, {config.aggregation}, weights {list(config.weights)})")
        return 0
    except CarClfError as exc:
        print(f"carclf.ensemble.evaluate: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"carclf.ensemble.evaluate: error: {os_error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
