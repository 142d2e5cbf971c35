"""``carclf predict FOLDER --output CSV``: a run that stops keeps what was answered, and ``--resume`` sends only
the rest. Against a stand-in gRPC server over loopback whose answer depends on each photo's bytes, so that a
row kept from the earlier run, or sent in another order, would show."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from carclf import cli
from tests.clients.predict_stubs import own_lines, stub_prediction_service
from tests.fixtures import REPO_ROOT, signal_lines

CLASSES = 7
RUN = "# carclf predict --model m"  # the partial file's first line: the options of the runs below


def by_photo(sent: list[bytes]) -> dict:
    """A backbone's answer whose class is a function of the photo's bytes."""
    ids = np.array([zlib.crc32(photo) % CLASSES for photo in sent], dtype=np.int64)
    return {"probabilities": np.eye(CLASSES, dtype=np.float32)[ids], "class_id": ids,
            "label": np.array([f"car {i}".encode() for i in ids], dtype=object)}


class Recorder:
    """``outputs_for`` of the stand-in server: answers by photo and records what each request sent; a request
    numbered ``fail_from`` or later is refused, one numbered ``hold_at`` waits for ``release``."""

    def __init__(self, fail_from: int | None = None, hold_at: int | None = None):
        self.sent: list[bytes] = []
        self.requests = 0
        self.fail_from, self.hold_at = fail_from, hold_at
        self.arrived, self.release = threading.Event(), threading.Event()

    def __call__(self, sent: list[bytes]) -> dict:
        self.requests += 1
        if self.requests == self.hold_at:
            self.arrived.set()
            self.release.wait(60)
        if self.fail_from is not None and self.requests >= self.fail_from:
            raise RuntimeError("the server is going down")
        self.sent.extend(sent)
        return by_photo(sent)


@pytest.fixture
def folder(photos, tmp_path) -> Path:
    """Six photos in a folder of their own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:6]:
        shutil.copyfile(photo, folder / photo.name)
    return folder


def predict(url: str, folder: Path, out: Path, *extra: str) -> int:
    return cli.main(["predict", str(folder), "--server", url, "--model", "m", "--batch-size", "1",
                     "--output", str(out), *extra])


def whole_run(folder: Path, tmp_path: Path) -> str:
    """The CSV an uninterrupted run writes."""
    out = tmp_path / "whole.csv"
    with stub_prediction_service(Recorder()) as url:
        assert predict(url, folder, out) == 0
    assert not (tmp_path / "whole.partial.csv").exists()  # a run that ends whole leaves no partial file
    return out.read_text()


def test_a_run_the_server_stops_resumes_with_only_the_photos_it_lacks(folder, tmp_path, capsys):
    expected = whole_run(folder, tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    with stub_prediction_service(Recorder(fail_from=3)) as url:
        assert predict(url, folder, out, "--retries", "0") == 2
    assert "the same command with --resume sends only the others" in capsys.readouterr().err
    assert not out.exists() and partial.read_text().splitlines() == [RUN, *expected.splitlines()[:3]]

    resumed = Recorder()
    with stub_prediction_service(resumed) as url:
        assert predict(url, folder, out, "--resume") == 0
    err = own_lines(capsys.readouterr().err)
    assert err == [f"carclf predict: resuming: 2 of 6 photos were answered in {partial}"], err
    photos = sorted(folder.iterdir())
    assert resumed.sent == [p.read_bytes() for p in photos[2:]]  # the other four, once each
    assert out.read_text() == expected and not partial.exists()


def test_a_run_stopped_twice_resumes_twice(folder, tmp_path, capsys):
    """A resumed run that stops again keeps its own rows after the earlier ones, under the same first line
    (the file is rewritten before the resume appends), so the next --resume goes on from both."""
    expected = whole_run(folder, tmp_path).splitlines()
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    with stub_prediction_service(Recorder(fail_from=3)) as url:
        assert predict(url, folder, out, "--retries", "0") == 2
    with stub_prediction_service(Recorder(fail_from=2)) as url:
        assert predict(url, folder, out, "--retries", "0", "--resume") == 2
    assert partial.read_text().splitlines() == [RUN, *expected[:4]]
    last = Recorder()
    with stub_prediction_service(last) as url:
        assert predict(url, folder, out, "--resume") == 0
    assert len(last.sent) == 3 and out.read_text().splitlines() == expected and not partial.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_a_run_stopped_by_a_signal_keeps_every_answered_row(folder, tmp_path, capsys, sig):
    """Ctrl-C (or a kill) while the third photo waits for its answer: the two answered rows are on disk (they
    were lost before, with the whole run), and --resume finishes the submission with the other four."""
    expected = whole_run(folder, tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    held = Recorder(hold_at=3)
    with stub_prediction_service(held) as url:
        command = [sys.executable, "-m", "carclf", "predict", str(folder), "--server", url, "--model", "m",
                   "--batch-size", "1", "--output", str(out)]
        child = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        try:
            assert held.arrived.wait(120), child.stderr.read() if child.poll() is not None else "no third request"
            dispositions = signal_lines(child.pid)  # for the failure message: is SIGINT caught, blocked, ignored?
            child.send_signal(sig)
            _, stderr = child.communicate(timeout=60)
        finally:
            held.release.set()
            if child.poll() is None:
                child.kill()
    assert not out.exists() and partial.read_text().splitlines() == [RUN, *expected.splitlines()[:3]]
    if sig == signal.SIGINT:
        assert child.returncode == 130, f"{stderr}\nthe child's signal masks when it was sent SIGINT: {dispositions}"
        assert own_lines(stderr) == [f"carclf predict: the 2 of 6 photos answered so far are in {partial}: the same "
                                     "command with --resume sends only the others", "carclf predict: interrupted"]
    else:
        assert child.returncode == -signal.SIGKILL

    resumed = Recorder()
    with stub_prediction_service(resumed) as url:
        assert predict(url, folder, out, "--resume") == 0
    assert len(resumed.sent) == 4 and out.read_text() == expected and not partial.exists()


@pytest.mark.parametrize("content", ["", RUN[:9], RUN + "\n", RUN + "\nId,Cat", RUN + "\nId,Category\n"],
                         ids=["empty", "run-cut", "run-only", "header-cut", "header-only"])
def test_a_partial_file_killed_before_its_first_row_resumes_from_nothing(folder, tmp_path, capsys, content):
    """A kill between creating the file and its first row's flush leaves it empty, or its first lines cut:
    every photo is sent, and the run ends whole."""
    expected = whole_run(folder, tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    partial.write_text(content)
    resumed = Recorder()
    with stub_prediction_service(resumed) as url:
        assert predict(url, folder, out, "--resume") == 0, capsys.readouterr().err
    assert len(resumed.sent) == 6 and out.read_text() == expected and not partial.exists()


def test_a_last_line_cut_off_by_a_kill_is_asked_again_and_kept_rows_are_not(folder, tmp_path, capsys):
    """The rows of the partial file are the submission's, as written (the first says class 5, which the
    server would not): only the photo of the cut line and those after it are sent."""
    photos = sorted(folder.iterdir())
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    partial.write_text(f"{RUN}\nId,Category\n{photos[0].name},5\n{photos[1].name[:3]}")
    resumed = Recorder()
    with stub_prediction_service(resumed) as url:
        assert predict(url, folder, out, "--resume") == 0
    assert own_lines(capsys.readouterr().err) == [
        f"carclf predict: resuming: 1 of 6 photos were answered in {partial}; its last line was cut off, that photo "
        "is answered again"]
    assert resumed.sent == [p.read_bytes() for p in photos[1:]]
    answers = by_photo(resumed.sent)["class_id"]
    assert out.read_text().splitlines() == ["Id,Category", f"{photos[0].name},5",
                                            *(f"{p.name},{c}" for p, c in zip(photos[1:], answers, strict=True))]


def test_a_run_killed_after_its_last_answer_resumes_without_the_server(folder, tmp_path, capsys):
    """Every photo was answered before the kill, the submission not yet written: --resume writes it from the
    partial file alone, even with the server gone."""
    expected = whole_run(folder, tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    partial.write_text(f"{RUN}\n{expected}")
    with stub_prediction_service(Recorder()) as url:
        pass  # a port nobody listens on any more
    assert predict(url, folder, out, "--resume") == 0
    assert out.read_text() == expected and not partial.exists()


def test_resume_with_nothing_to_resume_runs_whole(folder, tmp_path, capsys):
    """--resume in a script that always passes it: the first run has no partial file and classifies them all."""
    expected = whole_run(folder, tmp_path)
    recorder = Recorder()
    with stub_prediction_service(recorder) as url:
        assert predict(url, folder, tmp_path / "out.csv", "--resume") == 0
    assert not own_lines(capsys.readouterr().err) and len(recorder.sent) == 6
    assert (tmp_path / "out.csv").read_text() == expected


def refused(recorder: Recorder, argv: list[str], capsys) -> str:
    """The one error line of a run that exits 2."""
    with stub_prediction_service(recorder) as url:
        assert cli.main([*argv, "--server", url, "--model", "m"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("content,resume,message", [
    pytest.param(RUN + "\nId,Category\n{0},3\n", False,
                 "{partial} holds the rows of an earlier run that stopped: give --resume to send only the photos it "
                 "lacks, or remove it", id="without-resume"),
    pytest.param(RUN + "\nId,Category\n{0},3\nelsewhere.jpg,1\n", True,
                 "{partial} line 4: 'elsewhere.jpg' is not one of the photos of this run (the file was written for "
                 "other photos): remove it or give another --output", id="other-photos"),
    pytest.param(RUN + "\nId,Category\n{0},3\n{0},4\n", True, "{partial} line 4: '{0}' is there twice", id="twice"),
    pytest.param(RUN + "\nId,Category\n{0}\n", True, "{partial} line 3: expected Id,Category, found '{0}'",
                 id="one-field"),
    pytest.param("# carclf predict --model other\nId,Category\n{0},3\n", True,
                 "{partial} was written by 'carclf predict --model other', this run is 'carclf predict --model m': "
                 "resume with the same --model, --version, --version-label and --classes (or remove it), so that "
                 "one submission holds one model's answers", id="another-model"),
    pytest.param("Id,Category\n{0},3\n", True,
                 "{partial} does not record the model it was written with: if its rows are answers of this run's "
                 "options, make its first line '# carclf predict --model m' and resume; otherwise remove it",
                 id="no-run-line"),
    pytest.param("name,score\n{0},3\n", True,
                 "{partial} is not the partial submission of a carclf predict run (its line 1 is 'name,score', not "
                 "'# carclf predict ...'): remove it or give another --output", id="not-a-partial"),
    pytest.param("my notes\n", True,
                 "{partial} is not the partial submission of a carclf predict run (its line 1 is 'my notes', not "
                 "'# carclf predict ...'): remove it or give another --output", id="one-line-of-another-file"),
    pytest.param("\nId,Category\n{0},3\n", True,
                 "{partial} is not the partial submission of a carclf predict run (its line 1 is '', not "
                 "'# carclf predict ...'): remove it or give another --output", id="empty-first-line"),
    pytest.param("\0" * 3, True,
                 "{partial} is not the partial submission of a carclf predict run (its line 1 is '\\x00\\x00\\x00', "
                 "not '# carclf predict ...'): remove it or give another --output", id="bytes-without-a-newline"),
    pytest.param("x" * 100, True,
                 "{partial} is not the partial submission of a carclf predict run (its line 1 is '" + "x" * 80 + "'... "
                 "(100 characters), not '# carclf predict ...'): remove it or give another --output", id="long-line"),
    pytest.param(RUN + "\nname,score\n{0},3\n", True,
                 "{partial} is not the partial submission of a carclf predict run (its line 2 is 'name,score', not "
                 "'Id,Category'): remove it or give another --output", id="not-a-partial-header"),
])
def test_a_partial_file_that_cannot_be_resumed_is_refused_before_anything_is_sent(folder, tmp_path, capsys, content,
                                                                                   resume, message):
    """Nothing is sent, and the partial file (an earlier run's answers) is left as it was."""
    first = sorted(folder.iterdir())[0].name
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    partial.write_text(content.format(first))
    before = partial.read_bytes()
    recorder = Recorder()
    line = refused(recorder, ["predict", str(folder), "--output", str(out), *(["--resume"] if resume else [])], capsys)
    assert line == "carclf predict: error: " + message.format(first, partial=partial)
    assert recorder.requests == 0 and partial.read_bytes() == before and not out.exists()


def test_photos_of_one_name_in_two_folders_are_refused_for_a_submission(folder, tmp_path, capsys):
    """Their rows would carry the same Id, which a submission cannot; printing them is fine."""
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    name = sorted(folder.iterdir())[0].name
    recorder = Recorder()
    line = refused(recorder, ["predict", str(folder), str(other), "--output", str(tmp_path / "out.csv")], capsys)
    assert line == (f"carclf predict: error: two photos are named {name!r} ({folder / name} and {other / name}): a "
                    "submission's Ids (the file names) must differ")
    assert recorder.requests == 0


def test_resume_without_a_submission_is_refused(photos, capsys):
    line = refused(Recorder(), ["predict", str(photos[0]), "--resume"], capsys)
    assert line == "carclf predict: error: --resume continues a submission run: give --output (or a folder) with it"


def test_a_run_resumed_with_other_options_is_refused_and_with_the_same_mapping_goes_on(folder, tmp_path, capsys):
    """The partial file's rows are one model's answers in one classes file's ids: resuming without --classes,
    with another mapping, or asking another version label would mix them into one submission, so each is
    refused with nothing sent. The same mapping written otherwise (another file, order, layout) resumes."""
    mapping = {str(10 + i): f"car {i}" for i in range(CLASSES)}
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(mapping))
    with_classes = ("--classes", str(classes))
    whole = tmp_path / "whole.csv"
    with stub_prediction_service(Recorder()) as url:
        assert predict(url, folder, whole, *with_classes) == 0
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    with stub_prediction_service(Recorder(fail_from=3)) as url:
        assert predict(url, folder, out, "--retries", "0", *with_classes) == 2
    capsys.readouterr()
    kept = partial.read_bytes()
    written_by = kept.decode().splitlines()[0][2:]
    assert written_by.startswith("carclf predict --model m --classes sha256:")

    remapped = tmp_path / "remapped.json"
    remapped.write_text(json.dumps({**mapping, "10": "car 1", "11": "car 0"}))
    for options in [(), ("--classes", str(remapped)), (*with_classes, "--version-label", "canary")]:
        recorder = Recorder()
        with stub_prediction_service(recorder) as url:
            assert predict(url, folder, out, "--resume", *options) == 2
        err = own_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"carclf predict: error: {partial} was written by "
                                                   f"{written_by!r}, this run is 'carclf predict --model m"), err
        assert written_by not in err[0].split("this run is")[1], err  # this run's options differ
        assert recorder.requests == 0 and partial.read_bytes() == kept and not out.exists()

    rewritten = tmp_path / "elsewhere" / "classes.json"
    rewritten.parent.mkdir()
    rewritten.write_text(json.dumps(dict(reversed(mapping.items())), indent=2))
    resumed = Recorder()
    with stub_prediction_service(resumed) as url:
        assert predict(url, folder, out, "--resume", "--classes", str(rewritten)) == 0
    assert len(resumed.sent) == 4 and out.read_text() == whole.read_text() and not partial.exists()
    assert {row.split(",")[1] for row in whole.read_text().splitlines()[1:]} <= set(mapping)  # ids of the file
