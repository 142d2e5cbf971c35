"""``python -m carclf.loadtest.soak``: a short soak end to end (server, locust, RSS sampling, verdict)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_soak(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carclf.loadtest.soak", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_short_soak_runs_end_to_end_and_writes_its_verdict(lt_repository, lt_ensemble, tmp_path, sample_dir):
    """Seconds of load on the ensemble over the tiny models: the server is started with the thread count given,
    requests are made (to the ensemble only, over gRPC and REST) and answered, RSS is sampled, and soak.json /
    soak.md hold the figures. (The growth limit is set out of reach: this checks the mechanics, not the memory of
    a 10-second run.)"""
    reports = tmp_path / "soak"
    result = run_soak("--minutes", "0.2", "--warmup-minutes", "0.05", "--sample-every", "0.5", "--users", "2",
                      "--model-repository", str(lt_repository), "--ensemble-config", str(lt_ensemble),
                      "--photo-folder", str(sample_dir), "--batching-config", "none", "--max-rss-growth", "10",
                      "--tensorflow-intra-op-parallelism", "1", "--reports", str(reports))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((reports / "soak.json").read_text())
    assert figures["passed"] is True and figures["failures"] == 0 and figures["requests"] > 0, figures
    assert figures["memory"]["samples"] >= 4 and figures["memory"]["baseline_mib"] > 0, figures["memory"]
    assert figures["server_exit_status"] == 0  # SIGTERM drained
    assert "TensorFlow threads: intra-op 1," in (reports / "server.log").read_text()
    assert "| RSS growth after warm-up |" in (reports / "soak.md").read_text()
    assert "soak: PASSED" in result.stdout
    with (reports / "locust_stats.csv").open(newline="") as handle:  # the load is on the ensemble only
        called = {row["Name"] for row in csv.DictReader(handle)} - {"Aggregated"}
    assert called == {"Predict car_ensemble", "POST /v1/models/car_ensemble:predict"}, called


@pytest.mark.parametrize("flags,needle", [
    (["--max-rss-growth", "-1"], "field '--max-rss-growth': expected a growth ratio > 0 such as 0.05 (5 %), "
                                 "received -1.0"),
    (["--tensorflow-intra-op-parallelism", "-2"], "field '--tensorflow-intra-op-parallelism': expected a thread "
                                                   "count >= 0"),
])
def test_bad_soak_flags_are_refused_before_a_server_starts(tmp_path, flags, needle):
    result = run_soak("--minutes", "0.5", "--warmup-minutes", "0.1", "--reports", str(tmp_path / "soak"), *flags,
                      timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert needle in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "soak").exists()
