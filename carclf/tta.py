"""Test-time augmentation policies, declared as data and shared by evaluation and the ensemble.

A policy is an ordered tuple of views; a view is a crop box (fractions of the photo) and a flip. The
``full`` view is exactly the training evaluation preprocessing (``imaging.prepare`` of the whole photo),
so policy ``none`` reproduces plain evaluation bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from carclf import imaging
from carclf.errors import ConfigError

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class View:
    name: str
    box: tuple[float, float, float, float] = FULL_BOX  # top, left, bottom, right, fractions
    flip: bool = False

    def __post_init__(self) -> None:
        top, left, bottom, right = self.box
        if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
            raise ConfigError(f"box must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1, received "
                              f"{self.box}", source=f"TTA view {self.name!r}", field="box")


@dataclass(frozen=True)
class TTAPolicy:
    name: str
    views: tuple[View, ...]

    def __post_init__(self) -> None:
        if not self.views:
            raise ConfigError("a TTA policy needs at least one view", source=f"TTA policy {self.name!r}",
                              field="views")

    def __len__(self) -> int:
        return len(self.views)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "views": [asdict(v) for v in self.views]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TTAPolicy:
        try:
            views = tuple(
                View(name=str(v["name"]), box=tuple(float(x) for x in v.get("box", FULL_BOX)),
                     flip=bool(v.get("flip", False)))
                for v in data["views"]
            )
            return cls(name=str(data["name"]), views=views)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed TTA policy {dict(data)!r}: {exc}", field="tta") from None


def _center(frac: float) -> tuple[float, float, float, float]:
    m = (1.0 - frac) / 2
    return (m, m, 1.0 - m, 1.0 - m)


_C = 0.875  # crop fraction: the crops keep 87.5 % of each side
POLICIES: dict[str, TTAPolicy] = {
    p.name: p
    for p in (
        TTAPolicy("none", (View("full"),)),
        TTAPolicy("hflip", (View("full"), View("full_flip", flip=True))),
        TTAPolicy("hflip_crops", (
            View("full"), View("full_flip", flip=True),
            View("center", _center(_C)), View("center_flip", _center(_C), flip=True),
            View("top_left", (0.0, 0.0, _C, _C)), View("top_right", (0.0, 1 - _C, _C, 1.0)),
            View("bottom_left", (1 - _C, 0.0, 1.0, _C)), View("bottom_right", (1 - _C, 1 - _C, 1.0, 1.0)),
        )),
    )
}


def get_policy(policy: str | TTAPolicy | Mapping[str, Any]) -> TTAPolicy:
    """A policy by name, or a declared one (mapping with name and views)."""
    if isinstance(policy, TTAPolicy):
        return policy
    if isinstance(policy, Mapping):
        return TTAPolicy.from_dict(policy)
    if policy in POLICIES:
        return POLICIES[policy]
    raise ConfigError(f"unknown TTA policy {policy!r}; expected one of {sorted(POLICIES)} or a mapping "
                      "with name and views", field="tta")


def policy_names(text: str, flag: str) -> list[str]:
    """The policy names of a comma-separated command-line value (``flag``): at least one, each known."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    expected = f"expected a comma-separated list of {sorted(POLICIES)}"
    if not names:
        raise ConfigError(f"{flag} {text!r} names no TTA policy; {expected}")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ConfigError(f"{flag} {text!r}: unknown TTA policy {unknown[0]!r}; {expected}")
    return names


def make_views(image, policy: str | TTAPolicy, size: imaging.Size, resize: str = "squash"):
    """All views of one decoded uint8 [H, W, 3] image: uint8 [len(policy), height, width, 3] for the model's
    ``size`` (one side, or (height, width)); each crop is resized as the model was trained
    (``imaging.prepare`` with the model's ``resize`` mode)."""
    import tensorflow as tf

    views = []
    for view in get_policy(policy).views:
        crop = image if view.box == FULL_BOX else imaging.crop_fraction(image, view.box)
        out = imaging.prepare(crop, size, resize)
        if view.flip:
            out = tf.image.flip_left_right(out)
        views.append(out)
    return tf.stack(views)


def traced_views(policy: str | TTAPolicy, size: imaging.Size, resize: str = "squash", channel_order: str = "rgb"):
    """``make_views`` of one decoded photo stored in ``channel_order`` (``imaging.to_rgb`` first), as a graph
    for any [H, W, 3] uint8 image: the same pixels as eagerly, several times faster per photo. Traced once per
    process for each policy, size, resize mode and channel order (a trace costs a tenth of a second or more)."""
    return _traced_views(get_policy(policy), imaging.side_pair(size), imaging.check_resize(resize),
                         imaging.check_channel_order(channel_order))


@functools.lru_cache(maxsize=64)
def _traced_views(policy: TTAPolicy, size: tuple[int, int], resize: str, channel_order: str):
    import tensorflow as tf

    return tf.function(lambda image: make_views(imaging.to_rgb(image, channel_order), policy, size, resize),
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])


def average_views(probabilities, num_views: int):
    """Mean over each photo's consecutive views: [batch * num_views, C] -> [batch, C]."""
    import numpy as np

    probs = np.asarray(probabilities)
    return probs.reshape(-1, num_views, probs.shape[-1]).mean(axis=1)
