"""The shared batch scheduler's promises: one queue per model version, full queues, fair turns, errors reaching
every caller of a batch, padding and its metrics, and the caller's deadline while a batch runs."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from carclf.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted
from carclf.serving.batching import BatchScheduler
from carclf.serving.config import BatchingConfig
from carclf.serving.metrics import ServingMetrics
from tests.serving.conformance_setup import CANARY, MODEL, OTHER_MODEL, STABLE
from tests.serving.conftest import Rest
from tests.serving.test_batching import BATCHING, RecordingServable, metric, rows, wait_until
from tests.serving.test_grpc import expect_code, outputs, predict_request

SIGNATURE = "serving_default"


def batching(server, what: str) -> float:
    """A batching metric of ``server`` (``input_batch_size_sum``, ``processed_batch_size_sum``, ...)."""
    return server.metrics.registry.get_sample_value(BATCHING + what) or 0.0


class HeldServable(RecordingServable):
    """A batchable stand-in that records each batch's ``label`` in a shared ``log``; its first batch holds the
    scheduler's thread until ``release`` is set (at most ``hold_s``, so a broken scheduler cannot hang a test)."""

    def __init__(self, label: str, log: list[str], release: threading.Event | None = None, hold_s: float = 20.0,
                 error: Exception | None = None):
        super().__init__(0.0)
        self.label, self.log, self.release, self.hold_s, self.error = label, log, release, hold_s, error
        self._held = False

    def run(self, signature_name, inputs):
        with self._lock:
            hold, self._held = self.release is not None and not self._held, True
            self.log.append(self.label)
        outputs = super().run(signature_name, inputs)
        if hold:
            self.release.wait(self.hold_s)
        if self.error is not None:
            raise self.error
        return outputs


@contextlib.contextmanager
def batch_thread_held(server) -> Iterator[None]:
    """Hold the batch thread of a server batching on one thread (a stand-in model's batch runs until the block
    ends), so that requests sent meanwhile wait in the batching queue for as long as a test needs."""
    release = threading.Event()
    gate = HeldServable("gate", [], release, hold_s=60.0)
    gate.name = "gate"
    server.manager.add_static(gate)
    holder = threading.Thread(target=server.predictor.predict, args=("gate", {"x": np.ones(1, np.float32)}))
    holder.start()
    try:
        assert gate.started.wait(30), "the stand-in model's batch never started"
        yield
    finally:
        release.set()
        holder.join(60)


#: Batching parameters for ``batch_thread_held``: one batch thread, no waiting for company.
ONE_BATCH_THREAD = "max_batch_size { value: 8 } batch_timeout_micros { value: 0 } num_batch_threads { value: 1 }"


def one_batch_thread_server(private_server, conformance_repository, tmp_path):
    """A server of OTHER_MODEL batching on one thread, without waiting for company."""
    parameters = tmp_path / "batching.config"
    parameters.write_text(ONE_BATCH_THREAD)
    return private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                          enable_batching=True, batching_parameters_file=str(parameters), enable_model_warmup=False)


def test_requests_to_different_models_and_versions_never_share_a_batch(private_server, conformance_repository,
                                                                       reference, jpegs, tmp_path):
    """Queues are per servable: concurrent requests to tiny_a version 1, tiny_a version 2 (by number and by its
    label) and tiny_b, all of one signature and shape, are each answered by their own model version."""
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 300000 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 8 }")
    server = private_server(model_config_file=str(conformance_repository / "models.config"),
                            model_repository=str(conformance_repository), enable_batching=True,
                            batching_parameters_file=str(batching), enable_model_warmup=False)
    data = np.array(jpegs[:1], dtype=object)
    calls = [(MODEL, {"version": STABLE}, STABLE), (MODEL, {"version": CANARY}, CANARY),
             (MODEL, {"label": "canary"}, CANARY), (OTHER_MODEL, {}, 1)] * 2
    expected = {(model, version): reference(model, version, image_bytes=data)["probabilities"]
                for model, _, version in calls}
    assert not np.allclose(expected[(MODEL, STABLE)], expected[(MODEL, CANARY)], atol=1e-4)  # told apart
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(stub.Predict, predict_request(model, image_bytes=data, **spec), timeout=60)
                       for model, spec, _ in calls]
            replies = [f.result() for f in futures]
    for (model, spec, version), reply in zip(calls, replies, strict=True):
        assert (reply.model_spec.name, reply.model_spec.version.value) == (model, version), spec
        np.testing.assert_allclose(outputs(reply)["probabilities"], expected[(model, version)], atol=1e-5,
                                   err_msg=f"{model} {spec} answered by another model version's batch")


def test_a_queue_holding_max_enqueued_batches_refuses_the_next_batch_though_none_is_full():
    """A queue holds at most ``max_enqueued_batches`` batches, the open one included: with one closed batch and
    one open (not full) batch, a request that does not fit the open one is RESOURCE_EXHAUSTED, and the refusal
    leaves the open batch open for a request that does fit."""
    config = BatchingConfig(max_batch_size=3, batch_timeout_micros=30_000_000, num_batch_threads=1,
                            max_enqueued_batches=2)
    scheduler = BatchScheduler(config, ServingMetrics())
    release, log = threading.Event(), []
    servable = HeldServable("a", log, release)
    try:
        running = scheduler.submit(servable, SIGNATURE, rows(3))     # full: taken by the only thread, held there
        assert servable.started.wait(5)
        first = scheduler.submit(servable, SIGNATURE, rows(2))       # batch 1 (open)
        second = scheduler.submit(servable, SIGNATURE, rows(2))      # does not fit: batch 1 closed, batch 2 open
        with pytest.raises(ResourceExhausted, match="max_enqueued_batches=2"):
            scheduler.submit(servable, SIGNATURE, rows(2))           # would be a third batch
        third = scheduler.submit(servable, SIGNATURE, rows(1))       # the refusal left batch 2 open: it fits there
        release.set()
        scheduler.flush()
        assert running.result(5)["y"].tolist() == [0.0, 2.0, 4.0]
        assert first.result(5)["y"].tolist() == [0.0, 2.0] and second.result(5)["y"].tolist() == [0.0, 2.0]
        assert third.result(5)["y"].tolist() == [0.0]
        assert servable.sizes == [3, 2, 3]
    finally:
        release.set()
        scheduler.close()


def test_threads_take_ready_batches_from_the_queues_in_turn():
    """Fair turns between models: a model's single batch is not left waiting behind all the batches another
    model queued before it."""
    config = BatchingConfig(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=8)
    scheduler = BatchScheduler(config, ServingMetrics())
    release, log = threading.Event(), []
    busy = HeldServable("a", log, release)
    other = HeldServable("b", log)
    try:
        held = scheduler.submit(busy, SIGNATURE, rows(1))            # holds the only thread
        assert busy.started.wait(5)
        a_batches = [scheduler.submit(busy, SIGNATURE, rows(1)) for _ in range(3)]
        b_batch = scheduler.submit(other, SIGNATURE, rows(1))
        release.set()
        for future in [held, *a_batches, b_batch]:
            assert future.result(5)["y"].tolist() == [0.0]
        after = log[1:]                                              # the batches queued while the thread was held
        assert sorted(after) == ["a", "a", "a", "b"]
        assert after.index("b") < 2, f"b's one batch waited behind a's batches: {after}"
    finally:
        release.set()
        scheduler.close()


def test_an_error_of_a_merged_batch_reaches_every_request_in_it():
    """A batch that fails (other than one request's bad input) fails every request merged into it, at once."""
    config = BatchingConfig(max_batch_size=3, batch_timeout_micros=30_000_000, num_batch_threads=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    broken = HeldServable("broken", [], error=FailedPrecondition("the model cannot run"))
    try:
        futures = [scheduler.submit(broken, SIGNATURE, rows(1)) for _ in range(3)]  # the third fills the batch
        for future in futures:
            with pytest.raises(FailedPrecondition, match="the model cannot run"):
                future.result(5)
        assert broken.sizes == [3]  # one merged batch
    finally:
        scheduler.close()


def test_a_request_of_an_allowed_batch_size_is_not_padded():
    metrics = ServingMetrics()
    config = BatchingConfig(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1)
    scheduler = BatchScheduler(config, metrics)
    servable = RecordingServable(0.0)
    size = config.allowed_batch_sizes[0]
    try:
        answer = scheduler.submit(servable, SIGNATURE, rows(size)).result(5)
        assert answer["y"].tolist() == (rows(size)["x"] * 2).tolist()
    finally:
        scheduler.close()
    assert servable.sizes == [size]
    text = metrics.exposition().decode()
    assert metric(text, ":tensorflow:serving:batching_session:padding_size_sum") == 0
    assert f'execution_batch_size="{size}"' in text


def test_processed_batch_size_counts_the_padded_batch_that_ran():
    """As in TF Serving, processed_batch_size is the size of the batch the model ran, padding included."""
    metrics = ServingMetrics()
    config = BatchingConfig(max_batch_size=8, allowed_batch_sizes=(4, 8), num_batch_threads=1)
    scheduler = BatchScheduler(config, metrics)
    servable = RecordingServable(0.0)
    try:
        assert scheduler.submit(servable, SIGNATURE, rows(1)).result(5)["y"].tolist() == [0.0]
    finally:
        scheduler.close()
    padded = next(b for b in config.allowed_batch_sizes if b >= 1)
    assert servable.sizes == [padded]
    text = metrics.exposition().decode()
    prefix = ":tensorflow:serving:batching_session:"
    assert metric(text, prefix + "processed_batch_size_sum") == padded
    assert metric(text, prefix + "padding_size_sum") == padded - 1


def test_a_batched_in_process_request_ends_at_its_deadline_while_its_batch_still_runs(private_server,
                                                                                       conformance_repository,
                                                                                       tmp_path):
    """The caller gets DEADLINE_EXCEEDED at its deadline; the run it waited for is not stopped, but not waited
    for either."""
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 4 } batch_timeout_micros { value: 1000 } "
                        "num_batch_threads { value: 1 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    release = threading.Event()
    slow = HeldServable("slow", [], release, hold_s=15.0)
    slow.name = "slow"
    server.manager.add_static(slow)
    try:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            server.predictor.predict("slow", {"x": np.ones(1, np.float32)}, deadline=time.monotonic() + 0.5)
        assert slow.started.is_set()  # it was running, not waiting in the queue
        assert time.monotonic() - start < 10.0
    finally:
        release.set()
    # the batch thread is free again once the run ends
    assert server.predictor.predict("slow", {"x": np.ones(1, np.float32)}).outputs["y"].tolist() == [2.0]


def test_a_grpc_clients_deadline_reaches_the_batching_queue(private_server, conformance_repository, jpegs,
                                                            tmp_path):
    """serving/README.md, "Deadlines": a gRPC request whose client deadline passes while it waits for the batch
    thread is never run; the request sent next runs with its own row only."""
    server = one_batch_thread_server(private_server, conformance_repository, tmp_path)
    request = predict_request(OTHER_MODEL, image_bytes=np.array(jpegs[:1], dtype=object))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with batch_thread_held(server):
            queued, processed = batching(server, "input_batch_size_sum"), batching(server, "processed_batch_size_sum")
            expect_code(lambda: stub.Predict(request, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED)
        assert stub.Predict(request, timeout=30).model_spec.version.value == 1
    assert batching(server, "input_batch_size_sum") == queued + 2  # both were queued ...
    assert batching(server, "processed_batch_size_sum") == processed + 1  # ... and the abandoned one never ran


@pytest.mark.extension
def test_a_grpc_call_its_client_cancels_while_queued_is_never_run(private_server, conformance_repository, jpegs,
                                                                  tmp_path):
    """serving/README.md, "Cancelled requests": a client that cancels its call (or goes away) while the request
    waits for the batch thread takes it out: it is counted CANCELLED at once and never run; the next one runs."""
    server = one_batch_thread_server(private_server, conformance_repository, tmp_path)
    request = predict_request(OTHER_MODEL, image_bytes=np.array(jpegs[:1], dtype=object))
    requests = server.metrics.request_count.value  # (model, status) -> count
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with batch_thread_held(server):
            queued, processed = batching(server, "input_batch_size_sum"), batching(server, "processed_batch_size_sum")
            call = stub.Predict.future(request, timeout=30)
            assert wait_until(lambda: batching(server, "input_batch_size_sum") == queued + 1)
            assert call.cancel()
            assert wait_until(lambda: requests(OTHER_MODEL, "CANCELLED") == 1), \
                "the server's handler still waits for the batch of a call its client cancelled"
        assert stub.Predict(request, timeout=30).model_spec.version.value == 1
    assert batching(server, "processed_batch_size_sum") == processed + 1  # the next request; never the cancelled
    assert requests(OTHER_MODEL, "OK") == 1


@pytest.mark.extension
def test_a_rest_request_whose_client_disconnects_while_queued_is_never_run(private_server, conformance_repository,
                                                                           jpegs, tmp_path):
    """The same over REST: the client closes its connection while its request waits for the batch thread."""
    server = one_batch_thread_server(private_server, conformance_repository, tmp_path)
    body = json.dumps({"instances": [{"b64": base64.b64encode(jpegs[0]).decode()}]}).encode()
    path = f"/v1/models/{OTHER_MODEL}:predict"
    requests = server.metrics.request_count.value
    with batch_thread_held(server):
        queued, processed = batching(server, "input_batch_size_sum"), batching(server, "processed_batch_size_sum")
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as client:
            client.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_until(lambda: batching(server, "input_batch_size_sum") == queued + 1)
        assert wait_until(lambda: requests(OTHER_MODEL, "CANCELLED") == 1), \
            "the server still waits for the batch of a request whose client has gone"
    reply = Rest(f"http://127.0.0.1:{server.rest_port}").post(path, body)
    assert reply.status == 200 and len(json.loads(reply.body)["predictions"]) == 1
    assert batching(server, "processed_batch_size_sum") == processed + 1
    assert requests(OTHER_MODEL, "OK") == 1


@pytest.mark.extension
def test_a_rest_request_waiting_for_a_worker_is_never_run_once_its_client_disconnects(private_server,
                                                                                      conformance_repository):
    """serving/README.md, "Cancelled requests", unbatched: with the one REST worker busy, a request whose client
    closes its connection while it waits for that worker is counted CANCELLED and never run."""
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            rest_api_num_threads=1, enable_model_warmup=False)
    release, runs = threading.Event(), []
    slow = HeldServable("run", runs, release)
    slow.name = "slow"
    server.manager.add_static(slow)
    path, body = "/v1/models/slow:predict", json.dumps({"instances": [1.0]}).encode()
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    text = lambda: server.metrics.exposition().decode()  # noqa: E731
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(rest.post, path, body)
            assert slow.started.wait(10)  # the only REST worker is taken
            with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as client:
                client.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                               + body)
                assert wait_until(lambda: metric(text(), 'carclf_serving_inflight_requests{entrypoint="REST"}') == 2)
            assert wait_until(lambda: server.metrics.request_count.value("slow", "CANCELLED") == 1)
            release.set()
            assert first.result(30).status == 200
        assert rest.post(path, body).status == 200  # queued behind where the cancelled one was
    finally:
        release.set()
    assert runs == ["run", "run"]  # the first request and the last; never the one whose client left
