"""Pure parts of the load tests: pass/fail rules, answer checks, wire formats, settings."""

from __future__ import annotations

import argparse
import json

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
