"""Where a command will write, checked before it does any work: a file path or a folder path given by a flag.

A path is refused, with the flag named, when it cannot be written: a folder where a file is wanted (or the
reverse), a path under a file, or a folder where files cannot be created (read-only, no permission, /proc).
The last is found by creating and removing a hidden empty file in the nearest folder that exists, which is
what the command would need to do anyway.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from carclf.errors import InvalidInput

STDOUT = "-"


def check_file(path: str | os.PathLike, what: str = "submission") -> None:
    """Refuse a path that cannot become a file. ``what`` names it in the message (a flag such as --out).
    Commands that can print their file (``write_or_print``) skip this check for '-'."""
    out = Path(path)
    if not str(path).strip():
        raise InvalidInput(f"{what} is empty; give a file path")
    _refuse_stdout(path, what, "a file path")
    if out.is_dir():
        raise InvalidInput(f"{what} {str(path)!r} is a folder; give a file path")
    _check_writable_ancestor(out.parent, path, what)


def check_folder(path: str | os.PathLike, what: str) -> None:
    """Refuse a path that cannot become (or is not) a folder files can be written into."""
    out = Path(path)
    if not str(path).strip():
        raise InvalidInput(f"{what} is empty; give a folder")
    _refuse_stdout(path, what, "a folder")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{what} {str(path)!r} is a file; give a folder")
    _check_writable_ancestor(out, path, what)


def _refuse_stdout(path: str | os.PathLike, what: str, wanted: str) -> None:
    """'-' asks for standard output, which this command cannot write to: refused rather than written as a file
    or folder named '-' in the working folder."""
    if str(path) == STDOUT:
        raise InvalidInput(f"{what} '-' asks for standard output, which this command does not write to; give "
                           f"{wanted}")


def _check_writable_ancestor(folder: Path, path: str | os.PathLike, what: str) -> None:
    """``folder`` (or, while it does not exist yet, its nearest existing ancestor) must be a folder in which
    files can be created."""
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not nearest.is_dir():
        raise InvalidInput(f"{what} {str(path)!r} cannot be created: {str(nearest)!r} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".carclf-write-check-", dir=nearest)
    except OSError as exc:
        raise InvalidInput(f"{what} {str(path)!r} cannot be written: files cannot be created in "
                           f"{str(nearest)!r} ({exc.strerror or exc})") from None
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def write_or_print(output: str, text: str, summary: str) -> None:
    """``text`` to standard output when ``output`` is '-'; else into that file (its folders made), then
    "wrote <output>: <summary>" on stderr. Written in place, not renamed over: a config file that docker-compose
    bind-mounts into a container (models.config) keeps showing the old inode after a rename; a server polling it
    mid-write reads an empty text (no action) or an unclosed one (refused, read again)."""
    if output == STDOUT:
        sys.stdout.write(text)
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text, encoding="utf-8")
    print(f"wrote {output}: {summary}", file=sys.stderr)
