"""Recipes are validated data: the packaged ones load, and every error names the file, field and value."""

from __future__ import annotations

import copy

import pytest
import yaml

from carclf.errors import ConfigError, NotFound
from carclf.train.augment import Augmenter
from carclf.train.recipe import Unfreeze, load_recipe, parse_recipe, recipe_names
from tests.train.conftest import tiny_recipe


@pytest.mark.parametrize("name", recipe_names())
def test_packaged_recipes_load_and_round_trip(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.stages and all(s.epochs >= 1 for s in recipe.stages)
    assert parse_recipe(recipe.to_dict(), source="resolved") == recipe  # what a run folder stores reads back
    for stage in recipe.stages:  # each stage's augmentation builds and keeps the stage's shape
        Augmenter(recipe.augmentation, stage.image_size, seed=0, source=name)


def test_required_recipes_exist():
    names = set(recipe_names())
    assert {"xception", "efficientnet_b3", "efficientnet_b7", "mobilenet_v2"} <= names
    assert load_recipe("efficientnet_b3").final_size == 512
    assert any(n.startswith("demo_") for n in names)


def test_experiment_recipes_are_found_by_name_apart_from_the_main_ones():
    from carclf.train.recipe import EXPERIMENTS_DIR, recipe_path

    main, every = recipe_names(experiments=False), recipe_names()
    assert len(set(every)) == len(every)  # a name is in one folder only
    experiments = [n for n in every if n not in main]
    assert experiments and "mobilenet_v2_320_bn" in main
    for name in experiments:
        assert recipe_path(name).parent == EXPERIMENTS_DIR and load_recipe(name).name == name


@pytest.mark.parametrize("path,value,field,needle", [
    (("stages", 0, "epochs"), 0, "stages[0].epochs", "expected a value >= 1, received 0"),
    (("stages", 1, "lr"), "fast", "stages[1].lr", "expected float, received 'fast'"),
    (("stages", 1, "lr"), 0, "stages[1].lr", "expected a value > 0, received 0"),
    (("stages", 1, "name"), "head", "stages", "stage names must be unique, received ['head', 'head']"),
    (("stages", 0, "unfreeze"), "top_blocks x", "stages[0].unfreeze", "received 'top_blocks x'"),
    (("stages", 1, "unfreeze"), "top_blocks 0", "stages[1].unfreeze", "N >= 1, received 'top_blocks 0'"),
    (("stages", 1, "image_size"), 4096, "stages[1].image_size", "expected a value <= 1024"),
    (("backbone",), "resnet9000", "backbone", "unknown backbone 'resnet9000'"),
    (("head", "pooling"), "median", "head.pooling", "expected one of ['avg', 'max', 'bilinear'], received 'median'"),
    (("split", "val_fraction"), 1.5, "split.val_fraction", "received 1.5"),
    (("split", "folds"), 1, "split.folds", "at least 2, received 1"),
    (("split", "folds"), -3, "split.folds", "expected a value >= 0, received -3"),
    (("head", "colour"), "red", "head.colour", "unknown field"),
    (("tta",), ["none", "sideways"], "tta", "unknown TTA policy 'sideways'"),
    (("resize",), "stretch", "resize", "expected one of ['squash', 'letterbox'], received 'stretch'"),
    (("data", "channel_order"), "grb", "data.channel_order", "expected one of ['rgb', 'bgr'], received 'grb'"),
    (("weights",), "/no/such/weights.h5", "weights", "received '/no/such/weights.h5'"),
    (("stages",), [], "stages", "non-empty list"),
    (("loss",), {"label_smoothing": 0.9}, "loss.label_smoothing", "expected a value <= 0.5, received 0.9"),
    (("head", "batchnorm_momentum"), 1.5, "head.batchnorm_momentum", "expected a value <= 0.9999, received 1.5"),
    (("head", "hidden_activation"), "rleu", "head.hidden_activation", "received 'rleu'"),
    (("backbone",), "xception", "stages[0].image_size", "backbone 'xception' takes sides of at least 71 px, "
                                                        "received 32"),
    (("tta",), [], "tta", "expected a non-empty list of TTA policy names"),
    (("stages", 0, "lr"), float("nan"), "stages[0].lr", "expected a finite number, received nan"),
    (("stages", 1, "lr"), float("inf"), "stages[1].lr", "expected a finite number, received inf"),
    (("stages", 1, "warmup_epochs"), float("nan"), "stages[1].warmup_epochs", "expected a finite number, received nan"),
    (("split", "val_fraction"), float("nan"), "split.val_fraction", "expected a finite number, received nan"),
    (("head", "l2"), float("inf"), "head.l2", "expected a finite number, received inf"),
    (("schedule",), {"decay_per_epoch": float("nan")}, "schedule.decay_per_epoch",
     "expected a finite number, received nan"),
    (("schedule",), {"min_lr": float("-inf")}, "schedule.min_lr", "expected a finite number, received -inf"),
    (("stages", 1, "mix"), {"method": "mixup", "alpha": float("inf")}, "stages[1].mix.alpha",
     "expected a finite number, received inf"),
    (("augmentation", 1, "scale"), [0.8, float("nan")], "augmentation[1].scale",
     "expected finite numbers, received [0.8, nan]"),
])
def test_config_errors_name_file_field_and_value(tmp_path, path, value, field, needle):
    data = tiny_recipe(tmp_path)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe_file)
    message = str(info.value)
    assert str(recipe_file) in message and f"field '{field}'" in message and needle in message


def test_a_plateau_factor_must_lower_the_rate(tmp_path):
    """schedule.plateau_factor multiplies the rate on a plateau: below 1 is accepted, 1 is refused when the recipe
    is read (Keras's ReduceLROnPlateau would refuse it only once the run folder exists)."""
    data = tiny_recipe(tmp_path)
    data["schedule"] = {"plateau_factor": 0.99}
    assert parse_recipe(data, source="r.yaml").schedule.plateau_factor == 0.99
    for factor in (1.0, 1):
        data["schedule"] = {"plateau_factor": factor}
        with pytest.raises(ConfigError) as info:
            parse_recipe(data, source="r.yaml")
        message = str(info.value)
        assert "r.yaml" in message and "field 'schedule.plateau_factor'" in message
        assert "expected a value < 1, received 1.0" in message


def test_missing_required_field_and_bad_yaml(tmp_path):
    data = tiny_recipe(tmp_path)
    del data["stages"][0]["lr"]
    with pytest.raises(ConfigError, match=r"field 'stages\[0\].lr': is required"):
        parse_recipe(data, source="r.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML") as caught:
        load_recipe(broken)
    assert "\n" not in str(caught.value) and "line 2" in str(caught.value)  # one line, with where it broke
    twice = tmp_path / "twice.yaml"  # PyYAML alone keeps the second value silently
    text = yaml.safe_dump(tiny_recipe(tmp_path), sort_keys=False)
    twice.write_text(text.replace("name: tiny\n", "name: tiny\nname: other\n", 1))
    assert "name: other" in twice.read_text()
    with pytest.raises(ConfigError, match=r"twice.yaml.*key 'name' is given twice \(lines 1 and 2\)"):
        load_recipe(twice)
    with pytest.raises(NotFound, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_unfreeze_forms_and_overrides(tmp_path):
    data = tiny_recipe(tmp_path)
    data["stages"][1]["unfreeze"] = {"top_blocks": 3}
    recipe = parse_recipe(data)
    assert recipe.stages[0].unfreeze == Unfreeze("none")
    assert recipe.stages[1].unfreeze == Unfreeze("top_blocks", 3)
    changed = recipe.with_overrides(train="/elsewhere", weights="none", seed=9, val_fraction=0.3, name=None)
    assert changed.data.train == "/elsewhere" and changed.weights is None and changed.seed == 9
    assert changed.split.val_fraction == 0.3 and changed.name == recipe.name
    with pytest.raises(ConfigError, match="field 'weights'"):
        recipe.with_overrides(weights="/no/such/file.h5")
    # the command line passes every flag, given or not: a recipe without overrides keeps naming its file alone
    named = parse_recipe(data, source="r.yaml")
    assert named.with_overrides(train=None, seed=None).source == "r.yaml"
    assert named.with_overrides(seed=3).source == "r.yaml (with command-line overrides)"


def test_fold_must_lie_inside_the_k_fold_split(tmp_path):
    data = tiny_recipe(tmp_path)
    data["split"] = {"seed": 1, "folds": 5, "fold": 5}
    with pytest.raises(ConfigError, match=r"field 'split.fold': expected a fold in \[0, 5\).*received 5"):
        parse_recipe(data, source="r.yaml")
    data["split"] = {"seed": 1, "fold": 2}
    with pytest.raises(ConfigError, match=r"field 'split.fold': needs split.folds.*received fold 2"):
        parse_recipe(data, source="r.yaml")
    data["split"] = {"seed": 1, "folds": 5}
    recipe = parse_recipe(data, source="r.yaml")
    assert (recipe.split.folds, recipe.split.fold) == (5, 0)
    assert recipe.with_overrides(fold=4).split.fold == 4
    with pytest.raises(ConfigError, match="field 'split.fold'"):
        recipe.with_overrides(fold=7)


@pytest.mark.parametrize("transform,field,needle", [
    ({"name": "NoSuchTransform"}, "augmentation[0].name", "unknown albumentations transform"),
    ({"name": "HorizontalFlip", "p": 7}, "augmentation[0]", "invalid parameters"),
    ({"name": "Resize", "height": 10, "width": 10}, "augmentation[0]", "must keep uint8 images of 32x32x3"),
    # albumentations only warns about a parameter its transform lacks and builds it with the default value
    ({"name": "RandomBrightnessContrast", "brightness_limt": 0.4}, "augmentation[0].brightness_limt",
     "RandomBrightnessContrast has no parameter 'brightness_limt' (a misspelling of 'brightness_limit'?)"),
    ({"name": "HorizontalFlip", "p": 0.5, "always_apply": True}, "augmentation[0].always_apply",
     "HorizontalFlip has no parameter 'always_apply'; expected some of ['p']"),
])
def test_augmentation_errors_name_the_transform(transform, field, needle):
    with pytest.raises(ConfigError) as info:
        Augmenter([copy.deepcopy(transform)], image_size=32, seed=0, source="r.yaml")
    assert f"field '{field}'" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("key,too_long,allowed", [("average_last", 2, 1), ("warmup_epochs", 1.5, 0.5)])
def test_stage_fields_counted_in_epochs_fit_the_stage(tmp_path, key, too_long, allowed):
    """average_last and warmup_epochs: at most the stage's epochs, never negative; errors name the field."""
    data = tiny_recipe(tmp_path)
    for bad in (too_long, -1):
        data["stages"][1][key] = bad
        with pytest.raises(ConfigError) as info:
            parse_recipe(data, source="r.yaml")
        assert f"stages[1].{key}" in str(info.value) and f"received {bad}" in str(info.value)
    data["stages"][1][key] = allowed
    assert getattr(parse_recipe(data, source="r.yaml").stages[1], key) == allowed


def test_a_packaged_recipe_reads_the_same_files_from_any_folder(tmp_path, monkeypatch):
    """Packaged recipes name their weights and data relative to the project root; loaded from another folder
    they must not point elsewhere (the weights would be missed and a demo would silently train from scratch)."""
    import os

    from carclf.train.recipe import PROJECT_ROOT

    at_root = load_recipe("demo_mobilenet_v2")
    monkeypatch.chdir(tmp_path)
    elsewhere = load_recipe("demo_mobilenet_v2")
    assert elsewhere == at_root
    assert os.path.isabs(elsewhere.weights) and elsewhere.weights == os.path.normpath(
        PROJECT_ROOT / "../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    assert os.path.isabs(load_recipe("mobilenet_v2").data.train)
    own = tmp_path / "mine.yaml"  # a recipe file of one's own keeps its paths as written
    own.write_text(yaml.safe_dump(tiny_recipe(tmp_path) | {"weights": None}))
    assert load_recipe(own).data.train == str(tmp_path / "train")


def test_every_hidden_activation_a_recipe_accepts_is_one_keras_builds():
    import keras

    from carclf.train.recipe import HIDDEN_ACTIVATIONS

    for name in HIDDEN_ACTIVATIONS:
        assert callable(keras.activations.get(name)), name


@pytest.mark.parametrize("transform,needles", [
    ({"name": "ToFloat"}, ("ToFloat", "must keep uint8 images of 32x32x3", "float32")),
    ({"name": "Normalize"}, ("Normalize", "must keep uint8 images of 32x32x3", "float32")),
    ({"name": "RandomCrop", "height": 24, "width": 24, "p": 0.5}, ("RandomCrop", "32x32x3", "uint8[24, 24, 3]")),
    ({"name": "Resize", "height": 20, "width": 20, "p": 0.3}, ("Resize", "32x32x3", "uint8[20, 20, 3]")),
    ({"name": "Rotate", "crop_border": True, "p": 0.5}, ("Rotate", "must keep uint8 images of 32x32x3")),
    ({"name": "BBoxSafeRandomCrop"}, ("BBoxSafeRandomCrop", "on an image alone", "bboxes")),
    ({"name": "RandomSizedBBoxSafeCrop", "height": 32, "width": 32}, ("RandomSizedBBoxSafeCrop", "bboxes")),
    ({"name": "MaskDropout"}, ("MaskDropout", "on an image alone", "mask")),
], ids=["to_float", "normalize", "crop_p0.5", "resize_p0.3", "rotate_crop_border", "bbox_crop", "bbox_sized_crop",
        "mask_dropout"])
def test_augmentation_that_would_spoil_training_is_refused_when_the_recipe_is_read(tmp_path, transform, needles):
    """A transform that returns floats, changes the stage's shape (even only on a share p of the images) or needs
    boxes or masks is refused by load_recipe, naming its place in the list; not accepted to spoil every image or
    to stop the run mid-epoch."""
    data = tiny_recipe(tmp_path)
    data["augmentation"] = [{"name": "HorizontalFlip", "p": 0.5}, transform]
    recipe_file = tmp_path / "aug.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe_file)
    message = str(info.value)
    assert str(recipe_file) in message and "field 'augmentation[1]'" in message, message
    for needle in needles:
        assert needle in message, message


def test_augmentation_is_checked_at_every_stage_size(tmp_path):
    """A crop to a fixed 32 px keeps the first stage's shape, not the second's (48 px)."""
    data = tiny_recipe(tmp_path)
    data["augmentation"] = [{"name": "RandomCrop", "height": 32, "width": 32, "p": 0.5}]
    data["stages"] = data["stages"][:1]
    assert parse_recipe(data, source="r.yaml").augmentation == tuple(data["augmentation"])
    data = tiny_recipe(tmp_path, augmentation=data["augmentation"])
    with pytest.raises(ConfigError, match=r"field 'augmentation\[0\]'.*48x48x3.*uint8\[32, 32, 3\]"):
        parse_recipe(data, source="r.yaml")
