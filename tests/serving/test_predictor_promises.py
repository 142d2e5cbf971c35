"""The prediction path's promises outside batching: a version and a label are exclusive, output_filter holds
unbatched, request metrics (in-flight gauge, latencies in microseconds, untyped counters) and warmup replays."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from carclf.errors import InvalidInput, NotFound
from tests.serving.conformance_setup import MODEL, OTHER_MODEL, STABLE
from tests.serving.test_batching import SlowServable, metric
from tests.serving.test_batching_queues import HeldServable
from tests.serving.test_grpc import outputs, predict_request

INFLIGHT = "carclf_serving_inflight_requests"


def test_a_version_and_a_version_label_together_are_invalid_argument(embedded_only, jpegs):
    """The in-process predictor takes both arguments; TF Serving's rule (ModelSpec holds one) still applies."""
    predictor = embedded_only.server.predictor
    with pytest.raises(InvalidInput, match=r"Both model version \(1\) and model version label \(stable\) cannot "
                                           r"be supplied"):
        predictor.predict(MODEL, {"image_bytes": np.array(jpegs[:1], dtype=object)}, version=STABLE,
                          version_label="stable")


def test_output_filter_is_honoured_without_batching(private_server, conformance_repository, reference, jpegs):
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False)
    data = np.array(jpegs[:2], dtype=object)
    expected = reference(OTHER_MODEL, 1, image_bytes=data)
    assert {"probabilities", "class_id"} < set(expected)  # there is something to leave out
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        reply = stub.Predict(predict_request(OTHER_MODEL, output_filter=["class_id"], image_bytes=data), timeout=30)
    assert set(reply.outputs) == {"class_id"}
    np.testing.assert_array_equal(outputs(reply)["class_id"], expected["class_id"])
    result = server.predictor.predict(OTHER_MODEL, {"image_bytes": data}, output_filter=("probabilities",))
    assert set(result.outputs) == {"probabilities"}
    np.testing.assert_allclose(result.outputs["probabilities"], expected["probabilities"], atol=1e-5)


@pytest.fixture
def monitored(private_server, conformance_repository):
    """A server with metrics on, serving tiny_b (unbatched) and whatever stand-ins a test adds."""
    return private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                          enable_model_warmup=False,
                          monitoring_config_file=str(conformance_repository / "monitoring.config"))


def test_the_inflight_gauge_counts_a_request_while_it_runs_and_drops_back_after(monitored):
    release = threading.Event()
    held = HeldServable("held", [], release, hold_s=15.0)
    held.name = "held"
    monitored.manager.add_static(held)
    x = {"x": np.ones(1, np.float32)}
    with grpc.insecure_channel(f"127.0.0.1:{monitored.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with ThreadPoolExecutor(1) as pool:
            try:
                call = pool.submit(stub.Predict, predict_request("held", **x), timeout=30)
                assert held.started.wait(10)
                during = metric(monitored.metrics.exposition().decode(), INFLIGHT + '{entrypoint="GRPC"}')
            finally:
                release.set()
            assert outputs(call.result())["y"].tolist() == [2.0]
        stub.Predict(predict_request("held", **x), timeout=30)
    monitored.predictor.predict("held", x)
    with pytest.raises(InvalidInput):
        monitored.predictor.predict("held", {"wrong": np.ones(1, np.float32)})
    text = monitored.metrics.exposition().decode()
    assert during == 1
    assert metric(text, INFLIGHT + '{entrypoint="GRPC"}') == 0
    assert metric(text, INFLIGHT + '{entrypoint="IN_PROCESS"}') == 0


def test_request_latencies_are_in_microseconds(monitored):
    """A stand-in whose every run takes 50 ms: each request's recorded latency is at least 50 000 us."""
    seconds = 0.05
    slow = SlowServable(seconds)
    monitored.manager.add_static(slow)
    x = {"x": np.ones(1, np.float32)}
    with grpc.insecure_channel(f"127.0.0.1:{monitored.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(predict_request(slow.name, **x), timeout=30)
    monitored.predictor.predict(slow.name, x)
    text = monitored.metrics.exposition().decode()
    floor = seconds * 1e6
    for entrypoint in ("GRPC", "IN_PROCESS"):
        labels = f'API="Predict",entrypoint="{entrypoint}",model_name="{slow.name}"'
        assert metric(text, f":tensorflow:serving:request_latency_count{{{labels}}}") == 1
        assert metric(text, f":tensorflow:serving:request_latency_sum{{{labels}}}") >= floor, entrypoint
        by_version = f'API="Predict",entrypoint="{entrypoint}",model_name="{slow.name}",model_version="1"'
        assert metric(text, f"carclf_serving_request_latency_by_version_sum{{{by_version}}}") >= floor


def test_request_count_and_warmup_records_are_exported_untyped(monitored, embedded_only):
    """serving/README.md: exported as ``untyped`` under their exact names (a counter would gain ``_total``)."""
    with pytest.raises(NotFound):
        monitored.predictor.predict("no_such_model", {"x": np.ones(1, np.float32)})
    lines = monitored.metrics.exposition().decode().splitlines()
    assert "# TYPE :tensorflow:serving:request_count untyped" in lines
    assert "# TYPE :tensorflow:serving:model_warmup_records_read untyped" in lines
    assert any(line.startswith(':tensorflow:serving:request_count{model_name="no_such_model"') for line in lines)


def test_warmup_replays_each_record_the_number_of_times_asked_and_counts_the_records(private_server,
                                                                                      conformance_repository,
                                                                                      monkeypatch):
    """--num_request_iterations_for_warmup N replays every warmup record N times before the version serves;
    :tensorflow:serving:model_warmup_records_read counts the records (once each)."""
    import tensorflow as tf

    from carclf.serving.savedmodel import SavedModelServable
    from carclf.serving.warmup import warmup_file

    version_dir = conformance_repository / OTHER_MODEL / "1"
    records = sum(1 for _ in tf.data.TFRecordDataset(str(warmup_file(version_dir))))
    assert records >= 1
    calls: list[str] = []
    predict = SavedModelServable.predict

    def counting(self, *args, **kwargs):
        calls.append(str(self.path))
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(SavedModelServable, "predict", counting)
    iterations = 3
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            num_request_iterations_for_warmup=iterations,
                            monitoring_config_file=str(conformance_repository / "monitoring.config"))
    assert len(calls) == records * iterations
    text = server.metrics.exposition().decode()
    assert metric(text, ":tensorflow:serving:model_warmup_records_read") == records


def _warmup_records(version_dir) -> list[bytes]:
    """The raw PredictionLog records of a version's warmup file."""
    import tensorflow as tf

    from carclf.serving.warmup import warmup_file

    return [record.numpy() for record in tf.data.TFRecordDataset(str(warmup_file(version_dir)))]


def _write_records(path, records: list[bytes]) -> None:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def test_a_warmup_record_the_version_cannot_answer_fails_its_load(private_server, conformance_repository,
                                                                  tmp_path):
    """As in TF Serving, a warmup record that fails fails the version's load: the version is reported END with
    the record's number and its error, never marked AVAILABLE half warmed."""
    from tensorflow_serving.apis import prediction_log_pb2

    from carclf.serving.manager import State
    from carclf.serving.warmup import warmup_file

    repo = tmp_path / "repository"
    version = repo / OTHER_MODEL / "1"
    shutil.copytree(conformance_repository / OTHER_MODEL / "1", version)
    wrong = prediction_log_pb2.PredictionLog()
    wrong.predict_log.request.CopyFrom(predict_request(OTHER_MODEL, wrong_name=np.array([b"x"], dtype=object)))
    _write_records(warmup_file(version), [_warmup_records(version)[0], wrong.SerializeToString()])
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(repo / OTHER_MODEL),
                            model_repository=str(repo))
    (status,) = server.manager.status(OTHER_MODEL)
    assert status.state == State.END, status
    assert "warmup record 1 of" in status.error_message and "wrong_name" in status.error_message, status


def test_a_warmup_file_holds_at_most_1000_records(conformance_repository, tmp_path):
    """TF Serving reads at most 1000 warmup records: 1000 are replayed, a file of 1001 is refused."""
    from carclf.serving.warmup import read_warmup_requests

    record = _warmup_records(conformance_repository / OTHER_MODEL / "1")[0]
    path = tmp_path / "tf_serving_warmup_requests"
    _write_records(path, [record] * 1000)
    assert len(read_warmup_requests(path)) == 1000
    _write_records(path, [record] * 1001)
    with pytest.raises(InvalidInput, match="more than 1000 warmup records"):
        read_warmup_requests(path)
