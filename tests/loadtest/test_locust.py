"""Short headless locust runs through ``python -m carclf.loadtest.run`` (what ``make loadtest`` runs)."""

from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from carclf.loadtest import server as srv

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_loadtest(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carclf.loadtest.run", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def stats(reports: Path) -> dict[str, dict[str, str]]:
    with (reports / "locust_stats.csv").open(newline="") as handle:
        return {f"{row['Type']} {row['Name']}".strip(): row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_both_users_backbone_and_ensemble_pass_with_zero_failures(tiny_deployment, tmp_path, sample_dir):
    address, reports = tiny_deployment.address, tmp_path / "reports"
    ensemble_weight = "1" if tiny_deployment.ensemble_config else "0"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target, "--no-start",
                          "--users", "4", "--spawn-rate", "4", "--run-time", "3s",
                          "--target-model", "tiny_a", "--ensemble-model", "car_ensemble",
                          "--ensemble-weight", ensemble_weight, "--backbone-weight", "1",
                          "--photo-folder", str(sample_dir), "--model-repository", str(tiny_deployment.repository),
                          "--max-p95-ms", "0", "--reports", str(reports))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = stats(reports)
    expected = {"grpc Predict tiny_a", "POST POST /v1/models/tiny_a:predict"}
    if tiny_deployment.ensemble_config:
        expected |= {"grpc Predict car_ensemble", "POST POST /v1/models/car_ensemble:predict"}
    assert expected <= set(rows), sorted(rows)
    for name in expected:
        assert int(rows[name]["Request Count"]) > 0 and rows[name]["Failure Count"] == "0", rows[name]
    assert (reports / "locust.html").stat().st_size > 10_000
    # the CSV holds the final counts, the same as locust's printed table (not a snapshot up to 1 s older)
    printed = re.search(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(", result.stdout + result.stderr, re.M)
    assert printed is not None, result.stderr[-3000:]
    assert (rows["Aggregated"]["Request Count"], rows["Aggregated"]["Failure Count"]) == printed.groups()
    assert json.loads((reports / "run.json").read_text())["started_server"] is False
    if tiny_deployment.ensemble_skip:
        pytest.skip(f"backbone tasks passed; ensemble tasks not run: {tiny_deployment.ensemble_skip}")


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
    common = ("--host", address.rest_url, "--grpc-host", address.grpc_target, "--photo-folder", str(sample_dir),
              "--model-repository", str(lt_repository), "--reports", str(tmp_path / "reports"))
    result = run_loadtest(*common, "--target-model", "no_such_model", "--ensemble-weight", "0", timeout=60)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    held = ", ".join(srv.repository_models(lt_repository))
    assert result.stderr.strip().splitlines()[-1] == (
        f"loadtest: error: field 'target-model': target-model 'no_such_model' is not in the model repository "
        f"'{lt_repository}' (it holds {held}); give --target-model NAME (or LOCUST_TARGET_MODEL=NAME)")
    assert "starting the embedded server" not in result.stdout
    assert not (tmp_path / "reports" / "locust_stats.csv").exists()

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


def test_a_running_server_without_the_model_stops_before_any_request(tiny_deployment, tmp_path, sample_dir):
    address, reports = tiny_deployment.address, tmp_path / "reports"
    result = run_loadtest("--host", address.rest_url, "--grpc-host", address.grpc_target,
                          "--target-model", "no_such_model", "--ensemble-weight", "0",
                          "--photo-folder", str(sample_dir), "--reports", str(reports), timeout=60)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    served = ", ".join(sorted(["tiny_a", "tiny_b", *(["car_ensemble"] if tiny_deployment.ensemble_config else [])]))
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
    result = subprocess.run([sys.executable, "-m", "locust", "--config", str(REPO_ROOT / "loadtest" / "locust.conf"),
                             "--host", f"http://127.0.0.1:{port}", "--grpc-host", f"127.0.0.1:{port}",
                             "--csv", str(tmp_path / "locust"), "--html", str(tmp_path / "locust.html"), *flags],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "/ERROR/" in line]
    assert len(errors) == 1 and "cannot start the load test: " in errors[0] and errors[0].endswith(needle), \
        output[-3000:]
    assert "Traceback" not in output
    # no report of a run that never was: locust opens its CSV files at start, and they stay empty
    assert [f.name for f in tmp_path.iterdir() if f.stat().st_size or f.suffix != ".csv"] == []
