"""A data set stored with red and blue swapped (``data.channel_order: bgr``, as cars10 is) is read back as RGB
everywhere the product reads photos: training, evaluation, submissions and pseudo-labels, the ensemble's
evaluation. Each is checked against the data set's true-colour twin."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from carclf import contract, imaging
from carclf.cli import main as carclf_main
from carclf.ensemble import evaluate as ensemble_evaluate
from carclf.ensemble.config import render
from carclf.train import data, loop, pipeline, runs
from carclf.train.recipe import parse_recipe
from tests.train.conftest import tiny_recipe


def _decode(payload: bytes) -> np.ndarray:
    import tensorflow as tf

    return imaging.decode_image(tf.constant(payload)).numpy()


def _swapped_twin(source: Path, target: Path) -> Path:
    """Every photo under ``source`` decoded, red and blue swapped and saved losslessly (PNG bytes, same name)."""
    import tensorflow as tf

    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".jpg":
            out.write_bytes(tf.io.encode_png(_decode(path.read_bytes())[..., ::-1]).numpy())
        else:
            out.write_bytes(path.read_bytes())
    return target


@pytest.fixture(scope="module")
def bgr_sample(tmp_path_factory) -> Path:
    """data/sample with its colours swapped: what cars10's files look like next to true-colour photos."""
    from tests.fixtures import SAMPLE_DIR

    return _swapped_twin(SAMPLE_DIR, tmp_path_factory.mktemp("bgr") / "sample")


def test_rgb_encoded_turns_bgr_bytes_into_exact_rgb_pixels(sample_dir):
    payload = sorted((sample_dir / "train" / "3").glob("*.jpg"))[0].read_bytes()
    assert imaging.rgb_encoded(payload, "rgb") is payload
    stored = _decode(payload)
    assert np.array_equal(_decode(imaging.rgb_encoded(payload, "bgr")), stored[..., ::-1])
    assert np.array_equal(imaging.to_rgb(stored, "bgr"), stored[..., ::-1])
    with pytest.raises(ValueError, match="unknown channel order 'brg'"):
        imaging.rgb_encoded(payload, "brg")


def test_training_pipeline_reads_bgr_files_as_their_twin(sample_dir, bgr_sample):
    twin = data.read_folder_layout(sample_dir / "train").samples[:6]
    swapped = data.read_folder_layout(bgr_sample / "train").samples[:6]

    def pixels(samples, order):
        return np.stack([image.numpy() for image, _ in pipeline.prepared_images(samples, (24, 40), channel_order=order)])

    expected = pixels(twin, "rgb")
    assert np.array_equal(pixels(swapped, "bgr"), expected)
    assert not np.array_equal(pixels(swapped, "rgb"), expected)


def _labels_csv(tmp_path: Path, model: Path, photos: Path, *extra: str) -> list[list[str]]:
    out = tmp_path / f"labels{len(list(tmp_path.glob('labels*')))}.csv"
    assert carclf_main(["pseudo-label", str(model), str(photos), "--out", str(out), "--min-confidence", "0",
                        "--tta", "hflip", *extra]) == 0
    return list(csv.reader(out.open()))


def _evaluation(tmp_path: Path, model: Path, *extra: str, every: bool = True) -> dict:
    """``carclf evaluate`` of every photo (``--all``), or with ``every=False`` of the run's validation photos."""
    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"
    assert carclf_main(["evaluate", str(model), "--tta", "none", *(["--all"] if every else []), "--out", str(out),
                        *extra]) == 0
    return json.loads(next(out.glob("*.json")).read_text())


def test_savedmodel_predictions_of_bgr_photos_equal_their_twins(tiny_repository_template, sample_dir, bgr_sample,
                                                                tmp_path, capsys):
    model = tiny_repository_template / "tiny_a"  # a random CNN: its answers depend on colour
    twin = _labels_csv(tmp_path, model, sample_dir / "test_upload")
    assert len(twin) == 1 + len(list((sample_dir / "test_upload").glob("*.jpg")))
    assert _labels_csv(tmp_path, model, bgr_sample / "test_upload", "--channel-order", "bgr") == twin
    assert _labels_csv(tmp_path, model, bgr_sample / "test_upload") != twin  # read as stored: wrong colours

    expected = _evaluation(tmp_path, model, "--data", str(sample_dir / "train"))["policies"]["none"]
    declared = _evaluation(tmp_path, model, "--data", str(bgr_sample / "train"), "--channel-order", "bgr")
    as_stored = _evaluation(tmp_path, model, "--data", str(bgr_sample / "train"))  # --data: rgb unless told
    assert declared["channel_order"] == "bgr" and as_stored["channel_order"] == "rgb"
    assert declared["policies"]["none"]["log_loss"] == pytest.approx(expected["log_loss"], abs=1e-5)
    # A random CNN is nearly uniform over ten classes: the change is small, but a hundred times the tolerance.
    assert as_stored["policies"]["none"]["log_loss"] != pytest.approx(expected["log_loss"], abs=1e-5)

    with pytest.raises(SystemExit):  # an unknown order is refused by the command line, naming the choices
        carclf_main(["submit", str(model), str(bgr_sample / "test_upload"), "--channel-order", "grb"])
    assert "invalid choice: 'grb'" in capsys.readouterr().err


def test_ensemble_evaluation_reads_bgr_photos_as_their_twins(tiny_repository_template, sample_dir, bgr_sample,
                                                             tmp_path):
    config = tmp_path / "e" / "config.pbtxt"
    config.parent.mkdir()
    config.write_text(render("e", ["tiny_a", "tiny_b"], parameters={"tta_policy": "hflip"}))
    split = tmp_path / "split.json"
    data.save_split(data.stratified_split(data.read_folder_layout(sample_dir / "train").samples, 0.3, seed=1), split)

    def report(root: Path, *extra: str) -> tuple[list[dict], list[list[str]]]:
        out, submission = tmp_path / f"{root.parent.name}{len(extra)}.json", tmp_path / f"{root.parent.name}{len(extra)}.csv"
        assert ensemble_evaluate.main(["--config", str(config), "--model-repository", str(tiny_repository_template),
                                       "--train", str(root / "train"), "--split", str(split), "--policies", "hflip",
                                       "--folds", "2", "--out", str(out), "--test", str(root / "test_upload"),
                                       "--submission", str(submission), "--quiet", *extra]) == 0
        return json.loads(out.read_text())["rows"], list(csv.reader(submission.open()))

    rows, submission = report(sample_dir)
    bgr_rows, bgr_submission = report(bgr_sample, "--channel-order", "bgr")
    assert bgr_submission == submission
    assert [(r["model"], r["correct"]) for r in bgr_rows] == [(r["model"], r["correct"]) for r in rows]
    for r, b in zip(rows, bgr_rows, strict=True):
        assert b["log_loss"] == pytest.approx(r["log_loss"], abs=1e-6)
    stored_rows, _ = report(bgr_sample)
    assert [r["log_loss"] for r in stored_rows] != pytest.approx([r["log_loss"] for r in rows], abs=1e-5)


@pytest.mark.slow
def test_a_run_on_bgr_data_records_and_uses_its_channel_order(bgr_sample, tmp_path, capsys):
    recipe = tiny_recipe(bgr_sample, stages=[{"name": "all", "epochs": 1, "lr": 1e-3, "batch_size": 4,
                                              "image_size": 32, "unfreeze": "all"}])
    recipe["data"]["channel_order"] = "bgr"
    run = loop.train(parse_recipe(recipe, source="bgr"), runs_root=tmp_path / "runs", verbose=0)
    assert runs.read_json(run / runs.RUN_INFO)["data_channel_order"] == "bgr"
    stored = runs.read_json(run / runs.METRICS)["policies"]["none"]

    # `carclf evaluate` of the run reads its own data as the recipe declares, so it reproduces the run's figures.
    evaluated = _evaluation(tmp_path, run, every=False)
    assert evaluated["channel_order"] == "bgr" and evaluated["policies"]["none"]["count"] == stored["count"]
    assert evaluated["policies"]["none"]["log_loss"] == pytest.approx(stored["log_loss"], abs=1e-4)

    # The export records how its training photos were stored, and its evaluation reads them the same way.
    repo = tmp_path / "model_repository"
    assert carclf_main(["export", str(run), "--repository", str(repo), "--name", "tiny"]) == 0
    card = json.loads((repo / "tiny" / "1" / "assets.extra" / contract.MODEL_CARD).read_text())
    assert card["data_channel_order"] == "bgr" and card["config"]["data"]["channel_order"] == "bgr"
    exported = _evaluation(tmp_path, repo / "tiny", every=False)
    assert exported["channel_order"] == "bgr" and exported["policies"]["none"]["count"] == stored["count"]
    assert exported["policies"]["none"]["log_loss"] == pytest.approx(stored["log_loss"], abs=1e-4)


@pytest.mark.parametrize("extra,expected", [
    ((), "bgr"),                                              # the recipe's own photos, as it declares
    (("--data", "{data}"), "rgb"),                            # another folder is read as stored unless told
    (("--data", "{data}", "--channel-order", "bgr"), "bgr"),
    (("--channel-order", "rgb"), "rgb"),
])
def test_train_reads_the_recipes_order_for_its_own_data_only(sample_dir, extra, expected):
    from carclf.cli import build_parser
    from carclf.train.commands.train import recipe_from

    argv = ["train", "mobilenet_v2_224x448", *(a.replace("{data}", str(sample_dir / "train")) for a in extra)]
    assert recipe_from(build_parser("train").parse_args(argv)).data.channel_order == expected


def test_a_submission_of_bgr_photos_equals_their_twins(tiny_repository_template, sample_dir, bgr_sample, tmp_path):
    """``carclf submit --channel-order bgr`` (cars10's test_upload) writes the categories of the true-colour twins;
    for this model and policy two photos change class when read in the wrong colours."""
    model = str(tiny_repository_template / "tiny_a" / "1")

    def submission(photos: Path, *extra: str) -> list[list[str]]:
        out = tmp_path / f"submission{len(list(tmp_path.glob('submission*')))}.csv"
        assert carclf_main(["submit", model, str(photos), "--out", str(out), "--tta", "hflip_crops", *extra]) == 0
        return list(csv.reader(out.open()))

    twin = submission(sample_dir / "test_upload")
    assert submission(bgr_sample / "test_upload", "--channel-order", "bgr") == twin
    assert submission(bgr_sample / "test_upload") != twin  # read as stored: wrong colours, other answers
