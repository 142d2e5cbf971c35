"""Short headless locust runs through ``python -m carclf.loadtest.run`` (what ``make loadtest`` runs)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from carclf.loadtest import protocol
from carclf.loadtest import server as srv

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_loadtest(*args: str, timeout: float = 150, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carclf.loadtest.run", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def run_locust(reports: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A plain ``locust`` run over loadtest/locust.conf (not through run.py), its CSV and HTML under ``reports``."""
    return subprocess.run([sys.executable, "-m", "locust", "--config", str(REPO_ROOT / "loadtest" / "locust.conf"),
                           *args, "--csv", str(reports / "locust"), "--html", str(reports / "locust.html")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def interrupt_run(when: Callable[[subprocess.Popen], None], *args: str) -> tuple[subprocess.Popen, str, str]:
    """Start ``python -m carclf.loadtest.run *args`` in a session of its own, wait for ``when(child)``, then send
    its process group SIGINT (a terminal's Ctrl-C); the child, its stdout and its stderr once it has ended."""
    child = subprocess.Popen([sys.executable, "-m", "carclf.loadtest.run", *args], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        when(child)
        os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    return child, out, err


def stats_at(prefix: Path) -> dict[str, dict[str, str]]:
    """Rows of locust's ``<prefix>_stats.csv`` by "Type Name"."""
    with Path(f"{prefix}_stats.csv").open(newline="") as handle:
        return {f"{row['Type']} {row['Name']}".strip(): row for row in csv.DictReader(handle)}


def stats(reports: Path) -> dict[str, dict[str, str]]:
    return stats_at(reports / "locust")


@pytest.mark.slow
def test_both_users_backbone_and_ensemble_pass_with_zero_failures(tiny_deployment, tmp_path, sample_dir):
    address, reports = tiny_deployment.address, tmp_path / "reports"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--users", "4", "--spawn-rate", "4", "--run-time", "3s",
                          "--target-model", "tiny_a", "--ensemble-model", "car_ensemble",
                          "--ensemble-weight", "1", "--backbone-weight", "1",
                          "--photo-folder", str(sample_dir), "--model-repository", str(tiny_deployment.repository),
                          "--max-p95-ms", "0", "--reports", str(reports))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = stats(reports)
    expected = {"grpc Predict tiny_a", "POST POST /v1/models/tiny_a:predict", "grpc Predict car_ensemble",
                "POST POST /v1/models/car_ensemble:predict"}
    assert expected <= set(rows), sorted(rows)
    for name in expected:
        assert int(rows[name]["Request Count"]) > 0 and rows[name]["Failure Count"] == "0", rows[name]
    assert (reports / "locust.html").stat().st_size > 10_000
    # the CSV holds the final counts, the same as locust's printed table (not a snapshot up to 1 s older)
    printed = re.search(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(", result.stdout + result.stderr, re.M)
    assert printed is not None, result.stderr[-3000:]
    assert (rows["Aggregated"]["Request Count"], rows["Aggregated"]["Failure Count"]) == printed.groups()
    assert json.loads((reports / "run.json").read_text())["started_server"] is False


@pytest.mark.slow
def test_a_started_server_serves_the_repository_and_is_stopped(lt_repository, tmp_path, sample_dir):
    """No server is running: run.py starts one over every model of the repository (as make serve does),
    the run passes, and the server it started is gone afterwards."""
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    reports = tmp_path / "reports"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--batching-config", "none",
                          "--tensorflow-intra-op-parallelism", "1", "--users", "2", "--spawn-rate", "2", "--run-time", "2s",
                          "--target-model", "tiny_b", "--ensemble-weight", "0", "--max-p95-ms", "0",
                          "--photo-folder", str(sample_dir), "--model-repository", str(lt_repository),
                          "--labels-file", str(sample_dir / "classes.json"), "--reports", str(reports))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting the embedded server" in result.stdout
    assert srv.config_model_names(reports / "models.config") == srv.repository_models(lt_repository)
    total = stats(reports)["Aggregated"]
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0"
    assert json.loads((reports / "run.json").read_text())["started_server"] is True
    assert "TensorFlow threads: intra-op 1," in (reports / "server.log").read_text()  # as make serve runs it
    with socket.socket() as sock:  # the server it started is stopped
        assert sock.connect_ex((address.host, address.rest_port)) != 0


def test_a_model_the_repository_lacks_stops_before_any_server_or_request(lt_repository, tmp_path, sample_dir):
    address = srv.ServerAddress(srv.LOOPBACK, srv.free_port(), srv.free_port())
    reports = tmp_path / "reports"
    reports.mkdir()
    earlier = reports / "models.config"  # what an earlier run in this folder served: a refusal keeps it
    earlier.write_text('model_config_list { config { name: "earlier_run" base_path: "/models/earlier_run" } }\n')
    kept = earlier.read_bytes()
    common = ("--host", address.rest_url, "--grpc-host", address.grpc_target, "--photo-folder", str(sample_dir),
              "--model-repository", str(lt_repository), "--reports", str(reports))
    result = run_loadtest(*common, "--target-model", "no_such_model", "--ensemble-weight", "0", timeout=60)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    held = ", ".join(srv.repository_models(lt_repository))
    assert result.stderr.strip().splitlines()[-1] == (
        f"loadtest: error: field 'target-model': target-model 'no_such_model' is not in the model repository "
        f"'{lt_repository}' (it holds {held}); give --target-model NAME (or LOCUST_TARGET_MODEL=NAME)")
    assert "starting the embedded server" not in result.stdout
    assert not (reports / "locust_stats.csv").exists()
    assert earlier.read_bytes() == kept

    from carclf.ensemble.config import render

    ensemble = tmp_path / "other_ensemble" / "config.pbtxt"
    ensemble.parent.mkdir()
    ensemble.write_text(render("car_ensemble", ["tiny_a", "mobilenet_v2"], parameters={"failure_policy": "fail"}))
    result = run_loadtest(*common, "--target-model", "tiny_a", "--ensemble-config", str(ensemble), timeout=60)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"car_ensemble needs 2 of its members tiny_a, mobilenet_v2, but the model repository '{lt_repository}' " \
           "lacks mobilenet_v2" in last and "--ensemble-weight 0" in last
    assert "starting the embedded server" not in result.stdout
    assert earlier.read_bytes() == kept


def test_a_running_server_without_the_model_stops_before_any_request(tiny_deployment, tmp_path, sample_dir):
    address, reports = tiny_deployment.address, tmp_path / "reports"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target,
                          "--target-model", "no_such_model", "--ensemble-weight", "0",
                          "--photo-folder", str(sample_dir), "--reports", str(reports), timeout=60)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    served = ", ".join(sorted(["tiny_a", "tiny_b", "car_ensemble"]))
    assert result.stderr.strip().splitlines()[-1] == (
        f"loadtest: error: the server at {address.rest_url} does not serve the backbone model 'no_such_model'; "
        f"it serves {served}; give --target-model NAME (or LOCUST_TARGET_MODEL=NAME)")
    assert not (reports / "locust_stats.csv").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--photo-folder", "/no/such/photos"], "photo folder does not exist, received '/no/such/photos'"),
    (["--run-time", "0s"], "field 'run-time': expected a run time > 0 such as 30s, 2m or 1h30m, received '0s'"),
    (["--users", "0"], "field 'users': expected an integer >= 1, received '0'"),
])
def test_a_plain_locust_run_refuses_bad_settings_in_one_line(tmp_path, flags, needle):
    """``locust --config loadtest/locust.conf`` (not through run.py) makes run.py's checks before any request:
    one error line and exit status 2, not a traceback from locust's event handler (and no run without limit)."""
    port = srv.free_port()  # nothing listens there: a run that started would fail its requests, not exit 2
    result = run_locust(tmp_path, "--host", f"http://127.0.0.1:{port}", "--grpc-host", f"127.0.0.1:{port}", *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "/ERROR/" in line]
    assert len(errors) == 1 and "cannot start the load test: " in errors[0] and errors[0].endswith(needle), \
        output[-3000:]
    assert "Traceback" not in output
    # no report of a run that never was: locust opens its CSV files at start, and they stay empty
    assert [f.name for f in tmp_path.iterdir() if f.stat().st_size or f.suffix != ".csv"] == []


def _mixed_photos(folder: Path, sample_dir: Path, good: int = 3) -> Path:
    """``good`` real photos and one file named .jpg that is not an image (its calls fail with 400)."""
    folder.mkdir()
    for path in sorted(sample_dir.rglob("*.jpg"))[:good]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "not_a_photo.jpg").write_text("this is text, not a JPEG")
    return folder


@pytest.mark.slow
def test_failures_within_max_fail_ratio_pass_and_above_it_fail(tiny_deployment, tmp_path, sample_dir):
    """--max-fail-ratio decides the exit status (locust alone exits 1 on any failed request)."""
    address = tiny_deployment.address
    photos = _mixed_photos(tmp_path / "photos", sample_dir)
    common = ("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start", "--users", "2",
              "--spawn-rate", "2", "--run-time", "2s", "--target-model", "tiny_a", "--ensemble-weight", "0",
              "--photo-folder", str(photos), "--model-repository", str(tiny_deployment.repository),
              "--max-p95-ms", "0")
    allowed = run_loadtest(*common, "--max-fail-ratio", "0.9", "--reports", str(tmp_path / "allowed"))
    # without a report, the run's own output says why (it once ended so in CI with nothing to read)
    assert (tmp_path / "allowed" / "locust_stats.csv").exists(), allowed.stdout[-3000:] + allowed.stderr[-3000:]
    total = stats(tmp_path / "allowed")["Aggregated"]
    failed, made = int(total["Failure Count"]), int(total["Request Count"])
    assert 0 < failed < made, total  # the bad photo's calls failed, the others answered
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert "loadtest: PASSED" in allowed.stdout and "within --max-fail-ratio 0.9" in allowed.stderr

    strict = run_loadtest(*common, "--max-fail-ratio", "0", "--reports", str(tmp_path / "strict"))
    assert strict.returncode == 1, strict.stdout[-3000:] + strict.stderr[-3000:]
    assert re.search(r"load test failed: failure ratio [\d.]+% \(\d+ of \d+\) is above 0\.00%", strict.stderr)


def test_settings_that_would_call_nothing_or_a_wrong_port_stop_before_any_request(tiny_deployment, tmp_path,
                                                                                  sample_dir):
    """Each mistake ends the run with one line and exit status 2 before locust starts: a gRPC address where
    nothing answers (the REST check alone passed it, and the run then counted a flood of refused calls),
    the REST address given the gRPC port, a gRPC address with a scheme, both task weights 0."""
    address = tiny_deployment.address
    nothing = srv.free_port()
    cases = [
        (["--host", address.rest_url, "--grpc-host", f"127.0.0.1:{nothing}"],
         f"gRPC at 127.0.0.1:{nothing} (grpc-host): the backbone model 'tiny_a': "),
        (["--host", f"http://127.0.0.1:{address.grpc_port}", "--grpc-host", address.grpc_target],
         "does not answer HTTP/1.x (BadStatusLine), as a gRPC port does: give the REST port (http://host:port)"),
        (["--host", address.rest_url, "--grpc-host", f"http://{address.grpc_target}"],
         f"field 'grpc-host': expected HOST:PORT (no scheme, a port from 1 to 65535), received "
         f"'http://{address.grpc_target}'"),
        (["--host", "http://127.0.0.1:99999", "--grpc-host", address.grpc_target],
         "field 'host': expected http://HOST:PORT (a port from 1 to 65535), received 'http://127.0.0.1:99999'"),
        (["--host", "http://127.0.0.1:85o1", "--grpc-host", address.grpc_target],
         "field 'host': expected http://HOST:PORT (a port from 1 to 65535), received 'http://127.0.0.1:85o1'"),
        (["--host", address.rest_url, "--grpc-host", "127.0.0.1:70000"],
         "field 'grpc-host': expected HOST:PORT (no scheme, a port from 1 to 65535), received '127.0.0.1:70000'"),
        (["--host", address.rest_url, "--grpc-host", address.grpc_target, "--ensemble-weight", "1",
          "--ensemble-rest-host", f"127.0.0.1:{address.rest_port}"],
         f"field 'ensemble-rest-host': expected http://HOST:PORT (a port from 1 to 65535), received "
         f"'127.0.0.1:{address.rest_port}'"),
        (["--host", address.rest_url, "--grpc-host", address.grpc_target, "--backbone-weight", "0"],
         "field 'backbone-weight': expected a weight > 0 here or for ensemble-weight: with both 0 the users have "
         "nothing to call, received '0'"),
    ]
    for number, (flags, needle) in enumerate(cases):
        reports = tmp_path / f"case{number}"
        result = run_loadtest("--no-start", "--target-model", "tiny_a", "--ensemble-weight", "0", *flags,
                              "--photo-folder", str(sample_dir), "--run-time", "2s", "--reports", str(reports),
                              timeout=60)
        assert result.returncode == 2, (flags, result.stdout[-2000:], result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("loadtest: error: ") and needle in last, (flags, last)
        assert "Traceback" not in result.stderr and not (reports / "locust_stats.csv").exists()


def test_calls_nothing_answers_say_why_and_back_off(tmp_path, sample_dir):
    """A plain locust run where nothing listens: every failure says why (not "HTTP 0:"), and each user waits
    before trying again instead of looping thousands of times a second."""
    rest_port, grpc_port = srv.free_port(), srv.free_port()
    run_s = 2
    result = run_locust(tmp_path, "--host", f"http://127.0.0.1:{rest_port}", "--grpc-host", f"127.0.0.1:{grpc_port}",
                        "--users", "2", "--spawn-rate", "2", "--run-time", f"{run_s}s", "--ensemble-weight", "0",
                        "--target-model", "tiny_a", "--photo-folder", str(sample_dir), "--max-fail-ratio", "1")
    assert result.returncode == 0, result.stderr[-3000:]  # every call failed, and a ratio of 1 allows that
    assert (tmp_path / "locust.html").is_file()  # the report went here, not over the checkout's reports/
    with (tmp_path / "locust_failures.csv").open(newline="") as handle:
        failures = {row["Method"]: row for row in csv.DictReader(handle)}
    rest, grpc_row = failures["POST"], failures["grpc"]
    assert rest["Error"].startswith(f"CatchResponseError('no answer from http://127.0.0.1:{rest_port}: "), rest
    assert "refused" in rest["Error"].lower(), rest
    assert grpc_row["Error"].startswith("Unavailable('UNAVAILABLE: "), grpc_row
    # one user per transport, one call per back-off at most (plus the first): a handful, not thousands
    bound = run_s / protocol.UNANSWERED_BACKOFF_S + 3
    for row in (rest, grpc_row):
        assert 1 <= int(row["Occurrences"]) <= bound, row


def test_a_rest_answer_that_is_no_prediction_is_a_failed_request(tmp_path, sample_dir):
    """A server that answers 200 with probabilities summing to 9: the REST user checks what came back, not only
    the status, so every such call is a failure naming what is wrong."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = json.dumps({"predictions": [{"probabilities": [0.9] * 10, "label": "BMW X5", "class_id": 0}]}).encode()

    class WrongAnswers(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongAnswers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_locust(tmp_path, "RestPredictUser", "--host", f"http://127.0.0.1:{server.server_address[1]}",
                            "--grpc-host", f"127.0.0.1:{srv.free_port()}", "--users", "1", "--spawn-rate", "1",
                            "--run-time", "2s", "--ensemble-weight", "0", "--target-model", "tiny_a",
                            "--photo-folder", str(sample_dir), "--model-repository", str(tmp_path),
                            "--max-fail-ratio", "1")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "locust_stats.csv").open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    row = rows["POST /v1/models/tiny_a:predict"]
    assert int(row["Request Count"]) > 0 and row["Failure Count"] == row["Request Count"], row
    with (tmp_path / "locust_failures.csv").open(newline="") as handle:
        errors = [row["Error"] for row in csv.DictReader(handle)]
    assert errors and all("BadPrediction" in e and "sum to [9" in e for e in errors), errors


def test_ctrl_c_ends_the_run_with_its_figures_so_far(tiny_deployment, tmp_path, sample_dir):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) stops locust cleanly: the table of what
    was measured, an INTERRUPTED verdict and exit status 130, no traceback. The CSV counts the same requests
    as the printed table (the users stop before the CSV's last pass), and the HTML report is this run's: an
    earlier run's reports in the folder are gone (locust writes no HTML when stopped by SIGTERM)."""
    address, reports = tiny_deployment.address, tmp_path / "reports"
    reports.mkdir()
    (reports / "locust_stats.csv").write_text(STALE_STATS)
    (reports / "locust.html").write_text("an earlier run's report")
    def some_requests_made(_child) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (reports / "locust_stats_history.csv").is_file():
            time.sleep(0.2)
        time.sleep(3)

    child, out, err = interrupt_run(some_requests_made, "--host", address.rest_url, "--grpc-host",
                                    address.grpc_target, "--no-start", "--users", "2", "--spawn-rate", "2",
                                    "--run-time", "60s", "--target-model", "tiny_a", "--ensemble-weight", "0",
                                    "--photo-folder", str(sample_dir), "--reports", str(reports))
    assert child.returncode == 130, out[-2000:] + err[-3000:]
    assert "loadtest: interrupted; the figures up to then follow" in out
    summary = re.search(r"^\s*Aggregated\s+([1-9]\d*)\s", out, re.M)
    assert summary, out[-2000:]
    assert "loadtest: INTERRUPTED (locust exit status 130)" in out
    assert "Traceback" not in out + err, err[-3000:]
    printed = re.findall(r"^\s*Aggregated\s+(\d+)\s+\d+\(", err, re.M)  # locust's own final table
    assert printed and printed[-1] == summary.group(1) == stats(reports)["Aggregated"]["Request Count"], \
        (printed, summary.group(1), stats(reports)["Aggregated"])
    html = (reports / "locust.html").read_text()
    assert len(html) > 10_000 and "an earlier run" not in html


STALE_STATS = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
               "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
               "99.99%,100%\n,Aggregated,28,0,40,41.0,30,60,100,5.0,0.0,40,42,44,46,50,55,58,60,60,60,60\n")


def test_a_run_that_stops_before_locust_reports_shows_no_earlier_runs_figures(tiny_deployment, tmp_path,
                                                                              sample_dir):
    """A locust that refuses a flag of its own writes nothing: the summary must not print the figures an earlier
    run left in the same reports folder (28 requests here) as if they were this run's."""
    address, reports = tiny_deployment.address, tmp_path / "reports"
    reports.mkdir()
    (reports / "locust_stats.csv").write_text(STALE_STATS)
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--target-model", "tiny_a", "--ensemble-weight", "0", "--photo-folder", str(sample_dir),
                          "--run-time", "2s", "--reports", str(reports), "--", "--no-such-locust-flag", timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unrecognized arguments: --no-such-locust-flag" in result.stderr
    assert "Aggregated" not in result.stdout and not (reports / "locust_stats.csv").exists()
    assert result.stdout.strip().splitlines()[-1] == f"loadtest: FAILED (locust exit status 2); reports in {reports}/"


def test_the_ensemble_at_a_host_of_its_own_is_checked_and_called_there(tiny_deployment, lt_repository, tmp_path,
                                                                       sample_dir):
    """``--ensemble-rest-host``/``--ensemble-grpc-host`` (a gateway in front of real TF Serving): the backbone's
    server need not serve the ensemble. The check before the run asked the backbone's REST host for it and
    refused every such run."""
    from tests.loadtest.conftest import start_tiny_server

    backbones = start_tiny_server(lt_repository, tmp_path / "backbones", None)  # tiny_a and tiny_b, no ensemble
    try:
        gateway = tiny_deployment.address
        common = ("--host", backbones.address.rest_url, "--grpc-host", backbones.address.grpc_target, "--no-start",
                  "--target-model", "tiny_a", "--ensemble-weight", "1", "--photo-folder", str(sample_dir),
                  "--model-repository", str(lt_repository), "--users", "2", "--spawn-rate", "2", "--run-time", "3s",
                  "--max-p95-ms", "0")
        result = run_loadtest(*common, "--ensemble-rest-host", gateway.rest_url,
                              "--ensemble-grpc-host", gateway.grpc_target, "--reports", str(tmp_path / "ok"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = stats(tmp_path / "ok")
        for name in ("grpc Predict car_ensemble", "POST POST /v1/models/car_ensemble:predict"):
            assert int(rows[name]["Request Count"]) > 0 and rows[name]["Failure Count"] == "0", rows[name]
        # the ensemble's REST host that lacks it is the one named
        result = run_loadtest(*common, "--ensemble-rest-host", backbones.address.rest_url,
                              "--ensemble-grpc-host", gateway.grpc_target, "--reports", str(tmp_path / "wrong"),
                              timeout=60)
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"loadtest: error: the server at {backbones.address.rest_url} does not serve the ensemble model "
            f"'car_ensemble'")
    finally:
        backbones.stop()


def test_environment_variables_name_the_report_paths_as_for_locust(tiny_deployment, tmp_path, sample_dir):
    """LOCUST_CSV and LOCUST_HTML (locust's own variables) place the reports, under the flags' precedence."""
    address = tiny_deployment.address
    prefix, html = tmp_path / "from_env" / "run", tmp_path / "from_env" / "page.html"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--target-model", "tiny_a", "--ensemble-weight", "0", "--photo-folder", str(sample_dir),
                          "--users", "1", "--run-time", "2s", "--max-p95-ms", "0",
                          env={"LOCUST_CSV": str(prefix), "LOCUST_HTML": str(html)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert int(stats_at(prefix)["Aggregated"]["Request Count"]) > 0 and html.stat().st_size > 10_000
    assert result.stdout.strip().splitlines()[-1].endswith(f"reports in {prefix.parent}/")


def test_photos_that_do_not_decode_for_the_pixels_signature_are_a_setting_error(tiny_deployment, tmp_path,
                                                                                sample_dir):
    """``--signature serving_pixels`` decodes every photo before the run: one that does not decode stops it with
    one line naming the photo and exit status 2, not a TensorFlow traceback and a failed load test."""
    photos = _mixed_photos(tmp_path / "photos", sample_dir, good=2)
    address = tiny_deployment.address
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--target-model", "tiny_a", "--ensemble-weight", "0", "--photo-folder", str(photos),
                          "--signature", "serving_pixels", "--run-time", "2s", "--reports", str(tmp_path / "r"),
                          timeout=90)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "/ERROR/" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"cannot start the load test: photo 'not_a_photo.jpg' of {photos} does not decode (truncated or corrupt): "
        "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."), errors
    assert "Traceback" not in output


def test_ctrl_c_while_a_started_server_loads_stops_it_without_a_traceback(lt_repository, tmp_path, sample_dir):
    """Ctrl-C before locust starts (the server it started still loading its models): one line, exit status 130,
    and the server it started is stopped, its ports free."""
    import psutil

    rest, grpc_port = srv.free_port(), srv.free_port()
    reports = tmp_path / "reports"
    server = []

    def server_loading(child) -> None:
        while "loadtest: starting the embedded server" not in (line := child.stdout.readline()):
            assert line, "run.py ended before it started a server"
        time.sleep(0.5)
        server.extend(p for p in psutil.Process(child.pid).children(recursive=True) if "serve" in " ".join(p.cmdline()))

    child, out, err = interrupt_run(server_loading, "--host", f"http://127.0.0.1:{rest}", "--grpc-host",
                                    f"127.0.0.1:{grpc_port}", "--target-model", "tiny_a", "--ensemble-weight", "0",
                                    "--photo-folder", str(sample_dir), "--model-repository", str(lt_repository),
                                    "--run-time", "30s", "--reports", str(reports))
    assert child.returncode == 130, out[-2000:] + err[-3000:]
    assert err.strip().splitlines()[-1] == "loadtest: interrupted before the load test began; no load test was run"
    assert "Traceback" not in out + err, err[-3000:]
    assert server and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server)
    for port in (rest, grpc_port):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free again


@pytest.mark.parametrize("sig,hint", [(signal.SIGABRT, ""), (signal.SIGKILL, " (the system may have run out of memory)")])
def test_a_locust_killed_by_a_signal_reads_crashed_with_the_shells_status(tiny_deployment, tmp_path, sample_dir,
                                                                          sig, hint):
    """A locust that dies of a signal (here a locustfile that sends it to its own process, as an abort in
    gRPC's core or the out-of-memory killer would) judged nothing: CRASHED with the signal's name and exit
    status 128 + n, where it read "FAILED (locust exit status -6)" and exited 250."""
    crashing = tmp_path / "crashing_locustfile.py"
    crashing.write_text(f"import os\nos.kill(os.getpid(), {int(sig)})\n")
    address, reports = tiny_deployment.address, tmp_path / "reports"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--users", "1", "--run-time", "3s", "--target-model", "tiny_a", "--ensemble-weight", "0",
                          "--photo-folder", str(sample_dir), "--reports", str(reports), "--", "-f", str(crashing),
                          timeout=60)
    assert result.returncode == 128 + sig, result.stdout[-3000:] + result.stderr[-3000:]
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict == (f"loadtest: CRASHED (locust was killed by {sig.name}{hint}; any figures above are partial); "
                       f"reports in {reports}/")
    assert "FAILED" not in result.stdout


def test_a_grpc_request_asks_for_its_signature(tiny_deployment, photos):
    """The load test's gRPC requests name their signature: pixels sent through serving_pixels are answered by
    it (the default signature takes JPEG bytes and would refuse them), and the answer is a valid prediction."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from carclf import contract
    from carclf.loadtest import checks

    inputs = protocol.photo_inputs(contract.SIGNATURE_PIXELS, photos[0].read_bytes())
    request = protocol.grpc_request("tiny_a", contract.SIGNATURE_PIXELS, inputs)
    with grpc.insecure_channel(tiny_deployment.address.grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert response.model_spec.signature_name == contract.SIGNATURE_PIXELS
    checks.check_prediction(protocol.grpc_outputs(response),
                            checks.repository_labels(tiny_deployment.repository, "tiny_a"))


def test_an_ensemble_without_labels_of_its_own_is_checked_against_the_backbones(lt_repository, tmp_path,
                                                                               sample_dir):
    """The ensemble has no folder in the model repository (it is a config, not an export): its answers are
    checked against the backbone's labels rather than for consistency only."""
    from carclf.loadtest import checks

    program = f"""
import argparse, json
from carclf.loadtest.locustfile import Workload
options = argparse.Namespace(photo_folder={str(sample_dir)!r}, target_model="tiny_a", ensemble_model="car_ensemble",
                             ensemble_weight=1, signature="serving_default", labels_file="",
                             model_repository={str(lt_repository)!r})
print(json.dumps(Workload.build(options).labels))
"""
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = json.loads(result.stdout.strip().splitlines()[-1])
    backbone = checks.repository_labels(lt_repository, "tiny_a")
    assert not (lt_repository / "car_ensemble").exists() and backbone
    assert labels == {"tiny_a": backbone, "car_ensemble": backbone}


def test_a_grpc_call_nothing_answers_fails_after_the_request_timeout(tmp_path, sample_dir):
    """--request-timeout bounds every gRPC call: against a server that accepts the connection and never answers,
    each call fails as DEADLINE_EXCEEDED after it, instead of hanging until the run ends uncounted."""
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        result = run_locust(tmp_path, "GrpcPredictUser", "--host", f"http://127.0.0.1:{port}",
                            "--grpc-host", f"127.0.0.1:{port}", "--users", "1", "--spawn-rate", "1", "--run-time", "3s",
                            "--request-timeout", "0.5", "--ensemble-weight", "0", "--target-model", "tiny_a",
                            "--photo-folder", str(sample_dir), "--model-repository", str(tmp_path),
                            "--max-fail-ratio", "1")
    assert result.returncode == 0, result.stderr[-3000:]  # every call failed, and a ratio of 1 allows that
    with (tmp_path / "locust_failures.csv").open(newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert failures and all(row["Method"] == "grpc" and "DEADLINE_EXCEEDED" in row["Error"] for row in failures), \
        failures
    assert sum(int(row["Occurrences"]) for row in failures) >= 2  # 3 s of 0.5 s calls


def test_grpc_users_call_concurrently_and_time_each_call(tmp_path, sample_dir):
    """A gRPC user's call does not hold up the others (grpc runs on gevent's loop): against a server that takes
    0.4 s per call, four users have four calls running at once (one at a time when a call blocks the loop, as
    it does without grpc's gevent mode), and each call is timed at no less than the server took."""
    import threading
    from concurrent import futures

    import grpc

    delay_s, users = 0.4, 4
    lock, running, most = threading.Lock(), [0], [0]

    def slow_predict(request: bytes, context) -> bytes:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(delay_s)
        with lock:
            running[0] -= 1
        context.abort(grpc.StatusCode.INTERNAL, "answered slowly on purpose")

    class Slow(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(slow_predict) if details.method == protocol.PREDICT_METHOD \
                else None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * users))
    server.add_generic_rpc_handlers((Slow(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_locust(tmp_path, "GrpcPredictUser",
                            "--host", f"http://127.0.0.1:{srv.free_port()}", "--grpc-host", f"127.0.0.1:{port}",
                            "--users", str(users), "--spawn-rate", "100", "--run-time", "2s",
                            "--ensemble-weight", "0", "--target-model", "tiny_a",
                            "--photo-folder", str(sample_dir), "--model-repository", str(tmp_path),
                            "--max-fail-ratio", "1")
    finally:
        server.stop(grace=None)
    assert result.returncode == 0, result.stderr[-3000:]  # every call failed, and a ratio of 1 allows that
    assert most[0] == users, (most[0], result.stderr[-2000:])
    row = stats(tmp_path)["grpc Predict tiny_a"]
    assert int(row["Request Count"]) >= users and row["Failure Count"] == row["Request Count"], row
    assert float(row["Min Response Time"]) >= delay_s * 1000, row


def own_master_port() -> list[str]:
    """A free port for a ``--processes`` master and its workers: two such runs at once (``pytest -n 2`` without
    ``--dist loadfile``) would otherwise share locust's default 5557, and one's workers join the other's master."""
    port = str(srv.free_port())
    return ["--master-bind-port", port, "--master-port", port]  # the master binds it, its forked workers dial it


@pytest.mark.slow
def test_distributed_mode_with_forked_workers_aggregates_both_users(tiny_deployment, tmp_path, sample_dir):
    """README's one-machine distributed run (``--processes``): a master and two forked workers; the master's
    options reach the workers, every call of both users is answered and checked, and the master reports the
    total."""
    address = tiny_deployment.address
    result = run_locust(tmp_path, "--processes", "2", *own_master_port(), "--host", address.rest_url,
                        "--grpc-host", address.grpc_target, "--users", "4", "--spawn-rate", "4", "--run-time", "3s", "--target-model", "tiny_a",
                        "--ensemble-weight", "0", "--photo-folder", str(sample_dir),
                        "--model-repository", str(tiny_deployment.repository), "--max-p95-ms", "0", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 workers connected" in result.stderr, result.stderr[-3000:]
    rows = stats(tmp_path)
    for name in ("grpc Predict tiny_a", "POST POST /v1/models/tiny_a:predict"):
        assert int(rows[name]["Request Count"]) > 0 and rows[name]["Failure Count"] == "0", rows[name]


def _processes_of(marker: Path) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(marker) in " ".join(process.info["cmdline"] or []):
                found.append(process)
    return found


@pytest.mark.parametrize("flags,needle", [
    (["--run-time", "0s", "--photo-folder", "PHOTOS"],
     "cannot start the load test: field 'run-time': expected a run time > 0 such as 30s, 2m or 1h30m, received '0s'"),
    (["--run-time", "5s", "--photo-folder", "/no/such/photos"],
     "cannot start the load test: worker "),
])
def test_a_distributed_run_refuses_bad_settings_in_one_line_and_leaves_no_worker(tiny_deployment, tmp_path,
                                                                               sample_dir, flags, needle):
    """``--processes 2``: the master checks what it can (a run time of 0 ran without limit before); a worker that
    cannot read its photos says so in one line and the master ends the run with exit status 2 (before: tracebacks
    from every user for the whole run time, then exit 1). No forked worker outlives the master."""
    address = tiny_deployment.address
    flags = [str(sample_dir) if f == "PHOTOS" else f for f in flags]
    try:
        result = run_locust(tmp_path, "--processes", "2", *own_master_port(), "--host", address.rest_url, "--grpc-host",
                            address.grpc_target, "--users", "2", "--spawn-rate", "2", "--target-model", "tiny_a",
                            "--ensemble-weight", "0", *flags, timeout=90)
    finally:  # whatever happened, no worker of this test may outlive it (they would join the next master)
        deadline = time.monotonic() + 10
        while _processes_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_of(tmp_path)
        for process in left:
            with contextlib.suppress(Exception):
                process.kill()
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "/ERROR/carclf" in line]
    assert errors and all(needle in line for line in errors if "cannot start" in line), errors
    assert any("cannot start the load test" in line for line in errors) and "Traceback" not in output, output[-3000:]
    assert left == [], [p.pid for p in left]


CSV_WRITER_AFTER_CLOSE = """
import sys, tempfile
import gevent
import carclf.loadtest.locustfile  # noqa: F401 - what locust imports first
from locust.env import Environment
from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter

writer = StatsCSVFileWriter(Environment(), PERCENTILES_TO_REPORT, tempfile.mkdtemp() + "/locust")
greenlet = gevent.spawn(writer.stats_writer)
gevent.sleep(0.2)          # it wrote its first pass and sleeps
writer.close_files()       # locust's shutdown
gevent.sleep(1.5)          # a --processes master waiting for its workers
print("writer ended with", repr(greenlet.exception), "dead:", greenlet.dead)
"""


def test_locusts_csv_writer_never_runs_on_its_closed_files():
    """The locust file stops locust's CSV writer greenlet before its files close: a --processes master that
    waited for its workers after closing them printed "I/O operation on closed file" tracebacks."""
    result = subprocess.run([sys.executable, "-c", CSV_WRITER_AFTER_CLOSE], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "writer ended with None dead: True"
    assert "Traceback" not in result.stderr and "closed file" not in result.stderr, result.stderr[-3000:]
