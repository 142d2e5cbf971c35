"""Fixtures of the load-test tests: the tiny model repository served by the embedded server.

One server per module, started as a subprocess with TF Serving's flags on kernel-chosen loopback ports,
serving tiny_a, tiny_b and a ``car_ensemble`` over both. A server or ensemble that does not load fails the
tests that need it (never a skip).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from carclf.errors import CarClfError
from carclf.loadtest import server as srv

ENSEMBLE = "car_ensemble"
MEMBERS = ("tiny_a", "tiny_b")


@dataclass(frozen=True)
class TinyDeployment:
    repository: Path
    address: srv.ServerAddress | None
    ensemble_config: Path


@pytest.fixture(scope="module")
def lt_repository(tiny_repository_template, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("lt") / "model_repository"
    shutil.copytree(tiny_repository_template, repo)
    return repo


@pytest.fixture(scope="module")
def lt_ensemble(tmp_path_factory) -> Path:
    """config.pbtxt of car_ensemble over the tiny models (checked: it loads)."""
    from carclf.ensemble.config import load_config, render

    path = tmp_path_factory.mktemp("lt_ensemble") / ENSEMBLE / "config.pbtxt"
    path.parent.mkdir(parents=True)
    path.write_text(render(ENSEMBLE, MEMBERS, parameters={"tta_policy": "hflip", "aggregation": "mean"}))
    load_config(path)
    return path


def start_tiny_server(repository: Path, folder: Path, ensemble_config: Path | None,
                      flags: tuple[str, ...] = ()) -> srv.EmbeddedServer:
    """The embedded server over the tiny models (and the ensemble), ready; the caller stops it."""
    config = srv.write_models_config(folder / "models.config", repository, MEMBERS)
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    extra = (*flags, *(("--ensemble_config_file", str(ensemble_config)) if ensemble_config else ()))
    server = srv.EmbeddedServer(address, model_config_file=config, model_repository=repository, flags=extra,
                                log_path=folder / "server.log")
    server.start()
    try:
        server.wait_ready(["tiny_a", *([ENSEMBLE] if ensemble_config else [])], timeout=180)
    except CarClfError:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def tiny_deployment(lt_repository, lt_ensemble, tmp_path_factory):
    """The running server of the tiny models and their ensemble."""
    server = start_tiny_server(lt_repository, tmp_path_factory.mktemp("lt_server"), lt_ensemble)
    try:
        yield TinyDeployment(lt_repository, server.address, lt_ensemble)
    finally:
        server.stop()
