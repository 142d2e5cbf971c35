"""A model repository on disk: ``<base_path>/<integer version>/saved_model.pb``.

Non-numeric folders (``.tmp-export-*`` written by an export in progress, ``assets``...) are ignored,
as TF Serving ignores them, so a version appears only once its folder has been renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

from carclf import contract

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def holds_savedmodel(folder: Path) -> bool:
    """Whether ``folder`` holds a SavedModel's graph file (binary or text)."""
    return any((folder / name).is_file() for name in SAVED_MODEL_FILES)


def list_versions(base_path: Path) -> dict[int, Path]:
    """Integer version -> folder, for every numeric sub-folder of ``base_path`` (empty when missing)."""
    versions: dict[int, Path] = {}
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return versions
    for entry in entries:
        number = contract.version_number(entry.name)
        if number is not None and entry.is_dir(follow_symlinks=True):
            versions[number] = Path(entry.path)
    return versions


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
    """Changes when a version folder's files change; a failed version is retried only then."""
    parts = []
    for sub in (version_path, version_path / "variables"):
        try:
            for entry in sorted(os.scandir(sub), key=lambda e: e.name):
                stat = entry.stat(follow_symlinks=True)
                parts.append((sub.name, entry.name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            parts.append((sub.name, None))
    return tuple(parts)
