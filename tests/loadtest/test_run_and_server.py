"""``make loadtest`` (``python -m carclf.loadtest.run``) deciding whether to start a server, and how long it waits
for one (loadtest/README.md): ``--no-start``, ``--server-timeout``, a version that cannot load, the hosts it may
start a server on. Every case here ends before locust would start."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from carclf.errors import DeadlineExceeded
from carclf.loadtest import run
from carclf.loadtest import server as srv
from tests.fixtures import break_version, version_numbers


def _nothing_answers(address: srv.ServerAddress) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((address.host, address.rest_port)) != 0


def _common(address: srv.ServerAddress, sample_dir: Path, reports: Path, repository: Path, *more: str) -> list[str]:
    return ["--host", address.rest_url, "--grpc-host", address.grpc_target, "--photo-folder", str(sample_dir),
            "--reports", str(reports), "--model-repository", str(repository), "--batching-config", "none",
            "--ensemble-weight", "0", *more]


def _last_error(capsys) -> str:
    """The error line run.py printed (a started server's log tail may follow it)."""
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("loadtest: error: "))


def test_no_start_with_nothing_answering_exits_2_and_starts_nothing(tmp_path, sample_dir, capsys):
    """--no-start against a server that is down exits 2 naming the address; it never falls through to starting
    one (here the empty repository would make that fail with another message rather than serve)."""
    empty = tmp_path / "empty_repository"
    empty.mkdir()
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    reports = tmp_path / "reports"
    args = _common(address, sample_dir, reports, empty, "--target-model", "tiny_b", "--no-start")
    assert run.main(args) == 2
    assert _last_error(capsys) == f"loadtest: error: no server answers at {address.rest_url} (and --no-start)"
    assert not (reports / "server.log").exists() and not (reports / "models.config").exists()
    assert _nothing_answers(address)


@pytest.mark.timeout(90)
def test_server_timeout_bounds_the_wait_for_a_started_server_which_is_then_stopped(lt_repository, tmp_path,
                                                                                   sample_dir, capsys):
    """A started server whose model never becomes AVAILABLE (its config asks for a version not exported yet)
    is waited for --server-timeout seconds, not the default 300, then stopped; exit 2."""
    newest = version_numbers(lt_repository / "tiny_b")[-1]
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "tiny_b" base_path: "{lt_repository / "tiny_b"}" '
                      f'model_platform: "tensorflow" model_version_policy {{ specific {{ versions: {newest + 1} }} }} '
                      "} }\n")
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    timeout_s = 3
    args = _common(address, sample_dir, tmp_path / "reports", lt_repository, "--target-model", "tiny_b",
                   "--model-config", str(config), "--server-timeout", str(timeout_s))
    assert run.main(args) == 2
    last = _last_error(capsys)
    assert last.startswith(f"loadtest: error: models ['tiny_b'] not AVAILABLE after {timeout_s} s"), last
    assert _nothing_answers(address)


@pytest.mark.timeout(90)
def test_a_version_that_cannot_load_ends_the_wait_at_once_naming_the_model(lt_repository, tmp_path, sample_dir,
                                                                          capsys):
    """A started server's version that ends with a load error will not become AVAILABLE by waiting: run.py
    says which model and why at once, well within --server-timeout, and stops the server."""
    repository = tmp_path / "model_repository"
    shutil.copytree(lt_repository, repository)
    for version in version_numbers(repository / "tiny_b"):
        break_version(repository / "tiny_b" / str(version))
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    args = _common(address, sample_dir, tmp_path / "reports", repository, "--target-model", "tiny_b",
                   "--server-timeout", "80")
    assert run.main(args) == 2
    last = _last_error(capsys)
    assert last.startswith("loadtest: error: model tiny_b is not served: "), last
    assert _nothing_answers(address)


def test_grpc_and_rest_on_different_hosts_are_refused_before_a_server_starts(tmp_path, sample_dir, capsys):
    """A started server listens on one host for both ports: a gRPC host that differs from the REST host is
    refused before anything starts (an empty repository would fail later, so the check comes first)."""
    empty = tmp_path / "empty_repository"
    empty.mkdir()
    rest, grpc = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port()), "127.0.0.2"
    args = ["--host", rest.rest_url, "--grpc-host", f"{grpc}:{rest.grpc_port}", "--photo-folder", str(sample_dir),
            "--reports", str(tmp_path / "reports"), "--model-repository", str(empty), "--ensemble-weight", "0"]
    assert run.main(args) == 2
    assert _last_error(capsys) == ("loadtest: error: field 'grpc-host': gRPC and REST must be on the same host to "
                                   f"start a server, received {grpc!r} and {rest.host!r}")


def test_a_remote_address_nothing_answers_on_is_never_started_on(tmp_path, sample_dir, capsys):
    """A server is started only on a local address: for another host (192.0.2.1, TEST-NET-1, never this
    machine's) run.py says nothing answers there instead of starting one."""
    empty = tmp_path / "empty_repository"
    empty.mkdir()
    remote = srv.ServerAddress("192.0.2.1", srv.free_port(), srv.free_port())
    assert remote.host not in run.LOCAL_HOSTS
    args = _common(remote, sample_dir, tmp_path / "reports", empty, "--target-model", "tiny_b")
    assert run.main(args) == 2
    assert _last_error(capsys) == (f"loadtest: error: no server answers at {remote.rest_url} and it is not a local "
                                   "address to start one on")


@pytest.fixture
def half_broken_server(lt_repository, tmp_path):
    """An in-process server where tiny_a serves its older version while its newest fails to load, and tiny_b has
    no version that loads (both versions of tiny_a under the ``all`` policy)."""
    from carclf.serving.options import ANY_PORT, ServerOptions
    from carclf.serving.server import ModelServer

    repository = tmp_path / "model_repository"
    shutil.copytree(lt_repository, repository)
    versions = version_numbers(repository / "tiny_a")
    assert len(versions) >= 2
    break_version(repository / "tiny_a" / str(versions[-1]))
    for version in version_numbers(repository / "tiny_b"):
        break_version(repository / "tiny_b" / str(version))
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "tiny_a" base_path: "{repository / "tiny_a"}" '
                      'model_platform: "tensorflow" model_version_policy { all {} } } '
                      f'config {{ name: "tiny_b" base_path: "{repository / "tiny_b"}" model_platform: "tensorflow" }} }}\n')
    server = ModelServer(ServerOptions(model_config_file=str(config), model_repository=str(repository), port=0,
                                       rest_api_port=ANY_PORT, file_system_poll_wait_seconds=0,
                                       enable_model_warmup=False)).start()
    try:
        yield srv.ServerAddress(srv.LOOPBACK, server.grpc_port, server.rest_port), versions
    finally:
        server.stop(drain_timeout=1)


def test_a_model_with_one_available_version_counts_as_available(half_broken_server):
    """loadtest/server.py reads a model as AVAILABLE when any of its versions is (what run.py waits for and
    checks before locust), even when the version GET /v1/models lists first ended with an error."""
    import json
    import urllib.request

    address, versions = half_broken_server
    with urllib.request.urlopen(f"{address.rest_url}/v1/models/tiny_a", timeout=10) as reply:
        listed = {int(v["version"]): v["state"] for v in json.loads(reply.read())["model_version_status"]}
    first = next(iter(listed))
    assert listed[first] == "END" and listed[versions[0]] == "AVAILABLE", listed
    assert srv.model_status(address.rest_url, "tiny_a") == ("AVAILABLE", "")
    assert srv.is_serving(address, ["tiny_a"])


def test_a_running_server_lists_only_the_models_it_can_answer_for(half_broken_server, tmp_path, sample_dir,
                                                                   capsys):
    """Against a running server whose target model has no AVAILABLE version, run.py stops before locust naming
    the model's state and, as the models the server does serve, only those with an AVAILABLE version."""
    address, _ = half_broken_server
    args = ["--host", address.rest_url, "--grpc-host", address.grpc_target, "--photo-folder", str(sample_dir),
            "--reports", str(tmp_path / "reports"), "--ensemble-weight", "0", "--target-model", "tiny_b",
            "--no-start"]
    assert run.main(args) == 2
    last = _last_error(capsys)
    assert last.startswith(f"loadtest: error: the server at {address.rest_url} has no AVAILABLE version of the "
                           "backbone model 'tiny_b' (END: "), last
    assert last.endswith("; it serves tiny_a; give --target-model NAME (or LOCUST_TARGET_MODEL=NAME)"), last
    assert not (tmp_path / "reports" / "locust_stats.csv").exists()


@pytest.fixture
def silent_listener():
    """A loopback port that takes connections and never answers (a server busy past any probe's patience)."""
    listener = socket.create_server((srv.LOOPBACK, 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://{srv.LOOPBACK}:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in [*held, listener]:
        conn.close()


def test_a_server_that_takes_the_connection_but_does_not_answer_is_not_taken_for_no_server(
        silent_listener, tmp_path, sample_dir, capsys, monkeypatch):
    """A status probe that times out is reported as such: not "no server answers" (with --no-start), and never
    a reason to start a second server on the ports it holds (without it). Exit 2, nothing started or written."""
    started: list[object] = []
    monkeypatch.setattr(run, "start_server", lambda *args: started.append(args))
    monkeypatch.setattr(run.srv, "call_child", lambda *args, **kwargs: started.append(args))
    monkeypatch.setattr(run, "FIRST_PROBE_S", 0.5)
    with pytest.raises(DeadlineExceeded, match=r"within 0\.3 s"):
        srv.model_status(silent_listener, "tiny_a", timeout=0.3)
    refused = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    assert srv.model_status(refused.rest_url, "tiny_a", timeout=0.3) == (None, "")  # nothing there: no error

    port = int(silent_listener.rsplit(":", 1)[1])
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), port)
    for more in (["--no-start"], []):
        reports = tmp_path / f"reports{len(more)}"
        assert run.main(_common(address, sample_dir, reports, tmp_path, "--target-model", "tiny_a", *more)) == 2
        assert _last_error(capsys) == (
            f"loadtest: error: {silent_listener} took the connection but did not answer GET /v1/models/tiny_a "
            "within 0.5 s (a server too busy to answer, or not an HTTP server); no load test was run and no "
            "server started"), more
        assert not started and not any(reports.iterdir()), more


class _SlowFirstAnswer(http.server.BaseHTTPRequestHandler):
    """Answers GET /v1/models/<m> with one AVAILABLE version; the first request waits past the probe's timeout."""

    calls = 0
    delay_s = srv.PROBE_TIMEOUT_S + 1.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).calls += 1
        if type(self).calls == 1:
            time.sleep(self.delay_s)
        body = json.dumps({"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the probe gave up on the first request and closed its end
            pass

    def log_message(self, *args) -> None:
        pass


def test_wait_ready_waits_through_a_status_probe_that_times_out():
    """A started server busy loading may not answer one probe in time: wait_ready keeps polling until its own
    timeout instead of failing on the first late answer."""
    handler = type("SlowFirst", (_SlowFirstAnswer,), {"calls": 0})
    httpd = http.server.ThreadingHTTPServer((srv.LOOPBACK, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        server = srv.EmbeddedServer(srv.ServerAddress(srv.LOOPBACK, srv.free_port(), httpd.server_address[1]),
                                    model_config_file="unused.config")
        server.wait_ready(["m"], timeout=30)
        assert handler.calls >= 2  # the first probe timed out; a later one read AVAILABLE
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_benchmark_memory_probe_reads_a_late_status_answer_as_not_available_yet(silent_listener):
    """carclf bench polls for the model copy it loads to measure memory: a status probe that times out (the
    server busy loading it) means "not yet", so the loop polls again instead of reporting the figure missing."""
    from carclf.loadtest import bench

    assert bench._available(silent_listener, "tiny_a") is False
