"""The rows a submission run has been answered so far, kept on disk as they come: ``<output>.partial.csv``.

``carclf predict FOLDER --output OUT`` appends each answered request's rows to ``OUT.partial.csv`` (flushed
as written), so that a run stopped by any means (the server gone for longer than ``--retries``, Ctrl-C, a
killed process) keeps every photo the server answered. ``--resume`` reads that file back and sends only the
photos it lacks; once every photo is answered ``OUT`` is written whole and the partial file is removed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from carclf.errors import InvalidInput
from carclf.submission import HEADER
from carclf.submission import write_submission as write_csv

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # as the submission: names as their bytes on disk


def partial_path(output: Path) -> Path:
    """Where the rows of a run writing ``output`` are kept until it is whole."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def read_partial(path: Path, photos: Sequence[Path]) -> tuple[dict[str, str], bool]:
    """Id -> Category of an earlier run's partial file, every Id one of ``photos``' names; and whether its
    last line was cut off (the run killed while writing it), that row left out so that its photo is sent again.
    A file that is not such a partial file is refused, naming the file and the line."""
    try:
        text = path.read_bytes().decode(**ENCODING)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path} to resume from it ({exc.strerror or exc})") from None
    cut = bool(text) and not text.endswith("\n")
    if cut:
        text = text[:text.rfind("\n") + 1]
    if not text:  # killed before its first rows reached the file: nothing was kept
        return {}, cut
    lines = csv.reader(io.StringIO(text, newline=""))
    header = next(lines, None)
    if header is None or tuple(header) != HEADER:
        raise InvalidInput(f"{path} is not the partial submission of a carclf predict run (its first line is "
                           f"{','.join(header or [])!r}, not {','.join(HEADER)!r}): remove it or give another "
                           "--output")
    names = {photo.name for photo in photos}
    rows: dict[str, str] = {}
    for number, row in enumerate(lines, start=2):
        if len(row) != 2 or not all(row):
            raise InvalidInput(f"{path} line {number}: expected Id,Category, found {','.join(row)!r}")
        name, category = row
        if name in rows:
            raise InvalidInput(f"{path} line {number}: {name!r} is there twice")
        if name not in names:
            raise InvalidInput(f"{path} line {number}: {name!r} is not one of the photos of this run (the file was "
                               "written for other photos): remove it or give another --output")
        rows[name] = category
    return rows, cut


class PartialRows:
    """Appends rows to the partial file as they are answered, each call's rows flushed to the file."""

    def __init__(self, path: Path, resumed: dict[str, str]):
        self.path = path
        self._file = None
        if resumed:  # rewritten whole (and atomically): a line cut off by a kill must not run into the next
            write_csv(path, resumed.items())
            self._file = self._open("a")

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        if self._file is None:
            self._file = self._open("w")
            csv.writer(self._file).writerow(HEADER)
        try:
            csv.writer(self._file).writerows(rows)
            self._file.flush()
        except OSError as exc:
            raise self._not_kept(exc) from exc

    def _open(self, mode: str):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # as the submission's own folder will be
            return self.path.open(mode, newline="", **ENCODING)
        except OSError as exc:
            raise self._not_kept(exc) from exc

    def _not_kept(self, exc: OSError) -> OSError:
        return OSError(exc.errno, f"cannot keep the rows answered so far ({exc.strerror or exc})", str(self.path))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """The run is whole: the partial file has served its purpose."""
        self.close()
        self.path.unlink(missing_ok=True)
