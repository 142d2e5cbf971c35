"""MixUp and CutMix batches: the targets say exactly how much of each photo a mixed image holds."""

from __future__ import annotations

import numpy as np
import pytest

from carclf.errors import ConfigError
from carclf.train import loop, pipeline, runs
from carclf.train.mixing import MixConfig, mix_batch
from carclf.train.recipe import parse_recipe
from tests.train.conftest import tiny_recipe

CLASSES = 6


def _flat_batch(size: int = 20):
    """Image i is filled with the value 40 * label_i, so a pixel's value tells which photo it came from."""
    labels = np.arange(CLASSES, dtype=np.int32)
    images = np.repeat((40 * labels).astype(np.uint8)[:, None, None, None], size, axis=1)
    return np.repeat(images, size, axis=2).repeat(3, axis=3), labels


def _mix(config: MixConfig, seed=(7, 11)):
    import tensorflow as tf

    images, labels = _flat_batch()
    mixed, targets = mix_batch(tf.constant(images), tf.constant(labels), CLASSES, config,
                               tf.constant(seed, tf.int64))
    return images, labels, mixed.numpy(), targets.numpy()


@pytest.mark.parametrize("seed", [(1, 2), (7, 11), (123, 5)])
def test_mixup_pixels_are_the_target_weighted_mean_of_the_photos(seed):
    _, labels, mixed, targets = _mix(MixConfig("mixup", alpha=1.0, p=1.0), seed)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    expected = targets @ (40.0 * labels)  # what each mixed image must hold, from its target alone
    np.testing.assert_allclose(mixed[..., 0].mean(axis=(1, 2)), expected, rtol=1e-5)
    assert np.ptp(mixed) > 0 and mixed.dtype == np.float32


@pytest.mark.parametrize("seed", [(1, 2), (7, 11), (123, 5), (9, 9)])
def test_cutmix_targets_are_the_share_of_pixels_from_each_photo(seed):
    _, labels, mixed, targets = _mix(MixConfig("cutmix", alpha=1.0, p=1.0), seed)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    for row in range(CLASSES):
        shares = [(mixed[row, ..., 0] == 40 * k).mean() for k in labels]
        np.testing.assert_allclose(shares, targets[row], atol=1e-6)


def test_cutmix_pastes_one_rectangle():
    images, _, mixed, targets = _mix(MixConfig("cutmix", alpha=1.0, p=1.0), (3, 4))
    changed = mixed[..., 0] != images[..., 0]
    pasted = [r for r in range(CLASSES) if changed[r].any()]
    assert pasted, "some image must receive a box"
    for r in pasted:
        ys, xs = np.nonzero(changed[r])
        box = changed[r, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all() and box.sum() == changed[r].sum()


def test_p_zero_passes_batches_through_with_one_hot_targets():
    images, labels, mixed, targets = _mix(MixConfig("cutmix", alpha=1.0, p=0.0))
    np.testing.assert_array_equal(mixed, images.astype(np.float32))
    np.testing.assert_array_equal(targets, np.eye(CLASSES, dtype=np.float32)[labels])


def test_the_seed_decides_the_mix():
    first = _mix(MixConfig("mixup"), (5, 6))[2:]
    again = _mix(MixConfig("mixup"), (5, 6))[2:]
    other = _mix(MixConfig("mixup"), (6, 5))[2:]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_training_stream_with_mixing_yields_soft_targets(two_class_data):
    from carclf.train.augment import Augmenter
    from carclf.train.data import read_dataset

    parsed = parse_recipe(tiny_recipe(two_class_data), source="tiny")
    samples = read_dataset(parsed.data).samples
    prepared = pipeline.prepared_images(samples, 32)
    stream = pipeline.training_stream(prepared, len(samples), 4, Augmenter([], 32, seed=0), seed=1,
                                      mix=MixConfig("cutmix"), num_classes=2)
    images, targets = next(iter(stream))
    assert images.shape == (4, 32, 32, 3) and targets.shape == (4, 2)
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mix,field,needle", [
    ({"method": "blend"}, "stages[1].mix.method", "expected one of ['mixup', 'cutmix'], received 'blend'"),
    ({"method": "cutmix", "alpha": 0}, "stages[1].mix.alpha", "expected a value > 0, received 0.0"),
    ({"method": "mixup", "p": 1.5}, "stages[1].mix.p", "expected a value <= 1.0, received 1.5"),
    ({"method": "mixup", "beta": 2}, "stages[1].mix.beta", "unknown field"),
    ({"alpha": 1.0}, "stages[1].mix.method", "is required"),
    ("cutmix", "stages[1].mix", "expected a mapping"),
])
def test_mix_errors_name_the_field(tmp_path, mix, field, needle):
    data = tiny_recipe(tmp_path)
    data["stages"][1]["mix"] = mix
    with pytest.raises(ConfigError) as info:
        parse_recipe(data, source="r.yaml")
    assert f"field '{field}'" in str(info.value) and needle in str(info.value)


def test_mix_reads_back_from_a_run_folder(tmp_path):
    data = tiny_recipe(tmp_path)
    data["stages"][1]["mix"] = {"method": "cutmix", "alpha": 0.5, "p": 0.5}
    recipe = parse_recipe(data, source="r.yaml")
    assert recipe.stages[1].mix == MixConfig("cutmix", 0.5, 0.5) and recipe.stages[0].mix is None
    assert parse_recipe(recipe.to_dict(), source="resolved") == recipe


@pytest.mark.slow
def test_a_letterbox_cutmix_run_trains_and_scores_on_class_ids(tmp_path, two_class_data):
    """A real letterbox run whose second stage mixes (and averages its epochs): training accuracy and
    validation accuracy are recorded under the usual names, and the run evaluates its validation photos.
    No stage creates a variable inside its traced training step (TensorFlow would trace that step twice)."""
    import tensorflow as tf

    from carclf.train.data import load_split, read_dataset
    from carclf.train.evaluate import evaluate_photos, load_model

    data = tiny_recipe(two_class_data, resize="letterbox")
    data["stages"][1].update(epochs=2, mix={"method": "cutmix", "alpha": 1.0, "p": 1.0}, average_last=2)
    recipe = parse_recipe(data, source="tiny")
    in_graph = []

    def creator(next_creator, **kwargs):
        if not tf.executing_eagerly():
            in_graph.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):  # fit traces its steps in this thread
        run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)
    # Each stage's optimizer slots and metric variables (sparse targets, then mixed ones) came first.
    assert in_graph == []
    history = runs.read_json(run_dir / runs.HISTORY_JSON)
    mixed = [row for row in history if row.get("stage") == "top"]
    assert len(mixed) == 2 and all(0.0 <= row["val_accuracy"] <= 1.0 and "accuracy" in row for row in mixed)
    metrics = runs.read_json(run_dir / "metrics.json")
    assert metrics["policies"]["none"]["count"] == metrics["num_val"] > 0
    assert runs.read_json(run_dir / runs.RUN_INFO)["averaged_epochs"] == {"top": [2, 3]}
    # The run folder remembers the letterbox resize: evaluating it again reproduces the run's own figures.
    model = load_model(run_dir)
    assert model.resize == "letterbox"
    val = load_split(run_dir / runs.SPLIT, read_dataset(recipe.data)).val
    again = evaluate_photos(model.predictor, [s.path for s in val], [s.label for s in val], model.input_size,
                            ["none"], model.class_ids, model.class_names, resize=model.resize)
    assert again["none"]["log_loss"] == pytest.approx(metrics["policies"]["none"]["log_loss"], abs=1e-6)


def _mixup_shares(alpha: float, draws: int) -> np.ndarray:
    """The share ``lam`` of ``draws`` seeded MixUp batches. Each of 16 images is its own class, so the target
    of an image that was mixed with another holds ``lam`` at its own class; the smallest diagonal entry is
    ``lam`` unless the partner permutation is the identity (odds of 1 in 16 factorial)."""
    import tensorflow as tf

    size = 16
    labels = tf.range(size, dtype=tf.int32)
    images = tf.zeros([size, 1, 1, 3], tf.float32)
    config = MixConfig("mixup", alpha=alpha, p=1.0)

    @tf.function
    def share(seed):
        _, targets = mix_batch(images, labels, size, config, seed)
        return tf.reduce_min(tf.linalg.diag_part(targets))

    return np.array([float(share(tf.constant([i, 2024], tf.int64))) for i in range(draws)])


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_mixup_share_follows_beta_alpha_alpha(alpha):
    """``lam`` ~ Beta(alpha, alpha): mean 1/2 and variance alpha^2 / ((2 alpha)^2 (2 alpha + 1)), so alpha
    decides how far from an even blend a batch goes (a share stuck at 0.5 would ignore alpha)."""
    lam = _mixup_shares(alpha, 2000)
    assert np.all((lam >= 0.0) & (lam <= 1.0)) and np.ptp(lam) > 0.5
    variance = alpha * alpha / ((2 * alpha) ** 2 * (2 * alpha + 1))
    # Standard errors over 2000 draws: under 0.01 on the mean, about 0.002 on the variance.
    assert abs(lam.mean() - 0.5) < 0.03
    assert abs(lam.var() - variance) < 0.01
