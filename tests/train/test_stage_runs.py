"""What tiny real runs hand from one epoch or stage to the next: the recipe's augmentation on training batches
only, the best checkpoint that starts the next stage, where a resume inside a stage picks up, and the frozen
BatchNorm of a pretrained backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carclf import backbones, imaging
from carclf.train import loop, runs
from carclf.train.model import backbone_of, build_classifier
from carclf.train.recipe import PROJECT_ROOT, parse_recipe
from tests.train.conftest import tiny_recipe

pytestmark = pytest.mark.slow

PRETRAINED = PROJECT_ROOT / "../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def _stage(name: str, epochs: int = 1, lr: float = 1e-3, unfreeze: str = "none") -> dict:
    return {"name": name, "epochs": epochs, "lr": lr, "batch_size": 4, "image_size": 32, "unfreeze": unfreeze}


def _record_fits(monkeypatch) -> list[dict]:
    """Each Keras fit of the run: its training stream, its validation data, the weights it started and ended on."""
    import keras

    real = keras.Model.fit
    fits: list[dict] = []

    def fit(model, x=None, *args, **kwargs):
        fits.append({"x": x, "validation_data": kwargs.get("validation_data"),
                     "start": [np.array(w) for w in model.get_weights()]})
        history = real(model, x, *args, **kwargs)
        fits[-1]["end"] = [np.array(w) for w in model.get_weights()]
        return history

    monkeypatch.setattr(keras.Model, "fit", fit)
    return fits


def _train(data_root: Path, tmp_path: Path, **overrides) -> Path:
    recipe = parse_recipe(tiny_recipe(data_root, tta=["none"], **overrides), source="tiny")
    root = tmp_path / "runs"
    loop.train(recipe, runs_root=root, verbose=0)
    (run_dir,) = root.iterdir()
    return run_dir


def _prepared(data_root: Path, rows: list, size: int) -> np.ndarray:
    """The photos of split rows as the product's one resize makes them, computed here from the files."""
    import tensorflow as tf

    return np.stack([imaging.prepare(imaging.decode_image(tf.constant((data_root / "train" / rel).read_bytes())),
                                     size).numpy() for rel, _ in rows])


def test_training_batches_carry_the_recipe_augmentation_and_validation_batches_do_not(two_class_data, tmp_path,
                                                                                       monkeypatch):
    """With augmentation [InvertImg p=1], every training image the model is fed is an inverted photo; validation
    images are the plain photos, in the split's order."""
    fits = _record_fits(monkeypatch)
    run_dir = _train(two_class_data, tmp_path, stages=[_stage("head")],
                     augmentation=[{"name": "InvertImg", "p": 1.0}])
    split = runs.read_json(run_dir / runs.SPLIT)
    train, val = _prepared(two_class_data, split["train"], 32), _prepared(two_class_data, split["val"], 32)
    (stage,) = fits
    images, _ = next(iter(stage["x"]))
    for image in np.asarray(images):
        assert any(np.array_equal(image, 255 - photo) for photo in train)
    val_images, _ = next(iter(stage["validation_data"]))
    np.testing.assert_array_equal(np.asarray(val_images), val[: len(val_images)])


def test_the_next_stage_starts_from_the_previous_stage_best_checkpoint(two_class_data, tmp_path, monkeypatch):
    """Stage "head" runs two epochs; its best epoch (the first: the second, at a negligible rate, scores no
    better) and not its last is what stage "top" starts from."""
    fits = _record_fits(monkeypatch)
    run_dir = _train(two_class_data, tmp_path, head={"hidden_units": [8], "batchnorm": False},
                     stages=[_stage("head", epochs=2, lr=1e-7), _stage("top", unfreeze="top_blocks 1")])
    recipe = runs.load_config(run_dir)
    best, _ = build_classifier(backbones.get(recipe.backbone), 2, recipe.head, 32, None)
    runs.load_weights(best, runs.best_weights(run_dir, "head"))
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [h["stage"] for h in history] == ["head", "head", "top"]
    assert history[1]["val_accuracy"] <= history[0]["val_accuracy"]  # epoch 1 stays the best of "head"
    head_fit, top_fit = fits
    ended = zip(head_fit["end"], best.get_weights(), strict=True)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in ended)  # the best is not the last epoch
    for started, kept in zip(top_fit["start"], best.get_weights(), strict=True):
        np.testing.assert_array_equal(started, np.asarray(kept))


def test_a_resume_inside_a_later_stage_runs_only_that_stage_remaining_epochs(two_class_data, tmp_path,
                                                                            monkeypatch):
    """Stopped after the first of stage "top"'s two epochs, state.json counts 1 epoch done in that stage, and
    the resumed run trains exactly one more epoch."""
    from carclf.train.callbacks import ResumeState

    real = ResumeState.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        real(self, epoch, logs)
        if self.stage_index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "on_epoch_end", on_epoch_end)
    recipe = parse_recipe(tiny_recipe(two_class_data, tta=["none"],
                                      stages=[_stage("head"), _stage("top", epochs=2, unfreeze="top_blocks 1")]),
                          source="tiny")
    with pytest.raises(KeyboardInterrupt):
        loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = runs.read_json(run_dir / runs.CHECKPOINTS / runs.STATE)
    assert (state["stage_index"], state["stage_epochs_done"], state["global_epoch"]) == (1, 1, 2)
    loop.resume(run_dir, verbose=0)
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    assert [(h["stage"], h["epoch"]) for h in history] == [("head", 1), ("top", 2), ("top", 3)]


def test_fine_tuning_all_of_a_pretrained_backbone_keeps_its_batchnorm(two_class_data, tmp_path):
    """weights: the ImageNet file, unfreeze: all: the backbone's BatchNorm layers end the run with exactly the
    file's scale, offset and moving statistics, while its convolutions were trained."""
    import keras

    run_dir = _train(two_class_data, tmp_path, backbone="mobilenet_v2", weights=str(PRETRAINED),
                     stages=[_stage("all", unfreeze="all")])
    recipe = runs.load_config(run_dir)
    spec = backbones.get("mobilenet_v2")
    pretrained, _ = build_classifier(spec, 2, recipe.head, 32, str(PRETRAINED))
    trained, _ = build_classifier(spec, 2, recipe.head, 32, None)
    runs.load_weights(trained, run_dir / runs.FINAL_WEIGHTS)
    before, after = backbone_of(pretrained), backbone_of(trained)
    norms = [layer.name for layer in before.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for name in norms:
        for old, new in zip(before.get_layer(name).weights, after.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(np.asarray(old), np.asarray(new), err_msg=f"{name} {old.path}")
    conv = [np.asarray(model.get_layer("Conv_1").kernel) for model in (before, after)]
    assert not np.allclose(*conv)
