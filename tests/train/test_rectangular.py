"""Rectangular inputs: ``image_size: [height, width]`` from the recipe through training, export, serving,
evaluation and the ensemble, and the errors that guard it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carclf import contract, imaging
from carclf.errors import ConfigError
from carclf.train.augment import Augmenter
from carclf.train.recipe import parse_recipe
from tests.train.conftest import tiny_recipe

RECT = (32, 64)  # height, width


def test_size_forms_and_model_cards():
    assert contract.side_pair(48) == (48, 48) and contract.side_pair([24, 40]) == (24, 40)
    assert contract.plain_size([40, 40]) == 40 and contract.plain_size([24, 40]) == (24, 40)
    assert contract.size_text(320) == "320" and contract.size_text((224, 448)) == "224x448"
    assert contract.size_json((320, 320)) == 320 and contract.size_json((224, 448)) == [224, 448]
    assert contract.card_input_size({"input_size": 320}) == 320
    assert contract.card_input_size({"input_size": [224, 448]}) == (224, 448)
    for bad in (None, "320", True, [224], [224, 448, 3], [224.0, 448], [4, 448], 4):
        assert contract.card_input_size({"input_size": bad}) is None, bad


@pytest.mark.parametrize("resize", imaging.RESIZE_MODES)
def test_prepare_to_height_and_width(photos, resize):
    import tensorflow as tf

    image = imaging.decode_image(tf.constant(photos[0].read_bytes()))
    out = imaging.prepare(image, RECT, resize)
    assert out.shape == (*RECT, 3) and out.dtype == tf.uint8
    batch = imaging.prepare(tf.stack([image, image]), RECT, resize)
    np.testing.assert_array_equal(batch[0].numpy(), out.numpy())


def test_recipe_reads_height_and_width(tmp_path):
    data = tiny_recipe(tmp_path)
    data["stages"][1]["image_size"] = list(RECT)
    recipe = parse_recipe(data, source="r.yaml")
    assert recipe.final_size == RECT and recipe.stages[0].image_size == 32
    assert recipe.to_dict()["stages"][1]["image_size"] == list(RECT)
    assert parse_recipe(recipe.to_dict(), source="resolved") == recipe  # the run folder's config reads back
    data["stages"][1]["image_size"] = [48, 48]
    assert parse_recipe(data, source="r.yaml").final_size == 48  # a square pair is one side


@pytest.mark.parametrize("value,needle", [
    ([32], "expected one side or [height, width] in pixels, received [32]"),
    ([32, 64, 3], "expected one side or [height, width] in pixels, received [32, 64, 3]"),
    ([32, 2048], "expected sides from 32 to 1024, received [32, 2048]"),
    ([16, 64], "expected sides from 32 to 1024, received [16, 64]"),
    ([32.5, 64], "expected one side or [height, width] in pixels, received [32.5, 64]"),
    ("32x64", "expected one side or [height, width] in pixels, received '32x64'"),
    (4096, "expected a value <= 1024, received 4096"),
])
def test_bad_image_sizes_name_the_field(tmp_path, value, needle):
    data = tiny_recipe(tmp_path)
    data["stages"][1]["image_size"] = value
    with pytest.raises(ConfigError) as info:
        parse_recipe(data, source="r.yaml")
    assert "field 'stages[1].image_size'" in str(info.value) and needle in str(info.value)


def test_augmentation_follows_a_rectangular_stage():
    pipeline = [{"name": "RandomResizedCrop", "size": "image_size", "scale": [0.5, 1.0], "ratio": [1.5, 2.5],
                 "p": 1.0},
                {"name": "CenterCrop", "height": "image_size", "width": "image_size", "p": 1.0}]
    aug = Augmenter(pipeline, RECT, seed=0)
    image = np.random.default_rng(0).integers(0, 256, (*RECT, 3), dtype=np.uint8)
    out = aug(image, 5)
    assert out.shape == (*RECT, 3) and not np.array_equal(out, image)
    np.testing.assert_array_equal(Augmenter(pipeline, RECT, seed=0)(image, 5), out)  # seeded
    with pytest.raises(ConfigError) as info:
        Augmenter([{"name": "LongestMaxSize", "max_size": "image_size"}], RECT, seed=0, source="r.yaml")
    assert "field 'augmentation[0].max_size'" in str(info.value) and "32x64" in str(info.value)


def test_ensemble_config_takes_height_x_width():
    from carclf.ensemble.config import parse_config, render

    config = parse_config(render("e", ["m"], parameters={"input_size.m": "224x448"}))
    assert config.members[0].input_size == (224, 448)
    assert parse_config(render("e", ["m"], parameters={"input_size.m": "96x96"})).members[0].input_size == 96
    for bad in ("224x", "x448", "224x4", "224x448x3"):
        with pytest.raises(ConfigError) as info:
            parse_config(render("e", ["m"], parameters={"input_size.m": bad}))
        assert "parameters['input_size.m']" in str(info.value), bad


@pytest.mark.slow
def test_a_rectangular_run_trains_exports_serves_and_evaluates(tmp_path, two_class_data, capsys):
    """A square head stage, then a 32x64 stage: the run, its export (card, both signatures, warm-up records)
    and the ensemble's views all use 32x64, and the SavedModel reproduces the run's own figures."""
    import tensorflow as tf

    from carclf.cli import main as carclf_main
    from carclf.ensemble.config import Member
    from carclf.ensemble.members import info_from_repository
    from carclf.serving.warmup import read_warmup_requests, warmup_file
    from carclf.train import loop, runs
    from carclf.train.data import load_split, read_dataset
    from carclf.train.evaluate import evaluate_photos, load_model
    from carclf.tta import make_views

    data = tiny_recipe(two_class_data)
    data["stages"][1]["image_size"] = list(RECT)
    data["augmentation"][1]["ratio"] = [1.5, 2.5]
    recipe = parse_recipe(data, source="tiny")
    run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)
    assert runs.read_json(run_dir / runs.RUN_INFO)["image_size"] == list(RECT)
    trained = runs.load_run(run_dir)
    assert trained.image_size == RECT and tuple(trained.model.input_shape) == (None, *RECT, 3)

    repo = tmp_path / "model_repository"
    assert carclf_main(["export", str(run_dir), "--repository", str(repo), "--name", "rect"]) == 0
    capsys.readouterr()
    version = repo / "rect" / "1"
    card = json.loads((version / "assets.extra" / contract.MODEL_CARD).read_text())
    assert card["input_size"] == list(RECT) and card["export_check_max_abs_diff"] <= 1e-4

    photo_bytes = [p.read_bytes() for p in sorted((two_class_data / "train" / "0").glob("*.jpg"))[:2]]
    loaded = tf.saved_model.load(str(version))
    served = loaded.signatures[contract.SIGNATURE_BYTES](**{contract.INPUT_IMAGE_BYTES: tf.constant(photo_bytes)})
    pixels = np.stack([imaging.prepare(imaging.decode_image(tf.constant(b)), RECT).numpy() for b in photo_bytes])
    expected = np.asarray(trained.model(pixels.astype("float32"), training=False))
    np.testing.assert_allclose(served[contract.OUTPUT_PROBABILITIES].numpy(), expected, atol=1e-4)
    bigger = imaging.prepare(imaging.decode_image(tf.constant(photo_bytes[0])), 57)[None]  # resized in-graph
    from_pixels = loaded.signatures[contract.SIGNATURE_PIXELS](**{contract.INPUT_PIXELS: bigger})
    direct = trained.model(tf.cast(imaging.prepare(bigger, RECT), tf.float32), training=False)
    np.testing.assert_allclose(from_pixels[contract.OUTPUT_PROBABILITIES].numpy(), np.asarray(direct), atol=1e-5)
    pixel_records = [r for r in read_warmup_requests(warmup_file(version))
                     if r.signature_name == contract.SIGNATURE_PIXELS]
    assert pixel_records and all(r.inputs[contract.INPUT_PIXELS].shape == (1, *RECT, 3) for r in pixel_records)

    model = load_model(version)
    assert model.input_size == RECT
    val = load_split(run_dir / runs.SPLIT, read_dataset(recipe.data)).val
    again = evaluate_photos(model.predictor, [s.path for s in val], [s.label for s in val], model.input_size,
                            ["none", "hflip"], model.class_ids, model.class_names, resize=model.resize)
    stored = runs.read_json(run_dir / runs.METRICS)["policies"]
    for policy in ("none", "hflip"):
        assert again[policy]["log_loss"] == pytest.approx(stored[policy]["log_loss"], abs=1e-5)

    info = info_from_repository(repo, Member("rect"))
    assert info.input_size == RECT
    views = make_views(imaging.decode_image(tf.constant(photo_bytes[0])), "hflip", info.input_spec.size)
    assert views.shape == (2, *RECT, 3)
