"""``make demo``: the product end to end on a fresh clone, with no network.

1. train three small backbones (MobileNetV2 from the offline ImageNet weights when present, EfficientNetB0
   and Xception from scratch) on data/sample with the ``demo_*`` recipes;
2. export each as a versioned SavedModel under model_repository/;
3. write a models.config for them and a Triton-style config.pbtxt for an ensemble over them;
4. start the embedded TF-Serving-compatible server (gRPC + REST) hosting the backbones and the ensemble;
5. classify a few sample photos through ``car_ensemble`` over gRPC and over REST, then stop the server.

Every step runs the real ``carclf`` command a user would run, and prints it first.

EfficientNetB0 and Xception have no ImageNet weights offline: trained from scratch on 50 photos for a few
seconds they stay at chance (validation accuracy about 0.1) and answer nearly the same probabilities for
every photo. They are there to show the one registry and the ensemble's fan-out; the ensemble's answer
comes from MobileNetV2, diluted by their flat votes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from carclf import exits
from carclf.cli import CommandParser

DEMO_RECIPES = ("demo_mobilenet_v2", "demo_efficientnet_b0", "demo_xception")
ENSEMBLE_TTA = "hflip"
ENSEMBLE_PARAMETERS = {"aggregation": "mean", "top_k": "3", "deadline_ms": "30000", "failure_policy": "degrade",
                       "quorum": "2"}


def _carclf(*args: str) -> list[str]:
    return [sys.executable, "-m", "carclf", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(c) for c in (["carclf", *cmd[3:]] if cmd[1:3] == ["-m", "carclf"] else cmd))
    print(f"\n$ {shown}", flush=True)
    result = subprocess.run(cmd, text=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: step failed ({exits.describe(result.returncode)}): {shown}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _newest_run(runs: Path, recipe: str) -> Path:
    candidates = sorted(runs.glob(f"{recipe}-*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"demo: no run folder for {recipe} under {runs}")
    return candidates[-1]


def _wait_ready(rest_url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: the server ended ({exits.describe(server.returncode)}) before it was ready")
        try:
            with urllib.request.urlopen(f"{rest_url}/v1/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the server was not ready within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m carclf.demo", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/demo", help="where the demo's run folders go")
    parser.add_argument("--repository", default="model_repository", help="model repository to export into")
    parser.add_argument("--skip-training", action="store_true",
                        help="reuse the newest demo runs instead of training again")
    parser.add_argument("--photos", nargs="*", default=None, help="photos to classify (default: 3 from data/sample)")
    args = parser.parse_args(argv)

    runs, repository = Path(args.runs), Path(args.repository)
    work = runs / "serving"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print("== 1-2. train and export the demo backbones", flush=True)
    for recipe in DEMO_RECIPES:
        if not args.skip_training or not list(runs.glob(f"{recipe}-*")):
            _run(_carclf("train", recipe, "--runs", str(runs), "--allow-scratch", "--verbose", "2"))
        _run(_carclf("export", str(_newest_run(runs, recipe)), "--repository", str(repository), "--name", recipe))

    print("\n== 3. serving configuration", flush=True)
    models_config = work / "models.config"
    _run(_carclf("serving-config", "--repository", str(repository), "--models", *DEMO_RECIPES,
                 "--policy", "latest", "--output", str(models_config)))
    ensemble_config = work / "car_ensemble" / "config.pbtxt"
    _run(_carclf("ensemble-config", *DEMO_RECIPES, "--name", "car_ensemble", "--repository", str(repository),
                 "--tta", ENSEMBLE_TTA, *(w for kv in ENSEMBLE_PARAMETERS.items() for w in ("--param", "=".join(kv))),
                 "--out", str(ensemble_config)))

    print("\n== 4. start the embedded server", flush=True)
    grpc_port, rest_port = _free_port(), _free_port()
    rest_url = f"http://127.0.0.1:{rest_port}"
    serve = _carclf("serve", "--port", str(grpc_port), "--rest_api_port", str(rest_port),
                    "--model_config_file", str(models_config), "--model_repository", str(repository),
                    "--ensemble_config_file", str(ensemble_config),
                    "--enable_batching", "--batching_parameters_file", "serving/batching.config",
                    "--batching_early_dispatch",
                    "--monitoring_config_file", "serving/monitoring.config")
    print("$ carclf " + " ".join(shlex.quote(c) for c in serve[3:]), flush=True)
    server = subprocess.Popen(serve, text=True)
    try:
        _wait_ready(rest_url, server)
        with urllib.request.urlopen(f"{rest_url}/v1/models/car_ensemble", timeout=5) as response:
            print("car_ensemble status:", json.dumps(json.load(response)))

        photos = args.photos or [str(p) for p in sorted(Path("data/sample/test_upload").glob("*.jpg"))[:3]]
        print("\n== 5. predictions through car_ensemble", flush=True)
        _run(_carclf("predict", *photos, "--server", f"grpc://127.0.0.1:{grpc_port}", "--model", "car_ensemble",
                     "--top-k", "3", "--verbose"))
        _run(_carclf("predict", *photos, "--server", rest_url, "--model", "car_ensemble", "--top-k", "3"))
        _run(_carclf("predict", photos[0], "--server", rest_url, "--model", DEMO_RECIPES[0], "--top-k", "3",
                     "--classes", "data/sample/classes.json"))
    finally:
        print("\n== stop the server (SIGTERM: drains in-flight requests)", flush=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; server {exits.describe(server.returncode)}")
    print("\nEfficientNetB0 and Xception trained from scratch (no ImageNet weights offline) and stay at chance; "
          "they show the registry and the ensemble's fan-out.")
    elsewhere = "" if repository == Path("model_repository") else f" REPOSITORY={shlex.quote(str(repository))}"
    print(f"Serve these models again with their ensemble: make serve ENSEMBLE={ensemble_config}{elsewhere}")
    print("  then upload a photo at http://127.0.0.1:8501/ui (the page asks car_ensemble)")
    also = "" if not elsewhere else f" --model-repository {shlex.quote(str(repository))}"
    print(f"Load-test them (make loadtest starts the server when none runs): make loadtest ARGS=\"--target-model "
          f"{DEMO_RECIPES[0]} --ensemble-config {ensemble_config}{also}\"")
    return 0 if server.returncode == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
