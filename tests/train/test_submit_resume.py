"""``carclf submit MODEL PHOTOS --out CSV``: a run that stops keeps the rows of every chunk predicted, and
``--resume`` predicts only the photos they lack, with the same models, TTA policy and channel order or not at
all. Real exported models and real photos; the predictors are wrapped to count what they are given (and, for
the in-process stops, to raise Ctrl-C's KeyboardInterrupt at a chosen call)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carclf.cli import main as carclf_main
from carclf.errors import InvalidInput
from carclf.train.evaluate import LoadedModel, load_model
from carclf.train.submit import write_submission
from tests.fixtures import REPO_ROOT, SAMPLE_DIR, signal_lines

PHOTOS = SAMPLE_DIR / "test_upload"  # 10 real photos
VIEWS = 2  # the hflip policy's


class Counting:
    """A model's predictor that counts the images it is given; call number ``stop_at`` raises KeyboardInterrupt
    instead (Ctrl-C in the middle of a run)."""

    def __init__(self, predictor, stop_at: int | None = None):
        self.predictor, self.stop_at = predictor, stop_at
        self.calls = self.images = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(pixels)
        return self.predictor(pixels)


def counting(model: LoadedModel, stop_at: int | None = None) -> LoadedModel:
    return dataclasses.replace(model, predictor=Counting(model.predictor, stop_at))


def whole(models, tmp_path: Path, **options) -> list[str]:
    """The lines of the CSV an uninterrupted run writes."""
    out = tmp_path / "whole.csv"
    write_submission(models, PHOTOS, out, progress=False, **options)
    return out.read_text().splitlines()


def test_a_run_stopped_by_ctrl_c_keeps_its_chunks_and_resumes_with_only_the_photos_they_lack(
        tiny_repository_template, tmp_path, caplog):
    """Chunks of 4 photos; Ctrl-C during the third: the 8 rows of the first two are on disk, nothing else is
    written, and --resume predicts the last 2 photos only, into the CSV an uninterrupted run writes."""
    model = load_model(tiny_repository_template / "tiny_a" / "1")
    expected = whole(model, tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING):
        write_submission(counting(model, stop_at=3), PHOTOS, out, progress=False, chunk=4)
    assert [r.getMessage() for r in caplog.records] == [f"the 8 of 10 photos answered so far are in {partial}: the "
                                                        "same command with --resume predicts only the others"]
    first, *rows = partial.read_text().splitlines()
    assert first.startswith("# carclf submit tiny_a/1@sha256:") and first.endswith(" --tta hflip --channel-order rgb")
    assert rows == expected[:9] and not out.exists()  # the header and 8 rows

    resumed = counting(model)
    stats = write_submission(resumed, PHOTOS, out, progress=False, resume=True)
    assert stats == {"rows": 10, "skipped": 0, "resumed": 8}
    assert resumed.predictor.images == 2 * VIEWS
    assert out.read_text().splitlines() == expected and not partial.exists()


def test_a_resume_with_other_models_policy_or_order_is_refused_and_the_same_models_in_any_order_go_on(
        tiny_repository, tiny_repository_template, tmp_path):
    """The partial file of a run of tiny_a/1 and tiny_b/1 is refused, untouched and before any prediction, to a
    run without --resume, of tiny_a/1 alone, with --tta none or --channel-order bgr, and of tiny_a/1 once
    its folder holds other weights (a model exported again under the same version); tiny_b/1 and tiny_a/1 in
    the other order resume it."""
    a, b = (load_model(tiny_repository / name / "1") for name in ("tiny_a", "tiny_b"))
    expected = whole([a, b], tmp_path)
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    with pytest.raises(KeyboardInterrupt):  # a's second call: the first chunk of 4 is kept
        write_submission([counting(a, stop_at=2), b], PHOTOS, out, progress=False, chunk=4)
    kept = partial.read_bytes()
    recorded = kept.decode().splitlines()[0][2:]

    refusals = [([a, b], {"resume": False}, "holds the rows of an earlier run that stopped: give --resume to "
                                            "predict only the photos it lacks, or remove it"),
                ([a], {}, "was written by"), ([a, b], {"policy": "none"}, "was written by"),
                ([a, b], {"channel_order": "bgr"}, "was written by")]
    for models, options, message in refusals:
        wrapped = [counting(m) for m in models]
        with pytest.raises(InvalidInput, match=message) as refused:
            write_submission(wrapped, PHOTOS, out, progress=False, **{"resume": True, **options})
        assert [m.predictor.calls for m in wrapped] == [0] * len(wrapped), options
        assert partial.read_bytes() == kept and not out.exists()
        if message == "was written by":
            assert f"{partial} was written by {recorded!r}, this run is 'carclf submit " in str(refused.value)

    shutil.rmtree(tiny_repository / "tiny_a" / "1")
    shutil.copytree(tiny_repository / "tiny_a" / "2", tiny_repository / "tiny_a" / "1")
    with pytest.raises(InvalidInput, match="was written by") as refused:
        write_submission([load_model(tiny_repository / "tiny_a" / "1"), b], PHOTOS, out, progress=False, resume=True)
    this_run = str(refused.value).split("this run is ")[1].split("'")[1]
    assert this_run.split(" ")[2].startswith("tiny_a/1@sha256:") and this_run != recorded
    assert partial.read_bytes() == kept
    shutil.rmtree(tiny_repository / "tiny_a" / "1")  # its own weights back
    shutil.copytree(tiny_repository_template / "tiny_a" / "1", tiny_repository / "tiny_a" / "1")

    a_again, b_again = counting(a), counting(b)  # a's weights as they were when the run stopped
    stats = write_submission([b_again, a_again], PHOTOS, out, progress=False, resume=True)
    assert stats["resumed"] == 4 and a_again.predictor.images == b_again.predictor.images == 6 * VIEWS
    assert out.read_text().splitlines() == expected and not partial.exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_command_with_its_rows_kept_and_the_same_command_with_resume_finishes(
        tiny_repository_template, tmp_path, capsys):
    """The real command in a process of its own, sent SIGINT once its first chunk of 64 rows is on disk: exit
    130, the note on stderr; the command again is refused without --resume and finishes with it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(32):  # 320 photos: five chunks, so that the signal lands well before the end
        for photo in sorted(PHOTOS.iterdir()):
            shutil.copyfile(photo, folder / f"{i:02d}_{photo.name}")
    model = str(tiny_repository_template / "tiny_a" / "1")
    out, partial = tmp_path / "out.csv", tmp_path / "out.partial.csv"
    child = subprocess.Popen([sys.executable, "-m", "carclf", "submit", model, str(folder), "--out", str(out)],
                             cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline = time.monotonic() + 180
        while child.poll() is None and time.monotonic() < deadline:
            if partial.exists() and len(partial.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the run ended before its first chunk was seen"
        dispositions = signal_lines(child.pid)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, f"{stderr}\nthe child's signal masks when it was sent SIGINT: {dispositions}"
    rows = len(partial.read_text().splitlines()) - 2
    assert 64 <= rows < 320 and rows % 64 == 0 and not out.exists()
    assert stderr.splitlines()[-2:] == [f"the {rows} of 320 photos answered so far are in {partial}: the same "
                                        "command with --resume predicts only the others", "carclf submit: interrupted"]

    kept = partial.read_bytes()
    assert carclf_main(["submit", model, str(folder), "--out", str(out)]) == 2
    assert "give --resume to predict only the photos it lacks" in capsys.readouterr().err
    assert partial.read_bytes() == kept
    assert carclf_main(["submit", model, str(folder), "--out", str(out), "--resume"]) == 0
    assert (f"wrote {out}: 320 rows, 0 skipped, {rows} of them kept from the run that stopped"
            in capsys.readouterr().out)
    expected = tmp_path / "whole.csv"
    write_submission(load_model(model), folder, expected, progress=False)
    assert out.read_bytes() == expected.read_bytes() and not partial.exists()


@pytest.mark.parametrize("command", ["submit", "pseudo-label"])
def test_what_needs_no_model_is_refused_before_any_model_loads(tiny_repository_template, tmp_path, monkeypatch,
                                                               capsys, command):
    """A mistyped or empty photo folder, and for submit a stopped run's partial file without --resume, are
    refused before the models load (seconds each, minutes for several large ones); the partial file is kept."""
    from carclf.train.commands import pseudo_label, submit

    module = submit if command == "submit" else pseudo_label
    loads = []

    def spying_load(path):
        loads.append(path)
        return load_model(path)

    monkeypatch.setattr(module, "load_model", spying_load)
    model = str(tiny_repository_template / "tiny_a" / "1")
    out = tmp_path / "out.csv"
    empty = tmp_path / "empty"
    empty.mkdir()
    nested = tmp_path / "test_upload"  # Kaggle's archive unpacks into test_upload/test_upload/
    shutil.copytree(PHOTOS, nested / "test_upload")
    cases = [(tmp_path / "nope", f"photo folder {str(tmp_path / 'nope')!r} does not exist"),
             (empty, f"photo folder {str(empty)!r} has no photos"),
             (nested, f"photo folder {str(nested)!r} has no photos (.jpg, .jpeg, .png, .bmp, .gif, .webp); its folder "
                      f"'test_upload' has them: pass {str(nested / 'test_upload')!r}")]
    if command == "submit":
        partial, stopped = tmp_path / "out.partial.csv", "# carclf submit whatever\nId,Category\n006605.jpg,3\n"
        partial.write_text(stopped)
        cases.append((PHOTOS, f"{partial} holds the rows of an earlier run that stopped: give --resume to predict "
                              "only the photos it lacks, or remove it"))
    for photos, message in cases:
        assert carclf_main([command, model, str(photos), "--out", str(out)]) == 2
        assert f"carclf {command}: error: {message}" in capsys.readouterr().err
    assert loads == [] and not out.exists()
    if command == "submit":
        assert partial.read_text() == stopped
        partial.unlink()
    assert carclf_main([command, model, str(PHOTOS), "--out", str(out)]) == 0  # the spy does see a load
    assert [str(path) for path in loads] == [model]
