"""Session-wide fixtures: a model repository of tiny real SavedModels and the sample photos."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.fixtures import SAMPLE_DIR, export_tiny, sample_labels, sample_photos  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The commands the tests start take Ctrl-C (SIGINT) as from a terminal. A suite started with SIGINT ignored
    (``make test &`` from a script: a shell without job control ignores SIGINT and SIGQUIT in its background
    jobs) passed that on to every process it started, so the tests that press Ctrl-C on a command saw it ignored
    (the command ran to its end); with Python's handler here, they inherit the default disposition instead."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, each file's tests in their own order. ``make test`` hands whole files to its
    workers in collection order (``--dist loadfile --no-loadscope-reorder``): a long file taken last would keep
    one worker busy while the other has nothing left to do."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort keeps the order within each group


@pytest.fixture(scope="session")
def labels() -> list[str]:
    return sample_labels()


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return sample_photos()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_repository_template(tmp_path_factory) -> Path:
    """Built once: tiny_a (versions 1 and 2) and tiny_b (version 1). Copy it before changing anything."""
    repo = tmp_path_factory.mktemp("model_repository_template")
    export_tiny(repo, "tiny_a", seed=1)
    export_tiny(repo, "tiny_a", seed=2)
    export_tiny(repo, "tiny_b", seed=3)
    return repo


@pytest.fixture
def tiny_repository(tiny_repository_template, tmp_path) -> Path:
    """A private copy of the tiny model repository that a test may change freely."""
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repository_template, repo)
    return repo


@pytest.fixture(scope="session")
def tiny_ensemble_server(tiny_repository_template, tmp_path_factory):
    """One in-process embedded server (tiny_a, tiny_b and the ensemble ``tiny_ensemble`` over them), shared by
    tests/ensemble and tests/clients. Tests that change its config must restore it."""
    from tests.ensemble.servers import TINY_LABELS, embedded_server, write_ensemble_config

    work = tmp_path_factory.mktemp("tiny_ensemble_server")
    ensembles = [write_ensemble_config(work),  # tiny_ensemble: the latest versions
                 write_ensemble_config(work, name="tiny_canary", **{"version_label.tiny_a": "canary"})]
    with embedded_server(tiny_repository_template, work, ensembles=ensembles,
                         labels=TINY_LABELS, web_ui_model="tiny_ensemble") as server:
        yield server
