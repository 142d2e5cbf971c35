"""``make demo``: the product end to end on a fresh clone, with no network.

1. train three small backbones (MobileNetV2 from the offline ImageNet weights when present, EfficientNetB0
   and Xception from scratch) on data/sample with the ``demo_*`` recipes;
2. export each as a versioned SavedModel under model_repository/;
3. write a models.config for them and a Triton-style config.pbtxt for an ensemble over them;
4. start the embedded TF-Serving-compatible server (gRPC + REST) hosting the backbones and the ensemble;
5. classify a few sample photos through ``car_ensemble`` over gRPC and over REST, then stop the server.

Every step runs the real ``carclf`` command a user would run, and prints it first. ``--skip-training`` exports
the newest finished run of each demo recipe (run.json says finished, final weights written) and trains only a
recipe that has none. Ctrl-C stops the step that runs (it gets the same SIGINT and ends on its own, else it is
sent SIGTERM after ``STOP_GRACE_S``) and the server, and ends the demo with "demo: interrupted", status 130.

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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from carclf import exits
from carclf.cli import CommandParser
from carclf.train import runs as run_files

DEMO_RECIPES = ("demo_mobilenet_v2", "demo_efficientnet_b0", "demo_xception")
ENSEMBLE_TTA = "hflip"
ENSEMBLE_PARAMETERS = {"aggregation": "mean", "top_k": "3", "deadline_ms": "30000", "failure_policy": "degrade",
                       "quorum": "2"}
STOP_GRACE_S = 30.0  # after Ctrl-C: how long a step or the server has to end on its own before SIGTERM


def _carclf(*args: str) -> list[str]:
    return [sys.executable, "-m", "carclf", *args]


def _stop(child: subprocess.Popen, grace_s: float | None = None) -> None:
    """Stop ``child`` after a Ctrl-C: a terminal sent it the same SIGINT, so it has ``grace_s`` to end on its
    own, then SIGTERM and as long again, then SIGKILL; a second Ctrl-C meanwhile kills it at once."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    try:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            exits.terminate(child, grace_s)
    except KeyboardInterrupt:
        child.kill()
        child.wait()


def _run(cmd: list[str]) -> int:
    """Run one step (printed first as the ``carclf`` command a user would type); SystemExit when it fails."""
    shown = " ".join(shlex.quote(c) for c in (["carclf", *cmd[3:]] if cmd[1:3] == ["-m", "carclf"] else cmd))
    print(f"\n$ {shown}", flush=True)
    child = subprocess.Popen(cmd, text=True)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        _stop(child)
        raise
    if code != 0:
        raise SystemExit(f"demo: step failed ({exits.describe(code)}): {shown}")
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_finished_run(runs: Path, recipe: str) -> Path | None:
    """The run of ``recipe`` under ``runs`` that finished training last (by its run.json), or None."""
    finished = [p for p in runs.glob(f"{recipe}-*") if p.is_dir() and run_files.finished_training(p)]
    return max(finished, key=lambda p: (p / run_files.RUN_INFO).stat().st_mtime, default=None)


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
                        help="reuse the newest finished run of each demo recipe; train a recipe that has none")
    parser.add_argument("--photos", nargs="*", default=None, help="photos to classify (default: 3 from data/sample)")
    args = parser.parse_args(argv)
    try:
        return _demo(args)
    except KeyboardInterrupt:  # the step and the server running were stopped on the way out
        print("demo: interrupted", file=sys.stderr, flush=True)
        return 130


def _demo(args: argparse.Namespace) -> int:
    runs, repository = Path(args.runs), Path(args.repository)
    work = runs / "serving"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print("== 1-2. train and export the demo backbones", flush=True)
    for recipe in DEMO_RECIPES:
        run = newest_finished_run(runs, recipe) if args.skip_training else None
        if args.skip_training:
            print(f"demo: reusing {run}" if run else f"demo: no finished {recipe} run under {runs}: training it",
                  flush=True)
        if run is None:
            _run(_carclf("train", recipe, "--runs", str(runs), "--allow-scratch", "--verbose", "2"))
            run = newest_finished_run(runs, recipe)
            if run is None:
                raise SystemExit(f"demo: carclf train {recipe} ended without a finished run under {runs}")
        _run(_carclf("export", str(run), "--repository", str(repository), "--name", recipe))

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
    except KeyboardInterrupt:
        _stop(server)  # it had the same Ctrl-C and drains; a SIGTERM now would end it at once
        raise
    finally:
        if server.returncode is None:
            print("\n== stop the server (SIGTERM: drains in-flight requests)", flush=True)
            exits.terminate(server, 60.0)
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
