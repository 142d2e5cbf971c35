"""Real photos for load tests and the benchmark: read once, sent many times."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from carclf import sources
from carclf.errors import ConfigError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Photo:
    """One photo as it travels on the wire: its file name and its encoded bytes."""

    name: str
    data: bytes


def load_photos(folder: str | os.PathLike, limit: int | None = None) -> list[Photo]:
    """All JPEG/PNG photos under ``folder`` (recursively, sorted by path), at most ``limit`` of them."""
    root = Path(folder)
    if why := sources.why_not(root, "folder"):
        raise ConfigError(f"photo folder {why}, received {str(root)!r}", field="photo_folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if limit is not None:
        paths = paths[: max(0, int(limit))]
    if not paths:
        raise ConfigError(f"no {'/'.join(PHOTO_SUFFIXES)} photos under {str(root)!r}", field="photo_folder")
    return [Photo(str(p.relative_to(root)), p.read_bytes()) for p in paths]
