"""Fixtures of the reliability tests: one embedded server set up as `make serve` runs it, the upload page
in front of it, and raw gRPC/REST access to both.

The server (``reliability_server``) serves the tiny fixture backbones tiny_a (versions 1 and 2, labels
stable -> 2, canary -> 1) and tiny_b, and ``car_ensemble``: an ensemble config over them rendered with the
tests' parameters (hflip TTA, weighted mean, degrade with quorum 1; the shipped one has quorum 2 and a
geometric mean). Batching uses the shipped ``serving/batching.config``
(max batch 16) and the request-size bound is lowered to ``MAX_REQUEST_BYTES`` so that oversized bodies
are cheap to send.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ensemble.servers import TINY_LABELS, embedded_server, write_ensemble_config
from tests.reliability.servers import ENSEMBLE, MAX_REQUEST_BYTES, SHIPPED_BATCHING, upload_page
from tests.serving.conftest import Rest, private_server  # noqa: F401 - a fixture, reused here


@pytest.fixture(scope="session")
def reliability_server(tiny_repository_template, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability_server")
    ensemble = write_ensemble_config(work, name=ENSEMBLE)
    with embedded_server(tiny_repository_template, work, ensembles=[ensemble], labels=TINY_LABELS,
                         enable_batching=True, batching_parameters_file=str(SHIPPED_BATCHING),
                         batching_early_dispatch=True,
                         max_request_bytes=MAX_REQUEST_BYTES) as server:
        yield server


@pytest.fixture(scope="session")
def page_rest(reliability_server) -> Iterator[Rest]:
    with upload_page(reliability_server) as url:
        yield Rest(url)


@pytest.fixture(scope="session")
def server_rest(reliability_server) -> Rest:
    return Rest(f"http://127.0.0.1:{reliability_server.rest_port}")


@pytest.fixture(scope="session")
def grpc_channel(reliability_server):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{reliability_server.grpc_port}",
                                    options=[("grpc.max_send_message_length", 64 << 20),
                                             ("grpc.max_receive_message_length", 64 << 20)])
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def photo_bytes_list(photos) -> list[bytes]:
    return [p.read_bytes() for p in photos]
