"""Tiny real models and photos shared by the test suite.

The models are small Keras CNNs exported through the product's real export path
(``carclf.train.export.export_model``), so serving, ensemble, client and load tests exercise the same
SavedModel signatures, assets and warmup records as a trained backbone, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
TINY_SIZE = 32


def sample_labels() -> list[str]:
    classes = json.loads((SAMPLE_DIR / "classes.json").read_text())
    return [classes[str(i)] for i in range(len(classes))]


def sample_photos(limit: int | None = None) -> list[Path]:
    photos = sorted((SAMPLE_DIR / "train").glob("*/*.jpg"))
    return photos[:limit] if limit else photos


def build_tiny_classifier(num_classes: int, size: int = TINY_SIZE, seed: int = 0):
    """A small CNN taking float pixels in [0, 255] (the contract of every exported backbone)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"tiny_{seed}")


def export_tiny(repository: Path, name: str, seed: int = 0, size: int = TINY_SIZE, resize: str = "squash") -> Path:
    """Export one tiny classifier as the next version of ``name`` under ``repository``."""
    from carclf.train.export import export_model

    labels = sample_labels()
    photos = [p.read_bytes() for p in sample_photos(4)]
    model = build_tiny_classifier(len(labels), size=size, seed=seed)
    return export_model(model, repository=repository, name=name, input_size=size, labels=labels,
                        warmup_images=photos[:2], verify_images=photos,
                        card={"backbone": "tiny-cnn", "seed": seed}, resize=resize)


def version_numbers(model_dir: Path) -> list[int]:
    """The version folders under a model's base path, as numbers, oldest first."""
    from carclf.contract import version_number

    return sorted(n for p in Path(model_dir).iterdir() if (n := version_number(p.name)) is not None)


def break_version(version_dir: Path) -> None:
    """Make a version folder one TensorFlow cannot load (its saved_model.pb is not a SavedModel)."""
    (Path(version_dir) / "saved_model.pb").write_bytes(b"\x08\x01 this is not a SavedModel")


def signal_lines(pid: int) -> str:
    """The SigBlk, SigIgn and SigCgt lines of a running process's /proc status (SIGINT is 0x2 in each mask), for the
    failure message of a test that signals a command."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return "; ".join(line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError as exc:
        return f"unknown ({exc})"
