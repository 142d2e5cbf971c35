"""``python -m carclf.demo``: which runs ``--skip-training`` reuses, and a Ctrl-C in the middle of a step.

No model is trained here: the steps are recorded or replaced by a small script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from carclf import demo
from carclf.train import runs as run_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_folder(runs: Path, name: str, age_s: float, *, finished: bool | None) -> Path:
    """A run folder as training leaves it: interrupted (``finished=None``: a checkpoint, no run.json, no final
    weights), cut short (run.json says not finished) or finished; its files and itself ``age_s`` old."""
    path = runs / name
    (path / run_files.CHECKPOINTS).mkdir(parents=True)
    (path / run_files.CONFIG).write_text("name: x\n")
    (path / run_files.CHECKPOINTS / run_files.LAST_WEIGHTS).write_bytes(b"weights")
    if finished is not None:
        (path / run_files.FINAL_WEIGHTS).write_bytes(b"weights")
        run_files.write_json(path / run_files.RUN_INFO, {"recipe": name.split("-")[0], "finished": finished})
    stamp = time.time() - age_s
    for entry in [*path.rglob("*"), path]:
        os.utime(entry, (stamp, stamp))
    return path


def test_the_newest_finished_run_is_picked_over_a_newer_unfinished_one(tmp_path):
    older = run_folder(tmp_path, "demo_mobilenet_v2-20260101-100000", 3600, finished=True)
    run_folder(tmp_path, "demo_mobilenet_v2-20260101-110000", 60, finished=None)   # Ctrl-C during training
    run_folder(tmp_path, "demo_mobilenet_v2-20260101-105000", 600, finished=False)  # cut short by a time budget
    assert demo.newest_finished_run(tmp_path, "demo_mobilenet_v2") == older
    assert demo.newest_finished_run(tmp_path, "demo_xception") is None


class StopAfterExports(Exception):
    """Raised by the recorded steps at the serving configuration: the training and exports are what is looked at."""


def record_steps(monkeypatch, runs: Path) -> list[list[str]]:
    """Replace demo._run: record each ``carclf`` step; a train step leaves a finished run folder behind."""
    steps: list[list[str]] = []

    def fake_run(cmd: list[str]) -> None:
        args = cmd[3:]
        steps.append(args)
        if args[0] == "train":
            run_folder(runs, f"{args[1]}-20260102-000000", 0, finished=True)
        if args[0] == "serving-config":
            raise StopAfterExports

    monkeypatch.setattr(demo, "_run", fake_run)
    return steps


def test_skip_training_exports_the_newest_finished_run_and_trains_a_recipe_that_has_none(tmp_path, monkeypatch,
                                                                                           capsys):
    """After a Ctrl-C during training, --skip-training exported the interrupted (newest) folder: "carclf export:
    error: run ... has not finished training", "demo: step failed"."""
    runs = tmp_path / "runs"
    finished = run_folder(runs, "demo_mobilenet_v2-20260101-100000", 3600, finished=True)
    run_folder(runs, "demo_mobilenet_v2-20260101-110000", 60, finished=None)
    run_folder(runs, "demo_efficientnet_b0-20260101-110000", 60, finished=None)   # never finished
    steps = record_steps(monkeypatch, runs)
    with pytest.raises(StopAfterExports):
        demo.main(["--runs", str(runs), "--repository", str(tmp_path / "repo"), "--skip-training"])
    made = {recipe: runs / f"{recipe}-20260102-000000" for recipe in ("demo_efficientnet_b0", "demo_xception")}
    assert [s[:2] for s in steps[:-1]] == [
        ["export", str(finished)],
        ["train", "demo_efficientnet_b0"], ["export", str(made["demo_efficientnet_b0"])],
        ["train", "demo_xception"], ["export", str(made["demo_xception"])],
    ], steps
    out = capsys.readouterr().out
    assert f"reusing {finished}" in out and "no finished demo_efficientnet_b0 run" in out, out


def test_without_skip_training_every_recipe_is_trained_and_its_new_run_exported(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run_folder(runs, "demo_mobilenet_v2-20260101-100000", 3600, finished=True)
    steps = record_steps(monkeypatch, runs)
    with pytest.raises(StopAfterExports):
        demo.main(["--runs", str(runs), "--repository", str(tmp_path / "repo")])
    assert [s[:2] for s in steps[:-1]] == [
        x for recipe in demo.DEMO_RECIPES
        for x in (["train", recipe], ["export", str(runs / f"{recipe}-20260102-000000")])], steps


# A stand-in for the training step: says it started (with its pid), then sleeps; on Ctrl-C it ends as
# `carclf train` does (exit 130), leaving a note that it saw the interrupt.
STEP = textwrap.dedent("""\
    import pathlib, sys, time
    note = pathlib.Path(sys.argv[1])
    try:
        print(f"step started {__import__('os').getpid()}", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        note.write_text("interrupted")
        sys.exit(130)
""")

# The demo with its `carclf` steps replaced by STEP, and a 1 s grace after an interrupt.
HARNESS = textwrap.dedent("""\
    import sys
    from carclf import demo
    step, note, *argv = sys.argv[1:]
    demo.STOP_GRACE_S = 1.0
    demo._carclf = lambda *args: [sys.executable, step, note]
    sys.exit(demo.main(argv))
""")


def interrupted_demo(tmp_path: Path, to_the_group: bool) -> tuple[subprocess.Popen, str, int, Path]:
    """Start the demo (in a session of its own), wait for its first step, send SIGINT to the process group (a
    terminal's Ctrl-C) or to the demo only; returns the demo, its stderr, the step's pid and its note."""
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "harness.py").write_text(HARNESS)
    note = tmp_path / "note"
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "harness.py"), str(tmp_path / "step.py"), str(note),
         "--runs", str(tmp_path / "runs"), "--repository", str(tmp_path / "repo")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("step started "):
                step_pid = int(line.split()[-1])
                break
        else:
            pytest.fail(f"the step never started: {process.stderr.read()[-2000:]}")
        if to_the_group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process, err, step_pid, note


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_during_a_step_ends_the_demo_in_one_line_with_status_130(tmp_path):
    """It was a KeyboardInterrupt traceback from subprocess.run, and the step was SIGKILLed 0.25 s after the
    interrupt instead of being let to finish its own."""
    process, err, step_pid, note = interrupted_demo(tmp_path, to_the_group=True)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "demo: interrupted", err[-3000:]
    assert note.read_text() == "interrupted"  # the step ended on its own Ctrl-C
    assert gone(step_pid)


def test_sigint_to_the_demo_alone_still_stops_its_step(tmp_path):
    """``kill -INT <demo>``: the step heard nothing; after the grace the demo ends it with SIGTERM."""
    process, err, step_pid, note = interrupted_demo(tmp_path, to_the_group=False)
    assert process.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "demo: interrupted", err[-3000:]
    assert not note.exists()
    assert gone(step_pid)
