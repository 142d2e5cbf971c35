"""Pure parts of the load tests: pass/fail rules, answer checks, wire formats, settings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from carclf import contract
from carclf.errors import ConfigError
from carclf.loadtest import bench, checks, loadgen, protocol, run, thresholds
from carclf.loadtest.photos import load_photos


def test_thresholds_fail_on_any_failure_slow_p95_or_no_request():
    assert thresholds.violations(100, 0, 50.0, max_p95_ms=100) == []
    assert "failure ratio" in thresholds.violations(100, 1, 50.0)[0]
    assert thresholds.violations(100, 1, 50.0, max_fail_ratio=0.05) == []
    assert "p95" in thresholds.violations(100, 0, 150.0, max_p95_ms=100)[0]
    assert thresholds.violations(100, 0, 150.0, max_p95_ms=0) == []  # 0 turns the latency check off
    assert thresholds.violations(0, 0, None) == ["no request was made"]


@pytest.fixture(scope="module")
def tiny_answer(tiny_repository_template, photos):
    """A real answer of the tiny model, computed in-process, and its labels."""
    from carclf.loadtest.inprocess import LoadedModel

    model = LoadedModel.load(tiny_repository_template, "tiny_a")
    inputs = protocol.photo_inputs(contract.SIGNATURE_BYTES, photos[0].read_bytes())
    return model.predict(contract.SIGNATURE_BYTES, inputs), model.labels


def test_pixels_payload_is_prepared_as_the_models_card_says(tmp_path, sample_dir):
    """The bench's uint8 payload for ``serving_pixels`` follows the model's resize mode, so a letterbox model
    answers it as it answers the JPEG itself."""
    from carclf.loadtest import payload
    from carclf.loadtest.inprocess import LoadedModel
    from tests.fixtures import export_tiny

    export_tiny(tmp_path, "boxed", seed=4, resize="letterbox")
    model = LoadedModel.load(tmp_path, "boxed")
    assert model.resize == "letterbox"
    photo = next(p for p in sorted(sample_dir.rglob("*.jpg")) if _aspect(p) > 1.3).read_bytes()  # a wide photo
    from_jpeg = model.predict(contract.SIGNATURE_BYTES, protocol.photo_inputs(contract.SIGNATURE_BYTES, photo))
    pixels = payload.prepared_pixels(photo, model.size, model.resize)
    from_pixels = model.predict(contract.SIGNATURE_PIXELS, {contract.INPUT_PIXELS: pixels})
    np.testing.assert_allclose(from_pixels[contract.OUTPUT_PROBABILITIES],
                               from_jpeg[contract.OUTPUT_PROBABILITIES], atol=1e-5)
    squashed = payload.prepared_pixels(photo, model.size)
    assert squashed.shape == pixels.shape and not np.array_equal(squashed, pixels)
    sizes = payload.payload_table("boxed", [photo], model.size, model.resize)
    assert sizes["mean_bytes"]["uint8_grpc"] > pixels.size  # the pixels themselves plus the request around them


def _aspect(path) -> float:
    from PIL import Image

    with Image.open(path) as image:
        return image.width / image.height


def test_check_prediction_accepts_a_real_answer_and_rejects_wrong_ones(tiny_answer):
    outputs, labels = tiny_answer
    checks.check_prediction(outputs, labels)

    def broken(**changes):
        return {**outputs, **changes}

    probs = outputs[contract.OUTPUT_PROBABILITIES]
    best = int(probs[0].argmax())
    other = labels[(best + 1) % len(labels)]
    cases = {
        "sum": broken(probabilities=probs * 0.5),
        "negative": broken(probabilities=np.concatenate([probs[:, :1] * 0 - 0.5, probs[:, 1:] + 0.5 / 9], 1)),
        "unknown label": broken(label=np.array([b"Lada Priora"], dtype=object)),
        "not the arg-max": broken(label=np.array([other.encode()], dtype=object)),
        "class_id": broken(class_id=np.array([(best + 1) % len(labels)])),
        "missing label": {contract.OUTPUT_PROBABILITIES: probs},
        "batch": broken(probabilities=np.concatenate([probs, probs])),
    }
    out_of_range = np.zeros_like(probs)  # sums to 1, arg-max unchanged, yet no probability distribution
    out_of_range[0, best], out_of_range[0, (best + 1) % len(labels)] = 1.4, -0.4
    with pytest.raises(checks.BadPrediction, match=r"outside \[0, 1\]: min -0.4, max 1.4"):
        checks.check_prediction(broken(probabilities=out_of_range), labels)
    for name, bad in cases.items():
        if name == "not the arg-max" and probs[0].max() - probs[0, labels.index(other)] <= checks.PROBABILITY_TOLERANCE:
            continue  # a tie cannot be told apart
        with pytest.raises(checks.BadPrediction):
            checks.check_prediction(bad, labels)
    checks.check_prediction(outputs, None)  # without labels: consistency checks only


def test_rest_body_and_answers_round_trip(photos):
    data = photos[0].read_bytes()
    body = json.loads(protocol.rest_body(contract.SIGNATURE_BYTES, protocol.photo_inputs(contract.SIGNATURE_BYTES,
                                                                                          data)))
    assert body["signature_name"] == contract.SIGNATURE_BYTES
    import base64

    assert base64.b64decode(body["instances"][0][contract.INPUT_IMAGE_BYTES]["b64"]) == data
    rows = {"predictions": [{"probabilities": [0.25, 0.75], "class_id": 1, "label": "b"}]}
    out = protocol.rest_outputs(rows)
    assert out["probabilities"].shape == (1, 2) and out["label"][0] == "b"
    cols = protocol.rest_outputs({"outputs": {"probabilities": [[0.25, 0.75]], "label": ["b"]}})
    assert cols["probabilities"].shape == (1, 2)
    request = protocol.grpc_request("m", contract.SIGNATURE_BYTES, protocol.photo_inputs(contract.SIGNATURE_BYTES, data))
    assert request.model_spec.name == "m" and request.inputs[contract.INPUT_IMAGE_BYTES].string_val[0] == data
    with pytest.raises(Exception, match="signature"):
        protocol.signature_input("nope")


def test_photos_and_labels_errors_name_the_problem(tmp_path, sample_dir, labels):
    with pytest.raises(ConfigError, match="photo_folder"):
        load_photos(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no .jpg"):
        load_photos(tmp_path)
    assert len(load_photos(sample_dir, limit=3)) == 3
    assert checks.read_labels(sample_dir / "classes.json") == labels


def test_run_settings_flags_over_env_over_conf(tmp_path, monkeypatch):
    conf = tmp_path / "locust.conf"
    conf.write_text("users = 8\nhost = http://127.0.0.1:8501\ngrpc-host = 127.0.0.1:8500  # gRPC\n"
                    "target-model = a\n")
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    monkeypatch.setenv("LOCUST_TARGET_MODEL", "from_env")
    settings = run.resolve(parser.parse_args(["--config", str(conf), "--users", "3"]))
    assert settings["users"] == "3" and settings["target-model"] == "from_env"
    assert run.server_address(settings) == run.srv.ServerAddress("127.0.0.1", 8500, 8501)
    # The locustfile's own options are flags of run.py too (so `make loadtest ARGS=...` takes them).
    args = parser.parse_args(["--config", str(conf), "--think-time", "0.5", "--max-fail-ratio", "0.01",
                              "--request-timeout", "9", "--ensemble-grpc-host", "gw:8600"])
    command = " ".join(run.locust_command(args, run.resolve(args)))
    for flag in ("--think-time 0.5", "--max-fail-ratio 0.01", "--request-timeout 9.0", "--ensemble-grpc-host gw:8600"):
        assert flag in command, command
    conf.write_text("users 8\n")
    with pytest.raises(ConfigError, match="locust.conf:1"):
        run.resolve(parser.parse_args(["--config", str(conf)]))


def test_bench_settings_are_validated():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    quick = bench.settings_from(parser.parse_args(["--quick"]))
    assert quick["duration_s"] < 2 and quick["concurrency"] == [1, 2]
    full = bench.settings_from(parser.parse_args(["--concurrency", "1,8"]))
    assert full["concurrency"] == [1, 8] and full["batch_sizes"] == [1, 2, 4, 8, 16, 32]
    for bad in (["--concurrency", "0"], ["--concurrency", "a"], ["--batching", "maybe"], ["--duration", "0"]):
        with pytest.raises(ConfigError):
            bench.settings_from(parser.parse_args(bad))
    assert full["tf_threads"] == {"intra_op": 0, "inter_op": 0}  # TensorFlow's default unless told
    threads = bench.settings_from(parser.parse_args(["--tensorflow-intra-op-parallelism", "1"]))["tf_threads"]
    assert threads == {"intra_op": 1, "inter_op": 0}


def test_verdicts_need_both_figures_to_agree():
    from carclf.loadtest.report import _verdict_of

    assert _verdict_of(0.95, 0.92, 0.9, higher=True) == "met"
    assert _verdict_of(0.85, 0.80, 0.9, higher=True) == "missed"
    assert _verdict_of(0.95, 0.85, 0.9, higher=True) == "inconclusive"
    assert _verdict_of(1.5, None, 2.0, higher=False) == "met"
    assert _verdict_of(0.10, 0.05, 0.10, higher=False, strict=True) == "inconclusive"
    assert _verdict_of(None, None, 2.0, higher=False) == "not measured"


def test_rounds_summary_and_metrics_breakdown():
    rounds = [{"round": 1, "batching": "on", "x": 1.0}, {"round": 2, "batching": "on", "x": 3.0},
              {"round": 3, "batching": "on", "x": 2.0}]
    assert bench.summarize_rounds(rounds, "batching")["on"]["x"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    from carclf.loadtest import metrics

    def scrape(requests: int, latency_us: float, runtime_us: float) -> dict:
        text = (f':tensorflow:serving:request_latency_count{{API="Predict",entrypoint="GRPC",model_name="m"}} {requests}\n'
                f':tensorflow:serving:request_latency_sum{{API="Predict",entrypoint="GRPC",model_name="m"}} {latency_us}\n'
                f':tensorflow:serving:runtime_latency_count{{API="Predict",model_name="m",runtime="TF2"}} {requests}\n'
                f':tensorflow:serving:runtime_latency_sum{{API="Predict",model_name="m",runtime="TF2"}} {runtime_us}\n'
                "# HELP ignored\n")
        return metrics.parse(text)

    parts = metrics.breakdown(scrape(10, 1000.0, 800.0), scrape(20, 61000.0, 50800.0), "m", "GRPC")
    assert parts == {"server_ms": 6.0, "queue_ms": 0.0, "runtime_ms_per_batch": 5.0, "mean_batch": 1.0,
                     "server_other_ms": 1.0}
    assert metrics.with_outside({"mean_ms": 7.5}, parts)["outside_ms"] == 1.5
    assert metrics.breakdown(scrape(10, 1, 1), scrape(10, 1, 1), "m", "GRPC") is None


def test_closed_loop_times_the_call_not_the_check_and_counts_wrong_answers():
    """A request's latency stops when its answer is in; the check runs after the clock stops, and a check that
    fails counts as a failed request."""
    import time

    def factory(_index: int):
        def send(i: int):
            time.sleep(0.002)

            def check() -> None:
                time.sleep(0.25)  # far longer than any call: it must not show in the latencies
                if i % 2:
                    raise checks.BadPrediction(f"answer {i} is wrong")

            return check

        return send, lambda: None

    result = loadgen.closed_loop(factory, 1, duration_s=1.2, warmup_s=0.0)
    assert result.latencies_ms and max(result.latencies_ms) < 250
    assert result.errors >= 1 and "is wrong" in result.first_error
    assert abs(result.errors - len(result.latencies_ms)) <= 2  # every other answer fails its check


def test_the_window_callbacks_leave_the_priming_calls_out_and_come_after_the_last_call():
    """Server-side figures are read at on_window("start") and ("end"): every worker's priming call (a cold
    first call, slower than the rest) is over by the start, and every measured call has returned by the end.
    Read before the loop instead, a bench with --warmup 0 counted the cold calls on the server side only and
    showed more time inside the server than the client saw."""
    import threading
    import time

    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    def factory(index: int):
        def send(i: int):
            time.sleep(0.05 if i < 0 else 0.005)  # the priming call is the slow one
            with lock:
                events.append(("prime" if i < 0 else "call", time.perf_counter()))

        return send, lambda: None

    def on_window(edge: str) -> None:
        with lock:
            events.append((edge, time.perf_counter()))

    result = loadgen.closed_loop(factory, 2, duration_s=0.3, warmup_s=0.0, on_window=on_window)
    order = [name for name, _ in events]
    start, end = order.index("start"), order.index("end")
    assert order.count("prime") == 2 and all(name == "prime" for name in order[:2]) and start == 2
    assert end == len(order) - 1 and order.count("start") == order.count("end") == 1
    assert len(result.latencies_ms) >= 10 and max(result.latencies_ms) < 50  # no cold call among them


def test_alternating_takes_the_senders_in_turn_and_times_each_call_alone():
    """Calls go a, b, a, b, ... one at a time; each sender's latencies are its own calls (the check off the
    clock), so a sender that is slower by a known amount shows exactly that excess at p50."""
    import time

    order: list[str] = []

    def sender(name: str, seconds: float, fail_every: int = 0):
        def send(i: int):
            order.append(name)
            time.sleep(seconds)
            if fail_every and i % fail_every == fail_every - 1:
                raise checks.BadPrediction(f"{name} call {i} failed")
            return lambda: time.sleep(0.05)  # a slow check must not count

        return send

    fast, slow = loadgen.alternating([sender("a", 0.001), sender("b", 0.011, fail_every=4)], duration_s=1.0,
                                     warmup_s=0.1)
    assert order[:6] == ["a", "b"] * 3 and len(order) % 2 == 0
    assert fast.errors == 0 and slow.errors >= 1 and "call 3 failed" in slow.first_error
    assert fast.requests >= slow.requests > 0 and max(fast.latencies_ms) < 50
    assert slow.percentile(50) - fast.percentile(50) >= 9.0  # the 10 ms of extra sleep, no check time added


# --- Setup errors: one line naming the flag and value, exit 2, nothing started, nothing written ----------------

def _no_start(monkeypatch) -> None:
    """Any attempt to reach or start a server, or to run locust, fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a server or locust was started")

    from carclf.loadtest import soak

    monkeypatch.setattr(run, "start_server", refuse)
    monkeypatch.setattr(run.srv, "model_state", refuse)
    monkeypatch.setattr(run.srv, "call_child", refuse)
    monkeypatch.setattr(soak.loadtest_run, "start_server", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("flags", "expected"), [
    (["--run-time", "0s"], "field 'run-time': expected a run time > 0 such as 30s, 2m or 1h30m, received '0s' "
                           "(from --run-time)"),
    (["--run-time", "0"], "received '0' (from --run-time)"),
    (["--run-time", "soon"], "field 'run-time'"),
    (["--users", "0"], "field 'users': expected an integer >= 1, received '0' (from --users)"),
    (["--users", "-1"], "received '-1' (from --users)"),
    (["--request-timeout", "0"], "field 'request-timeout': expected seconds > 0, received '0.0'"),
    (["--think-time", "-1"], "field 'think-time': expected seconds >= 0, received '-1.0'"),
    (["--max-fail-ratio", "-1"], "field 'max-fail-ratio': expected a ratio in [0, 1], received '-1.0'"),
    (["--max-fail-ratio", "1.5"], "field 'max-fail-ratio'"),
    (["--photo-folder", "/no/such/photos"], "photo folder does not exist, received '/no/such/photos'"),
    (["--labels-file", "/no/such/labels.txt"], "labels file does not exist, received '/no/such/labels.txt'"),
    (["--photo-folder", "{tmp}/locust.conf"], "photo folder is a file, not a folder, received '{tmp}/locust.conf'"),
    (["--labels-file", "{tmp}"], "labels file is a folder, not a file, received '{tmp}'"),
    (["--config", "{tmp}"], "locust config file is a folder, not a file, received '{tmp}'"),
    (["--signature", "serving_jpeg"], "signature must be one of ['serving_default', 'serving_pixels'], "
                                      "received 'serving_jpeg'"),
    (["--tensorflow-intra-op-parallelism", "-1"], "field '--tensorflow-intra-op-parallelism': expected a thread "
                                                  "count >= 0 (0: TensorFlow's default), received -1"),
])
def test_loadtest_run_refuses_bad_settings_before_anything_starts(flags, expected, tmp_path, sample_dir,
                                                                 monkeypatch, capsys):
    _no_start(monkeypatch)
    reports = tmp_path / "reports"
    (tmp_path / "locust.conf").write_text("users = 1\n")
    flags, expected = [f.replace("{tmp}", str(tmp_path)) for f in flags], expected.replace("{tmp}", str(tmp_path))
    args = ["--photo-folder", str(sample_dir), "--reports", str(reports), *flags]
    assert run.main(args) == 2
    line = _one_line(capsys)
    assert line.startswith("loadtest: error: ") and expected in line, line
    assert not reports.exists()


def test_loadtest_run_names_a_bad_setting_from_the_environment(tmp_path, sample_dir, monkeypatch, capsys):
    _no_start(monkeypatch)
    monkeypatch.setenv("LOCUST_BACKBONE_WEIGHT", "abc")
    assert run.main(["--photo-folder", str(sample_dir), "--reports", str(tmp_path / "r")]) == 2
    assert _one_line(capsys) == ("loadtest: error: field 'backbone-weight': expected an integer >= 0, received "
                                 "'abc' (from LOCUST_BACKBONE_WEIGHT)")
    conf = tmp_path / "locust.conf"
    conf.write_text("users = many\n")
    monkeypatch.delenv("LOCUST_BACKBONE_WEIGHT")
    monkeypatch.delenv("LOCUST_USERS", raising=False)
    assert run.main(["--config", str(conf), "--photo-folder", str(sample_dir), "--reports", str(tmp_path / "r")]) == 2
    assert f"received 'many' (from {conf})" in _one_line(capsys)
    assert not (tmp_path / "r").exists()


def test_loadtest_run_refuses_reports_at_or_under_a_file(tmp_path, sample_dir, monkeypatch, capsys):
    _no_start(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for reports in (blocker, blocker / "reports"):
        assert run.main(["--photo-folder", str(sample_dir), "--reports", str(reports)]) == 2
        line = _one_line(capsys)
        assert line.startswith(f"loadtest: error: field '--reports': cannot create the reports folder '{reports}'")


def test_loadtest_run_accepts_the_shipped_settings():
    run.check_settings({**run.read_conf(run.DEFAULT_CONF), "photo-folder": str(run.HERE.parent / "data" / "sample")})


def test_locust_run_times_parse_as_locust_reads_them():
    from carclf.loadtest.options import timespan_s

    assert [timespan_s(t) for t in ("90", "30s", "2m", "1h30m", "0s", "", "2x", "-5")] == [
        90, 30, 120, 5400, 0, None, None, None]


def test_a_bad_classes_json_is_a_config_error(tmp_path):
    bad = tmp_path / "classes.json"
    bad.write_text('{"1": "a"}')
    with pytest.raises(ConfigError, match="labels_file.*classes.json"):
        checks.read_labels(bad)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--minutes", "0"], "field '--minutes': expected at least 1/60 (one second), received 0.0"),
    (["--minutes", "-1"], "field '--minutes'"),
    (["--minutes", "0.1"], "field '--minutes': expected more than --warmup-minutes 2.0, received 0.1"),
    (["--minutes", "1", "--warmup-minutes", "-1"], "field '--warmup-minutes': expected minutes >= 0, received -1.0"),
    (["--users", "0"], "field '--users': expected an integer >= 1, received 0"),
    (["--sample-every", "0"], "field '--sample-every': expected seconds > 0, received 0.0"),
    (["--sample-every", "-5"], "field '--sample-every'"),
    (["--max-rss-growth", "0"], "field '--max-rss-growth': expected a growth ratio > 0 such as 0.05 (5 %), "
                                "received 0.0"),
    (["--minutes", "3", "--photo-folder", "/no/such/photos"], "received '/no/such/photos'"),
])
def test_soak_refuses_bad_arguments_before_the_server_starts(flags, expected, tmp_path, monkeypatch, capsys):
    from carclf.loadtest import soak

    _no_start(monkeypatch)
    reports = tmp_path / "soak"
    config = run.HERE.parent / "ensemble" / "car_ensemble" / "config.pbtxt"
    assert soak.main(["--reports", str(reports), "--ensemble-config", str(config), *flags]) == 2
    line = _one_line(capsys)
    assert line.startswith("soak: error: ") and expected in line, line
    assert not reports.exists()


def _soak_with_fakes(monkeypatch, tmp_path: Path, sample_dir: Path, flags: list[str], *, locust_status: int = 0,
                     samples_before_locust: int = 0) -> tuple[int, Path]:
    """soak.main over a stand-in server (a steady 100 MiB) and a stand-in locust (42 requests, none failed,
    exiting ``locust_status`` once the server's memory was read ``samples_before_locust`` times): (exit, reports)."""
    import threading

    from carclf.loadtest import soak

    sampled = threading.Event()
    if not samples_before_locust:
        sampled.set()

    class FakeServer:
        calls = 0

        def rss_bytes(self) -> int:
            FakeServer.calls += 1
            if FakeServer.calls >= samples_before_locust:
                sampled.set()
            return 100 * 2**20

        def stop(self) -> int:
            return 0

    def locust(command):
        assert sampled.wait(60), "the server's memory was not sampled"
        prefix = command[command.index("--csv") + 1]
        Path(prefix + "_stats.csv").write_text("Type,Name,Request Count,Failure Count,Requests/s,50%,95%,99%\n"
                                               ",Aggregated,42,0,7.0,10,20,30\n")
        return locust_status

    def models_config(path, *_args):
        Path(path).write_text("")
        return Path(path)

    monkeypatch.setattr(soak.loadtest_run, "start_server", lambda *_a: FakeServer())
    monkeypatch.setattr(soak.srv, "call_child", locust)
    monkeypatch.setattr(soak.srv, "write_models_config", models_config)
    reports = tmp_path / "soak"
    config = run.HERE.parent / "ensemble" / "car_ensemble" / "config.pbtxt"
    return soak.main([*flags, "--reports", str(reports), "--ensemble-config", str(config),
                      "--photo-folder", str(sample_dir)]), reports


def test_soak_writes_its_figures_when_no_memory_verdict_can_be_made(tmp_path, sample_dir, monkeypatch, capsys):
    """Too few RSS samples after warm-up: soak.json still holds the request counts and says why it failed."""
    code, reports = _soak_with_fakes(monkeypatch, tmp_path, sample_dir,
                                     ["--minutes", "1", "--warmup-minutes", "0.5", "--sample-every", "60"])
    assert code == 1
    data = json.loads((reports / "soak.json").read_text())
    assert data["requests"] == 42 and data["failures"] == 0 and data["memory"] is None and not data["passed"]
    assert data["no_verdict"].startswith("no memory verdict") and "only 0 memory samples" in data["no_verdict"]
    assert data["no_verdict"] in (reports / "soak.md").read_text()
    assert "soak: FAILED (no memory verdict" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "expected"), [
    (["--max-requests", "0"], "field '--max-requests': expected a count >= 1, received 0"),
    (["--photo-limit", "-1"], "field '--photo-limit': expected a count >= 0 (0: all), received -1"),
    (["--payload-photos", "-1"], "field '--payload-photos': expected a count >= 1, received -1"),
    (["--duration", "0"], "field '--duration': expected seconds > 0, received 0.0"),
    (["--warmup", "-1"], "field '--warmup': expected seconds >= 0, received -1.0"),
    (["--pair-duration", "0"], "field '--pair-duration': expected seconds > 0, received 0.0"),
    (["--pair-warmup", "-1"], "field '--pair-warmup': expected seconds >= 0, received -1.0"),
    (["--ensemble-config", "/nonexist.pbtxt"], "field '--ensemble-config': expected an existing file, "
                                               "received '/nonexist.pbtxt'"),
    (["--batching-config", "/nonexist.config"], "field '--batching-config': expected an existing file"),
    (["--transports", "quic"], "field '--transports': expected a comma-separated subset of ['grpc', 'rest'], "
                               "received 'quic'"),
    (["--transports", ""], "field '--transports'"),
    (["--tensorflow-intra-op-parallelism", "-1"],
     "field '--tensorflow-intra-op-parallelism': expected a thread count >= 0 (0: TensorFlow's default), received -1"),
    (["--tensorflow-inter-op-parallelism", "-2"], "field '--tensorflow-inter-op-parallelism'"),
])
def test_bench_refuses_bad_flags_before_any_measurement(flags, expected, tmp_path, capsys):
    from carclf import cli

    out = tmp_path / "bench"
    assert cli.main(["bench", "--out", str(out), *flags]) == 2
    line = _one_line(capsys)
    assert line.startswith("carclf bench: error: ") and expected in line, line
    assert not out.exists()


def test_bench_refuses_a_photo_the_model_cannot_decode_before_measuring(tmp_path, sample_dir, capsys):
    """A benchmark of error answers measures nothing (and its payload step used to end in a TensorFlow
    traceback after minutes of measuring): the photo is named before the model loads or --out is made."""
    from carclf import cli

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(sample_dir.rglob("*.jpg"))[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    (photos / "notes.jpg").write_text("not a photo")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--out", str(out), "--photo-folder", str(photos), "--no-ensemble",
                     "--model-repository", str(tmp_path / "no_repository")]) == 2
    line = _one_line(capsys)
    assert line.startswith("carclf bench: error: field '--photo-folder': photo 'notes.jpg' under ") and \
        "remove it or give --photo-folder of good ones" in line, line
    assert not out.exists()


def test_bench_refuses_a_named_ensemble_config_it_cannot_measure(tmp_path, sample_dir):
    """A config named with --ensemble-config must be measured: one that does not load is refused before the
    model loads; the default one is skipped quietly when absent."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    broken = tmp_path / "config.pbtxt"
    broken.write_text("this is not a config")
    out = tmp_path / "bench"
    args = parser.parse_args(["--ensemble-config", str(broken), "--photo-folder", str(sample_dir), "--out", str(out)])
    with pytest.raises(ConfigError, match="--ensemble-config"):
        bench.Bench(args)
    assert not out.exists()
    assert bench.settings_from(parser.parse_args([]))["ensemble_config"] == bench.DEFAULT_ENSEMBLE_CONFIG
    _, skip = bench.load_ensemble({"ensemble_model": "car_ensemble", "ensemble_config": str(tmp_path / "none")},
                                  tmp_path)
    assert "does not exist" in skip


def test_bench_refuses_threads_it_cannot_give_its_in_process_side(tmp_path, sample_dir):
    """TensorFlow's thread counts are fixed once it runs; a bench whose in-process calls would run with other
    counts than its server is refused before anything is written, naming the flag."""
    import tensorflow as tf

    float(tf.reduce_sum(tf.ones(2)))  # TensorFlow runs in this process from here on
    running = tf.config.threading.get_intra_op_parallelism_threads()
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args(["--tensorflow-intra-op-parallelism", str(running + 3), "--no-ensemble",
                              "--photo-folder", str(sample_dir), "--out", str(out)])
    with pytest.raises(ConfigError, match="field '--tensorflow-intra-op-parallelism': TensorFlow already runs"):
        bench.Bench(args)
    assert not out.exists()
    assert tf.config.threading.get_intra_op_parallelism_threads() == running


def test_bench_plot_leaves_out_points_without_figures(tmp_path):
    from carclf.loadtest import report

    served = [{"transport": "grpc", "batching": "on", "concurrency": c, "throughput": t, "p95_ms": p}
              for c, t, p in ((1, 0.0, None), (2, 5.0, 12.0))]
    result = {"served": served, "settings": {"model": "m"}, "environment": {"cpus": 2},
              "inprocess": {"limit": {"throughput": None, "batch_size": 1, "p95_batch1_ms": None}}}
    assert report.plot(result, tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.parametrize(("flags", "expected"), [
    (["--transports", "quic"], "field '--transports': expected a comma-separated subset of ['grpc', 'rest'], "
                               "received 'quic'"),
    (["--transports", ""], "field '--transports'"),
    (["--photo-limit", "-1"], "field '--photo-limit'"),
    (["--max-requests", "0"], "field '--max-requests'"),
    (["--warmup", "-1"], "field '--warmup': expected seconds >= 0, received -1.0"),
    (["--rounds", "0"], "field '--rounds'"),
    (["--batching-config", "/nonexist.config"], "field '--batching-config'"),
])
def test_ab_refuses_bad_flags_before_any_server_starts(flags, expected, tmp_path, monkeypatch, capsys):
    from carclf.loadtest import ab

    def refuse(*_args, **_kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(ab, "start_servers", refuse)
    out = tmp_path / "ab"
    assert ab.main(["--baseline-checkout", str(tmp_path), "--model", "m", "--out", str(out), *flags]) == 2
    line = _one_line(capsys)
    assert line.startswith("ab: ") and expected in line, line
    assert not out.exists()


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (killed; its new parent has not reaped it yet)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return not os.path.exists(f"/proc/{pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_to_run_or_soak_still_ends_its_server_and_locust(tmp_path):
    """SIGKILL (or the OOM killer) gives run/soak/bench no chance to clean up; the kernel ends their children."""
    import os
    import signal
    import subprocess
    import time

    server_pid, locust_pid = tmp_path / "server.pid", tmp_path / "locust.pid"
    script = ("import sys\n"
              "from carclf.loadtest import server as srv\n"
              # the server as run/soak/bench start it (EmbeddedServer), with a stand-in command for carclf serve
              "srv.EmbeddedServer(srv.ServerAddress(), model_config_file='unused',\n"
              f"                  command=['sh', '-c', 'echo $$ > {server_pid}; exec sleep 120']).start()\n"
              # and locust as run/soak call it, waiting on it
              f"srv.call_child(['sh', '-c', 'echo $$ > {locust_pid}; exec sleep 120'])\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (server_pid.exists() and locust_pid.exists() and locust_pid.read_text().strip()
                   and server_pid.read_text().strip()):
            assert parent.poll() is None and time.monotonic() < deadline, "the children did not start"
            time.sleep(0.05)
        children = [int(server_pid.read_text()), int(locust_pid.read_text())]
        assert not any(_ended(pid) for pid in children)
        parent.send_signal(signal.SIGKILL)
        assert parent.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while not all(_ended(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in children if not _ended(pid)] == []
    finally:
        parent.kill()
        for pid_file in (server_pid, locust_pid):
            if pid_file.exists() and pid_file.read_text().strip():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _run_starter(script: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``script`` (one that starts children) in a fresh Python; (exit status, stdout, stderr). A starter or
    child that hangs is killed after ``timeout``, and said so in the stderr returned."""
    import os
    import signal
    import subprocess
    import uuid

    marker = f"starter-{uuid.uuid4().hex}"  # in the command line of the starter and of any child stuck in a fork
    starter = subprocess.Popen([sys.executable, "-c", f"# {marker}\n{script}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        out, err = starter.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(starter.pid, signal.SIGKILL)
        out, err = starter.communicate()
        err = f"did not end within {timeout:g} s (waiting in a fork handler?)\n{err}"
    finally:
        subprocess.run(["pkill", "-KILL", "-f", marker], check=False)  # a child stuck before exec, group of its own
    return starter.returncode, out, err


def _start_both_children_after(setup: str, locust: list[str], server: list[str]):
    """Run ``setup`` in a fresh Python, then start ``locust`` through ``call_child`` and ``server`` through
    ``EmbeddedServer`` there, as run/soak/bench do; (its exit status, its output lines, its stderr)."""
    code, out, err = _run_starter(
        f"{setup}"
        "from carclf.loadtest import server as srv\n"
        f"print('locust', srv.call_child({locust!r}), flush=True)\n"
        f"server = srv.EmbeddedServer(srv.ServerAddress(), model_config_file='unused', command={server!r})\n"
        "print('server', server.start().process.wait(), flush=True)\n")
    return code, out.split("\n"), err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and at-fork hooks as Linux has them")
def test_children_start_while_another_thread_holds_a_lock_a_forked_child_would_need():
    """run and bench start locust and the server from a process with TensorFlow's threads. Had any Python code
    run in the child between fork and exec, a lock another thread held at the fork would stay held in the child
    forever (a load-test run once never ended so: its child still blocked in futex_wait 2.5 h later). Here an
    at-fork hook needs a lock that a thread holds for good: each child must still start, run and end."""
    setup = ("import os, threading\n"
             "held, taken = threading.Lock(), threading.Event()\n"
             "def hold():\n"
             "    held.acquire(); taken.set(); threading.Event().wait()\n"
             "threading.Thread(target=hold, daemon=True).start()\n"
             "taken.wait()\n"
             "os.register_at_fork(after_in_child=held.acquire)\n")
    code, lines, err = _start_both_children_after(setup, ["sh", "-c", "exit 7"], ["sh", "-c", "exit 5"])
    assert (code, lines) == (0, ["locust 7", "server 5", ""]), err


def _glibc_fork_handlers() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "__register_atfork")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_fork_handlers(), reason="registers a fork handler through glibc's __register_atfork")
def test_no_c_librarys_fork_handler_runs_in_the_children():
    """grpc (and other C libraries) register handlers that run in every child made by fork(); the children of
    run, soak and bench are made without a fork(), so not even a handler that aborts the child reaches them."""
    setup = ("import ctypes\n"
             "libc = ctypes.CDLL('libc.so.6')\n"
             "assert libc.__register_atfork(None, None, ctypes.cast(libc.abort, ctypes.c_void_p), None) == 0\n")
    code, lines, err = _start_both_children_after(setup, ["true"], ["true"])
    assert (code, lines) == (0, ["locust 0", "server 0", ""]), err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="grpc's fork handlers as on Linux")
def test_children_started_right_after_a_grpc_call_are_not_killed_by_grpcs_fork_handlers():
    """run.py asks a running server for its models' status over gRPC, closes that channel, then starts locust;
    the suite starts servers with gRPC clients open. A ``preexec_fn`` makes subprocess fork rather than vfork,
    and a fork runs grpc's fork handlers: in the child they restart grpc's poller, subprocess closes the child's
    descriptors, the poller meets its epoll descriptor closed and the child aborts before exec (grpc/grpc#43055;
    read by the load test as "locust killed by SIGABRT"); or the handlers wait for good, in the child or in the
    parent. Sixty children in that pattern all start and end."""
    import subprocess
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = ("import collections, grpc\n"
              "from grpc_health.v1 import health_pb2, health_pb2_grpc\n"
              "from carclf.loadtest import server as srv\n"
              "codes = collections.Counter()\n"
              f"kept = grpc.insecure_channel('127.0.0.1:{port}')  # a client kept open, as the suite's are\n"
              "health_pb2_grpc.HealthStub(kept).Check(health_pb2.HealthCheckRequest(), timeout=10)\n"
              "for i in range(60):\n"
              f"    with grpc.insecure_channel('127.0.0.1:{port}') as channel:  # run.py's status call\n"
              "        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)\n"
              "    if i % 2:\n"
              "        codes[srv.call_child(['true'])] += 1\n"
              "    else:\n"
              "        server = srv.EmbeddedServer(srv.ServerAddress(), model_config_file='unused',\n"
              "                                    command=['true']).start()\n"
              "        codes[server.process.wait()] += 1\n"
              "print(dict(codes))\n")
    # two processes spinning beside it, as on a busy CI machine, widen the race (5 children in 300 aborted on an
    # idle machine, 84 to 95 with two cores kept busy: scripts/fork_children.py, docs/RELIABILITY.md)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        code, out, err = _run_starter(script)
    finally:
        server.stop(None)
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert (code, out.strip()) == (0, "{0: 60}"), err[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_tether_runs_its_command_as_itself_and_nothing_when_its_parent_already_ended(tmp_path):
    """The launcher becomes the command (same pid, SIGPIPE back to its default as a shell would give it), runs
    nothing when its parent is no longer the one named (ended before the tie), and names a command it cannot
    run with the shell's 127."""
    import os
    import signal
    import subprocess

    from carclf.loadtest import server as srv

    def tether(parent: int, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", str(srv.TETHER), str(parent), *command],
                              capture_output=True, text=True, timeout=30)

    status = tether(os.getpid(), "cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.stdout.splitlines() if ":\t" in line)
    assert status.returncode == 0, status.stderr
    assert int(fields["PPid"]) == os.getpid()  # cat itself, not a child of the launcher
    assert int(fields["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0

    marker = tmp_path / "ran"
    orphaned = tether(1, "touch", str(marker))  # its parent is this process, not init: as if orphaned
    assert (orphaned.returncode, marker.exists()) == (128 + signal.SIGTERM, False)

    missing = tether(os.getpid(), "no-such-command-here")
    assert missing.returncode == 127 and "cannot run 'no-such-command-here'" in missing.stderr
    assert tether(os.getpid()).returncode == 2  # no command: usage


def test_sigterm_stops_the_locust_child_too(tmp_path):
    """Killing run/soak/ab with SIGTERM ends the locust (or other) child it is waiting on."""
    import os
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    script = ("import os, signal, subprocess, threading\n"
              "from carclf.loadtest.options import exit_on_sigterm\n"
              "exit_on_sigterm()\n"
              "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
              f"subprocess.call(['sh', '-c', 'echo $$ > {pid_file}; exec sleep 60'])\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and time.monotonic() - started < 30, result.stderr
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_paired_slice_nothing_answered_is_not_a_ratio_of_zero_and_keeps_its_error():
    """A served slice in which no request completed (a window shorter than one call) measured nothing: its
    throughput ratio is left out (the target reads "not measured", not "missed"), and the round keeps why."""
    fake = bench.Bench.__new__(bench.Bench)
    fake.settings = {"pairs": 1, "pair_duration_s": 0.5, "pair_warmup_s": 0.0, "transports": ["grpc"]}
    fake.best = {"batch_size": 4, "threads": 1}
    fake.rounds, fake.work = [], None
    fake.inprocess = lambda *_a, **_k: [{"throughput": 100.0, "cpu_ms_per_photo": 10.0, "p50_ms": 9.0}]
    why = "no request completed within the 0.5 s window"
    nothing = {"throughput": 0.0, "p50_ms": None, "mean_ms": None, "errors": 1, "first_error": why,
               "server_cpu_ms_per_photo": None}
    fake.point = lambda *_a, **_k: nothing
    fake.interleaved = lambda *_a, **_k: {"inprocess_p50_ms": 9.0, "served_p50_ms": None, "added_p50_ms": None,
                                          "errors": 0, "first_error": ""}
    fake.paired_rounds(server=None, mode="on")
    (row,) = fake.rounds
    assert row["grpc_c8_ratio"] is None and row["errors"] == 2 and row["first_error"] == why
    summary = bench.summarize_rounds(fake.rounds, "batching")
    (target,) = [t for t in bench.report.judge_targets(summary, None, ["grpc"]) if t["target"] == "grpc_c8_ratio"]
    assert target["value"] is None and target["verdict"] != "missed", target


def test_the_memory_verdict_is_the_growth_of_the_last_windows_median_over_the_first():
    """RSS 100 MiB through the first minute after warm-up, 150 MiB through the last: growth +50 %, a rising slope;
    samples during warm-up (here 400 MiB) count for the peak only."""
    from carclf.loadtest.soak import Sample, memory_verdict

    mib = 2**20
    samples = [Sample(float(t), 400 * mib) for t in range(0, 30, 10)]
    samples += [Sample(float(t), (100 if t < 90 else 125 if t < 240 else 150) * mib) for t in range(30, 310, 10)]
    verdict = memory_verdict(samples, warmup_s=30, window_s=60)
    assert (verdict.baseline_mib, verdict.final_mib, verdict.peak_mib) == (100, 150, 400)
    assert verdict.growth == pytest.approx(0.5) and verdict.slope_mib_per_min > 0
    assert verdict.samples == 28
    shrinking = memory_verdict([Sample(s.seconds, 250 * mib - s.rss_bytes) for s in samples[3:]], warmup_s=30)
    assert shrinking.growth == pytest.approx(100 / 150 - 1) and shrinking.slope_mib_per_min < 0


def test_in_process_throughput_counts_photos_not_calls(tiny_repository_template, photos):
    """measure_batches reports throughput in photos/s: a call of a batch of 4 is 4 photos, so each row's
    throughput is its completed calls per second times its batch size."""
    from carclf.loadtest.inprocess import LoadedModel, measure_batches

    model = LoadedModel.load(tiny_repository_template, "tiny_a")
    inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, p.read_bytes()) for p in photos[:4]]
    rows = measure_batches(model, contract.SIGNATURE_BYTES, inputs, [1, 4], duration_s=0.6, warmup_s=0.1)
    assert [row["batch_size"] for row in rows] == [1, 4]
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["throughput"] == pytest.approx(row["requests"] * row["batch_size"] / row["duration_s"],
                                                  abs=2e-3), row


def test_alternating_leaves_the_calls_sent_during_the_warmup_out():
    """A's first call is slow (a cold start) and is sent during the warm-up: it is not among a's latencies,
    though it returns after the warm-up ended. B's calls, all sent after it, all count."""
    import time

    sent: dict[str, int] = {"a": 0, "b": 0}

    def sender(name: str, cold_s: float):
        def send(i: int):
            sent[name] += 1
            time.sleep(cold_s if i == 0 else 0.001)

        return send

    a, b = loadgen.alternating([sender("a", 0.3), sender("b", 0.001)], duration_s=0.5, warmup_s=0.2)
    assert a.errors == b.errors == 0 and a.requests > 0
    assert max(a.latencies_ms) < 250, max(a.latencies_ms)  # the cold call is left out
    assert a.requests == sent["a"] - 1 and b.requests == sent["b"]


def test_max_requests_caps_a_point_across_all_its_workers():
    """--max-requests is the cap on requests per point: two workers share it (5 each of 10), they do not get
    10 each."""
    import threading

    lock = threading.Lock()
    calls: list[tuple[int, int]] = []

    def factory(index: int):
        def send(i: int) -> None:
            if i >= 0:  # not the unmeasured priming call
                with lock:
                    calls.append((index, i))

        return send, lambda: None

    result = loadgen.closed_loop(factory, 2, duration_s=0.5, warmup_s=0.0, max_requests=10)
    assert len(calls) == 10 and sorted({index for index, _ in calls}) == [0, 1]
    assert result.requests == 10 and result.errors == 0


def test_targets_are_judged_on_the_better_batching_mode():
    """The bench measures with batching on and off; each target takes the mode that does better on it
    (higher throughput ratio, lower added latency), and says which."""
    from carclf.loadtest.report import judge_targets

    def figure(value: float) -> dict:
        return {"median": value, "min": value, "max": value, "n": 3}

    paired = {
        "on": {"grpc_c8_ratio": figure(0.95), "grpc_c8_cpu_ratio": figure(0.93),
               "grpc_added_mean_ms": figure(3.5), "grpc_interleaved_added_p50_ms": figure(3.0)},
        "off": {"grpc_c8_ratio": figure(0.60), "grpc_c8_cpu_ratio": figure(0.55),
                "grpc_added_mean_ms": figure(1.2), "grpc_interleaved_added_p50_ms": figure(1.5)},
    }
    targets = {t["target"]: t for t in judge_targets(paired, None, ["grpc"])}
    throughput, latency = targets["grpc_c8_ratio"], targets["grpc_added_p50_c1_ms"]
    assert (throughput["value"], throughput["second_value"], throughput["verdict"]) == (0.95, 0.93, "met")
    assert throughput["basis"].startswith("batching on")
    assert (latency["value"], latency["second_value"], latency["verdict"]) == (1.2, 1.5, "met")
    assert latency["basis"].startswith("batching off")


def test_ab_saved_time_is_positive_when_the_candidate_is_faster():
    """The A/B summary's "saved" figures are the paired differences baseline minus candidate: positive when the
    candidate (this checkout) answers faster."""
    from carclf.loadtest.ab import summarize

    pairs = [(10.0, 7.0), (12.0, 8.5), (11.0, 9.0)]  # (baseline, candidate) p50 per round: the candidate wins
    rounds = [{"round": n, "grpc": {"baseline": {"p50_ms": b, "added_ms": None},
                                    "candidate": {"p50_ms": c, "added_ms": None}}}
              for n, (b, c) in enumerate(pairs, 1)]
    figures = summarize(rounds, ["grpc"])["grpc"]
    saved = [b - c for b, c in pairs]
    assert figures["saved_p50_ms"] == {"median": sorted(saved)[1], "min": min(saved), "max": max(saved), "n": 3}
    assert figures["saved_p50_ms"]["min"] > 0
    assert (figures["baseline_p50_ms"], figures["candidate_p50_ms"]) == (11.0, 8.5)
    assert figures["saved_added_ms"] is None


def test_fewer_than_four_memory_samples_after_warmup_give_no_verdict():
    """A median of the first and of the last minute needs samples to stand on: three after warm-up are refused
    (naming how many there were), four give a verdict."""
    from carclf.loadtest.soak import Sample, memory_verdict

    mib = 2**20
    samples = [Sample(0.0, 300 * mib)] + [Sample(float(t), (100 + t) * mib) for t in (30, 40, 50)]
    with pytest.raises(ConfigError, match="only 3 memory samples after warm-up"):
        memory_verdict(samples, warmup_s=30)
    verdict = memory_verdict([*samples, Sample(60.0, 160 * mib)], warmup_s=30)
    assert verdict.samples == 4 and verdict.peak_mib == 300


def test_check_prediction_refuses_probabilities_that_do_not_match_the_label_count(tiny_answer):
    """An answer over another number of classes than the model's labels is wrong, even when its top label
    is among them and names its arg-max."""
    outputs, labels = tiny_answer
    checks.check_prediction(outputs, labels)
    more = [*labels, "Lada Priora Sedan 2010"]
    classes = outputs[contract.OUTPUT_PROBABILITIES].shape[1]
    with pytest.raises(checks.BadPrediction, match=f"{classes} probabilities for {len(more)} labels"):
        checks.check_prediction(outputs, more)


def test_check_prediction_refuses_a_batch_with_one_bad_row(tiny_answer):
    """Every row of a batch must be a distribution: one row that does not sum to 1 fails the whole answer."""
    outputs, labels = tiny_answer
    probs = outputs[contract.OUTPUT_PROBABILITIES]
    two = {key: np.concatenate([value, value]) for key, value in outputs.items()}
    checks.check_prediction(two, labels, batch=2)
    one_bad = {**two, contract.OUTPUT_PROBABILITIES: np.concatenate([probs, probs * 0.5])}
    with pytest.raises(checks.BadPrediction, match="sum to"):
        checks.check_prediction(one_bad, labels, batch=2)


def test_repository_labels_are_the_highest_versions(tmp_path):
    """Labels come from the model's newest version (by number: 10 after 9 and 2) that has them."""
    for version in (1, 2, 10):
        assets = tmp_path / "m" / str(version) / "assets"
        assets.mkdir(parents=True)
        (assets / contract.LABELS_ASSET).write_text(f"car of version {version}\nother car\n")
    (tmp_path / "m" / "11").mkdir()  # a version being written, no labels yet
    assert checks.repository_labels(tmp_path, "m") == ["car of version 10", "other car"]
    assert checks.repository_labels(tmp_path, "absent") is None


@pytest.mark.parametrize("locust_status", [0, 1])
def test_a_soak_whose_locust_run_failed_fails(tmp_path, sample_dir, monkeypatch, capsys, locust_status):
    """Steady memory and no failed request in the CSV, but locust itself exited non-zero (its own thresholds, an
    error in a user): the soak fails, and soak.json records locust's status. With status 0 it passes."""
    code, reports = _soak_with_fakes(monkeypatch, tmp_path, sample_dir,
                                     ["--minutes", "1", "--warmup-minutes", "0", "--sample-every", "0.01"],
                                     locust_status=locust_status, samples_before_locust=6)
    data = json.loads((reports / "soak.json").read_text())
    assert data["memory"] is not None and data["memory"]["growth"] == 0 and data["failures"] == 0
    assert data["locust_exit_status"] == locust_status
    assert code == locust_status and data["passed"] is (locust_status == 0)
    assert ("soak: PASSED" if locust_status == 0 else "soak: FAILED") in capsys.readouterr().out
