"""`carclf serve` and `carclf serving-config` as users type them: the documented defaults and ranges of the
flags (serving/README.md "Flags", ../shared/docs/tfserving-api.md), and what startup does with them: the
bind address, REST off with ``--rest_api_port 0``, the REST deadline, TensorFlow's thread pools."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from carclf import cli
from carclf.errors import ConfigError
from carclf.serving.options import ServerOptions
from carclf.serving.warmup import warmup_file
from tests.fixtures import version_numbers
from tests.serving import conformance_setup as setup
from tests.serving.conformance_setup import CANARY, ECHO_MODEL, MODEL, OTHER_MODEL, STABLE
from tests.serving.conftest import Rest

# serving/README.md ("Flags") and tfserving-api.md: TF Serving's own defaults, and the extensions'.
DOCUMENTED_DEFAULTS = {
    "port": 8500,
    "rest_api_port": 8501,
    "model_config_file_poll_wait_seconds": 0,   # 0 = read once
    "file_system_poll_wait_seconds": 1,
    "rest_api_timeout_in_ms": 30000,
    "num_request_iterations_for_warmup": 1,
    "enable_model_warmup": True,
    "enable_batching": False,
    "host": "127.0.0.1",
    "max_request_bytes": 64 * 1024 * 1024,      # 64 MiB
    "rest_api_idle_timeout_seconds": 75.0,
}


def serve_flags(*flags: str):
    """The namespace `carclf serve FLAGS` parses to (the CLI's own parser)."""
    return cli.build_parser("serve").parse_args(["serve", *flags])


def serving_config(*flags: str) -> int:
    return cli.main(["serving-config", *flags])


def official(path: Path) -> dict[str, model_server_config_pb2.ModelConfig]:
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    return {entry.name: entry for entry in config.model_config_list.config}


# ------------------------------------------------------------------------------------- flags


def test_serve_flags_default_as_documented(tmp_path):
    parsed = ServerOptions.from_args(serve_flags("--model_base_path", str(tmp_path / "m")))
    in_process = ServerOptions(model_base_path=str(tmp_path / "m")).validated()
    for flag, documented in DOCUMENTED_DEFAULTS.items():
        assert getattr(parsed, flag) == documented, f"carclf serve --{flag}"
        assert getattr(in_process, flag) == documented, f"ServerOptions.{flag}"


@pytest.mark.parametrize("flag,value", [
    ("rest_api_timeout_in_ms", "0"),
    ("rest_api_timeout_in_ms", "-1"),
    ("tensorflow_intra_op_parallelism", "-1"),
    ("tensorflow_inter_op_parallelism", "-1"),
    ("grpc_max_threads", "-1"),
    ("rest_api_num_threads", "-1"),
    ("max_request_bytes", "1023"),
    ("rest_api_idle_timeout_seconds", "0"),
    ("rest_api_idle_timeout_seconds", "-1"),
    ("rest_api_idle_timeout_seconds", "nan"),
    ("rest_api_idle_timeout_seconds", "inf"),
    ("rest_api_port", "-2"),
    ("port", "-1"),
])
def test_out_of_range_values_are_refused_naming_the_flag(flag, value, tmp_path):
    with pytest.raises(ConfigError) as refused:
        ServerOptions.from_args(serve_flags("--model_base_path", str(tmp_path / "m"), f"--{flag}", value))
    assert refused.value.source == f"--{flag}"
    assert value in refused.value.message


def test_grpc_channel_arguments_are_read_as_tf_serving_reads_them(tmp_path):
    """``--grpc_channel_arguments`` (TF Serving's flag): NAME=VALUE items split on commas; a value that is a
    32-bit integer is passed as one, any other as a string; empty items are skipped."""
    options = ServerOptions.from_args(serve_flags(
        "--model_base_path", str(tmp_path / "m"), "--grpc_channel_arguments=grpc.max_connection_age_ms=300000, "
        "grpc.primary_user_agent=carclf,,grpc.x=4294967296,grpc.y=-7"))
    assert options.channel_arguments() == [("grpc.max_connection_age_ms", 300000),
                                           ("grpc.primary_user_agent", "carclf"),
                                           ("grpc.x", "4294967296"), ("grpc.y", -7)]
    assert ServerOptions.from_args(serve_flags("--model_base_path", str(tmp_path / "m"))).channel_arguments() == []


@pytest.mark.parametrize("value,item", [("grpc.max_connection_age_ms", "grpc.max_connection_age_ms"),
                                        ("grpc.a=1,=5", "=5")])
def test_a_malformed_grpc_channel_argument_is_refused_naming_it(value, item, tmp_path):
    with pytest.raises(ConfigError) as refused:
        ServerOptions.from_args(serve_flags("--model_base_path", str(tmp_path / "m"),
                                            f"--grpc_channel_arguments={value}"))
    assert refused.value.source == "--grpc_channel_arguments"
    assert refused.value.message == ("--grpc_channel_arguments: expected NAME=VALUE items separated by commas, such as "
                                     f"grpc.max_connection_age_ms=300000; received {item!r}")


def test_grpc_channel_arguments_reach_the_grpc_server(private_server, conformance_repository):
    """``grpc.max_connection_age_ms`` (what the Kubernetes manifest sets, so that clients of a Service spread
    over replicas added later): the server closes each connection after 0.5 s, and a client calling for 3 s
    is connected several times over while every call succeeds."""
    import threading

    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            enable_model_warmup=False, grpc_channel_arguments="grpc.max_connection_age_ms=500,"
                                                                              "grpc.max_connection_age_grace_ms=200")
    states, lock = [], threading.Lock()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")

    def record(state):
        with lock:
            states.append(state)

    channel.subscribe(record, try_to_connect=True)
    try:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = OTHER_MODEL
        started, answered = time.monotonic(), 0
        while time.monotonic() - started < 3.0:
            stub.GetModelStatus(request, timeout=5, wait_for_ready=True)
            answered += 1
            time.sleep(0.1)
    finally:
        channel.unsubscribe(record)
        channel.close()
    with lock:
        connections = states.count(grpc.ChannelConnectivity.READY)
    assert answered >= 10
    assert connections >= 3, f"{connections} connections in 3 s with a 0.5 s connection age: {states}"


# ------------------------------------------------------------------------------------- startup


def _connects(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) == 0


def test_the_default_bind_address_is_loopback_only(conformance_repository, private_server):
    """Both ports listen on 127.0.0.1 only (README: "Binds 127.0.0.1 by default"): another local address of
    this machine (127.0.0.2, which the kernel routes to loopback too) finds nothing there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # 127.0.0.2 is a usable local address here
        probe.bind(("127.0.0.2", 0))
        probe.listen()
        assert _connects("127.0.0.2", probe.getsockname()[1])
    server = private_server(model_config_file=str(conformance_repository / "models.config"),
                            model_repository=str(conformance_repository), enable_model_warmup=False)
    assert server.options.host == DOCUMENTED_DEFAULTS["host"]
    for port in (server.grpc_port, server.rest_port):
        assert _connects("127.0.0.1", port)
        assert not _connects("127.0.0.2", port), f"port {port} listens beyond 127.0.0.1"


def test_rest_api_port_0_turns_rest_off_and_grpc_still_serves(conformance_repository, private_server):
    from carclf.clients.grpc_client import GrpcClient

    server = private_server(model_config_file=str(conformance_repository / "models.config"),
                            model_repository=str(conformance_repository), enable_model_warmup=False,
                            rest_api_port=0)
    assert server.rest_port is None
    with GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=10) as client:
        assert {v.state for v in client.status(OTHER_MODEL)} == {"AVAILABLE"}


def test_rest_api_timeout_in_ms_ends_a_request_waiting_for_its_batch(conformance_repository, private_server,
                                                                      tmp_path):
    """A lone request waits in the batching queue for batch_timeout_micros; a REST deadline far shorter than
    that answers 504 DEADLINE_EXCEEDED (serving/README.md, "Deadlines") instead of the prediction."""
    batch_timeout_us, rest_timeout_ms = 20_000_000, 200
    batching = tmp_path / "batching.config"
    batching.write_text(f"max_batch_size {{ value: 64 }}\nbatch_timeout_micros {{ value: {batch_timeout_us} }}\n"
                        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 8 }\n")
    server = private_server(model_config_file=str(conformance_repository / "models.config"),
                            model_repository=str(conformance_repository), enable_model_warmup=False,
                            enable_batching=True, batching_parameters_file=str(batching),
                            rest_api_timeout_in_ms=rest_timeout_ms)
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=batch_timeout_us / 1e6 / 2)
    try:
        conn.request("POST", f"/v1/models/{ECHO_MODEL}:predict", body=json.dumps({"instances": ["voiture"]}),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        status, body = reply.status, reply.read()
    finally:
        conn.close()
    assert status == 504, body
    assert "deadline" in json.loads(body)["error"].lower()


def test_tensorflow_thread_flags_reach_their_own_pools(conformance_repository):
    """--tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism set TensorFlow's two pools of
    the serving process, each its own (checked in a fresh process: TensorFlow takes them only before it runs)."""
    intra, inter = 1, 3
    script = (
        "import tensorflow as tf\n"
        "from carclf.serving.options import ServerOptions\n"
        "from carclf.serving.server import ModelServer\n"
        f"server = ModelServer(ServerOptions(model_name={OTHER_MODEL!r}, "
        f"model_base_path={str(conformance_repository / OTHER_MODEL)!r}, "
        f"model_repository={str(conformance_repository)!r}, port=0, rest_api_port=0, "
        "file_system_poll_wait_seconds=0, enable_model_warmup=False, "
        f"tensorflow_intra_op_parallelism={intra}, tensorflow_inter_op_parallelism={inter})).start()\n"
        "try:\n"
        "    print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
        "finally:\n"
        "    server.stop(drain_timeout=0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(intra), str(inter)]


def _states(rest: Rest, model: str) -> dict[int, str]:
    """{version: state} of ``model`` from GET /v1/models/<model> ({} when the server does not know it)."""
    reply = rest.get(f"/v1/models/{model}")
    if reply.status != 200:
        return {}
    return {int(v["version"]): v["state"] for v in reply.json["model_version_status"]}


def test_enable_model_warmup_false_serves_a_version_whose_warmup_would_fail(tiny_repository, private_server):
    """--enable_model_warmup=false skips the warmup records: a version whose warmup file is malformed (which
    fails its load with warmup on, as in TF Serving) is AVAILABLE and answers."""
    version = tiny_repository / OTHER_MODEL / "1"
    warmup_file(version).write_bytes(b"not TFRecords")
    options = {"model_name": OTHER_MODEL, "model_base_path": str(tiny_repository / OTHER_MODEL),
               "model_repository": str(tiny_repository)}
    with_warmup = private_server(**options)
    assert _states(Rest(f"http://127.0.0.1:{with_warmup.rest_port}"), OTHER_MODEL) == {1: "END"}
    without = private_server(**options, enable_model_warmup=False)
    assert _states(Rest(f"http://127.0.0.1:{without.rest_port}"), OTHER_MODEL) == {1: "AVAILABLE"}


def test_model_config_file_poll_wait_seconds_0_reads_the_file_once(private_repository, private_server):
    """With the default --model_config_file_poll_wait_seconds 0 the config file is read once: a rewritten file is
    not applied, while --file_system_poll_wait_seconds still finds a new version (which shows the poller ran after
    the rewrite)."""
    server = private_server(model_config_file=str(private_repository / "models.config"),
                            model_repository=str(private_repository), enable_model_warmup=False,
                            file_system_poll_wait_seconds=1)
    assert server.options.model_config_file_poll_wait_seconds == DOCUMENTED_DEFAULTS[
        "model_config_file_poll_wait_seconds"]
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    assert _states(rest, ECHO_MODEL) == {1: "AVAILABLE"}
    without_echo = "".join(line for line in setup.models_config_text(str(private_repository)).splitlines(True)
                           if f'name: "{ECHO_MODEL}"' not in line)
    (private_repository / "models.config").write_text(without_echo)
    newest = version_numbers(private_repository / OTHER_MODEL)[-1]
    staging = private_repository / f".staging_{OTHER_MODEL}"
    shutil.copytree(private_repository / OTHER_MODEL / str(newest), staging)
    staging.rename(private_repository / OTHER_MODEL / str(newest + 1))
    deadline = time.monotonic() + 30
    while _states(rest, OTHER_MODEL).get(newest + 1) != "AVAILABLE":
        assert time.monotonic() < deadline, f"version {newest + 1} never became AVAILABLE: {_states(rest, OTHER_MODEL)}"
        time.sleep(0.05)  # polling the condition, not waiting for it to happen
    assert _states(rest, ECHO_MODEL) == {1: "AVAILABLE"}


# ------------------------------------------------------------------------------------- serving-config


def test_serving_config_policy_latest_serves_the_newest_without_labels(conformance_repository, tmp_path):
    out = tmp_path / "models.config"
    assert serving_config("--repository", str(conformance_repository), "--output", str(out),
                          "--policy", "latest") == 0
    entries = official(out)
    assert set(entries) == {MODEL, OTHER_MODEL, ECHO_MODEL}
    for name, entry in entries.items():
        assert entry.model_version_policy.WhichOneof("policy_choice") == "latest", name
        assert entry.model_version_policy.latest.num_versions == 1, name
        assert dict(entry.version_labels) == {}, name


def test_serving_config_policy_all_serves_every_version_without_labels(conformance_repository, tmp_path):
    out = tmp_path / "models.config"
    assert serving_config("--repository", str(conformance_repository), "--output", str(out),
                          "--policy", "all") == 0
    entries = official(out)
    assert version_numbers(conformance_repository / MODEL) == \
        sorted({STABLE, CANARY})  # the model with two versions, which "labelled" would pin with specific
    for name, entry in entries.items():
        assert entry.model_version_policy.WhichOneof("policy_choice") == "all", name
        assert dict(entry.version_labels) == {}, name


def test_serving_config_refuses_an_unknown_model_in_one_line(conformance_repository, tmp_path, capsys):
    out = tmp_path / "models.config"
    assert serving_config("--repository", str(conformance_repository), "--output", str(out),
                          "--models", MODEL, "no_such_model") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--models" in err and "no_such_model" in err
    assert not out.exists()


def test_serving_config_refuses_a_relative_base_path_prefix(conformance_repository, tmp_path, capsys):
    out = tmp_path / "models.config"
    assert serving_config("--repository", str(conformance_repository), "--output", str(out),
                          "--base_path_prefix", "models") == 2
    err = capsys.readouterr().err
    assert "--base_path_prefix" in err and "'models'" in err, err
    assert not out.exists()
