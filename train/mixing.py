"""Batch mixing for training: MixUp (Zhang et al., 2018) and CutMix (Yun et al., 2019).

A mixed batch pairs every image with another image of the same batch (a seeded permutation) and draws one
share ``lam`` ~ Beta(alpha, alpha) for the batch:

- ``mixup``: the pixels are ``lam * a + (1 - lam) * b``;
- ``cutmix``: a box covering about ``1 - lam`` of the image is pasted from ``b`` into ``a``; ``lam`` is then
  recomputed from the box actually pasted (it is clipped at the borders).

The targets are mixed with the same share: ``lam * onehot(a) + (1 - lam) * onehot(b)``. With probability
``1 - p`` a batch passes through unmixed (one-hot targets). Every draw comes from stateless random ops fed
by a seeded stream, so a run's batches do not depend on thread scheduling. Mixing runs on whole batches,
after the per-image albumentations pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("mixup", "cutmix")


@dataclass(frozen=True)
class MixConfig:
    """How a stage mixes its training batches (see the module docstring)."""

    method: str
    alpha: float = 1.0
    p: float = 1.0


def mix_batch(images, labels, num_classes: int, config: MixConfig, seed):
    """Mix one batch. ``images`` [B, H, W, 3] (any real dtype), ``labels`` [B] class ids, ``seed`` an
    int64 [2] tensor. Returns float32 images and float32 [B, num_classes] targets that sum to 1 per row."""
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    images = tf.cast(images, tf.float32)
    targets = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes, dtype=tf.float32)
    batch = tf.shape(images)[0]
    partner = tf.argsort(tf.random.stateless_uniform([batch], seeds[0]))
    # Beta(alpha, alpha) as the ratio of two gamma draws.
    g1 = tf.random.stateless_gamma([], seeds[1], alpha=config.alpha)
    g2 = tf.random.stateless_gamma([], seeds[2], alpha=config.alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    apply = tf.random.stateless_uniform([], seeds[3]) < config.p

    other = tf.gather(images, partner)
    if config.method == "mixup":
        mixed = lam * images + (1.0 - lam) * other
    else:
        mixed, lam = _paste_box(images, other, lam, seeds[4])
    mixed_targets = lam * targets + (1.0 - lam) * tf.gather(targets, partner)
    return (tf.where(apply, mixed, images), tf.where(apply, mixed_targets, targets))


def _paste_box(images, other, lam, seed):
    """CutMix's box: side ratio sqrt(1 - lam), uniform centre, clipped; returns the images and the share
    of each image that stayed its own."""
    import tensorflow as tf

    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    ratio = tf.sqrt(1.0 - lam)
    centre = tf.random.stateless_uniform([2], seed) * tf.stack([height, width])
    half = tf.stack([height, width]) * ratio / 2.0
    top, left = tf.unstack(tf.clip_by_value(tf.round(centre - half), 0.0, tf.stack([height, width])))
    bottom, right = tf.unstack(tf.clip_by_value(tf.round(centre + half), 0.0, tf.stack([height, width])))
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = tf.where(inside[None, :, :, None], other, images)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, kept
