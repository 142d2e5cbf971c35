"""Fixtures of the ensemble tests: ensemble configs over the tiny fixture models, and runtimes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from carclf.ensemble.config import EnsembleConfig, load_config, render
from carclf.ensemble.runtime import EnsembleRuntime
from tests.ensemble.callers import RecordingCaller


@pytest.fixture
def write_config(tmp_path) -> Callable[..., Path]:
    """write_config(members, **parameters) -> path of a config.pbtxt over those members."""

    def write(members=("tiny_a", "tiny_b"), name: str = "tiny_ensemble", **parameters) -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        path = folder / "config.pbtxt"
        path.write_text(render(name, members, parameters=parameters), encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_config(write_config) -> Callable[..., EnsembleConfig]:
    def make(members=("tiny_a", "tiny_b"), **parameters) -> EnsembleConfig:
        return load_config(write_config(members, **parameters))

    return make


@pytest.fixture(scope="session")
def photo_bytes(photos) -> list[bytes]:
    return [p.read_bytes() for p in photos]


@pytest.fixture
def runtime_for(tiny_repository_template, tiny_config):
    """runtime_for(members, caller=None, **parameters): a warmed EnsembleRuntime over the tiny models (a
    RecordingCaller unless another caller is given), closed after the test."""
    made = []

    def make(members=("tiny_a", "tiny_b"), caller=None, **parameters):
        caller = caller or RecordingCaller(tiny_repository_template)
        runtime = EnsembleRuntime(tiny_config(members, **parameters), caller)
        runtime.warm()  # describe members and trace the image graphs before any timed request
        made.append(runtime)
        return runtime

    yield make
    for r in made:
        r.close()
