"""The Kaggle submission file, written one way for every producer (train, ensemble, clients)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

HEADER = ("Id", "Category")


def write_submission(path: str | os.PathLike, rows: Iterable[tuple[str, ...]],
                     header: tuple[str, ...] = HEADER) -> int:
    """Write ``Id,Category`` rows (or ``header``'s columns) atomically (a temporary file beside it, then
    rename); returns the row count."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
    os.replace(tmp, out)
    return count
