"""SIGTERM drains `carclf serve` (a subprocess): in-flight requests finish, new ones are refused, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.serving.conformance_setup import OTHER_MODEL
from tests.serving.conftest import REPO_ROOT, Rest
from tests.serving.test_batching import SlowServable, wait_until
from tests.serving.test_batching_queues import HeldServable
from tests.serving.test_grpc import expect_code, outputs, predict_request
from tests.serving.test_rest import b64

PORT_LINES = {"grpc": re.compile(r"Running gRPC ModelServer at \S+:(\d+)"),
              "rest": re.compile(r"Exporting HTTP/REST API at:\S+:(\d+)")}


# ``carclf serve`` (the real command, signal handling included) that also serves SlowServable("slow"), whose
# every batch takes $SLOW_SECONDS: a request that stays in flight however the batching queue behaves.
SERVE_WITH_SLOW_MODEL = """
import os, sys
from carclf.cli import main
from carclf.serving.server import ModelServer
from tests.serving.test_batching import SlowServable
served = ModelServer.static_servables
ModelServer.static_servables = lambda self: served(self) + [SlowServable(float(os.environ["SLOW_SECONDS"]))]
sys.exit(main(sys.argv[1:]))
"""

# ``carclf serve`` whose load of any version numbered 2 first waits $SLOW_LOAD_SECONDS (a large model's load).
SERVE_WITH_SLOW_LOAD = """
import os, sys, time
from carclf.cli import main
from carclf.serving.server import ModelServer
load = ModelServer._load_version
def slow(self, name, version, path):
    if version == 2:
        time.sleep(float(os.environ["SLOW_LOAD_SECONDS"]))
    return load(self, name, version, path)
ModelServer._load_version = slow
sys.exit(main(sys.argv[1:]))
"""


class ServeProcess:
    """``carclf serve`` (or ``command``, e.g. "gateway") in a subprocess; its ports are read from its log. With
    ``slow_seconds`` it also serves the model "slow" (``SERVE_WITH_SLOW_MODEL``)."""

    def __init__(self, *args: str, slow_seconds: float | None = None, slow_load_seconds: float | None = None,
                 command: str = "serve"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        launcher = [sys.executable, "-m", "carclf"]
        if slow_seconds is not None:
            env["SLOW_SECONDS"] = str(slow_seconds)
            launcher = [sys.executable, "-c", SERVE_WITH_SLOW_MODEL]
        if slow_load_seconds is not None:
            env["SLOW_LOAD_SECONDS"] = str(slow_load_seconds)
            launcher = [sys.executable, "-c", SERVE_WITH_SLOW_LOAD]
        self.process = subprocess.Popen([*launcher, command, "--port", "0", "--rest_api_port", "-1", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, cwd=REPO_ROOT, text=True)
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            for name, pattern in PORT_LINES.items():
                match = pattern.search(line)
                if match:
                    self.ports[name] = int(match.group(1))
            if len(self.ports) == len(PORT_LINES):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120) -> None:
        self._ready.wait(timeout)
        assert len(self.ports) == len(PORT_LINES), "server did not start:\n" + "".join(self.lines[-20:])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serve_process():
    processes = []

    def start(*args: str, slow_seconds: float | None = None) -> ServeProcess:
        process = ServeProcess(*args, slow_seconds=slow_seconds)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def in_flight_request(serve_process, repository, seconds: float, x: float, *flags: str):
    """``carclf serve`` of OTHER_MODEL and the stand-in "slow" (batching on; more ``flags``), and one gRPC Predict
    of ``[x]`` to "slow" that is running, and will be for ``seconds``: (server, channel, stub, REST client, the
    call's future)."""
    server = serve_process("--model_name", OTHER_MODEL, "--model_base_path", str(repository / OTHER_MODEL),
                           "--enable_batching", "--enable_model_warmup=false", "--monitoring_config_file",
                           str(repository / "monitoring.config"), *flags, slow_seconds=seconds)
    server.wait_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    rest = Rest(f"http://127.0.0.1:{server.ports['rest']}")
    call = stub.Predict.future(predict_request("slow", x=np.full(1, x, np.float32)), timeout=60)
    deadline = time.monotonic() + 10
    while 'carclf_serving_inflight_requests{entrypoint="GRPC"} 1.0' not in rest.get(
            "/monitoring/prometheus/metrics").body.decode():
        assert time.monotonic() < deadline, "the request never became in flight"
        time.sleep(0.05)
    return server, channel, stub, rest, call


def refuses_connections(port: int) -> bool:
    """True when nothing listens on ``port`` of 127.0.0.1 any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener closed with this one queued
        return True
    return False


@pytest.mark.slow
@pytest.mark.extension
def test_sigterm_drains_in_flight_requests_and_exits_zero(serve_process, conformance_repository, jpegs):
    data = np.array(jpegs[:2], dtype=object)
    server, channel, stub, rest, in_flight = in_flight_request(serve_process, conformance_repository, 2.0, 3.0)

    states: list[grpc.ChannelConnectivity] = []  # the channel's connectivity, as grpc reports it
    channel.subscribe(states.append)
    assert wait_until(lambda: states[-1:] == [grpc.ChannelConnectivity.READY])

    server.process.send_signal(signal.SIGTERM)
    # gRPC: GOAWAY and the port closed at once (channels reconnect to another replica; here there is none).
    # A call sent before the channel has read the GOAWAY may end CANCELLED (grpc's shutdown race, documented in
    # serving/README.md; GrpcClient raises it as Unavailable): this one is sent once the channel has read it.
    assert wait_until(lambda: refuses_connections(server.ports["grpc"])), "the gRPC port still accepts connections"
    assert wait_until(lambda: states[-1] != grpc.ChannelConnectivity.READY), f"the GOAWAY was never read: {states}"
    expect_code(lambda: stub.Predict(predict_request(OTHER_MODEL, image_bytes=data), timeout=10),
                grpc.StatusCode.UNAVAILABLE)
    refused = rest.post(f"/v1/models/{OTHER_MODEL}:predict", {"instances": [b64(jpegs[0])]})
    assert refused.status == 503 and "shutting down" in refused.json["error"]
    ready = rest.get("/v1/ready")
    assert ready.status == 503

    np.testing.assert_array_equal(outputs(in_flight.result(timeout=30))["y"], [6.0])
    assert server.process.wait(timeout=60) == 0, "".join(server.lines[-20:])
    assert any("draining" in line for line in server.lines)
    channel.close()


def test_bad_flags_fail_with_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "carclf", "serve", "--model_config_file", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 2
    assert "--model_config_file" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


class CountingSlowServable(SlowServable):
    """SlowServable that counts the batches it ran."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.runs = 0

    def run(self, signature_name, inputs):
        self.runs += 1
        return super().run(signature_name, inputs)


@pytest.mark.extension
def test_drain_timeout_refuses_queued_requests_and_lets_the_running_batch_answer(tmp_path):
    """Past --drain_timeout_seconds, requests still queued are refused unrun (UNAVAILABLE, retryable elsewhere)
    instead of being run one after another; the batch already running delivers its answer."""
    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer

    slow = CountingSlowServable(1.0)

    class SlowModelServer(ModelServer):
        def static_servables(self):
            return [slow]

    batching = tmp_path / "batching.config"  # one batch of one request at a time: the others queue
    batching.write_text("max_batch_size { value: 1 } batch_timeout_micros { value: 0 } "
                        "num_batch_threads { value: 1 } max_enqueued_batches { value: 16 }")
    models = tmp_path / "models.config"  # no model folder: the only model is the servable above
    models.write_text("model_config_list {}")
    server = SlowModelServer(ServerOptions(port=0, rest_api_port=-1, model_config_file=str(models),
                                           file_system_poll_wait_seconds=0, enable_batching=True,
                                           batching_parameters_file=str(batching))).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        calls = [stub.Predict.future(predict_request("slow", x=np.full(1, i, np.float32)), timeout=60)
                 for i in range(5)]
        deadline = time.monotonic() + 10
        while server.gate.inflight < len(calls) or not slow.started.is_set():
            assert time.monotonic() < deadline, "the requests never became in flight"
            time.sleep(0.02)
        assert server.stop(drain_timeout=0.2) is False  # the drain timed out
    finally:
        server.stop(drain_timeout=0)
    answered, refused = [], []
    for i, call in enumerate(calls):
        try:
            answered.append((i, outputs(call.result(timeout=30))["y"]))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
            assert "was not run" in exc.details() and "--drain_timeout_seconds" in exc.details()
            refused.append(i)
    channel.close()
    assert answered, "the batch that was running lost its answer"
    assert refused, "queued requests were run after the drain timed out"
    assert len(answered) == slow.runs < len(calls)  # every batch that ran was answered; none ran after the timeout
    for i, y in answered:
        np.testing.assert_array_equal(y, [2.0 * i])


@pytest.mark.extension
def test_a_second_signal_during_the_drain_ends_the_server_at_once(serve_process, conformance_repository):
    """Ctrl-C twice: the first starts the drain (here of a request that runs for 30 s), the second ends the
    process at once with exit status 1 instead of being ignored for the whole drain."""
    server, channel, _, _, waiting = in_flight_request(serve_process, conformance_repository, 30.0, 1.0)
    server.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while not any("draining" in line for line in server.lines):
        assert time.monotonic() < deadline, "the first signal did not start the drain"
        time.sleep(0.05)
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=10) == 1, "".join(server.lines[-20:])
    assert time.monotonic() - started < 10  # not the 30 s the queued request had left
    deadline = time.monotonic() + 5  # the log reader may be a line behind the exit
    while not any("second signal SIGINT during the drain: exiting now" in line for line in server.lines):
        assert time.monotonic() < deadline, "".join(server.lines[-20:])
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError):
        waiting.result(timeout=10)
    channel.close()


@pytest.mark.extension
@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_a_drain_that_runs_out_of_time_exits_1_without_waiting_for_the_running_batch(serve_process,
                                                                                    conformance_repository, transport):
    """A request whose batch still runs when --drain_timeout_seconds (twice: queued, then running) has passed is
    cut off: the process exits 1 (for a supervisor or script that checks it) at once, not when the batch ends,
    so the documented terminationGracePeriodSeconds of twice the timeout holds; the log says why."""
    batch_s, drain_s = 60.0, 0.5
    flags = ("--drain_timeout_seconds", str(drain_s))
    if transport == "grpc":
        server, channel, _, _, cut = in_flight_request(serve_process, conformance_repository, batch_s, 1.0, *flags)
    else:
        server = serve_process("--model_name", OTHER_MODEL, "--model_base_path",
                               str(conformance_repository / OTHER_MODEL), "--enable_batching",
                               "--enable_model_warmup=false", "--monitoring_config_file",
                               str(conformance_repository / "monitoring.config"), *flags, slow_seconds=batch_s)
        server.wait_ready()
        rest = Rest(f"http://127.0.0.1:{server.ports['rest']}")
        replies: list[object] = []

        def call() -> None:
            try:
                replies.append(rest.post("/v1/models/slow:predict", {"instances": [1.0]}))
            except OSError as exc:  # the server closed the connection unanswered
                replies.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        deadline = time.monotonic() + 10
        while 'carclf_serving_inflight_requests{entrypoint="REST"} 1.0' not in rest.get(
                "/monitoring/prometheus/metrics").body.decode():
            assert time.monotonic() < deadline, "the request never became in flight"
            time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=batch_s / 2) == 1, "".join(server.lines[-20:])
    if transport == "grpc":
        with pytest.raises(grpc.RpcError) as got:  # retryable: the request may go to another replica
            cut.result(timeout=10)
        assert got.value.code() == grpc.StatusCode.UNAVAILABLE, got.value
        channel.close()
    else:
        caller.join(timeout=10)
        assert len(replies) == 1 and isinstance(replies[0], OSError), replies  # the connection closed unanswered
    deadline = time.monotonic() + 5  # the log reader may be a line behind the exit
    while not any("the drain ran out of time (--drain_timeout_seconds): exit status 1" in line
                  for line in server.lines):
        assert time.monotonic() < deadline, "".join(server.lines[-20:])
        time.sleep(0.05)
    assert any("1 request(s) still running; shutting down without them" in line for line in server.lines)


@pytest.mark.extension
def test_the_drain_sends_open_batches_at_once_instead_of_waiting_for_company(private_server, conformance_repository,
                                                                           reference, jpegs, tmp_path):
    """A request waiting in a batch that would leave in 30 s (for others to join it) is run as soon as the
    drain starts, since nothing can join it any more: the drain ends at once, with its answer."""
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 30000000 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    data = np.array(jpegs[:2], dtype=object)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(
        predict_request(OTHER_MODEL, image_bytes=data), timeout=60)
    deadline = time.monotonic() + 10
    while server.gate.inflight < 1:
        assert time.monotonic() < deadline, "the request never became in flight"
        time.sleep(0.02)
    time.sleep(0.2)
    assert not call.done(), "the request did not wait for its batch"
    started = time.monotonic()
    assert server.stop(drain_timeout=20) is True
    assert time.monotonic() - started < 10, "the drain waited for the batch timeout"
    np.testing.assert_allclose(outputs(call.result(timeout=5))["probabilities"],
                               reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"], atol=1e-5)
    channel.close()


def stalled_upload(port: int) -> socket.socket:
    """A REST client that declares a 1000-byte Predict body, sends 12 bytes of it and stops (a phone that lost
    its signal mid-upload, or a slowloris): the request never becomes one the server can answer."""
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(f"POST /v1/models/{OTHER_MODEL}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"instances"')
    time.sleep(0.3)  # the server has the headers and waits for the rest of the body
    return stalled


@pytest.mark.extension
def test_a_client_that_stops_sending_its_body_does_not_hold_the_drain(private_server, conformance_repository):
    """Nothing is being answered while a client has not sent its whole request: the drain ends at once and
    reports success (`carclf serve` exits 0), instead of waiting twice --drain_timeout_seconds for an upload
    that never ends and exiting 1 with "batches that are running"."""
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False)
    with stalled_upload(server.rest_port):
        started = time.monotonic()
        drained = server.stop(drain_timeout=2.0)
        took = time.monotonic() - started
    assert drained, f"the drain waited {took:.1f} s for a request body that never came, and reported failure"
    assert took < 2.0  # at most the transports' own 1 s grace (TRANSPORT_GRACE_S), not the drain timeout


@pytest.mark.extension
def test_a_request_body_that_stops_arriving_ends_at_the_rest_timeout(private_server, conformance_repository):
    """--rest_api_timeout_in_ms bounds a REST call: a body that stops arriving half-way is answered 408 once
    the timeout has passed, and carclf_serving_inflight_requests stays 0, instead of counting a request in
    flight for as long as the client keeps the connection open."""
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False, rest_api_timeout_in_ms=1000,
                            monitoring_config_file=str(conformance_repository / "monitoring.config"))
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    with stalled_upload(server.rest_port) as stalled:
        stalled.settimeout(4.0)
        try:
            answer = stalled.recv(4096)
        except TimeoutError:
            answer = None
        inflight = re.search(r'carclf_serving_inflight_requests\{entrypoint="REST"\} (\S+)',
                             rest.get("/monitoring/prometheus/metrics").body.decode())
    deadline = time.monotonic() + 5  # the server notices the closed connection (and logs it) before the checks
    while server.gate.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer is not None, "no answer and no close 4 s into a request whose timeout is 1 s"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(body)["error"] == ("the request body did not arrive within 1 s (--rest_api_timeout_in_ms); "
                                         "nothing was run")
    assert inflight is None or float(inflight.group(1)) == 0.0, inflight.group(0)  # never counted


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection or ``seconds`` pass: (closed, what arrived)."""
    sock.settimeout(seconds)
    arrived = b""
    try:
        while chunk := sock.recv(65536):
            arrived += chunk
    except TimeoutError:
        return False, arrived
    return True, arrived


@pytest.mark.extension
@pytest.mark.parametrize("sent", [b"", b"POST /v1/models/x:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"],
                         ids=["nothing", "half_the_headers"])
def test_a_rest_connection_that_never_completes_its_headers_is_closed_at_the_idle_timeout(
        private_server, conformance_repository, sent):
    """--rest_api_idle_timeout_seconds: a connection that sends nothing, or part of a request line and headers
    and then nothing more (a slowloris), is closed once the idle timeout passes, where it stayed open for
    aiohttp's default of an hour, holding a file descriptor each; other clients are served meanwhile."""
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False, rest_api_idle_timeout_seconds=1.0)
    with socket.create_connection(("127.0.0.1", server.rest_port)) as idle:
        idle.sendall(sent)
        assert Rest(f"http://127.0.0.1:{server.rest_port}").get(f"/v1/models/{OTHER_MODEL}").status == 200
        closed, arrived = closed_within(idle, 5.0)
    assert closed and arrived == b"", arrived


@pytest.mark.extension
def test_a_request_that_runs_longer_than_the_idle_timeout_is_answered_then_its_idle_connection_closed(
        private_server, conformance_repository, jpegs, tmp_path):
    """The idle timeout is no request deadline: a Predict that waits 2 s for its batch to fill (batch timeout
    2 s) on a server whose idle timeout is 0.5 s is answered 200 on its keep-alive connection, which is then
    closed once it has idled for the timeout."""
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 2000000 } "
                        "num_batch_threads { value: 1 }")
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False, rest_api_idle_timeout_seconds=0.5, enable_batching=True,
                            batching_parameters_file=str(batching))
    body = json.dumps({"instances": [b64(jpegs[0])]}).encode()
    with socket.create_connection(("127.0.0.1", server.rest_port)) as conn:
        started = time.monotonic()
        conn.sendall(f"POST /v1/models/{OTHER_MODEL}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        closed, arrived = closed_within(conn, 10.0)
        took = time.monotonic() - started
    head, _, answer = arrived.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), arrived[:300]
    assert b"connection: close" not in head.lower(), head  # kept alive: what closes it later is the timeout
    assert len(json.loads(answer)["predictions"]) == 1
    assert took >= 2.0, f"answered after {took:.2f} s, before its batch's 2 s timeout"
    assert closed, "the keep-alive connection stayed open 10 s with an idle timeout of 0.5 s"


@pytest.mark.extension
def test_the_rest_client_keeps_working_across_connections_the_idle_timeout_closed(
        private_server, conformance_repository, jpegs):
    """A RestClient (one keep-alive session) that waits longer than the server's idle timeout between calls
    finds its pooled connection closed by the server and opens another: every call is answered."""
    from carclf.clients import connect

    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False, rest_api_idle_timeout_seconds=0.5)
    with connect(f"http://127.0.0.1:{server.rest_port}", timeout=10) as client:
        states = []
        for _ in range(3):
            states.append(client.status(OTHER_MODEL)[0].state)
            time.sleep(1.0)
        probabilities = client.predict(OTHER_MODEL, images=[jpegs[0]]).outputs["probabilities"]
    assert states == ["AVAILABLE"] * 3
    assert probabilities.shape[0] == 1


@pytest.mark.extension
def test_rest_responses_during_the_drain_end_their_keep_alive_connection(private_server, conformance_repository):
    """Before the drain a REST connection is kept alive; once it has begun every response (the 503 refusals,
    the answers still finishing) says ``Connection: close`` and the connection ends, so a keep-alive client's
    next request opens a new one, which a load balancer sends to a replica still serving. They stayed open, so
    such a client kept asking the draining server and getting 503 until it stopped."""
    import http.client

    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False)
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        conn.request("GET", f"/v1/models/{OTHER_MODEL}")
        before = conn.getresponse()
        before.read()
        assert before.status == 200 and not before.will_close
        server.gate.start_draining()
        conn.request("GET", f"/v1/models/{OTHER_MODEL}")  # the same connection
        during = conn.getresponse()
        body = json.loads(during.read())
    finally:
        conn.close()
    assert during.status == 503 and "shutting down" in body["error"]
    assert during.will_close and (during.getheader("Connection") or "").lower() == "close"


@pytest.mark.extension
def test_grpc_channels_move_to_another_replica_as_soon_as_the_drain_begins(private_server, conformance_repository,
                                                                           jpegs):
    """Two replicas behind one channel (pick_first over both addresses, as a client of a load-balanced Service
    reconnects): while the first drains a request still in flight, the channel's next calls are answered by the
    second, with no error, and the call in flight by the first. The draining server used to keep the connection
    and refuse each new call with UNAVAILABLE until it stopped, up to --drain_timeout_seconds later."""
    first, second = (private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                                    enable_model_warmup=False) for _ in range(2))
    release = threading.Event()
    slow = HeldServable("slow", [], release, hold_s=30.0)
    slow.name = "slow"
    first.manager.add_static(slow)
    request = predict_request(OTHER_MODEL, image_bytes=np.array(jpegs[:1], dtype=object))

    def answered(server) -> float:
        return server.metrics.request_count.value(OTHER_MODEL, "OK")

    stopping = threading.Thread(target=first.stop, kwargs={"drain_timeout": 30.0})
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(f"ipv4:127.0.0.1:{first.grpc_port},127.0.0.1:{second.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            stub.Predict(request, timeout=30)
            assert (answered(first), answered(second)) == (1, 0)  # pick_first: the first replica
            in_flight = stub.Predict.future(predict_request("slow", x=np.ones(1, np.float32)), timeout=60)
            assert slow.started.wait(10)
            channel.subscribe(states.append)
            stopping.start()
            assert wait_until(lambda: refuses_connections(first.grpc_port)), \
                "the draining server still accepts gRPC connections"
            # once the channel has read the GOAWAY (it leaves READY); a call sent in the instant before may end
            # CANCELLED, grpc's own shutdown race (serving/README.md, "SIGTERM drains")
            assert wait_until(lambda: states and states[-1] != grpc.ChannelConnectivity.READY), \
                "no GOAWAY reached the channel"  # (the subscription's first report may come late)
            for _ in range(3):
                stub.Predict(request, timeout=30)
            assert (answered(first), answered(second)) == (1, 3)
            assert first.gate.draining and stopping.is_alive()  # the drain still waits for the call in flight
        finally:
            release.set()
        assert outputs(in_flight.result(30))["y"].tolist() == [2.0]
    stopping.join(30)
    assert not stopping.is_alive()


@pytest.mark.extension
def test_a_version_still_loading_does_not_hold_the_shutdown_past_the_drain(conformance_repository, tmp_path):
    """SIGTERM while the file-system poller loads a new version (a large model's load and warmup take minutes):
    the shutdown keeps to its documented bound (twice --drain_timeout_seconds plus the transports' grace, so
    terminationGracePeriodSeconds covers it) instead of waiting for the load to end. The load here is a
    6 s stand-in in front of the real one."""
    import shutil

    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer

    loading = threading.Event()

    class SlowToLoad(ModelServer):
        def _load_version(self, name, version, path):
            if version == 2:
                loading.set()
                time.sleep(6.0)
            return super()._load_version(name, version, path)

    repository = tmp_path / "repository"
    shutil.copytree(conformance_repository / OTHER_MODEL / "1", repository / OTHER_MODEL / "1")
    server = SlowToLoad(ServerOptions(port=0, rest_api_port=-1, model_name=OTHER_MODEL,
                                      model_base_path=str(repository / OTHER_MODEL), enable_model_warmup=False,
                                      file_system_poll_wait_seconds=0.2)).start()
    try:
        shutil.copytree(repository / OTHER_MODEL / "1", tmp_path / "staging")
        (tmp_path / "staging").rename(repository / OTHER_MODEL / "2")  # published as an export does
        assert loading.wait(10), "the poller never started loading version 2"
        started = time.monotonic()
        server.stop(drain_timeout=0.5)
        took = time.monotonic() - started
    finally:
        server.stop(drain_timeout=0)
    assert took < 2 * 0.5 + 1.0 + 1.0, f"the shutdown waited {took:.1f} s for a version load to end"


@pytest.mark.extension
def test_carclf_serve_exits_0_at_once_on_sigterm_during_a_version_load(conformance_repository, tmp_path):
    """The command as an operator stops it: SIGTERM while a new version loads (here for 60 s) ends the process
    with status 0 (nothing was in flight) right after the drain, not when the load ends."""
    import shutil

    repository = tmp_path / "repository"
    shutil.copytree(conformance_repository / OTHER_MODEL / "1", repository / OTHER_MODEL / "1")
    server = ServeProcess("--model_name", OTHER_MODEL, "--model_base_path", str(repository / OTHER_MODEL),
                          "--enable_model_warmup=false", "--file_system_poll_wait_seconds", "1",
                          slow_load_seconds=60.0)
    try:
        server.wait_ready()
        shutil.copytree(repository / OTHER_MODEL / "1", tmp_path / "staging")
        (tmp_path / "staging").rename(repository / OTHER_MODEL / "2")
        deadline = time.monotonic() + 20
        while not any(f"loading {OTHER_MODEL} version 2" in line for line in server.lines):
            assert time.monotonic() < deadline, "".join(server.lines[-20:])
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0, "".join(server.lines[-20:])
    finally:
        server.kill()
