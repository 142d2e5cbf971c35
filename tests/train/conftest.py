"""Fixtures for the training tests: real photos copied into small data folders, and file factories."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import SAMPLE_DIR


def jpeg_bytes(array: np.ndarray, quality: int = 90, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality, **save_kwargs)
    return buf.getvalue()


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_two_class_data(root: Path) -> Path:
    """root/train/<0,1>/ with the sample's real photos of two classes, and root/classes.json naming them."""
    names = json.loads((SAMPLE_DIR / "classes.json").read_text())
    for cid in ("0", "1"):
        shutil.copytree(SAMPLE_DIR / "train" / cid, root / "train" / cid)
    (root / "classes.json").write_text(json.dumps({c: names[c] for c in ("0", "1")}))
    return root


@pytest.fixture
def two_class_data(tmp_path) -> Path:
    return make_two_class_data(tmp_path / "data")


def tiny_recipe(data_root: Path, **overrides) -> dict:
    """A recipe dict for the registry's ``tiny_cnn`` (random init) at 32 -> 48 px: two stages of one epoch each.
    Tests of what a real architecture brings (its blocks, pretrained BatchNorm) pass ``backbone="mobilenet_v2"``."""
    recipe = {
        "name": "tiny",
        "backbone": "tiny_cnn",
        "weights": "none",
        "seed": 3,
        "data": {"train": str(data_root / "train"), "classes": str(data_root / "classes.json")},
        "split": {"val_fraction": 0.4, "seed": 1},
        "head": {"hidden_units": [8], "dropout": 0.1},
        "augmentation": [{"name": "HorizontalFlip", "p": 0.5},
                         {"name": "RandomResizedCrop", "size": "image_size", "scale": [0.8, 1.0], "p": 0.5}],
        "stages": [
            {"name": "head", "epochs": 1, "lr": 1e-3, "batch_size": 4, "image_size": 32, "unfreeze": "none"},
            {"name": "top", "epochs": 1, "lr": 1e-4, "batch_size": 4, "image_size": 48,
             "unfreeze": "top_blocks 2"},
        ],
        "tta": ["none", "hflip"],
    }
    recipe.update(overrides)
    return recipe
