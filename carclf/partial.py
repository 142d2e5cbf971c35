"""The rows a submission run has answered so far, kept on disk as they come: ``<output>.partial.csv``.

``carclf predict FOLDER --output OUT`` (photos sent to a server) and ``carclf submit MODEL PHOTOS --out OUT``
(photos predicted in this process) append each answered batch's rows to ``OUT.partial.csv`` (flushed as
written), so that a run stopped by any means (the server gone, Ctrl-C, a killed process) keeps every photo
answered. ``--resume`` reads that file back and predicts only the photos it lacks; once every photo is answered
``OUT`` is written whole and the partial file is removed.

The file's first line records the options that decide its answers (``# carclf predict --model car_ensemble
--classes sha256:...``; each command says what decides its rows), so that a run resumed with other options is
refused instead of mixing two models' answers in one submission. Then come ``Id,Category`` and the rows, as in
the submission.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from carclf.errors import CarClfError, InvalidInput
from carclf.submission import HEADER
from carclf.submission import write_submission as write_csv

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # as the submission: names as their bytes on disk


def partial_path(output: Path) -> Path:
    """Where the rows of a run writing ``output`` are kept until it is whole."""
    return output.with_name(f"{output.stem}.partial{output.suffix}")


@dataclass(frozen=True)
class RunLine:
    """What decides a run's rows, as its partial file's first line records it (without the ``# ``)."""

    command: str       # "carclf predict"
    options: str       # "--model m --classes sha256:..." (one line, whatever the names hold)
    named: str         # the options it stands for, named in a refusal: "--model, --version ... and --classes"
    output_flag: str   # the command's option that names the submission: "--output"
    verb: str          # what it does with a photo not answered yet: "send" (to a server), "predict"

    @property
    def line(self) -> str:
        return f"{self.command} {self.options}"


def one_line(text: str) -> str:
    """``text`` escaped as a JSON string's body: a name holding a newline cannot break the file."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def read_partial(path: Path, photos: Sequence[Path], run: RunLine) -> tuple[dict[str, str], bool]:
    """Id -> Category of an earlier run's partial file, every Id one of ``photos``' names; and whether its
    last line was cut off (the run killed while writing it), that row left out so that its photo is predicted
    again. A file that is not such a partial file, or was written by a run of other options than ``run``, is
    refused, naming the file and the line."""
    try:
        text = path.read_bytes().decode(**ENCODING)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path} to resume from it ({exc.strerror or exc})") from None
    cut = bool(text) and not text.endswith("\n")
    first, newline, text = text.partition("\n")
    start = f"# {run.command}"
    if not (first.startswith(start) or first == ",".join(HEADER) or (not newline and start.startswith(first))):
        raise not_partial(path, first, run)  # another file of that name, even of one line: never written over
    text = text[:text.rfind("\n") + 1]  # a last line cut off by a kill is left out: its photo is answered again
    if not text:  # killed before its first rows reached the file (or within its first line): nothing was kept
        return {}, cut
    if first == ",".join(HEADER):  # the partial files of carclf predict before the options line
        raise InvalidInput(f"{path} does not record the model it was written with: if its rows are answers of "
                           f"this run's options, make its first line {'# ' + run.line!r} and resume; otherwise "
                           "remove it")
    if first[2:] != run.line:
        raise InvalidInput(f"{path} was written by {first[2:]!r}, this run is {run.line!r}: resume with the same "
                           f"{run.named} (or remove it), so that one submission holds one model's answers")
    lines = csv.reader(io.StringIO(text, newline=""))
    header = next(lines, None)
    if header is None or tuple(header) != HEADER:
        raise not_partial(path, ",".join(header or []), run, line=2)
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
                               f"written for other photos): remove it or give another {run.output_flag}")
        rows[name] = category
    return rows, cut


def not_partial(path: Path, found: str, run: RunLine, line: int = 1) -> InvalidInput:
    expected = f"# {run.command} ..." if line == 1 else ",".join(HEADER)
    shown = repr(found) if len(found) <= 80 else f"{found[:80]!r}... ({len(found)} characters)"
    return InvalidInput(f"{path} is not the partial submission of a {run.command} run (its line {line} is "
                        f"{shown}, not {expected!r}): remove it or give another {run.output_flag}")


def check_start(output: Path, resume: bool, verb: str) -> None:
    """Refuse a run without ``resume`` whose ``output`` has an earlier run's partial file (never written over);
    cheap, so that a command can ask it before it loads models."""
    path = partial_path(output)
    if path.exists() and not resume:
        raise InvalidInput(f"{path} holds the rows of an earlier run that stopped: give --resume to {verb} only the "
                           "photos it lacks, or remove it")


class PartialSubmission:
    """A submission whose rows are kept in its partial file as they are answered, resumed from an earlier run's
    partial file when there is one (refused without ``resume``: its rows are never written over)."""

    def __init__(self, output: Path, photos: Sequence[Path], run: RunLine, resume: bool):
        self.output, self.photos, self.run = output, list(photos), run
        self.path = partial_path(output)
        self.answered: dict[str, str] = {}
        self.resuming: str | None = None  # what was resumed from, to tell the user
        check_start(output, resume, run.verb)
        if self.path.exists():
            self.answered, cut = read_partial(self.path, self.photos, run)
            self.resuming = (f"resuming: {len(self.answered)} of {len(self.photos)} photos were answered in "
                             f"{self.path}" + ("; its last line was cut off, that photo is answered again" if cut
                                               else ""))
        self.resumed = len(self.answered)
        self._file: TextIO | None = None  # appended to once the first new rows come

    @property
    def rest(self) -> list[Path]:
        """The photos not answered yet, in order."""
        return [path for path in self.photos if path.name not in self.answered]

    def add(self, rows: Sequence[tuple[str, str]]) -> None:
        """Keep answered rows: in the partial file (flushed) first, then here. The file is first (re)written
        whole and atomically, as the submission is: its first line, header and any rows resumed (so that a line
        cut off by a kill cannot run into the next), then appended to."""
        try:
            if self._file is None:
                write_csv(self.path, self.answered.items(), comment=self.run.line)
                self._file = self.path.open("a", newline="", **ENCODING)
            csv.writer(self._file).writerows(rows)
            self._file.flush()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot keep the rows answered so far ({reason})", str(self.path)) from exc
        self.answered.update(rows)

    @contextlib.contextmanager
    def keeping(self, note: Callable[[str], None]) -> Iterator[None]:
        """Around the answering: a run stopped by an error or Ctrl-C says where its answers are and how to go
        on (in the error's message, or through ``note``); the partial file is closed either way."""
        try:
            yield
        except CarClfError as exc:  # the server went away, a photo that does not decode: nothing answered is lost
            if self.answered:
                exc.message += (f"; {self._so_far()} (not a whole submission; {self.output} was not written): "
                                f"the same command with --resume {self.run.verb}s only the others")
                exc.args = (exc.message,)
            raise
        except KeyboardInterrupt:
            if self.answered:
                note(f"{self._so_far()}: the same command with --resume {self.run.verb}s only the others")
            raise
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _so_far(self) -> str:
        return f"the {len(self.answered)} of {len(self.photos)} photos answered so far are in {self.path}"

    def finish(self) -> int:
        """Write the submission whole (the answered photos, in order) and remove the partial file; the row count."""
        count = write_csv(self.output, [(path.name, self.answered[path.name]) for path in self.photos
                                        if path.name in self.answered])
        self.path.unlink(missing_ok=True)
        return count
