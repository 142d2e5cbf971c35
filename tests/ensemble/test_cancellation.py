"""An ensemble request its client gives up on stops calling its members (serving/README.md, "Cancelled
requests are never run"; extension).

The member server batches with one batch thread, which a stand-in model holds while the test runs, so the
member calls of an ensemble request wait in the batching queue for as long as the test needs: the client
cancels (gRPC) or hangs up (REST) meanwhile. Once the thread is free again, the request sent next runs, and the
batching metrics show whether the abandoned member calls ran too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from carclf.clients import connect
from carclf.tta import get_policy
from tests.ensemble.servers import TINY_ENSEMBLE_PARAMETERS, embedded_server, grpc_url, write_ensemble_config
from tests.serving.test_batching import wait_until
from tests.serving.test_batching_queues import ONE_BATCH_THREAD, batch_thread_held, batching
from tests.serving.test_grpc import predict_request

pytestmark = pytest.mark.extension

ENSEMBLE = "tiny_ensemble"
MEMBERS = ("tiny_a", "tiny_b")
# views of each photo in the tiny ensemble's TTA policy: one stacked call per member holds them all
VIEWS = len(get_policy(TINY_ENSEMBLE_PARAMETERS["tta_policy"]))


def one_batch_thread(folder: Path) -> Path:
    path = folder / "batching.config"
    path.write_text(ONE_BATCH_THREAD)
    return path


def members_queued(server, before: float):
    """True once both members' calls of one ensemble request wait in the batching queue."""
    return lambda: batching(server, "input_batch_size_count") - before >= len(MEMBERS)


def expect_the_next_request_to_run_alone(ensemble_server, member_server, photo: bytes, processed: float) -> None:
    """The next ensemble request is answered, and the member batches that ran held its own views only."""
    with connect(grpc_url(ensemble_server)) as client:
        assert client.predict(ENSEMBLE, images=[photo], timeout=30).probabilities.shape[0] == 1
    ran = batching(member_server, "processed_batch_size_sum") - processed
    assert ran == VIEWS * len(MEMBERS), f"{ran:g} member rows ran: the abandoned request's member calls ran too"


@pytest.fixture
def in_process(tiny_repository_template, tmp_path):
    """The embedded server with the ensemble over its own members, batching on one thread."""
    config = write_ensemble_config(tmp_path / "ensemble")
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config], enable_batching=True,
                         batching_parameters_file=str(one_batch_thread(tmp_path))) as server:
        yield server


def test_a_grpc_ensemble_call_its_client_cancels_cancels_its_queued_member_calls(in_process, photo_bytes):
    """A client cancels its ensemble call while the member calls wait for the batch thread: the ensemble and
    both member calls are counted CANCELLED at once and the member calls never run."""
    server = in_process
    count = server.metrics.request_count.value  # (model, status) -> requests
    answered = [count(m, "OK") for m in MEMBERS]  # the ensemble's warmup called them
    request = predict_request(ENSEMBLE, image_bytes=np.array(photo_bytes[:1], dtype=object))
    with batch_thread_held(server), grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        queued, processed = batching(server, "input_batch_size_count"), batching(server, "processed_batch_size_sum")
        call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(request, timeout=30)
        assert wait_until(members_queued(server, queued))
        assert call.cancel()
        assert wait_until(lambda: count(ENSEMBLE, "CANCELLED") == 1), "the ensemble kept waiting for its members"
        assert [count(m, "CANCELLED") for m in MEMBERS] == [1, 1]
    expect_the_next_request_to_run_alone(server, server, photo_bytes[1], processed)
    assert [count(m, "OK") for m in MEMBERS] == [n + 1 for n in answered]  # the next request's calls only


def test_a_rest_ensemble_request_whose_client_hangs_up_cancels_its_queued_member_calls(in_process, photo_bytes):
    """The same over REST: the client closes its connection while the member calls wait for the batch thread."""
    import base64

    server = in_process
    count = server.metrics.request_count.value
    body = json.dumps({"instances": [{"b64": base64.b64encode(photo_bytes[0]).decode()}]}).encode()
    with batch_thread_held(server):
        queued, processed = batching(server, "input_batch_size_count"), batching(server, "processed_batch_size_sum")
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as client:
            client.sendall(f"POST /v1/models/{ENSEMBLE}:predict HTTP/1.1\r\nHost: test\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_until(members_queued(server, queued))
        assert wait_until(lambda: [count(m, "CANCELLED") for m in MEMBERS] == [1, 1]), \
            "the ensemble kept its member calls queued after its client had gone"
        assert wait_until(lambda: count(ENSEMBLE, "CANCELLED") == 1)
    expect_the_next_request_to_run_alone(server, server, photo_bytes[1], processed)


def test_a_gateway_call_its_client_cancels_cancels_its_member_calls_on_the_member_server(
        tiny_repository_template, photo_bytes, tmp_path):
    """The gateway calls its members over gRPC: a client that cancels the gateway call gets the member calls
    cancelled on the member server too, which takes them out of its batching queue."""
    from carclf.ensemble.gateway import Gateway
    from carclf.serving.options import ServerOptions

    config = write_ensemble_config(tmp_path / "ensemble")
    with embedded_server(tiny_repository_template, tmp_path / "members", enable_batching=True,
                         batching_parameters_file=str(one_batch_thread(tmp_path))) as members:
        gateway = Gateway(ServerOptions(ensemble_config_file=[str(config)], port=0, rest_api_port=0,
                                        model_repository=str(tiny_repository_template),
                                        file_system_poll_wait_seconds=0, drain_timeout_seconds=2.0),
                          grpc_url(members)).start()
        try:
            count = members.metrics.request_count.value
            request = predict_request(ENSEMBLE, image_bytes=np.array(photo_bytes[:1], dtype=object))
            with batch_thread_held(members), grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                queued = batching(members, "input_batch_size_count")
                processed = batching(members, "processed_batch_size_sum")
                call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(request, timeout=30)
                assert wait_until(members_queued(members, queued))
                assert call.cancel()
                assert wait_until(lambda: [count(m, "CANCELLED") for m in MEMBERS] == [1, 1]), \
                    "the member calls of a cancelled gateway call still wait on the member server"
                assert wait_until(lambda: gateway.metrics.request_count.value(ENSEMBLE, "CANCELLED") == 1)
            expect_the_next_request_to_run_alone(gateway, members, photo_bytes[1], processed)
        finally:
            gateway.stop(drain_timeout=1.0)
