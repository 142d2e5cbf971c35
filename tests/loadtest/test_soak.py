"""``python -m carclf.loadtest.soak``: a short soak end to end (server, locust, RSS sampling, verdict)."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from carclf.errors import ConfigError
from carclf.loadtest.soak import Sample, memory_verdict

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
    assert figures["memory"]["samples"] >= 6 and figures["memory"]["baseline_mib"] > 0, figures["memory"]
    # the clock starts with the load: the samples taken while locust was starting are before 0 and left out
    assert figures["load_clock"] == "locust stats history", figures["load_clock"]
    assert figures["rss_samples"][0][0] < 0 < figures["rss_samples"][-1][0], figures["rss_samples"]
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


MIB = 2**20


def rising(load_s: float, warmup_s: float, every: float = 5.0, base_mib: float = 1000.0,
           mib_per_s: float = 1.0) -> list[Sample]:
    """A leak: RSS flat through the warm-up, then up ``mib_per_s`` every second; a sample every ``every`` s."""
    times = [i * every for i in range(int(load_s // every) + 1)]
    return [Sample(t, int((base_mib + mib_per_s * max(0.0, t - warmup_s)) * MIB)) for t in times]


def test_a_short_soak_with_a_leak_is_measured_between_windows_that_do_not_overlap():
    """--minutes 1.75 --warmup-minutes 0.25, RSS up 1 MiB/s after warm-up (9 % in all): the two 60 s windows
    overlapped and the verdict read 3.2 %, a PASS under the 5 % limit. The 90 s after warm-up now hold two
    windows of a quarter of that span each (22.5 s: 5 samples at 5 s), 45 s apart."""
    samples = rising(105, 15)
    verdict = memory_verdict(samples, 15)
    by_time = {s.seconds: s.rss_bytes for s in samples}
    first = [by_time[t] for t in (15, 20, 25, 30, 35)]      # chosen by hand: [15 s, 37.5 s)
    last = [by_time[t] for t in (85, 90, 95, 100, 105)]     # (82.5 s, 105 s]
    baseline, final = statistics.median(first), statistics.median(last)
    assert verdict.baseline_mib == pytest.approx(baseline / MIB) == pytest.approx(1010)
    assert verdict.final_mib == pytest.approx(final / MIB) == pytest.approx(1080)
    assert verdict.growth == pytest.approx(final / baseline - 1)
    assert verdict.growth > 0.05  # over the default --max-rss-growth: the leak fails the soak
    assert verdict.samples == 19


@pytest.mark.parametrize("load_s,warmup_s", [(60, 15), (75, 15), (105, 15), (135, 15), (120, 30), (150, 0)])
def test_on_runs_under_two_minutes_after_warm_up_the_windows_still_see_the_rise(load_s, warmup_s):
    """Under 60 s after warm-up both windows were the same samples (growth 0 by construction); under 120 s they
    overlapped. Each window's median must come from samples that all precede the other's, and a steady rise
    must show as most of itself."""
    samples = rising(load_s, warmup_s)
    verdict = memory_verdict(samples, warmup_s)
    steady = [s.rss_bytes / MIB for s in samples if s.seconds >= warmup_s]
    real = steady[-1] / steady[0] - 1
    assert verdict.baseline_mib < verdict.final_mib
    prefix = next(k for k in range(1, len(steady)) if statistics.median(steady[:k]) == verdict.baseline_mib)
    suffix = next(k for k in range(1, len(steady)) if statistics.median(steady[-k:]) == verdict.final_mib)
    assert prefix + suffix <= len(steady), (prefix, suffix, len(steady))  # disjoint windows
    assert 0.7 * real <= verdict.growth <= real, (verdict.growth, real)


def test_a_ten_minute_soak_still_compares_its_first_and_last_minute():
    samples = rising(600, 120)
    verdict = memory_verdict(samples, 120)
    steady = [s.rss_bytes for s in samples if s.seconds >= 120]
    assert verdict.baseline_mib == pytest.approx(statistics.median(steady[:12]) / MIB)  # 120 .. 175 s
    assert verdict.final_mib == pytest.approx(statistics.median(steady[-12:]) / MIB)   # 545 .. 600 s


def test_a_window_shorter_than_two_samples_takes_two_and_never_the_other_windows():
    """20 s after warm-up, a sample every 5 s: 5 s windows would hold one sample each; they take two, and the
    middle sample is in neither (the old windows were all 5 samples both times: growth 0)."""
    samples = rising(35, 15)
    verdict = memory_verdict(samples, 15)
    assert (verdict.baseline_mib, verdict.final_mib) == (pytest.approx(1002.5), pytest.approx(1017.5))
    assert verdict.growth == pytest.approx(1017.5 / 1002.5 - 1)


@pytest.mark.parametrize("samples,warmup_s,needle", [
    (rising(25, 15), 15, "only 3 memory samples after warm-up"),
    ([Sample(t, (1000 + t) * MIB) for t in (0, 1, 2, 3, 4, 5, 40)], 0, "too unevenly spaced"),
], ids=["too-few-samples", "sampler-stalled"])
def test_too_few_samples_for_two_windows_after_warm_up_give_no_memory_verdict(samples, warmup_s, needle):
    """Two windows of 2 samples that share none: with a sample every second and then one after 35 s, the last
    window (one sample, 40 s) would need the 5 s one that the first holds. The old code gave a verdict (growth
    0) from windows that both held all 7 samples."""
    with pytest.raises(ConfigError, match=f"^field '--minutes': .*{needle}.*run longer or sample more often"):
        memory_verdict(samples, warmup_s)


def test_the_load_starts_when_locusts_stats_history_first_shows_users(tmp_path):
    """The sampler starts before locust, whose start-up takes seconds with no load: the samples are timed from
    the first second locust's stats history shows users."""
    from carclf.loadtest.soak import load_started_at

    prefix = str(tmp_path / "locust")
    assert load_started_at(prefix) is None  # no history: the caller keeps its own clock
    head = "Timestamp,User Count,Type,Name,Requests/s,Failures/s,Total Request Count\n"
    rows = ["1700000000,0,,Aggregated,0,0,0", "1700000001,0,,Aggregated,0,0,0", "1700000002,1,GRPC,Predict m,1,0,1",
            "1700000002,2,,Aggregated,0.5,0,1", "1700000003,2,,Aggregated,3,0,4"]
    Path(prefix + "_stats_history.csv").write_text(head + "\n".join(rows) + "\n")
    assert load_started_at(prefix) == 1700000002.0
    Path(prefix + "_stats_history.csv").write_text(head + rows[0] + "\n")
    assert load_started_at(prefix) is None
