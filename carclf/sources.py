"""Where a command reads: a path a flag names, checked to be the kind of thing the command reads from.

A file given where a folder is wanted (a CSV for the training folder) is said to be one, rather than reported
as missing: the path is right there, so "does not exist" would send its user looking in the wrong place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from carclf.errors import InvalidInput, NotFound

Kind = Literal["file", "folder"]


def why_not(path: str | os.PathLike, kind: Kind) -> str | None:
    """None when ``path`` is an existing ``kind``; else why not, in words that follow the path in a message:
    "does not exist", "is a file, not a folder", "is a folder, not a file" (or, for a device or a pipe, "is not a
    regular file")."""
    p = Path(path)
    if p.is_dir() if kind == "folder" else p.is_file():
        return None
    if not p.exists():
        return "does not exist"
    if kind == "folder":
        return "is a file, not a folder"
    return "is a folder, not a file" if p.is_dir() else "is not a regular file"


def require(path: str | os.PathLike, kind: Kind, what: str) -> Path:
    """``path`` when it is an existing ``kind``; else NotFound (missing) or InvalidInput (another kind) whose
    message reads "<what> '<path>' <why>"."""
    why = why_not(path, kind)
    if why is None:
        return Path(path)
    message = f"{what} {str(path)!r} {why}"
    raise NotFound(message) if why == "does not exist" else InvalidInput(message)
