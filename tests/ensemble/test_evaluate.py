"""The ensemble evaluation: honest cross-validated weights and an end-to-end run on the tiny models."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from carclf.ensemble import aggregate as agg
from carclf.ensemble import evaluate as ev
from carclf.ensemble.config import render


def test_stratified_folds_are_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    folds = ev.stratified_folds(labels, 5, seed=3)
    assert np.array_equal(folds, ev.stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, ev.stratified_folds(labels, 5, seed=4))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for cls in range(4):  # every class spread over the folds as evenly as it can be
        per_fold = np.bincount(folds[labels == cls], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_cross_validated_weights_never_see_the_rows_they_score():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=30)
    probs = rng.dirichlet(np.ones(3), size=(2, 30)).astype(np.float32)
    folds = ev.stratified_folds(labels, 3, seed=0)
    out, weights = ev.cross_validated(probs, labels, folds, "weighted_mean")
    for f, w in enumerate(weights):
        held = folds == f
        fit_elsewhere = agg.fit_weights(probs[:, ~held], labels[~held])
        assert w == [round(float(x), 4) for x in fit_elsewhere]
        np.testing.assert_allclose(out[held], agg.weighted_mean(probs[:, held], fit_elsewhere), rtol=1e-6)
    # changing the labels of one fold does not change the weights used on that fold
    other = labels.copy()
    other[folds == 0] = (other[folds == 0] + 1) % 3
    _, weights_other = ev.cross_validated(probs, other, folds, "weighted_mean")
    assert weights_other[0] == weights[0]


def test_evaluation_end_to_end_on_the_tiny_models(tiny_repository_template, sample_dir, tmp_path, capsys):
    from carclf.train.data import read_folder_layout, save_split, stratified_split

    dataset = read_folder_layout(sample_dir / "train", sample_dir / "classes.json")
    split_path = tmp_path / "split.json"
    save_split(stratified_split(dataset.samples, 0.5, seed=1), split_path)
    config = tmp_path / "e" / "config.pbtxt"
    config.parent.mkdir()
    config.write_text(render("e", ["tiny_a", "tiny_b"], parameters={"tta_policy": "hflip"}))
    out, submission = tmp_path / "eval.json", tmp_path / "sub.csv"
    code = ev.main(["--config", str(config), "--model-repository", str(tiny_repository_template),
                    "--train", str(sample_dir / "train"), "--classes", str(sample_dir / "classes.json"),
                    "--split", str(split_path), "--policies", "none,hflip", "--folds", "2", "--out", str(out),
                    "--test", str(sample_dir / "test_upload"), "--submission", str(submission), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    val = len(json.loads(split_path.read_text())["val"])
    assert report["validation_photos"] == val
    models = {(r["model"], r["tta"]) for r in report["rows"]}
    for policy in ("none", "hflip"):
        assert {("tiny_a", policy), ("tiny_b", policy), ("ensemble (mean)", policy)} <= models
    assert all(r["count"] == val and 0 <= r["accuracy"] <= 1 for r in report["rows"])
    assert [v["policy"] for v in report["verdicts"]] == ["none", "hflip"]
    assert "| ensemble (mean) | hflip |" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("| model | TTA |")
    rows = list(csv.reader(submission.open()))
    assert rows[0] == ["Id", "Category"] and len(rows) == 11
    assert {r[1] for r in rows[1:]} <= set(dataset.class_ids)


def test_evaluation_reports_bad_arguments_in_one_line(tmp_path, capsys):
    code = ev.main(["--train", str(tmp_path / "nope"), "--split", str(tmp_path / "split.json"), "--config",
                    str(tmp_path / "missing.pbtxt")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pbtxt" in err[0]


@pytest.fixture
def refused(tiny_repository_template, sample_dir, tmp_path, monkeypatch, capsys):
    """refused({flag: value}) -> the one stderr line of a run over the tiny models and a real split (20 validation
    photos at tmp_path/split.json) that must exit 2 before any member loads and without writing a file."""
    from carclf.train.data import read_folder_layout, save_split, stratified_split

    dataset = read_folder_layout(sample_dir / "train", sample_dir / "classes.json")
    save_split(stratified_split(dataset.samples, 0.5, seed=1), tmp_path / "split.json")
    config = tmp_path / "e" / "config.pbtxt"
    config.parent.mkdir()
    config.write_text(render("e", ["tiny_a", "tiny_b"]))

    def no_member(*args, **kwargs):
        raise AssertionError("a member was loaded before the arguments were checked")

    monkeypatch.setattr(ev, "SavedModelMemberCaller", no_member)

    def run(flags: dict[str, str]) -> str:
        argv = {"--config": str(config), "--model-repository": str(tiny_repository_template),
                "--train": str(sample_dir / "train"), "--classes": str(sample_dir / "classes.json"),
                "--split": str(tmp_path / "split.json"), "--out": str(tmp_path / "out" / "eval.json"), **flags}
        before = sorted(tmp_path.rglob("*"))
        capsys.readouterr()
        code = ev.main([*(x for item in argv.items() for x in item), "--quiet"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "Traceback" not in captured.err, captured.err
        assert err[0].startswith("carclf.ensemble.evaluate: error: ")
        assert sorted(tmp_path.rglob("*")) == before  # nothing written
        return err[0]

    return run


BAD_SPLITS = {
    "broken JSON": ('{"train": [', "is not a split file (not valid JSON"),
    "no train list": ('{"val": [["0/a.jpg", 0]], "seed": 1, "val_fraction": 0.5}', "field 'train': missing"),
    "a JSON list": ('[["0/a.jpg", 0]]', "expected a JSON object with \"train\" and \"val\" lists, found a list"),
    "a one-element row": ('{"train": [["0/a.jpg"]], "val": [], "seed": 1, "val_fraction": 0.5}',
                          "field 'train[0]': expected [file, label], found ['0/a.jpg']"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPLITS))
def test_a_bad_split_file_is_one_line_naming_it(refused, tmp_path, case):
    text, needle = BAD_SPLITS[case]
    bad = tmp_path / "bad_split.json"
    bad.write_text(text)
    line = refused({"--split": str(bad)})
    assert f"{bad}: " in line and needle in line


def test_a_missing_split_file_is_one_line_naming_it(refused, tmp_path):
    line = refused({"--split": str(tmp_path / "nope.json")})
    assert f"{tmp_path / 'nope.json'}: cannot read the split file: No such file or directory" in line


def test_a_split_without_validation_photos_is_refused(refused, tmp_path):
    split = json.loads((tmp_path / "split.json").read_text())
    split["train"] += split["val"]
    split["val"] = []
    (tmp_path / "all_train.json").write_text(json.dumps(split))
    line = refused({"--split": str(tmp_path / "all_train.json")})
    assert f"--split {str(tmp_path / 'all_train.json')!r} holds no validation photos" in line


def test_output_paths_are_checked_before_any_model_loads(refused, tmp_path, sample_dir):
    under_file = tmp_path / "split.json" / "e.json"
    line = refused({"--out": str(under_file)})
    assert f"--out {str(under_file)!r} cannot be created: {str(tmp_path / 'split.json')!r} is a file" in line
    line = refused({"--out": str(tmp_path / "e")})
    assert f"--out {str(tmp_path / 'e')!r} is a folder" in line
    line = refused({"--test": str(sample_dir / "test_upload"), "--submission": str(under_file)})
    assert f"--submission {str(under_file)!r} cannot be created" in line
    line = refused({"--test": str(tmp_path / "nonexist")})
    assert f"--test: photo folder {str(tmp_path / 'nonexist')!r} does not exist" in line
    bad = tmp_path / "test_photos"  # a test folder with a file that is no photo: refused naming the file
    shutil.copytree(sample_dir / "test_upload", bad)
    (bad / "empty.jpg").write_bytes(b"")
    line = refused({"--test": str(bad)})
    assert line.endswith(f"--test: {bad / 'empty.jpg'}: image is empty (0 bytes)")
    cut = next(p for p in sorted(bad.glob("*.jpg")) if p.stat().st_size)
    (bad / "empty.jpg").unlink()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    line = refused({"--test": str(bad)})
    assert f"--test: {cut}: does not decode (truncated or corrupt): " in line
    sub = tmp_path / "sub.csv"  # a submission asked for without the photos to predict: refused, not ignored
    line = refused({"--submission": str(sub)})
    assert f"--submission {str(sub)!r} needs --test, the photo folder to predict" in line
    too_long = tmp_path / ("x" * 300 + ".json")  # an OSError is one line too, not a traceback
    assert refused({"--out": str(too_long)}).endswith(f"File name too long: {too_long}")


@pytest.mark.parametrize("policies,needle", [
    (",", "--policies ',' names no TTA policy"),
    ("none,bogus", "--policies 'none,bogus': unknown TTA policy 'bogus'; expected a comma-separated list of"),
    ("none, none", "--policies 'none, none' names a policy twice"),
])
def test_policies_are_checked_before_any_model_loads(refused, policies, needle):
    assert needle in refused({"--policies": policies})


def test_folds_must_not_outnumber_the_validation_photos(refused, tmp_path):
    line = refused({"--folds": "100"})
    assert f"--folds 100 is more than the 20 validation photos of --split {str(tmp_path / 'split.json')!r}" in line
    assert "--folds must be >= 2, received 1" in refused({"--folds": "1"})


def _figures(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, correct, count and log loss, computed here rather than by the evaluation's own ``score``."""
    hits = int(sum(int(np.argmax(p)) == int(y) for p, y in zip(probs, labels, strict=True)))
    true = np.array([max(float(p[y]), 1e-7) for p, y in zip(probs, labels, strict=True)])
    return {"accuracy": round(hits / len(labels), 4), "correct": hits, "count": len(labels),
            "log_loss": round(float(-np.log(true).mean()), 4)}


def test_evaluation_figures_are_each_members_and_each_policys(tiny_repository_template, sample_dir, tmp_path,
                                                             monkeypatch):
    """Each row's figures are those of that member (or that aggregate) on that TTA policy's views, the fitted
    weights are fit by each aggregation's own method, --folds may be as many as the validation photos, and with
    --test alone the submission goes to results/cars10_ensemble_submission.csv, predicted by the ensemble as
    configured (its TTA policy and weights)."""
    from carclf.ensemble.config import load_config
    from carclf.ensemble.members import SavedModelMemberCaller
    from carclf.ensemble.runtime import EnsembleRuntime
    from carclf.train.data import load_split, read_folder_layout, save_split, stratified_split

    dataset = read_folder_layout(sample_dir / "train", sample_dir / "classes.json")
    split_path = tmp_path / "split.json"
    save_split(stratified_split(dataset.samples, 0.25, seed=2), split_path)
    val = load_split(split_path, dataset).val
    images = [open(s.path, "rb").read() for s in val]
    labels = np.array([s.label for s in val])
    config_path = tmp_path / "e" / "config.pbtxt"
    config_path.parent.mkdir()
    config_path.write_text(render("e", ["tiny_a", "tiny_b"], parameters={
        "tta_policy": "hflip_crops", "aggregation": "weighted_mean", "weight.tiny_a": "3", "weight.tiny_b": "1"}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert ev.main(["--config", str(config_path), "--model-repository", str(tiny_repository_template),
                    "--train", str(sample_dir / "train"), "--classes", str(sample_dir / "classes.json"),
                    "--split", str(split_path), "--policies", "none,hflip", "--folds", str(len(val)),
                    "--out", str(out), "--test", str(sample_dir / "test_upload"), "--quiet"]) == 0
    report = json.loads(out.read_text())
    rows = {(r["model"], r["tta"]): r for r in report["rows"]}
    config = load_config(config_path)
    caller = SavedModelMemberCaller(tiny_repository_template)
    try:
        for policy in ("none", "hflip"):
            runtime = EnsembleRuntime(config.with_overrides(tta=policy), caller, owns_caller=False)
            runtime.prepare()
            members = np.stack([m.probabilities for m in runtime.predict(images).members])
            runtime.close()
            expected = [*zip(("tiny_a", "tiny_b"), members, strict=True), ("ensemble (mean)", members.mean(0)),
                        ("ensemble (geometric mean)", agg.geometric_mean(members))]
            for model, probs in expected:
                want, got = _figures(probs, labels), rows[model, policy]
                assert (got["accuracy"], got["correct"], got["count"]) == (want["accuracy"], want["correct"],
                                                                           want["count"]), (model, policy)
                assert got["log_loss"] == pytest.approx(want["log_loss"], abs=2e-4), (model, policy)
            for method in ("weighted_mean", "geometric_mean"):
                want = [round(float(x), 4) for x in agg.fit_weights(members, labels, method=method)]
                assert report["weights_fit_on_all_validation"][f"{policy}/{method}"] == want
        test_photos = sorted(p for p in (sample_dir / "test_upload").iterdir() if p.is_file())
        with EnsembleRuntime(config, caller, owns_caller=False) as runtime:
            runtime.prepare()
            want_ids = runtime.predict([p.read_bytes() for p in test_photos]).class_ids.tolist()
    finally:
        caller.close()
    submission = tmp_path / "results" / "cars10_ensemble_submission.csv"
    rows_csv = list(csv.reader(submission.open()))[1:]
    assert dict(rows_csv) == {p.name: dataset.class_ids[i] for p, i in zip(test_photos, want_ids, strict=True)}


def test_verdict_names_the_best_member_and_only_strict_wins():
    """The best member is the most accurate (log loss breaks a tie); an ensemble that only ties it does not beat
    it."""
    def row(model, accuracy, log_loss):
        return {"model": model, "tta": "hflip", "accuracy": accuracy, "log_loss": log_loss}

    report = {"rows": [row("a", 0.6, 0.9), row("b", 0.8, 0.7), row("c", 0.8, 0.5),
                       row("ensemble (mean)", 0.8, 0.5), row("ensemble (geometric mean)", 0.8, 0.4),
                       row("x", 1.0, 0.0) | {"tta": "none"}]}
    got = ev.verdict(report, "hflip")
    assert (got["best_member"], got["best_member_accuracy"], got["best_member_log_loss"]) == ("c", 0.8, 0.5)
    assert got["ensemble (mean)"]["beats_best_member"] is False
    assert got["ensemble (geometric mean)"]["beats_best_member"] is True


def test_a_markdown_path_that_is_a_folder_is_refused_before_any_model_loads(refused, tmp_path):
    (tmp_path / "out" / "eval.md").mkdir(parents=True)
    line = refused({})
    assert f"--out {str(tmp_path / 'out' / 'eval.md')!r} is a folder" in line


def test_per_view_scores_each_view_and_counts_where_the_mirror_lowers_the_true_class(tiny_repository_template,
                                                                                    photo_bytes):
    """--per-view: each member scored on each single view, and the sign test counts the photos whose mirrored view
    gives the true class a LOWER probability than the full view."""
    from math import comb

    from carclf.ensemble.config import parse_config
    from carclf.ensemble.members import SavedModelMemberCaller
    from carclf.ensemble.runtime import EnsembleRuntime
    from carclf.tta import TTAPolicy, get_policy

    config = parse_config(render("e", ["tiny_a", "tiny_b"]))
    images, labels = photo_bytes[:8], np.arange(8) % 3
    got = ev.per_view(config, tiny_repository_template, images, labels, policy="hflip", progress=False)
    true_prob = {}
    caller = SavedModelMemberCaller(tiny_repository_template)
    try:
        for view in get_policy("hflip").views:
            runtime = EnsembleRuntime(config.with_overrides(tta=TTAPolicy(view.name, (view,))), caller,
                                      owns_caller=False)
            runtime.prepare()
            members = runtime.predict(images).members
            runtime.close()
            for m in members:
                true_prob[m.name, view.name] = m.probabilities[np.arange(8), labels]
                assert got["views"][view.name][m.name]["correct"] == int((m.probabilities.argmax(-1) == labels).sum())
    finally:
        caller.close()
    for name in ("tiny_a", "tiny_b"):
        full, flip = true_prob[name, "full"], true_prob[name, "full_flip"]
        lower = int(sum(f < p for f, p in zip(flip, full, strict=True)))
        test = got["mirror_sign_test"][name]
        assert test["mirrored_view_lowers_true_class_probability"] == f"{lower}/8"
        assert test["mean_change"] == pytest.approx(float(np.mean(flip - full)), abs=1e-4)
        assert test["one_sided_p"] == pytest.approx(sum(comb(8, k) for k in range(lower, 9)) / 256, rel=0.05)


def test_an_evaluation_stops_when_a_member_does_not_answer(tiny_repository_template, runtime_for, photo_bytes):
    """Under failure_policy 'degrade' the ensemble answers without a member that is down; an evaluation must not
    score that answer as the ensemble's: it stops, naming the member and its error."""
    from carclf.errors import CarClfError, Unavailable
    from tests.ensemble.callers import RecordingCaller

    caller = RecordingCaller(tiny_repository_template, failures={"tiny_b": [Unavailable("tiny_b is down")] * 20})
    runtime = runtime_for(caller=caller, failure_policy="degrade", quorum="1")
    with pytest.raises(CarClfError, match=r"a member did not answer during evaluation: \['tiny_b: tiny_b is down"):
        ev.run_policy(runtime, photo_bytes[:2], progress=False)


def test_the_submission_uses_the_configured_tta_policy(tiny_repository_template, sample_dir, tmp_path):
    """``--test`` writes the ensemble's answers as configured: tiny_a version 1 alone under hflip_crops changes its
    class for some test photos, and the CSV holds the hflip_crops classes."""
    from carclf.ensemble.config import parse_config
    from carclf.ensemble.members import SavedModelMemberCaller
    from carclf.ensemble.runtime import EnsembleRuntime
    from carclf.train.data import list_photos

    photos = list_photos(sample_dir / "test_upload")
    images = [p.read_bytes() for p in photos]
    latest = 'model_name: "tiny_a"\n    model_version: -1'
    text = render("e", ["tiny_a"], parameters={"tta_policy": "hflip_crops"})
    assert text.count(latest) == 1
    config = parse_config(text.replace(latest, 'model_name: "tiny_a"\n    model_version: 1'))
    answers = {}
    for policy in ("hflip_crops", "none"):
        with EnsembleRuntime(config.with_overrides(tta=policy), SavedModelMemberCaller(tiny_repository_template)) \
                as runtime:
            runtime.prepare()
            answers[policy] = runtime.predict(images).class_ids.tolist()
    assert answers["hflip_crops"] != answers["none"]  # the policy matters for these photos
    class_ids = [str(i) for i in range(10)]
    out = tmp_path / "submission.csv"
    ev.write_submission(config, tiny_repository_template, sample_dir / "test_upload", class_ids, out, progress=False)
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["Id", "Category"]
    assert rows[1:] == [[p.name, class_ids[i]] for p, i in zip(photos, answers["hflip_crops"], strict=True)]
