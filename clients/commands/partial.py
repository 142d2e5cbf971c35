"""The rows a submission run has been answered so far, kept on disk as they come: ``<output>.partial.csv``.

``carclf predict FOLDER --output OUT`` appends each answered request's rows to ``OUT.partial.csv`` (flushed
as written), so that a run stopped by any means (the server gone for longer than ``--retries``, Ctrl-C, a
killed process) keeps every photo the server answered. ``--resume`` reads that file back and sends only the
photos it lacks; once every photo is answered ``OUT`` is written whole and the partial file is removed.

The file's first line records the options that decide its answers (``# carclf predict --model car_ensemble
--classes sha256:...``), so that a run resumed with another model, version or classes file is refused instead
of mixing two models' answers in one submission. Then come ``Id,Category`` and the rows, as in the submission.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from carclf.errors import InvalidInput
from carclf.submission import HEADER
from carclf.submission import write_submission as write_csv

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # as the submission: names as their bytes on disk


def partial_path(output: Path) -> Path:
    """Where the rows of a run writing ``output`` are kept until it is whole."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def describe_run(model: str, version: int | None, version_label: str | None,
                 category_of: dict[str, str] | None) -> str:
    """The options that decide a run's rows, as its partial file's first line records them: the model, the
    version or label asked for, and the classes file's mapping (its digest: the rows hold its category ids)."""
    words = ["carclf predict", f"--model {model}"]
    if version is not None:
        words.append(f"--version {version}")
    if version_label is not None:
        words.append(f"--version-label {version_label}")
    if category_of is not None:
        digest = hashlib.sha256(json.dumps(category_of, sort_keys=True).encode()).hexdigest()[:12]
        words.append(f"--classes sha256:{digest}")
    return json.dumps(" ".join(words), ensure_ascii=False)[1:-1]  # one line, whatever the names hold


def read_partial(path: Path, photos: Sequence[Path], run: str) -> tuple[dict[str, str], bool]:
    """Id -> Category of an earlier run's partial file, every Id one of ``photos``' names; and whether its
    last line was cut off (the run killed while writing it), that row left out so that its photo is sent again.
    A file that is not such a partial file, or was written by a run of other options than ``run``
    (``describe_run``), is refused, naming the file and the line."""
    try:
        text = path.read_bytes().decode(**ENCODING)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path} to resume from it ({exc.strerror or exc})") from None
    cut = bool(text) and not text.endswith("\n")
    if cut:
        text = text[:text.rfind("\n") + 1]
    first, _, text = text.partition("\n")
    if not text:  # killed before its first rows reached the file: nothing was kept
        return {}, cut
    if first == ",".join(HEADER):  # the partial files of carclf before the options line
        raise InvalidInput(f"{path} does not record the model it was written with: if its rows are answers of "
                           f"this run's options, make its first line {'# ' + run!r} and resume; otherwise "
                           "remove it")
    if not first.startswith("# carclf predict"):
        raise not_partial(path, first)
    if first[2:] != run:
        raise InvalidInput(f"{path} was written by {first[2:]!r}, this run is {run!r}: resume with the same "
                           "--model, --version, --version-label and --classes (or remove it), so that one "
                           "submission holds one model's answers")
    lines = csv.reader(io.StringIO(text, newline=""))
    header = next(lines, None)
    if header is None or tuple(header) != HEADER:
        raise not_partial(path, ",".join(header or []), line=2)
    names = {photo.name for photo in photos}
    rows: dict[str, str] = {}
    for number, row in enumerate(lines, start=3):
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


def not_partial(path: Path, found: str, line: int = 1) -> InvalidInput:
    expected = "# carclf predict ..." if line == 1 else ",".join(HEADER)
    return InvalidInput(f"{path} is not the partial submission of a carclf predict run (its line {line} is "
                        f"{found!r}, not {expected!r}): remove it or give another --output")


class PartialRows:
    """Appends rows to the partial file as they are answered, each call's rows flushed to the file."""

    def __init__(self, path: Path, resumed: dict[str, str], run: str):
        self.path, self.run = path, run
        self._file = None
        if resumed:  # rewritten whole: a line cut off by a kill must not run into the next
            self._start(resumed)

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        if self._file is None:
            self._start({})
        try:
            csv.writer(self._file).writerows(rows)
            self._file.flush()
        except OSError as exc:
            raise self._not_kept(exc) from exc

    def _start(self, rows: dict[str, str]) -> None:
        """Write the file's first line, header and ``rows`` atomically, as the submission is written; then
        append to it."""
        try:
            write_csv(self.path, rows.items(), comment=self.run)
            self._file = self.path.open("a", newline="", **ENCODING)
        except OSError as exc:
            raise self._not_kept(exc) from exc

    def _not_kept(self, exc: OSError) -> OSError:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return OSError(exc.errno, f"cannot keep the rows answered so far ({reason})", str(self.path))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """The run is whole: the partial file has served its purpose."""
        self.close()
        self.path.unlink(missing_ok=True)
