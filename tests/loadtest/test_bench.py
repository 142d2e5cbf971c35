"""``carclf bench --quick`` on the tiny model: every section measured, figures consistent, files written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick_writes_json_table_and_plot(lt_repository, lt_ensemble, tmp_path, sample_dir):
    out = tmp_path / "bench"
    ensemble_args = ["--ensemble-config", str(lt_ensemble)]
    result = subprocess.run(
        [sys.executable, "-m", "carclf", "bench", "--quick", "--duration", "0.6", "--warmup", "0.1", "--batching", "on",
         "--model", "tiny_a", "--model-repository", str(lt_repository), "--photo-folder", str(sample_dir),
         "--out", str(out), "--tensorflow-intra-op-parallelism", "1", *ensemble_args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((out / "bench.json").read_text())

    limit = data["inprocess"]["limit"]
    best = max(data["inprocess"]["batches"], key=lambda r: r["throughput"])
    assert limit["batch_size"] == best["batch_size"] and limit["throughput"] >= best["throughput"] > 0
    assert all(r["errors"] == 0 and r["cpu_ms_per_photo"] > 0 for r in data["inprocess"]["batches"])
    served = data["served"]
    assert {(r["transport"], r["batching"], r["concurrency"]) for r in served} == {
        (t, "on", c) for t in ("grpc", "rest") for c in (1, 2)}
    for row in served:
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert abs(row["throughput_ratio"] - row["throughput"] / limit["throughput"]) < 1e-2
        assert abs(row["added_p50_ms"] - (row["p50_ms"] - limit["p50_batch1_ms"])) < 1e-2
        served_cpu = row["server_cpu_ms_per_photo"] + row["client_cpu_ms_per_photo"]
        assert abs(row["cpu_ratio"] - limit["cpu_ms_per_photo"] / served_cpu) < 1e-2
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]

    sizes = data["payload"]["mean_bytes"]
    assert sizes["jpeg_file"] < sizes["jpeg_grpc"] < sizes["jpeg_file"] + 200  # bytes travel as they are
    assert sizes["jpeg_rest_b64"] > sizes["jpeg_file"] * 4 / 3  # base64 costs a third more
    assert sizes["uint8_grpc"] >= 32 * 32 * 3 and sizes["float_rest_json"] > sizes["uint8_rest_json"]
    assert data["memory"]["server_rss_mb"] > 0 and data["memory"]["per_model_rss_mb"] > 0
    rounds = data["paired"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["errors"] == 0
    assert abs(rounds[0]["grpc_added_p50_ms"] - (rounds[0]["grpc_c1_p50_ms"] - rounds[0]["inprocess_p50_ms"])) < 1e-2
    targets = {t["target"]: t for t in data["targets"]}
    assert set(targets) == {"grpc_c8_ratio", "rest_c8_ratio", "grpc_added_p50_c1_ms", "rest_added_p50_c1_ms",
                            "ensemble_overhead"}
    assert targets["grpc_c8_ratio"]["value"] == data["paired"]["summary"]["on"]["grpc_c8_ratio"]["median"]
    for t in ("grpc", "rest"):  # the latency target's second figure: served and in-process calls taken in turn
        r = rounds[0]
        assert r[f"{t}_interleaved_served_p50_ms"] > 0 and r[f"{t}_interleaved_inprocess_p50_ms"] > 0
        assert abs(r[f"{t}_interleaved_added_p50_ms"]
                   - (r[f"{t}_interleaved_served_p50_ms"] - r[f"{t}_interleaved_inprocess_p50_ms"])) < 1e-2
        assert targets[f"{t}_added_p50_c1_ms"]["second_value"] == r[f"{t}_interleaved_added_p50_ms"]
    assert all(t["verdict"] in ("met", "missed", "inconclusive") for k, t in targets.items() if k != "ensemble_overhead")
    added = rounds[0]["grpc_added_mean_ms"]  # what the client waited beyond the server's TF run time
    assert added is not None and added > 0

    ens = data["ensemble"]
    assert ens["members"] == ["tiny_a", "tiny_b"] and ens["inprocess"]["requests"] > 0
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in ens["served"])
    assert ens["rounds"][0]["errors"] == 0 and targets["ensemble_overhead"]["value"] is not None

    table = (out / "bench.md").read_text()
    for heading in ("## In-process limit", "## Served", "## Ensemble", "## Payload", "## Memory", "## Targets"):
        assert heading in table
    assert data["settings"]["early_dispatch"] is True  # batching on is served as make serve serves it
    assert "early dispatch on" in table and "max_batch_size" in table
    # the same TensorFlow threading on both sides: said in the report, applied in the server
    assert data["settings"]["tf_threads"] == {"intra_op": 1, "inter_op": 0}
    assert "TensorFlow threads, in-process and in the server alike: intra-op 1," in table
    assert "bench: loading tiny_a in-process (TensorFlow threads: intra-op 1," in result.stdout
    server_log = (out / "server_batching_on.log").read_text()
    assert "TensorFlow threads: intra-op 1, inter-op TensorFlow's default" in server_log
    assert "has no effect" not in server_log
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
