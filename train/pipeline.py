"""tf.data input pipelines: decode and resize once with ``carclf.imaging`` (cached), then augment.

Decoding a large JPEG costs far more than a training step of a small backbone, so photos are decoded and
prepared once per image size and cached in memory; the training stream shuffles, augments (albumentations
through ``tf.numpy_function``, in parallel), batches and prefetches. Evaluation uses the cached prepared
images as they are: exactly what ``tta`` policy ``none`` and the exported SavedModel compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from carclf import imaging
from carclf.train.augment import Augmenter
from carclf.train.data import Sample
from carclf.train.mixing import MixConfig, mix_batch


def prepared_images(samples: Sequence[Sample], image_size: imaging.Size, resize: str = "squash",
                    cache: bool = True, channel_order: str = "rgb"):
    """(uint8 [height, width, 3], label) per sample, in order: read, decode (EXIF-aware), to RGB from the files'
    ``channel_order``, the one resize (``resize`` mode, ``imaging.RESIZE_MODES``)."""
    import tensorflow as tf

    paths = [s.path for s in samples]
    labels = [s.label for s in samples]
    ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))

    decode = imaging.traced_decode()  # traced once per process, not once per data set

    def load(path, label):
        image = imaging.to_rgb(decode(tf.io.read_file(path)), channel_order)
        image = imaging.prepare(image, image_size, resize)
        return tf.ensure_shape(image, [*imaging.side_pair(image_size), 3]), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.cache() if cache else ds


def training_stream(prepared, num_samples: int, batch_size: int, augmenter: Augmenter, seed: int,
                    mix: MixConfig | None = None, num_classes: int = 0):
    """An endless, seeded stream of augmented batches; ``steps_per_epoch`` batches make one epoch.
    With ``mix`` the batches are mixed (``carclf.train.mixing``) and carry [B, num_classes] soft targets."""
    import tensorflow as tf

    ds = prepared.shuffle(max(num_samples, 1), seed=seed, reshuffle_each_iteration=True).repeat()
    # One seed per image from a seeded stream: augmentation does not depend on thread scheduling.
    seeds = tf.data.Dataset.random(seed=seed).map(lambda s: s % (2**31 - 1))
    ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(lambda item, s: (augmenter.tf_apply(item[0], s), item[1]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=False)
    if mix is not None:
        batch_seeds = tf.data.Dataset.random(seed=seed + 1).batch(2)
        ds = tf.data.Dataset.zip((ds, batch_seeds)).map(
            lambda batch, s: mix_batch(batch[0], batch[1], num_classes, mix, s),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_batches(prepared, batch_size: int, num_classes: int = 0):
    """Batches of prepared images; with ``num_classes`` the labels come one-hot (for a mixing stage)."""
    import tensorflow as tf

    if num_classes:
        prepared = prepared.map(lambda image, label: (image, tf.one_hot(label, num_classes, dtype=tf.float32)))
    return prepared.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_samples / batch_size))
