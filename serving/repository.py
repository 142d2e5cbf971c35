"""A model repository on disk: ``<base_path>/<integer version>/saved_model.pb``.

Non-numeric folders (``.tmp-export-*`` written by an export in progress, ``assets``...) are ignored,
as TF Serving ignores them, so a version appears only once its folder has been renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

from carclf import contract

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
TRAINING_RUN_FILE = "run.json"  # carclf.train.runs.RUN_INFO: what every training run folder holds


def holds_savedmodel(folder: Path) -> bool:
    """Whether ``folder`` holds a SavedModel's graph file (binary or text)."""
    return any((folder / name).is_file() for name in SAVED_MODEL_FILES)


def scan_versions(base_path: Path) -> dict[int, Path] | None:
    """Integer version -> folder, for every numeric sub-folder of ``base_path``; None when ``base_path`` cannot be
    listed (missing, not a folder, unreadable), which the server tells apart from a folder without versions."""
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    versions: dict[int, Path] = {}
    for entry in entries:
        number = contract.version_number(entry.name)
        if number is not None and entry.is_dir(follow_symlinks=True):
            versions[number] = Path(entry.path)
    return versions


def list_versions(base_path: Path) -> dict[int, Path]:
    """Integer version -> folder, for every numeric sub-folder of ``base_path`` (empty when it cannot be listed)."""
    return scan_versions(base_path) or {}


def misplaced_base_path(base_path: Path) -> str:
    """Which other folder a base path without version folders is, and the one to give instead: a version folder
    (a SavedModel), a ``carclf train`` run folder, or the repository that holds models; "" for none of these."""
    if holds_savedmodel(base_path):
        return (f"{base_path} is itself a SavedModel: base_path is the folder that holds the version folders, here "
                f"{base_path.parent}")
    if (base_path / TRAINING_RUN_FILE).is_file():
        return (f"{base_path} is a training run folder: carclf export RUN --repository REPO writes its SavedModel as "
                "REPO/<name>/<version>/, and REPO/<name> is the base_path")
    models = sorted(list_models(base_path))
    if models:
        return (f"{base_path} is a model repository, of models {models}: base_path is one model's folder, such as "
                f"{base_path / models[0]}")
    return ""


def model_versions(folder: Path) -> list[int]:
    """The versions ``folder`` holds as one model's folder (integer folders with a SavedModel), oldest first; not
    empty when a model's folder is given where the repository that holds it is wanted."""
    return sorted(version for version, path in list_versions(folder).items() if holds_savedmodel(path))


def list_models(repository: Path) -> dict[str, dict[int, Path]]:
    """Model name -> versions, for every folder of ``repository`` that holds at least one version."""
    models = {}
    if not repository.is_dir():
        return models
    for child in sorted(repository.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            versions = list_versions(child)
            if versions:
                models[child.name] = versions
    return models


def fingerprint(version_path: Path) -> tuple:
    """Changes when any file under a version folder changes (its name, size or modification time), in any
    sub-folder: a failed version is retried only then, so a fixed ``assets.extra/`` warmup file or a replaced
    ``variables/`` shard counts, and an unchanged broken folder is not loaded again on every poll. Linked files
    are followed, linked folders are not walked (a link cycle must not hang the poll)."""
    parts = []
    for folder, subfolders, files in os.walk(version_path, onerror=lambda exc: parts.append((exc.filename, None))):
        subfolders.sort()
        relative = os.path.relpath(folder, version_path)
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                parts.append((relative, name, None))
            else:
                parts.append((relative, name, stat.st_size, stat.st_mtime_ns))
    return tuple(parts)
