"""Augmentation is declared, seeded per image, and saved exactly."""

from __future__ import annotations

import numpy as np
import pytest

from carclf.errors import ConfigError
from carclf.train.augment import Augmenter, load_pipeline
from tests.train.conftest import noise_image

PIPELINE = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "RandomResizedCrop", "size": "image_size", "scale": [0.5, 1.0], "p": 1.0},
    {"name": "RandomBrightnessContrast", "p": 0.8},
]


def test_same_seed_same_image_different_seed_different_image():
    aug = Augmenter(PIPELINE, image_size=40, seed=0)
    image = noise_image(40, 40)
    a, b = aug(image, 11), aug(image, 11)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, aug(image, 12))
    # A second augmenter (another run, another thread) reproduces the same images from the same seeds.
    np.testing.assert_array_equal(Augmenter(PIPELINE, image_size=40, seed=0)(image, 11), a)


def test_pipeline_is_saved_and_loads_back(tmp_path):
    aug = Augmenter(PIPELINE, image_size=40, seed=0)
    path = tmp_path / "augmentation.json"
    aug.save(path)
    loaded = load_pipeline(path)
    assert [type(t).__name__ for t in loaded.transforms] == ["HorizontalFlip", "RandomResizedCrop",
                                                             "RandomBrightnessContrast"]
    assert tuple(loaded.transforms[1].size) == (40, 40)  # "image_size" was resolved for this stage


def test_tf_apply_runs_inside_tf_data():
    import tensorflow as tf

    aug = Augmenter(PIPELINE, image_size=24, seed=0)
    images = tf.data.Dataset.from_tensor_slices(np.stack([noise_image(24, 24, i) for i in range(4)]))
    seeds = tf.data.Dataset.range(4)
    out = list(tf.data.Dataset.zip((images, seeds)).map(aug.tf_apply).as_numpy_iterator())
    assert len(out) == 4 and all(o.shape == (24, 24, 3) for o in out)
    np.testing.assert_array_equal(out[2], aug(noise_image(24, 24, 2), 2))


@pytest.mark.parametrize("transform,needle", [
    ({"name": "ToFloat", "p": 1.0}, "float32[24, 24, 3]"),
    ({"name": "RandomCrop", "height": 16, "width": 16, "p": 0.2}, "uint8[16, 16, 3]"),
    ({"name": "PadIfNeeded", "min_height": 40, "min_width": 40, "p": 0.1}, "uint8[40, 40, 3]"),
])
def test_a_transform_must_keep_uint8_images_of_the_stage_shape_whatever_its_p(transform, needle):
    """Checked on each transform applied, not on one seeded run of the pipeline (which may skip a transform of
    p < 1, or turn its float output back into uint8)."""
    pipeline = [{"name": "HorizontalFlip", "p": 0.5}, transform]
    with pytest.raises(ConfigError) as info:
        Augmenter(pipeline, image_size=24, seed=0, source="r.yaml")
    message = str(info.value)
    assert "r.yaml" in message and "field 'augmentation[1]'" in message and transform["name"] in message
    assert "must keep uint8 images of 24x24x3" in message and needle in message, message


def test_transforms_that_keep_the_stage_shape_are_accepted_and_still_seeded():
    """A crop to the stage's own size, with any p, keeps the shape; the check leaves the per-image seeds alone."""
    pipeline = [{"name": "RandomCrop", "height": "image_size", "width": "image_size", "p": 0.5}, *PIPELINE]
    image = noise_image(40, 40)
    first = Augmenter(pipeline, image_size=40, seed=0)(image, 7)
    again = Augmenter(pipeline, image_size=40, seed=0)
    assert first.shape == (40, 40, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(again(image, 7), first)
