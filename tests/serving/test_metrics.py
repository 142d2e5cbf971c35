"""The request metrics count each call once, under the status it was answered with, per transport.

A server of its own (its own registry), so the counts after a known set of calls are exact."""

from __future__ import annotations

import logging
import socket
import time

import grpc
import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.serving.conformance_setup import MODEL
from tests.serving.conftest import Rest
from tests.serving.test_batching import metric
from tests.serving.test_grpc import predict_request
from tests.serving.test_rest import b64


def test_request_count_and_latency_follow_each_calls_status_and_transport(private_server, conformance_repository,
                                                                          jpegs):
    server = private_server(model_name=MODEL, model_base_path=str(conformance_repository / MODEL),
                            enable_model_warmup=False,
                            monitoring_config_file=str(conformance_repository / "monitoring.config"))
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    path = f"/v1/models/{MODEL}:predict"
    assert [rest.post(path, {"instances": [b64(jpegs[0])]}).status for _ in range(2)] == [200, 200]
    assert rest.post(path, {"instances": [{"b64": "not base64 %%"}]}).status == 400
    assert rest.post(f"/v1/models/{MODEL}/versions/999:predict", {"instances": [b64(jpegs[0])]}).status == 404
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(predict_request(MODEL, image_bytes=np.array(jpegs[:1], dtype=object)), timeout=30)
        try:
            stub.Predict(predict_request(MODEL, wrong_name=np.array(jpegs[:1], dtype=object)), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("a wrong input name was answered")

    text = rest.get("/monitoring/prometheus/metrics").body.decode()

    def count(status: str) -> float:
        return metric(text, f':tensorflow:serving:request_count{{model_name="{MODEL}",status="{status}"}}')

    assert (count("OK"), count("INVALID_ARGUMENT"), count("NOT_FOUND")) == (3, 2, 1)
    latency = ":tensorflow:serving:request_latency_count"
    rest_calls = metric(text, f'{latency}{{API="Predict",entrypoint="REST",model_name="{MODEL}"}}')
    grpc_calls = metric(text, f'{latency}{{API="Predict",entrypoint="GRPC",model_name="{MODEL}"}}')
    assert (rest_calls, grpc_calls) == (4, 2)

    # The latency buckets are TF Serving's (10 us * 1.8^k, 33 of them, then +Inf), each `le` written with at most
    # the six significant digits TF Serving prints, so a dashboard's bucket series read the same on both servers.
    prefix = f'{latency[:-len("_count")]}_bucket{{API="Predict",entrypoint="GRPC",le="'
    bounds = [line[len(prefix):].split('"', 1)[0] for line in text.splitlines() if line.startswith(prefix)]
    assert len(bounds) == 34 and bounds[-1] == "+Inf"
    for k, bound in enumerate(bounds[:-1]):
        assert abs(float(bound) / (10 * 1.8 ** k) - 1) < 1e-5, (k, bound)
        assert float(f"{float(bound):.6g}") == float(bound) and len(bound) <= 12, (k, bound)


def test_a_client_that_hangs_up_mid_upload_is_no_server_error(private_server, conformance_repository, caplog):
    """A REST client that closes its connection half-way through its request body (a user leaving the upload
    page, a phone losing its signal) is the client's doing: it is not counted as an INTERNAL error (alerts on
    the server's error rate would fire) nor logged at ERROR with a traceback, as a server fault is."""
    server = private_server(model_name=MODEL, model_base_path=str(conformance_repository / MODEL),
                            enable_model_warmup=False,
                            monitoring_config_file=str(conformance_repository / "monitoring.config"))
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    with socket.create_connection(("127.0.0.1", server.rest_port)) as client:
        client.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"instances"')
        time.sleep(0.3)  # the server has the headers and reads the body
    deadline = time.monotonic() + 5
    while server.gate.inflight and time.monotonic() < deadline:  # the server has noticed the hang-up
        time.sleep(0.05)
    text = rest.get("/monitoring/prometheus/metrics").body.decode()
    internal = f':tensorflow:serving:request_count{{model_name="{MODEL}",status="INTERNAL"}}'
    assert internal not in text, [line for line in text.splitlines() if "request_count{" in line]
    server_errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not server_errors, server_errors
