"""The one registry of backbones.

Each backbone is a small declared :class:`BackboneSpec` (timm's pretrained-config idea): how to build it,
its default input size, the pixel preprocessing it expects, how its layers group into blocks for staged
unfreezing, and where its weights come from. Training, export and serving derive everything from the spec.
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from carclf import imaging
from carclf.errors import ConfigError, InvalidInput

# Pixel preprocessing modes, applied inside the model to float pixels in [0, 255].
PREPROCESSING_MODES = ("tf", "torch", "caffe", "builtin")

_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneSpec:
    """Declared facts about one backbone; ``constructor`` is "module:attribute"."""

    name: str
    constructor: str
    input_size: int
    preprocessing: str
    block_pattern: str
    weight_sources: tuple[str, ...] = ("imagenet",)
    min_input_size: int = 32  # the smallest side the architecture takes (Keras refuses less)
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ConfigError(
                f"preprocessing must be one of {PREPROCESSING_MODES}, received {self.preprocessing!r}",
                source=f"backbone {self.name}",
                field="preprocessing",
            )

    def resolve_constructor(self) -> Callable[..., Any]:
        module_name, attr = self.constructor.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def build(self, input_size: imaging.Size | None = None, weights: str | None = None):
        """Build the headless backbone (``include_top=False``) for inputs of ``input_size`` (one side for a
        square, or (height, width)).

        ``weights`` is ``None`` (random init), a named source from ``weight_sources`` (e.g. "imagenet",
        downloaded by Keras and cached under ~/.keras) or a path to a local weights file.
        """
        height, width = imaging.side_pair(input_size or self.input_size)
        weights_arg = resolve_weights(self, weights)
        ctor = self.resolve_constructor()
        try:
            return ctor(
                include_top=False,
                weights=weights_arg,
                input_shape=(height, width, 3),
                **self.constructor_kwargs,
            )
        except (OSError, ValueError, Exception) as exc:  # noqa: B014 - download failures come as many types
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if weights_arg and os.path.isfile(str(weights_arg)) and isinstance(exc, OSError | ValueError):
                raise WeightsUnreadable(
                    f"weights file {str(weights_arg)!r} does not load into backbone {self.name!r} at "
                    f"{imaging.size_text((height, width))} px ({reason}); it must be the Keras no-top "
                    f"weights of {self.constructor.split(':')[1]}"
                ) from None
            if weights_arg and not os.path.exists(str(weights_arg)) and _looks_like_download_error(exc):
                raise WeightsUnavailable(
                    f"could not download {weights_arg!r} weights for backbone {self.name!r} ({reason}); "
                    "pass a local weights file or weights=None"
                ) from exc
            if isinstance(exc, ValueError):  # the architecture refuses the arguments (an input too small)
                raise InvalidInput(f"backbone {self.name!r} cannot be built at {imaging.size_text((height, width))} "
                                   f"px: {reason}") from None
            raise


class WeightsUnavailable(InvalidInput):
    """Pretrained weights could not be fetched (no network)."""


class WeightsUnreadable(InvalidInput):
    """A local weights file is not HDF5, or does not fit the backbone: never a reason to train from scratch."""


def _looks_like_download_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        s in text
        for s in ("url fetch failure", "urlopen", "http", "name resolution", "connection", "temporary failure",
                  "network", "exception: url")
    )


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """Validate a weights argument against the spec: None, a declared source, or an existing file."""
    if weights in (None, "", "none", "None"):
        return None
    if weights in spec.weight_sources:
        return weights
    path = os.path.expanduser(weights)
    if os.path.isfile(path):
        return path
    raise ConfigError(
        f"expected None, one of {list(spec.weight_sources)} or a path to an existing weights file, "
        f"received {weights!r}",
        source=f"backbone {spec.name}",
        field="weights",
    )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def weights_file_problem(path: str) -> str | None:
    """Why a local file cannot hold Keras weights, told from its bytes without TensorFlow, or None.

    Only the format its name claims is checked: ``.h5``/``.hdf5`` must be HDF5 (the signature sits at byte 0,
    or at 512, 1024, 2048... after a user block) and ``.keras`` a zip archive. Whether the weights fit the
    backbone only loading them tells (:class:`WeightsUnreadable`).
    """
    name = path.lower()
    if not name.endswith((".keras", ".h5", ".hdf5")):
        return None
    try:
        with open(path, "rb") as f:
            if name.endswith(".keras"):
                return None if zipfile.is_zipfile(f) else "a .keras file must be a zip archive; this one is not"
            size, offset = os.fstat(f.fileno()).st_size, 0
            while offset + len(_HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return None
                offset = 512 if offset == 0 else offset * 2
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return "an .h5 file must be HDF5; this one has no HDF5 signature"


def preprocessing_layer(mode: str):
    """A Keras layer mapping float pixels in [0, 255] to what a backbone expects."""
    import keras

    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")
    if mode == "torch":
        return keras.layers.Normalization(
            mean=[255.0 * m for m in _TORCH_MEAN],
            variance=[(255.0 * s) ** 2 for s in _TORCH_STD],
            name="preprocess_torch",
        )
    if mode == "caffe":
        return keras.layers.Lambda(
            lambda x: x[..., ::-1] - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype),
            name="preprocess_caffe",
        )
    if mode == "builtin":
        return keras.layers.Identity(name="preprocess_builtin")
    raise ConfigError(f"unknown preprocessing mode {mode!r}, expected one of {PREPROCESSING_MODES}")


def block_indices(spec: BackboneSpec, backbone) -> dict[str, int]:
    """Map every backbone layer to a block index for staged unfreezing.

    Layers before the first numbered block are block 0 (the stem); numbered blocks keep their position
    in order of appearance (1..N); layers after the last numbered block join the last block (the top).
    """
    pattern = re.compile(spec.block_pattern)
    order: dict[str, int] = {}
    indices: dict[str, int] = {}
    current = 0
    for layer in backbone.layers:
        match = pattern.match(layer.name)
        if match:
            key = match.group(1)
            if key not in order:
                order[key] = len(order) + 1
            current = order[key]
        indices[layer.name] = current
    return indices


def num_blocks(spec: BackboneSpec, backbone) -> int:
    return max(block_indices(spec, backbone).values())


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; expected one of {sorted(_REGISTRY)}", field="backbone"
        ) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_specs() -> list[BackboneSpec]:
    return [_REGISTRY[n] for n in names()]


register(BackboneSpec(
    name="xception",
    constructor="keras.applications:Xception",
    input_size=299,
    preprocessing="tf",
    block_pattern=r"^block(\d+)_",
    min_input_size=71,
    family="xception",
    notes="Kaggle baseline of the competition (0.934)",
))

register(BackboneSpec(
    name="mobilenet_v2",
    constructor="keras.applications:MobileNetV2",
    input_size=224,
    preprocessing="tf",
    block_pattern=r"^block_(\d+)_",
    constructor_kwargs={"alpha": 1.0},
    family="mobilenet",
    notes="small and fast; offline ImageNet weights in ../shared/weights",
))

register(BackboneSpec(
    name="tiny_cnn",
    constructor="carclf.tiny_cnn:TinyCNN",
    input_size=32,
    preprocessing="tf",
    block_pattern=r"^block(\d+)_",
    weight_sources=(),
    min_input_size=16,
    family="test",
    notes="about 13,000 weights, for tests and smoke runs; no pretrained weights",
))

# EfficientNet B0..B7 as thin variants over one builder, Keras-applications style.
_EFFICIENTNET_SIZES = {0: 224, 1: 240, 2: 260, 3: 300, 4: 380, 5: 456, 6: 528, 7: 600}

for _b, _size in _EFFICIENTNET_SIZES.items():
    register(BackboneSpec(
        name=f"efficientnet_b{_b}",
        constructor=f"keras.applications:EfficientNetB{_b}",
        input_size=_size,
        preprocessing="builtin",  # keras EfficientNets rescale and normalize inside the model
        block_pattern=r"^block(\d)[a-z]_",
        family="efficientnet",
    ))
    register(BackboneSpec(
        name=f"efficientnet_b{_b}_ns",
        constructor=f"efficientnet.tfkeras:EfficientNetB{_b}",
        input_size=_size,
        preprocessing="torch",
        block_pattern=r"^block(\d)[a-z]_",
        weight_sources=("noisy-student", "imagenet"),
        family="efficientnet-noisy-student",
        notes="noisy-student weights from the `efficientnet` package (not in keras.applications)",
    ))
