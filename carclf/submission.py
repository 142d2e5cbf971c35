"""The Kaggle submission file, written one way for every producer (train, ensemble, clients)."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable
from pathlib import Path

from carclf import durable
from carclf.destinations import check_file

HEADER = ("Id", "Category")


def write_submission(path: str | os.PathLike, rows: Iterable[tuple[str, ...]],
                     header: tuple[str, ...] = HEADER, comment: str | None = None) -> int:
    """Write ``Id,Category`` rows (or ``header``'s columns) atomically (a temporary file beside it, then
    rename), after a ``# comment`` line when given; returns the row count. On failure no temporary file is
    left and the error names ``path``."""
    check_file(path)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    try:
        # surrogateescape: a file name that is not UTF-8 on disk is written as its bytes, not a UnicodeEncodeError
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            if comment is not None:
                fh.write(f"# {comment}\n")
            writer = csv.writer(fh)
            writer.writerow(header)
            for row in rows:
                writer.writerow(row)
                count += 1
        durable.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # never leave a half-written file behind
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # name the path the caller gave, not the temporary file
            message = f"cannot write the submission ({exc.strerror or exc})"
            raise OSError(exc.errno, message, str(path)) from exc
        raise
    return count
