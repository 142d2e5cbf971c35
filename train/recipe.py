"""Training recipes: YAML files validated into typed, frozen dataclasses.

A recipe says everything a run needs (backbone, weights, data, split, head, augmentation, optimizer,
schedule and the list of stages) so that one training loop serves every backbone. Every problem is
reported as a ConfigError naming the file, the field, the value received and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carclf import backbones, contract, imaging, tta
from carclf.errors import ConfigError, NotFound
from carclf.imaging import Size, plain_size
from carclf.train.augment import check_pipeline
from carclf.train.mixing import METHODS as MIX_METHODS
from carclf.train.mixing import MixConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: Recipes of experiments whose results are in docs/RESULTS.md; found by name like the main ones.
EXPERIMENTS_DIR = RECIPES_DIR / "experiments"
PROJECT_ROOT = RECIPES_DIR.parent.parent  # packaged recipes name files relative to it (../shared/...)
_MISSING = object()

UNFREEZE_MODES = ("none", "top_blocks", "all")
POOLINGS = ("avg", "max", "bilinear")  # train/pooling.py
# Activations of the head's hidden layers: Keras names (keras.activations.get), checked when the recipe is read
# rather than when the model is built, after the data scan.
HIDDEN_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "mish", "tanh",
                      "sigmoid", "softplus", "linear")
OPTIMIZERS = ("adam", "sgd")
ON_MISSING_WEIGHTS = ("fail", "scratch")
MAX_SEED = 2**32 - 1  # numpy's and Keras's seeds are unsigned 32-bit
# A recipe's name names its run folders (runs/<name>-<timestamp>), so it must stay one plain folder name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Unfreeze:
    """Which backbone layers a stage trains: none (frozen), the top ``blocks`` blocks, or all. Blocks are the
    backbone's numbered blocks and its stem (``backbones.block_indices``); more than it has is refused once the
    backbone is built (``model.check_unfreeze``)."""

    mode: str = "none"
    blocks: int = 0

    def __str__(self) -> str:
        return f"top_blocks {self.blocks}" if self.mode == "top_blocks" else self.mode


@dataclass(frozen=True)
class Stage:
    """One stage of training. With ``average_last`` N > 0 the stage ends on the mean of the weights of its
    last N epochs (stochastic weight averaging), not on its best checkpoint. With ``warmup_epochs`` W > 0 the
    learning rate climbs linearly to ``lr`` over the stage's first W epochs (counted in steps). With ``mix``
    the stage trains on MixUp or CutMix batches (``carclf.train.mixing``)."""

    name: str
    epochs: int
    lr: float
    batch_size: int
    image_size: Size  # one side (a square input) or (height, width)
    unfreeze: Unfreeze = Unfreeze()
    average_last: int = 0
    warmup_epochs: float = 0.0
    mix: MixConfig | None = None


FOLD_PLACEHOLDER = "{fold}"


@dataclass(frozen=True)
class ExtraSource:
    """Labelled photos that only ever train, never validate: a CSV ``Id,Category`` (for example the
    pseudo-labels ``carclf pseudo-label`` writes for unlabelled photos) and the folder its ids name.
    ``{fold}`` in ``csv`` stands for the run's fold, so each fold of a cross-validation reads its own file."""

    csv: str
    images: str

    def csv_for(self, fold: int) -> str:
        return self.csv.replace(FOLD_PLACEHOLDER, str(fold))


@dataclass(frozen=True)
class DataConfig:
    """Kaggle layout: ``train`` = folder of class folders, or ``csv`` (Id,Category) + ``images`` folder;
    ``extra_train`` sources join the training part of the split."""

    train: str | None = None
    csv: str | None = None
    images: str | None = None
    classes: str | None = None
    min_side: int = 32
    extra_train: tuple[ExtraSource, ...] = ()
    channel_order: str = "rgb"  # how the photos (train and extra_train) store colours (imaging.CHANNEL_ORDERS)


@dataclass(frozen=True)
class SplitConfig:
    """Hold-out (``val_fraction`` of each class) or, with ``folds`` >= 2, fold ``fold`` of a stratified k-fold."""

    val_fraction: float = 0.2
    seed: int = 42
    folds: int = 0
    fold: int = 0


@dataclass(frozen=True)
class HeadConfig:
    """The winning solutions' head: pooling, BatchNormalization, dropout, dense layers with L2, softmax."""

    pooling: str = "avg"
    # The backbone layer whose output the head pools; None: the backbone's own output. Bilinear pooling reads
    # a narrower layer (MobileNetV2's 320-channel ``block_16_project_BN``: 51,360 pairs, not 1280's 820,000).
    feature_layer: str | None = None
    batchnorm: bool = True
    # Share of the old moving statistics kept at each step. Keras's 0.99 needs hundreds of steps to follow
    # the features; a small data set gives ten steps an epoch, so inference lags training (recipes here use 0.9).
    batchnorm_momentum: float = 0.99
    dropout: float = 0.25
    hidden_units: tuple[int, ...] = (256,)
    hidden_activation: str = "relu"
    l2: float = 1e-4


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    amsgrad: bool = True
    momentum: float = 0.9


@dataclass(frozen=True)
class LossConfig:
    """Cross-entropy on the class ids; ``label_smoothing`` moves that share of the target to the other classes."""

    label_smoothing: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate and stopping policy shared by all stages."""

    monitor: str = "val_accuracy"
    decay_per_epoch: float = 0.95       # exponential decay: lr *= decay_per_epoch after every epoch
    plateau_factor: float = 0.5         # ReduceLROnPlateau
    plateau_patience: int = 2
    min_lr: float = 1e-6
    early_stopping_patience: int = 5


@dataclass(frozen=True)
class Recipe:
    name: str
    backbone: str
    weights: str | None
    stages: tuple[Stage, ...]
    on_missing_weights: str = "fail"
    seed: int = 42
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    head: HeadConfig = HeadConfig()
    augmentation: tuple[dict[str, Any], ...] = ()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    tta: tuple[str, ...] = ("none", "hflip", "hflip_crops")
    resize: str = "squash"  # how photos become model inputs (carclf.imaging.RESIZE_MODES)
    source: str = field(default="<memory>", compare=False)

    @property
    def final_size(self) -> Size:
        return self.stages[-1].image_size

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the resolved config written into every run folder); ``load_recipe`` reads it back."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["stages"] = [{**dataclasses.asdict(s), "unfreeze": str(s.unfreeze),
                          "image_size": contract.size_json(s.image_size)} for s in self.stages]
        out["head"]["hidden_units"] = list(self.head.hidden_units)
        out["augmentation"] = [dict(t) for t in self.augmentation]
        out["tta"] = list(self.tta)
        out["data"]["extra_train"] = [dataclasses.asdict(e) for e in self.data.extra_train]
        return out

    def with_overrides(self, **changes: Any) -> Recipe:
        """A copy with top-level fields or ``data``/``split`` fields replaced (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:  # errors found later name the file alone, not overrides nobody gave
            return self
        data_fields = {f.name for f in dataclasses.fields(DataConfig)}
        split_fields = {"val_fraction", "split_seed", "folds", "fold"}
        data = {k: v for k, v in changes.items() if k in data_fields}
        split = {("seed" if k == "split_seed" else k): v for k, v in changes.items() if k in split_fields}
        top = {k: v for k, v in changes.items() if k not in data_fields and k not in split_fields}
        if "weights" in top and top["weights"] in ("none", "None", ""):
            top["weights"] = None
        recipe = dataclasses.replace(self, **top)
        if data:
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, **data))
        if split:
            recipe = dataclasses.replace(recipe, split=dataclasses.replace(recipe.split, **split))
        # Re-read as data so an override is checked exactly like the file's own values.
        return parse_recipe(recipe.to_dict(), source=f"{self.source} (with command-line overrides)")


# ---------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------

class _Fields:
    """Typed access to one mapping of a config file; every error names the file and the dotted field."""

    def __init__(self, data: Any, source: str, path: str = ""):
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, received {data!r}", source=source, field=path or "<top>")
        self.data, self.source, self.path = dict(data), source, path
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=self.name(key))

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None and default is not _MISSING:
            if default is _MISSING:
                others = [k for k in self.data if isinstance(k, str) and k not in self.used]
                near = difflib.get_close_matches(key, others, n=1, cutoff=0.75)
                hint = f" (the field {near[0]!r} is unknown: a misspelling of {key!r}?)" if near else ""
                raise self.error(key, f"is required{hint}")
            return default
        return self.data[key]

    def get(self, key: str, kind: type, default: Any = _MISSING, *, choices: Sequence[Any] = (),
            minimum: float | None = None, maximum: float | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if kind is float and isinstance(value, int | str) and not isinstance(value, bool):
            try:
                value = float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(key, f"expected {kind.__name__}, received {value!r}")
        if kind is float and not math.isfinite(value):  # NaN passes every < and > check below
            raise self.error(key, f"expected a finite number, received {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {list(choices)}, received {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected a value >= {minimum}, received {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"expected a value <= {maximum}, received {value!r}")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.raw(key, {}), self.source, self.name(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], f"unknown field (received {self.data[unknown[0]]!r}); "
                                         f"expected one of {sorted(self.used)}")


def parse_unfreeze(value: Any, source: str, field_name: str) -> Unfreeze:
    """'none' | 'all' | 'top_blocks N' (or a mapping {top_blocks: N})."""
    if isinstance(value, Mapping) and set(value) == {"top_blocks"}:
        value = f"top_blocks {value['top_blocks']}"
    if value is False or value is None:
        value = "none"
    text = str(value).strip()
    parts = text.split()
    if parts == ["none"] or parts == ["all"]:
        return Unfreeze(parts[0])
    if len(parts) == 2 and parts[0] == "top_blocks" and parts[1].isdigit() and int(parts[1]) > 0:
        return Unfreeze("top_blocks", int(parts[1]))
    raise ConfigError(f"expected 'none', 'all' or 'top_blocks N' with N >= 1, received {value!r}",
                      source=source, field=field_name)


def _parse_stage(data: Any, source: str, index: int) -> Stage:
    f = _Fields(data, source, f"stages[{index}]")
    stage = Stage(
        name=_name(f, f"stage{index + 1}", names="the stage's checkpoint files"),
        epochs=f.get("epochs", int, minimum=1),
        lr=_positive(f, "lr"),
        batch_size=f.get("batch_size", int, minimum=1),
        image_size=_parse_image_size(f),
        unfreeze=parse_unfreeze(f.raw("unfreeze", "none"), source, f.name("unfreeze")),
        average_last=f.get("average_last", int, 0, minimum=0),
        warmup_epochs=f.get("warmup_epochs", float, 0.0, minimum=0.0),
        mix=_parse_mix(f),
    )
    for key in ("average_last", "warmup_epochs"):
        if getattr(stage, key) > stage.epochs:
            raise f.error(key, f"expected at most the stage's {stage.epochs} epochs, received {getattr(stage, key)}")
    f.finish()
    return stage


def _positive(f: _Fields, key: str) -> float:
    value = f.get(key, float, minimum=0.0)
    if value <= 0:
        raise f.error(key, f"expected a value > 0, received {value!r}")
    return value


def _below_one(f: _Fields, key: str, default: float) -> float:
    """A factor in [0, 1): ReduceLROnPlateau refuses 1 (it would never lower the rate)."""
    value = f.get(key, float, default, minimum=0.0)
    if value >= 1:
        raise f.error(key, f"expected a value < 1, received {value!r}")
    return value


def _name(f: _Fields, default: Any = _MISSING, names: str = "the run folders") -> str:
    value = f.get("name", str, default)
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise f.error("name", "expected a plain file name (letters, digits, '.', '_', '-'; at most 100 "
                              f"characters; it names {names}), received {value!r}")
    return value


def _parse_image_size(stage: _Fields) -> Size:
    """``image_size: S`` (a square) or ``[height, width]``, each side 32..1024; a square pair becomes S."""
    value = stage.raw("image_size")
    if isinstance(value, int) and not isinstance(value, bool):
        return stage.get("image_size", int, minimum=32, maximum=1024)
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise stage.error("image_size", f"expected one side or [height, width] in pixels, received {value!r}")
    for side in value:
        if not 32 <= side <= 1024:
            raise stage.error("image_size", f"expected sides from 32 to 1024, received {list(value)!r}")
    return plain_size(value)


def _parse_mix(stage: _Fields) -> MixConfig | None:
    """``mix: {method: mixup|cutmix, alpha: A > 0, p: P in [0, 1]}``, or absent / ``none``."""
    if stage.raw("mix", None) in (None, "none"):
        return None
    m = stage.sub("mix")
    config = MixConfig(method=m.get("method", str, choices=MIX_METHODS),
                       alpha=m.get("alpha", float, 1.0, minimum=0.0),
                       p=m.get("p", float, 1.0, minimum=0.0, maximum=1.0))
    if config.alpha <= 0:
        raise m.error("alpha", f"expected a value > 0, received {config.alpha!r}")
    m.finish()
    return config


def _parse_augmentation(value: Any, source: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"expected a list of transforms, received {value!r}", source=source, field="augmentation")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError(f"expected a mapping with a transform 'name', received {item!r}",
                              source=source, field=f"augmentation[{i}]")
        for key, param in item.items():  # albumentations takes a NaN limit and spoils every image
            numbers = param if isinstance(param, list | tuple) else [param]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                expected = "finite numbers" if isinstance(param, list | tuple) else "a finite number"
                raise ConfigError(f"expected {expected}, received {param!r}", source=source,
                                  field=f"augmentation[{i}].{key}")
        out.append(dict(item))
    return tuple(out)


def parse_recipe(data: Any, source: str = "<memory>") -> Recipe:
    """Build a validated Recipe from plain data (the content of a recipe YAML file)."""
    f = _Fields(data, source)
    d, s, h, o, sc = f.sub("data"), f.sub("split"), f.sub("head"), f.sub("optimizer"), f.sub("schedule")
    lo = f.sub("loss")
    stages_raw = f.raw("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"expected a non-empty list of stages, received {stages_raw!r}", source=source,
                          field="stages")
    tta_raw = f.raw("tta", ["none", "hflip", "hflip_crops"])
    # The policies the final model is evaluated with; 'none' is evaluation without TTA, so [] would evaluate nothing.
    if not isinstance(tta_raw, list) or not tta_raw or not all(isinstance(t, str) for t in tta_raw):
        raise ConfigError(f"expected a non-empty list of TTA policy names (['none']: evaluate without TTA), "
                          f"received {tta_raw!r}", source=source, field="tta")
    weights = f.raw("weights", None)
    recipe = Recipe(
        name=_name(f),
        backbone=f.get("backbone", str),
        weights=None if weights in (None, "none", "None", "") else str(weights),
        on_missing_weights=f.get("on_missing_weights", str, "fail", choices=ON_MISSING_WEIGHTS),
        seed=f.get("seed", int, 42, minimum=0, maximum=MAX_SEED),
        data=DataConfig(
            train=d.get("train", str, None), csv=d.get("csv", str, None), images=d.get("images", str, None),
            classes=d.get("classes", str, None), min_side=d.get("min_side", int, 32, minimum=1),
            extra_train=_parse_extra_train(d),
            channel_order=d.get("channel_order", str, "rgb", choices=imaging.CHANNEL_ORDERS),
        ),
        split=_parse_split(s),
        head=HeadConfig(
            pooling=h.get("pooling", str, "avg", choices=POOLINGS),
            feature_layer=h.get("feature_layer", str, None),
            batchnorm=h.get("batchnorm", bool, True),
            batchnorm_momentum=h.get("batchnorm_momentum", float, 0.99, minimum=0.0, maximum=0.9999),
            dropout=h.get("dropout", float, 0.25, minimum=0.0, maximum=0.95),
            hidden_units=tuple(_int_list(h, "hidden_units", [256])),
            hidden_activation=h.get("hidden_activation", str, "relu", choices=HIDDEN_ACTIVATIONS),
            l2=h.get("l2", float, 1e-4, minimum=0.0),
        ),
        augmentation=_parse_augmentation(f.raw("augmentation", []), source),
        optimizer=OptimizerConfig(name=o.get("name", str, "adam", choices=OPTIMIZERS),
                                  amsgrad=o.get("amsgrad", bool, True),
                                  momentum=o.get("momentum", float, 0.9, minimum=0.0, maximum=1.0)),
        loss=LossConfig(label_smoothing=lo.get("label_smoothing", float, 0.0, minimum=0.0, maximum=0.5)),
        schedule=ScheduleConfig(
            monitor=sc.get("monitor", str, "val_accuracy", choices=("val_accuracy", "val_loss")),
            decay_per_epoch=sc.get("decay_per_epoch", float, 0.95, minimum=0.0, maximum=1.0),
            plateau_factor=_below_one(sc, "plateau_factor", 0.5),
            plateau_patience=sc.get("plateau_patience", int, 2, minimum=1),
            min_lr=sc.get("min_lr", float, 1e-6, minimum=0.0),
            early_stopping_patience=sc.get("early_stopping_patience", int, 5, minimum=1),
        ),
        stages=tuple(_parse_stage(st, source, i) for i, st in enumerate(stages_raw)),
        tta=tuple(tta_raw),
        resize=f.get("resize", str, "squash", choices=imaging.RESIZE_MODES),
        source=source,
    )
    for sub in (d, s, h, o, lo, sc, f):
        sub.finish()
    return validate(recipe)


def _parse_extra_train(d: _Fields) -> tuple[ExtraSource, ...]:
    value = d.raw("extra_train", [])
    if not isinstance(value, list):
        raise d.error("extra_train", f"expected a list of {{csv: ..., images: ...}} mappings, received {value!r}")
    sources = []
    for i, item in enumerate(value):
        e = _Fields(item, d.source, d.name(f"extra_train[{i}]"))
        sources.append(ExtraSource(csv=e.get("csv", str), images=e.get("images", str)))
        e.finish()
    return tuple(sources)


def _parse_split(s: _Fields) -> SplitConfig:
    split = SplitConfig(val_fraction=s.get("val_fraction", float, 0.2, minimum=0.0, maximum=0.9),
                        seed=s.get("seed", int, 42, minimum=0, maximum=MAX_SEED), folds=s.get("folds", int, 0, minimum=0),
                        fold=s.get("fold", int, 0, minimum=0))
    if split.folds == 1:
        raise s.error("folds", "expected 0 (a hold-out split by val_fraction) or at least 2, received 1")
    if split.folds and split.fold >= split.folds:
        raise s.error("fold", f"expected a fold in [0, {split.folds}) for split.folds {split.folds}, "
                              f"received {split.fold}")
    if not split.folds and split.fold:
        raise s.error("fold", f"needs split.folds (k of a k-fold split), received fold {split.fold} without it")
    return split


def _int_list(f: _Fields, key: str, default: list[int]) -> list[int]:
    value = f.raw(key, default)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in value):
        raise f.error(key, f"expected a list of positive integers, received {value!r}")
    return value


def validate(recipe: Recipe) -> Recipe:
    """Cross-field checks: the backbone exists, weights are valid for it, the data source is complete, the
    augmentation keeps every stage's images."""
    src = recipe.source
    try:
        spec = backbones.get(recipe.backbone)
    except ConfigError as exc:
        raise ConfigError(exc.message.split(": ", 1)[-1], source=src, field="backbone") from None
    if recipe.weights is not None and recipe.weights not in spec.weight_sources:
        path = os.path.expanduser(recipe.weights)
        if not os.path.isfile(path):
            if recipe.on_missing_weights == "fail":
                raise ConfigError(f"expected None, one of {list(spec.weight_sources)} or an existing weights "
                                  f"file, received {recipe.weights!r}", source=src, field="weights")
        # A file that cannot be weights is refused here, before TensorFlow starts, whatever on_missing_weights
        # says: an unreadable file is never a reason to train from scratch.
        elif problem := backbones.weights_file_problem(path):
            raise ConfigError(f"expected Keras weights of {spec.name!r}, received {recipe.weights!r}: {problem}",
                              source=src, field="weights")
    data = recipe.data
    if data.train and (data.csv or data.images):
        raise ConfigError(f"give either data.train or data.csv + data.images, received train={data.train!r}, "
                          f"csv={data.csv!r}", source=src, field="data")
    if not data.train and not (data.csv and data.images):
        raise ConfigError("expected data.train (a folder of class folders) or data.csv and data.images, "
                          f"received {dataclasses.asdict(data)!r}", source=src, field="data")
    for i, extra in enumerate(data.extra_train):
        rest = extra.csv.replace(FOLD_PLACEHOLDER, "")
        if "{" in rest or "}" in rest:
            raise ConfigError(f"the only placeholder is {FOLD_PLACEHOLDER}, received {extra.csv!r}", source=src,
                              field=f"data.extra_train[{i}].csv")
        if FOLD_PLACEHOLDER in extra.csv and not recipe.split.folds:
            raise ConfigError(f"{FOLD_PLACEHOLDER} needs a k-fold split (split.folds), received {extra.csv!r}",
                              source=src, field=f"data.extra_train[{i}].csv")
    for name in recipe.tta:
        try:
            tta.get_policy(name)
        except ConfigError as exc:
            raise ConfigError(exc.message.split(": ", 1)[-1], source=src, field="tta") from None
    for i, stage in enumerate(recipe.stages):
        if min(imaging.side_pair(stage.image_size)) < spec.min_input_size:
            raise ConfigError(f"backbone {spec.name!r} takes sides of at least {spec.min_input_size} px, received "
                              f"{stage.image_size!r}", source=src, field=f"stages[{i}].image_size")
    if recipe.augmentation:  # each stage's size: a transform must keep it, or the run fails mid-epoch
        for size in {imaging.side_pair(s.image_size): s.image_size for s in recipe.stages}.values():
            check_pipeline(recipe.augmentation, size, src)
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, received {names}", source=src, field="stages")
    return recipe


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: a path to a YAML file, or the name of a packaged recipe in train/recipes/ or
    train/recipes/experiments/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise NotFound(f"no recipe file {str(path)!r}")
        return path
    for folder in (RECIPES_DIR, EXPERIMENTS_DIR):
        packaged = folder / f"{name_or_path}.yaml"
        if packaged.is_file():
            return packaged
    raise NotFound(f"unknown recipe {str(name_or_path)!r}; expected a YAML file or one of {recipe_names()}")


def recipe_names(experiments: bool = True) -> list[str]:
    """Names of the packaged recipes: the main ones, then (with ``experiments``) those of past experiments."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    return names + sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")) if experiments else names


def _duplicate_key(root) -> str | None:
    """Where a mapping of the composed YAML ``root`` gives a key twice (PyYAML keeps the last value silently, so a
    recipe's second ``epochs:`` would win unnoticed); None when no key repeats. Each node is read once, however
    many aliases point at it."""
    todo, visited = [root], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    ident = (key.tag, key.value)
                    if ident in seen:
                        return (f"key {key.value!r} is given twice (lines {seen[ident] + 1} and "
                                f"{key.start_mark.line + 1})")
                    seen[ident] = key.start_mark.line
                todo.append(value)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return None


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe by name (packaged) or YAML path. A packaged recipe's relative paths (weights file, data) are
    relative to the project's root, so it reads the same files from whatever folder it is run."""
    path = recipe_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        twice = _duplicate_key(yaml.compose(text))  # nodes only: composing constructs no object
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"is not valid YAML{where}: {problem}", source=str(path)) from None
    if twice:
        raise ConfigError(f"is not valid YAML: {twice}", source=str(path))
    if isinstance(data, dict) and path.resolve().parent in (RECIPES_DIR, EXPERIMENTS_DIR):
        data = _rooted(data, PROJECT_ROOT)
    return parse_recipe(data, source=str(path))


def _rooted(data: dict, root: Path) -> dict:
    """``data`` with its relative file paths made absolute against ``root`` (a copy; other values untouched)."""

    def rooted(value):
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)) and (
                "/" in value or value.endswith((".h5", ".keras", ".weights.h5"))):
            return os.path.normpath(root / value)
        return value

    out = dict(data)
    if "weights" in data:
        out["weights"] = rooted(data["weights"])
    if isinstance(data.get("data"), dict):
        section = dict(data["data"])
        for key in ("train", "csv", "images", "classes"):
            if key in section:
                section[key] = rooted(section[key])
        if isinstance(section.get("extra_train"), list):
            section["extra_train"] = [{k: rooted(v) if k in ("csv", "images") else v for k, v in e.items()}
                                      if isinstance(e, dict) else e for e in section["extra_train"]]
        out["data"] = section
    return out
