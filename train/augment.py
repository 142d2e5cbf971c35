"""Training augmentation: an albumentations pipeline declared in the recipe, seeded, saved with the model.

It runs on the uint8 images that ``carclf.imaging.prepare`` produced, so training and evaluation share
decoding and resizing and augmentation is the only difference. Each image gets its own seed from a
seeded stream (see ``loop``), and each worker thread its own copy of the pipeline, so a run's
augmentations do not depend on thread scheduling.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from carclf.errors import ConfigError
from carclf.imaging import Size, side_pair

IMAGE_SIZE = "image_size"  # a parameter value replaced by the stage's image size


def _resolve_params(params: Mapping[str, Any], image_size: Size, source: str, field_name: str) -> dict[str, Any]:
    """Replace the value "image_size": ``size`` becomes (height, width), ``height`` and ``width`` their side,
    any other parameter the side of a square stage (a rectangular stage has no one side to give it)."""
    height, width = side_pair(image_size)
    out = {}
    for key, value in params.items():
        if value == IMAGE_SIZE:
            if key in ("size", "height", "width"):
                value = {"size": (height, width), "height": height, "width": width}[key]
            elif height == width:
                value = height
            else:
                raise ConfigError(f"parameter {key!r} cannot take the stage's image_size {height}x{width}: only "
                                  "'size', 'height' and 'width' can follow a rectangular stage", source=source,
                                  field=f"{field_name}.{key}")
        out[key] = value
    return out


def build_compose(transforms: Sequence[Mapping[str, Any]], image_size: Size, seed: int,
                  source: str = "recipe"):
    """An ``A.Compose`` from declared transforms ({name: <albumentations class>, <its parameters>})."""
    import albumentations as A

    built = []
    for i, item in enumerate(transforms):
        item = dict(item)
        name = item.pop("name")
        cls = getattr(A, name, None)
        if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            raise ConfigError(f"unknown albumentations transform {name!r}", source=source,
                              field=f"augmentation[{i}].name")
        signature = inspect.signature(cls.__init__).parameters
        accepted = sorted(set(signature) - {"self"})
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        unknown = [] if takes_any else sorted(set(item) - set(accepted))
        if unknown:  # albumentations only warns, then builds the transform with its default for the parameter
            near = difflib.get_close_matches(unknown[0], accepted, n=1)
            hint = f" (a misspelling of {near[0]!r}?)" if near else ""
            raise ConfigError(f"{name} has no parameter {unknown[0]!r}{hint}; expected some of {accepted}",
                              source=source, field=f"augmentation[{i}].{unknown[0]}")
        params = _resolve_params(item, image_size, source, f"augmentation[{i}]")
        try:
            built.append(cls(**params))
        except Exception as exc:  # albumentations validates parameters (pydantic) when a transform is built
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"invalid parameters {item!r} for {name}: {detail}", source=source,
                              field=f"augmentation[{i}]") from None
    return A.Compose(built, seed=seed)


def check_pipeline(transforms: Sequence[Mapping[str, Any]], image_size: Size, source: str = "recipe") -> None:
    """Refuse a pipeline unless each transform, applied on its own, keeps a uint8 image of the stage's shape.

    Each one is forced to apply once (whatever its p) to a noise image, and its raw output is checked: a
    transform of p < 1 that one seeded run skipped would otherwise stop training mid-epoch, and a float result
    cast back to uint8 would spoil every image. Transforms that need boxes or masks fail here too."""
    shape = (*side_pair(image_size), 3)
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for i, transform in enumerate(build_compose(transforms, image_size, 0, source).transforms):
        name = type(transform).__name__
        try:
            out = transform(image=image.copy(), force_apply=True)["image"]
        except Exception as exc:  # e.g. KeyError 'bboxes', ValueError on a missing mask
            detail = " ".join(f"{type(exc).__name__} {exc}".split())[:300]
            raise ConfigError(f"{name} does not run on an image alone (training gives it no boxes, masks or "
                              f"keypoints): {detail}", source=source, field=f"augmentation[{i}]") from None
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != shape:
            got = f"{out.dtype}{list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ConfigError(f"{name} must keep uint8 images of {'x'.join(map(str, shape))} whatever its p, it "
                              f"returned {got}", source=source, field=f"augmentation[{i}]")


class Augmenter:
    """Applies the declared pipeline to one uint8 [height, width, 3] image with a given per-image seed."""

    def __init__(self, transforms: Sequence[Mapping[str, Any]], image_size: Size, seed: int,
                 source: str = "recipe"):
        self.shape = (*side_pair(image_size), 3)
        self.compose = build_compose(transforms, image_size, seed, source)
        self.empty = not transforms
        self._local = threading.local()
        if transforms:
            check_pipeline(transforms, image_size, source)

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        if self.empty:
            return image
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            pipeline = self._local.pipeline = copy.deepcopy(self.compose)
        pipeline.set_random_seed(int(seed))
        return np.ascontiguousarray(pipeline(image=image)["image"], dtype=np.uint8)

    def to_dict(self) -> dict[str, Any]:
        import albumentations as A

        return A.to_dict(self.compose)

    def save(self, path: str | os.PathLike) -> None:
        """Write the exact pipeline (albumentations' own serialization) next to the model."""
        import albumentations as A

        fmt = "yaml" if str(path).endswith((".yaml", ".yml")) else "json"
        A.save(self.compose, str(path), data_format=fmt)

    def tf_apply(self, image, seed):
        """The pipeline as a TF op (tf.numpy_function) for tf.data."""
        import tensorflow as tf

        out = tf.numpy_function(self.__call__, [image, seed], tf.uint8, stateful=False)
        out.set_shape(list(self.shape))
        return out


def load_pipeline(path: str | os.PathLike):
    """Read a saved pipeline back (to check or reuse exactly what a run trained with)."""
    import albumentations as A

    fmt = "yaml" if str(path).endswith((".yaml", ".yml")) else "json"
    return A.load(str(path), data_format=fmt)
