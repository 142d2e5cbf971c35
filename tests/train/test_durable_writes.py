"""What training, export and submissions keep is on disk before a rename puts it in place (``carclf.durable``).

A power cut cannot be staged in a test; what it would find can be read from the order of the system calls.
The real ``os.fsync``, ``os.replace`` and ``os.rename`` are wrapped to log what they were given (a synced
descriptor by the path it has open) and then do their work: every file a run, an export or a submission puts
in place by a rename must have been synced before it, and its folder after.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from carclf import durable
from carclf.submission import write_submission
from carclf.train import loop, runs
from carclf.train.recipe import parse_recipe
from tests.fixtures import export_tiny
from tests.train.conftest import tiny_recipe


class DiskLog:
    """The syncs and renames of the process, in order, with real paths."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst, *args, **kwargs):
                source, target = os.path.realpath(src), os.path.realpath(dst)
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", source, target))
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def renames_into(self, root: Path, start: int = 0) -> list[int]:
        """The indexes of the renames (from ``start`` on) whose target is under ``root``."""
        root = Path(os.path.realpath(root))
        return [i for i, e in enumerate(self.events[start:], start)
                if e[0] == "rename" and Path(e[2]).is_relative_to(root)]

    def synced(self, path: str | Path, start: int = 0, stop: int | None = None) -> bool:
        return ("sync", str(path)) in self.events[start:stop]

    def assert_durable(self, index: int) -> None:
        """The rename at ``index``: its source synced before it, its target's folder after."""
        _, source, target = self.events[index]
        assert self.synced(source, stop=index), f"{source} was renamed to {target} before it was synced"
        assert self.synced(Path(target).parent, start=index + 1), f"{Path(target).parent} not synced after {target}"


@pytest.fixture
def disk_log(monkeypatch) -> DiskLog:
    return DiskLog(monkeypatch)


def test_a_submission_is_synced_before_it_replaces_the_old_one(disk_log, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("Id,Category\nold.jpg,1\n")
    assert write_submission(out, [("a.jpg", "3"), ("b.jpg", "7")], comment="carclf test") == 2
    assert out.read_text().splitlines() == ["# carclf test", "Id,Category", "a.jpg,3", "b.jpg,7"]
    (index,) = disk_log.renames_into(tmp_path)
    disk_log.assert_durable(index)


@pytest.mark.slow
def test_every_checkpoint_and_log_a_run_resumes_from_is_synced_before_its_rename(disk_log, two_class_data, tmp_path):
    stages = [{"name": "head", "epochs": 2, "lr": 1e-3, "batch_size": 4, "image_size": 32, "unfreeze": "none"}]
    recipe = parse_recipe(tiny_recipe(two_class_data, stages=stages), source="tiny")
    run_dir = loop.train(recipe, runs_root=tmp_path / "runs", verbose=0)

    renames = disk_log.renames_into(run_dir)
    for index in renames:  # every epoch's, not only the last
        disk_log.assert_durable(index)
    targets = [Path(disk_log.events[i][2]) for i in renames]
    checkpoints = sorted((run_dir / runs.CHECKPOINTS).iterdir())
    assert {p.name for p in checkpoints} >= {runs.LAST_WEIGHTS, "best-head.weights.h5", runs.STATE}
    kept = [*checkpoints, run_dir / runs.FINAL_WEIGHTS, run_dir / runs.HISTORY_JSON, run_dir / runs.RUN_INFO]
    missing = [p.name for p in kept if Path(os.path.realpath(p)) not in targets]
    assert not missing, f"put in place without a synced rename: {missing}"
    assert sum(target.name == runs.LAST_WEIGHTS for target in targets) >= 2  # once an epoch

    start = len(disk_log.events)
    runs.trim_history(run_dir, 1)  # what --resume does to logs an epoch ahead of their checkpoint
    trims = disk_log.renames_into(run_dir, start)
    assert {Path(disk_log.events[i][2]).name for i in trims} == {runs.HISTORY_JSON, runs.HISTORY_CSV}
    for index in trims:
        disk_log.assert_durable(index)


def test_an_exported_version_is_on_disk_before_its_folder_is_renamed_into_the_repository(disk_log, tmp_path):
    version = export_tiny(tmp_path / "repository", "tiny")
    (index,) = [i for i, e in enumerate(disk_log.events) if e[0] == "rename" and e[2] == os.path.realpath(version)]
    staged = Path(disk_log.events[index][1])
    files = list(Path(version).rglob("*"))
    assert {p.name for p in files} >= {"saved_model.pb", "variables.index", "labels.txt"}
    for path in [*files, Path(version)]:
        before = staged / path.relative_to(version)
        assert disk_log.synced(before, stop=index), f"{path.relative_to(version)} not synced before the rename"
    assert disk_log.synced(os.path.realpath(version.parent), start=index + 1)
    assert disk_log.synced(os.path.realpath(version.parent.parent), start=index + 1)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF])
def test_a_folder_the_filesystem_cannot_sync_is_skipped_and_a_file_it_cannot_sync_is_an_error(monkeypatch, tmp_path,
                                                                                                code):
    real_fsync = os.fsync

    def fsync(fd):  # as a filesystem without fsync for folders answers (some network and FUSE ones)
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    source, target = tmp_path / "new.csv.tmp", tmp_path / "out.csv"
    source.write_text("a\n")
    durable.replace(source, target)  # the file is synced; its folder cannot be, and that is no error
    assert target.read_text() == "a\n" and not source.exists()

    def failing_fsync(fd):  # a disk that fails the write back
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    source.write_text("b\n")
    with pytest.raises(OSError, match="I/O error"):
        durable.replace(source, target)
    assert target.read_text() == "a\n"  # the old file stays when the new one may not be on disk
    source.unlink()
    with pytest.raises(OSError, match=r"cannot write the submission \(I/O error\): .*out\.csv"):
        write_submission(target, [("x.jpg", "1")])
    assert target.read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary left
