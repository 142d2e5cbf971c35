"""A tiny real run: 2 classes of real photos, 1 epoch per stage, trained, evaluated, exported, reloaded,
served from JPEG bytes, resumed and turned into a submission."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest

from carclf import contract, imaging
from carclf.cli import main as carclf_main
from carclf.train import evaluate, loop, runs
from carclf.train.recipe import parse_recipe
from carclf.train.submit import write_submission
from tests.fixtures import SAMPLE_DIR
from tests.train.conftest import make_two_class_data, tiny_recipe

pytestmark = pytest.mark.slow

RUN_FILES = {runs.CONFIG, runs.RUN_INFO, runs.LABELS, runs.CLASSES, runs.AUGMENTATION, runs.SCAN, runs.SPLIT,
             runs.HISTORY_CSV, runs.HISTORY_JSON, runs.CURVES, runs.FINAL_WEIGHTS, runs.METRICS,
             "metrics_confusion_none.png", "metrics_confusion_hflip.png"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data_root = make_two_class_data(root / "data")
    recipe = parse_recipe(tiny_recipe(data_root, backbone="mobilenet_v2"), source="tiny")  # a real architecture
    run_dir = loop.train(recipe, runs_root=root / "runs", verbose=0)
    return root, run_dir


@pytest.fixture(scope="module")
def tiny_export(tiny_run):
    """``carclf export`` of the tiny run (once per module): (the SavedModel version folder, what it printed)."""
    root, run_dir = tiny_run
    repo = root / "model_repository"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert carclf_main(["export", str(run_dir), "--repository", str(repo), "--name", "tiny"]) == 0
    return repo / "tiny" / "1", printed.getvalue()


def test_run_folder_holds_everything(tiny_run):
    _, run_dir = tiny_run
    names = {p.name for p in run_dir.iterdir()}
    assert RUN_FILES <= names, RUN_FILES - names
    info = runs.read_json(run_dir / runs.RUN_INFO)
    assert info["finished"] and info["image_size"] == 48 and info["num_val"] == 4 and info["num_train"] == 6
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [h["stage"] for h in history] == ["head", "top"]
    assert all({"loss", "accuracy", "val_accuracy", "epoch_seconds", "lr"} <= set(h) for h in history)
    metrics = runs.read_json(run_dir / runs.METRICS)
    assert set(metrics["policies"]) == {"none", "hflip"}
    assert metrics["policies"]["none"]["count"] == 4
    assert (run_dir / runs.LABELS).read_text().splitlines() == list(info["class_names"])
    assert (run_dir / runs.TENSORBOARD).is_dir()
    assert (run_dir / runs.CHECKPOINTS / runs.OPTIMIZER_STATE).is_file()  # what --resume restores mid-stage


def test_evaluation_of_run_matches_its_metrics(tiny_run):
    _, run_dir = tiny_run
    model = evaluate.load_model(run_dir)
    from carclf.train import data

    dataset = data.read_folder_layout(model.info["data_root"])
    split = data.load_split(run_dir / runs.SPLIT, dataset)
    results = evaluate.evaluate_photos(model.predictor, [s.path for s in split.val], [s.label for s in split.val],
                                       model.input_size, ["none", "hflip"], model.class_ids, model.class_names)
    stored = runs.read_json(run_dir / runs.METRICS)["policies"]
    for name in ("none", "hflip"):
        assert results[name]["confusion_matrix"] == stored[name]["confusion_matrix"]
        assert results[name]["log_loss"] == pytest.approx(stored[name]["log_loss"], abs=1e-5)


def test_evaluate_all_reads_every_usable_photo_not_the_runs_split(tiny_run, tmp_path):
    """``carclf evaluate RUN --all`` scores every usable photo of the run's data, not only its validation photos."""
    _, run_dir = tiny_run
    info = runs.read_json(run_dir / runs.RUN_INFO)
    out = tmp_path / "all"
    assert carclf_main(["evaluate", str(run_dir), "--all", "--tta", "none", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    photos = info["num_train"] + info["num_val"]
    assert (report["split"], report["photos"], report["policies"]["none"]["count"]) == ("all", photos, photos)
    assert photos > info["num_val"]


def test_export_reload_and_predict_from_jpeg_bytes(tiny_run, tiny_export):
    import tensorflow as tf

    _, run_dir = tiny_run
    version, printed = tiny_export
    assert "exported" in printed
    card = json.loads((version / "assets.extra" / contract.MODEL_CARD).read_text())
    assert card["backbone"] == "mobilenet_v2" and card["input_size"] == 48 and card["class_ids"] == ["0", "1"]
    assert card["warmup_records"] == 4 + 2 and card["export_check_max_abs_diff"] <= 1e-4

    photos = sorted((SAMPLE_DIR / "train" / "0").glob("*.jpg"))[:3]
    payload = [p.read_bytes() for p in photos]
    served = tf.saved_model.load(str(version)).signatures[contract.SIGNATURE_BYTES](
        **{contract.INPUT_IMAGE_BYTES: tf.constant(payload)})
    keras_model = runs.load_run(run_dir).model
    pixels = np.stack([imaging.prepare(imaging.decode_image(tf.constant(b)), 48).numpy() for b in payload])
    expected = np.asarray(keras_model(pixels.astype("float32"), training=False))
    np.testing.assert_allclose(served[contract.OUTPUT_PROBABILITIES].numpy(), expected, atol=1e-4)
    labels = (version / "assets" / contract.LABELS_ASSET).read_text().splitlines()
    assert [x.decode() for x in served[contract.OUTPUT_LABEL].numpy()] == [labels[i] for i in expected.argmax(1)]


def test_submission_csv_from_savedmodel(tiny_export, tmp_path):
    version, _ = tiny_export
    out = tmp_path / "submission.csv"
    stats = write_submission(evaluate.load_model(version.parent), SAMPLE_DIR / "test_upload", out, policy="hflip",
                             progress=False)
    rows = list(csv.reader(out.open()))
    photos = sorted(p.name for p in (SAMPLE_DIR / "test_upload").glob("*.jpg"))
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == photos and stats == {"rows": len(photos), "skipped": 0, "resumed": 0}
    assert {r[1] for r in rows[1:]} <= {"0", "1"}


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path):
    run_dir = tmp_path / tiny_run[1].name  # a copy: the other tests read the run as training left it
    shutil.copytree(tiny_run[1], run_dir)
    state_file = run_dir / runs.CHECKPOINTS / runs.STATE
    runs.write_json(state_file, {"stage_index": 1, "stage_epochs_done": 0, "best": None})
    (run_dir / runs.FINAL_WEIGHTS).unlink()
    loop.resume(run_dir, verbose=0)
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [h["stage"] for h in history] == ["head", "top", "top"]
    assert (run_dir / runs.FINAL_WEIGHTS).is_file()
    assert runs.read_json(state_file)["stage_index"] == 2
