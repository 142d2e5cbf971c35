"""Dynamic batching: requests merged (visible in the metrics), padding, full queues, oversized tasks."""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from carclf.errors import ConfigError, DeadlineExceeded, InvalidInput, ResourceExhausted
from carclf.serving import config as cfg
from carclf.serving.batching import BatchScheduler
from carclf.serving.config import BatchingConfig
from carclf.serving.metrics import ServingMetrics
from carclf.serving.servable import Servable, Signature, TensorInfo
from tests.serving.conformance_setup import MODEL, OTHER_MODEL
from tests.serving.conftest import Rest
from tests.serving.test_grpc import outputs, predict_request


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def test_concurrent_requests_are_batched_and_visible_in_metrics(private_server, conformance_repository, reference,
                                                                jpegs, tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 100000 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 4 }")
    monitoring = conformance_repository / "monitoring.config"
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching),
                            monitoring_config_file=str(monitoring), enable_model_warmup=False)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    expected = reference(OTHER_MODEL, 1, image_bytes=np.array(jpegs, dtype=object))["probabilities"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stub.Predict, predict_request(OTHER_MODEL, image_bytes=np.array([jpegs[i % 4]],
                                                                                                dtype=object)),
                               timeout=60) for i in range(16)]
        for i, future in enumerate(futures):
            np.testing.assert_allclose(outputs(future.result())["probabilities"][0], expected[i % 4], atol=1e-5)
    text = Rest(f"http://127.0.0.1:{server.rest_port}").get("/monitoring/prometheus/metrics").body.decode()
    prefix = ":tensorflow:serving:batching_session:"
    batches = metric(text, prefix + "processed_batch_size_count")
    examples = metric(text, prefix + "processed_batch_size_sum")
    assert metric(text, prefix + "input_batch_size_count") == 16 and examples == 16
    assert batches < 16, f"16 concurrent requests ran as {batches:.0f} batches: nothing was merged"
    assert metric(text, prefix + "queuing_latency_count") == 16


def test_a_bad_photo_fails_only_its_own_request_in_a_merged_batch(private_server, conformance_repository, reference,
                                                                  jpegs, tmp_path, caplog):
    """A truncated JPEG (its header is whole) fails the merged batch in TensorFlow; the batch's requests run
    again one by one, so the others answer as if alone and the bad one is told which photo does not decode."""
    caplog.set_level(logging.INFO, logger="carclf.serving.batching")
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 300000 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 4 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    expected = reference(OTHER_MODEL, 1, image_bytes=np.array(jpegs, dtype=object))["probabilities"]
    truncated = jpegs[0][: len(jpegs[0]) // 2]
    bodies = [[jpegs[i % len(jpegs)]] for i in range(7)]
    bodies.insert(3, [jpegs[1], truncated])  # the bad request: its second photo
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(stub.Predict, predict_request(OTHER_MODEL, image_bytes=np.array(body, dtype=object)),
                               timeout=60) for body in bodies]
        with pytest.raises(grpc.RpcError) as refused:
            futures[3].result()
        for i, future in enumerate(futures):
            if i != 3:
                np.testing.assert_allclose(outputs(future.result())["probabilities"][0],
                                           expected[jpegs.index(bodies[i][0])], atol=1e-5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'image_bytes' element 1 (of 2) does not decode" in refused.value.details()
    assert any("running them one by one" in r.getMessage() for r in caplog.records), "the requests were not merged"


def test_batches_are_padded_to_allowed_sizes(private_server, conformance_repository, reference, jpegs, tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } allowed_batch_sizes: [4, 8] num_batch_threads { value: 1 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    data = np.array(jpegs[:1], dtype=object)
    result = server.predictor.predict(OTHER_MODEL, {"image_bytes": data})
    assert result.outputs["probabilities"].shape[0] == 1
    np.testing.assert_allclose(result.outputs["probabilities"],
                               reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"], atol=1e-5)
    text = server.metrics.exposition().decode()
    assert metric(text, ":tensorflow:serving:batching_session:padding_size_sum") == 3
    assert 'execution_batch_size="4"' in text
    with pytest.raises(InvalidInput, match="larger than maximum input batch size 8"):
        server.predictor.predict(OTHER_MODEL, {"image_bytes": np.array(jpegs * 3, dtype=object)})


class SlowServable(Servable):
    """A batchable stand-in whose batches take ``seconds``: makes queues fill up deterministically."""

    name, version, batchable = "slow", 1, True

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = threading.Event()
        info = TensorInfo("x", "float32", (-1,))
        self._signatures = {"serving_default": Signature("serving_default", "tensorflow/serving/predict",
                                                         {"x": info}, {"y": TensorInfo("y", "float32", (-1,))})}

    def signatures(self):
        return self._signatures

    def predict(self, signature_name, inputs, *, output_filter=(), deadline=None, cancel=None):
        self.validate(signature_name, inputs, output_filter)
        return self.run(signature_name, inputs)

    def run(self, signature_name, inputs):
        self.started.set()
        time.sleep(self.seconds)
        return {"y": inputs["x"] * 2}


def test_full_queue_is_resource_exhausted():
    config = BatchingConfig(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = SlowServable(0.5)
    try:
        x = {"x": np.ones(1, np.float32)}
        running = scheduler.submit(servable, "serving_default", x)   # taken by the only thread
        assert servable.started.wait(5)
        queued = scheduler.submit(servable, "serving_default", x)    # the one batch the queue may hold
        with pytest.raises(ResourceExhausted, match="queue"):
            scheduler.submit(servable, "serving_default", x)
        assert running.result(5)["y"].tolist() == [2.0] and queued.result(5)["y"].tolist() == [2.0]
    finally:
        scheduler.close()


@pytest.mark.extension
def test_a_cancelled_request_gives_its_place_in_a_full_queue_back_at_once():
    """The queue holds one batch and it is taken by a request waiting behind a running batch: cancelling that
    request frees the place at once, so the next request is queued instead of refused, and the cancelled one
    never runs. (Before, it held the place until its batch left, and the next request got RESOURCE_EXHAUSTED.)"""
    config = BatchingConfig(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(1.0)
    try:
        running = scheduler.submit(servable, "serving_default", rows(1))  # taken by the only thread
        assert servable.started.wait(5)
        abandoned = scheduler.submit(servable, "serving_default", {"x": np.full(1, 5.0, np.float32)})
        with pytest.raises(ResourceExhausted, match="queue"):
            scheduler.submit(servable, "serving_default", rows(1))
        assert abandoned.cancel()
        queued = scheduler.submit(servable, "serving_default", {"x": np.full(1, 7.0, np.float32)})
        assert running.result(5)["y"].tolist() == [0.0] and queued.result(5)["y"].tolist() == [14.0]
        assert servable.sizes == [1, 1]  # the running batch and the next request's; never the cancelled one
    finally:
        scheduler.close()


@pytest.mark.extension
def test_a_cancelled_request_gives_its_room_in_the_open_batch_back():
    """A queue of one batch of at most 4 rows, 3 of them taken by a request waiting for company: a second
    request of 3 rows would need a batch more and is refused. Once the first is cancelled, its rows are free
    and the second is queued; it runs alone."""
    config = BatchingConfig(max_batch_size=4, batch_timeout_micros=300_000, num_batch_threads=1,
                            max_enqueued_batches=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(0.0)
    try:
        first = scheduler.submit(servable, "serving_default", rows(3))
        with pytest.raises(ResourceExhausted, match="queue"):
            scheduler.submit(servable, "serving_default", rows(3))
        assert first.cancel()
        second = scheduler.submit(servable, "serving_default", rows(3))
        assert second.result(10)["y"].tolist() == [0.0, 2.0, 4.0]
        assert servable.sizes == [3]
    finally:
        scheduler.close()


def test_full_queue_answers_429_and_resource_exhausted(private_server, conformance_repository, tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 1 } num_batch_threads { value: 1 } max_enqueued_batches { value: 1 }")
    server = private_server(model_name=MODEL, model_base_path=str(conformance_repository / MODEL),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    slow = SlowServable(1.0)
    server.manager.add_static(slow)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: rest.post("/v1/models/slow:predict", {"instances": [1.0]}), range(4)))
    statuses = sorted(r.status for r in replies)
    assert statuses.count(200) >= 1 and 429 in statuses, statuses
    assert all("queue" in r.json["error"] for r in replies if r.status == 429)
    assert rest.post("/v1/models/slow:predict", {"instances": [1.0]}).json == {"predictions": [2.0]}


class RecordingServable(SlowServable):
    """SlowServable that records which thread ran each batch and how many batches ran at once."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.threads: list[str] = []
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        self.running = self.most_at_once = 0

    def run(self, signature_name, inputs):
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.sizes.append(len(inputs["x"]))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return super().run(signature_name, inputs)
        finally:
            with self._lock:
                self.running -= 1


def test_inline_request_runs_in_the_calling_thread_when_nothing_waits():
    metrics = ServingMetrics()
    scheduler = BatchScheduler(BatchingConfig(max_batch_size=4, batch_timeout_micros=0, num_batch_threads=2), metrics)
    servable = RecordingServable(0.0)
    try:
        future = scheduler.submit(servable, "serving_default", {"x": np.ones(1, np.float32)}, inline=True)
        assert future.done() and future.result()["y"].tolist() == [2.0]
        assert servable.threads == [threading.current_thread().name]
        queued = scheduler.submit(servable, "serving_default", {"x": np.ones(1, np.float32)})  # not inline
        assert queued.result(5)["y"].tolist() == [2.0]
        assert servable.threads[1].startswith("batch_threads"), servable.threads
        text = metrics.exposition().decode()
        assert metric(text, ":tensorflow:serving:batching_session:queuing_latency_count") == 2
        assert metric(text, ":tensorflow:serving:batching_session:processed_batch_size_count") == 2
    finally:
        scheduler.close()


def test_inline_request_waits_for_its_batch_when_a_timeout_asks_for_merging():
    config = BatchingConfig(max_batch_size=4, batch_timeout_micros=200_000, num_batch_threads=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(0.0)
    try:
        x = {"x": np.ones(1, np.float32)}
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(scheduler.submit, servable, "serving_default", x, inline=True) for _ in range(3)]
            results = [f.result(5).result(5) for f in futures]
        assert all(r["y"].tolist() == [2.0] for r in results)
        assert all(name.startswith("batch_threads") for name in servable.threads), servable.threads
        assert sum(servable.sizes) == 3 and len(servable.sizes) < 3, servable.sizes  # merged
    finally:
        scheduler.close()


def test_inline_runs_count_against_num_batch_threads():
    """With one batch thread, an inline run and a queued batch never run at once."""
    config = BatchingConfig(max_batch_size=1, batch_timeout_micros=0, num_batch_threads=1, max_enqueued_batches=8)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(0.3)
    x = {"x": np.ones(1, np.float32)}
    try:
        with ThreadPoolExecutor(4, thread_name_prefix="caller") as pool:
            first = pool.submit(scheduler.submit, servable, "serving_default", x, inline=True)
            assert servable.started.wait(5)  # running inline in a caller thread, holding the only slot
            futures = [first] + [pool.submit(scheduler.submit, servable, "serving_default", x, inline=i % 2 == 0)
                                 for i in range(5)]
            results = [f.result(10).result(10) for f in futures]
        assert all(r["y"].tolist() == [2.0] for r in results)
        assert len(servable.threads) == 6 and servable.most_at_once == 1, servable.most_at_once
        assert servable.threads[0].startswith("caller"), servable.threads
    finally:
        scheduler.close()


# -- early dispatch (extension: --batching_early_dispatch) ------------------------------------------

LONG_TIMEOUT = BatchingConfig(max_batch_size=8, batch_timeout_micros=30_000_000, num_batch_threads=2)


class GatedServable(RecordingServable):
    """RecordingServable whose first batch, once recorded, holds its slot until ``release`` is set."""

    def __init__(self):
        super().__init__(0.0)
        self.release = threading.Event()
        self._first = True

    def run(self, signature_name, inputs):
        with self._lock:
            first, self._first = self._first, False
        outputs = super().run(signature_name, inputs)
        if first:
            assert self.release.wait(20), "the test never released the first batch"
        return outputs


def rows(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n, dtype=np.float32)}


def test_without_early_dispatch_a_lone_request_waits_for_the_timeout():
    """TF Serving's rule: a batch leaves when full or timed out, even on an idle server."""
    scheduler = BatchScheduler(LONG_TIMEOUT, ServingMetrics())
    try:
        future = scheduler.submit(SlowServable(0.0), "serving_default", rows(1))
        with pytest.raises(FutureTimeout):
            future.result(0.5)
    finally:
        scheduler.close()  # runs what is queued
    assert future.result(5)["y"].tolist() == [0.0]


def test_early_dispatch_sends_a_lone_request_at_once_on_an_idle_scheduler():
    scheduler = BatchScheduler(LONG_TIMEOUT, ServingMetrics(), early_dispatch=True)
    servable = GatedServable()
    servable.release.set()
    try:
        inline = scheduler.submit(servable, "serving_default", rows(1), inline=True)
        assert inline.done() and servable.threads == [threading.current_thread().name]
        queued = scheduler.submit(servable, "serving_default", rows(2))   # as REST submits: a batch thread runs it
        assert queued.result(5)["y"].tolist() == [0.0, 2.0]
        assert servable.threads[1].startswith("batch_threads") and servable.sizes == [1, 2]
    finally:
        scheduler.close()


def test_early_dispatch_waits_until_the_open_batch_matches_the_smallest_running_one():
    scheduler = BatchScheduler(LONG_TIMEOUT, ServingMetrics(), early_dispatch=True)
    servable = GatedServable()
    try:
        big = scheduler.submit(servable, "serving_default", rows(3))
        assert servable.started.wait(5)                                     # 3 rows running, held there
        singles = [scheduler.submit(servable, "serving_default", rows(1)) for _ in range(2)]
        time.sleep(0.3)
        assert servable.sizes == [3] and not any(f.done() for f in singles)  # 2 < 3: still waiting for company
        singles.append(scheduler.submit(servable, "serving_default", rows(1)))
        assert [f.result(5)["y"].tolist() for f in singles] == [[0.0]] * 3  # 3 >= 3: gone, 30 s before the timeout
        assert servable.sizes == [3, 3] and not big.done()
    finally:
        servable.release.set()
        scheduler.close()
    assert big.result(5)["y"].tolist() == [0.0, 2.0, 4.0]


def test_early_dispatch_still_ends_the_wait_at_the_batch_timeout():
    config = BatchingConfig(max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=2)
    scheduler = BatchScheduler(config, ServingMetrics(), early_dispatch=True)
    servable = GatedServable()
    try:
        big = scheduler.submit(servable, "serving_default", rows(3))
        assert servable.started.wait(5)
        alone = scheduler.submit(servable, "serving_default", rows(1))
        assert alone.result(5)["y"].tolist() == [0.0]      # smaller than the running batch, sent at the timeout
        assert servable.sizes == [3, 1] and not big.done()
    finally:
        servable.release.set()
        scheduler.close()


def test_early_dispatch_runs_inline_beside_a_batch_no_larger():
    scheduler = BatchScheduler(LONG_TIMEOUT, ServingMetrics(), early_dispatch=True)
    servable = GatedServable()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="caller") as pool:
            first = pool.submit(scheduler.submit, servable, "serving_default", rows(1), inline=True)
            assert servable.started.wait(5)                                 # one row running inline in "caller"
            second = scheduler.submit(servable, "serving_default", rows(1), inline=True)
            assert second.done() and second.result()["y"].tolist() == [0.0]
            assert servable.threads == [servable.threads[0], threading.current_thread().name]
            assert servable.threads[0].startswith("caller")
            servable.release.set()
            assert first.result(5).result(5)["y"].tolist() == [0.0]
    finally:
        servable.release.set()
        scheduler.close()


def test_served_with_early_dispatch_a_lone_request_is_answered_long_before_the_timeout(
        private_server, conformance_repository, reference, jpegs, tmp_path):
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 60000000 } "
                        "num_batch_threads { value: 2 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching),
                            batching_early_dispatch=True, enable_model_warmup=False, rest_api_timeout_in_ms=20_000)
    data = np.array(jpegs[:1], dtype=object)
    expected = reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    reply = stub.Predict(predict_request(OTHER_MODEL, image_bytes=data), timeout=20)  # the batch timeout is 60 s
    np.testing.assert_allclose(outputs(reply)["probabilities"], expected, atol=1e-5)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")  # waiting 60 s would pass the REST deadline of 20 s
    body = rest.post(f"/v1/models/{OTHER_MODEL}:predict",
                     {"instances": [{"image_bytes": {"b64": base64.b64encode(jpegs[0]).decode()}}]})
    assert body.status == 200, body.json
    np.testing.assert_allclose(body.json["predictions"][0]["probabilities"], expected[0], atol=1e-5)


# -- timeouts and the drain ------------------------------------------------------------------------

def test_a_timeout_near_int64_max_means_wait_for_a_full_batch():
    """``batch_timeout_micros: 9223372036854775807`` (an operator's "never time out") is legal; a lone request
    waits, and the batch leaves once full. Waiting that long used to raise OverflowError in every batch thread,
    after which no batch ever ran."""
    config = cfg.parse_batching_config("max_batch_size { value: 2 } num_batch_threads { value: 2 } "
                                       f"batch_timeout_micros {{ value: {2**63 - 1} }}")
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(0.0)
    try:
        first = scheduler.submit(servable, "serving_default", rows(1))
        with pytest.raises(FutureTimeout):
            first.result(0.5)                                            # waiting for company
        second = scheduler.submit(servable, "serving_default", rows(1))
        assert first.result(5)["y"].tolist() == [0.0] and second.result(5)["y"].tolist() == [0.0]
        assert servable.sizes == [2]
        assert all(thread.is_alive() for thread in scheduler._threads)
    finally:
        scheduler.close()


def test_flush_sends_open_batches_at_once_and_every_later_one_as_it_opens():
    """What the server's drain calls: nothing new can join an open batch, so it need not wait its timeout."""
    scheduler = BatchScheduler(LONG_TIMEOUT, ServingMetrics())
    servable = RecordingServable(0.0)
    try:
        waiting = scheduler.submit(servable, "serving_default", rows(2))
        with pytest.raises(FutureTimeout):
            waiting.result(0.3)
        scheduler.flush()
        assert waiting.result(5)["y"].tolist() == [0.0, 2.0]
        later = scheduler.submit(servable, "serving_default", rows(1))  # admitted before the drain began
        assert later.result(5)["y"].tolist() == [0.0]
        assert servable.sizes == [2, 1]
    finally:
        scheduler.close()


def test_a_thread_the_process_cannot_start_is_a_config_error_naming_num_batch_threads(monkeypatch):
    """Below the 1024 cap a process may still run out of threads (a low ulimit): one line naming the field,
    and the threads already started are stopped."""
    start = threading.Thread.start

    def start_or_refuse(thread):
        if thread.name == "refused_pool-2":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_refuse)
    with pytest.raises(ConfigError, match=r"field 'num_batch_threads': could not start batch thread 3 of 4"):
        BatchScheduler(BatchingConfig(num_batch_threads=4, thread_pool_name="refused_pool"), ServingMetrics())
    monkeypatch.undo()
    # a pool name of its own: other servers of this process (session fixtures) keep their batch_threads
    assert not [t for t in threading.enumerate() if t.name.startswith("refused_pool-")]


BATCHING = ":tensorflow:serving:batching_session:"


def wait_until(condition, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_request_whose_deadline_passes_in_the_queue_is_refused_unrun():
    """A request that waited in its batch past its deadline is answered DEADLINE_EXCEEDED and never run (its
    caller has gone); a request of the same batch with time left is run and answered."""
    config = BatchingConfig(max_batch_size=8, batch_timeout_micros=400_000, num_batch_threads=1)
    scheduler = BatchScheduler(config, ServingMetrics())
    servable = RecordingServable(0.0)
    try:
        hurried = scheduler.submit(servable, "serving_default", rows(1), time.monotonic() + 0.1)
        patient = scheduler.submit(servable, "serving_default", rows(2), time.monotonic() + 30)
        with pytest.raises(DeadlineExceeded, match="waited in the batching queue"):
            hurried.result(5)
        assert patient.result(5)["y"].tolist() == [0.0, 2.0]
        assert servable.sizes == [2]  # the batch that ran held the patient request's rows only
    finally:
        scheduler.close()
