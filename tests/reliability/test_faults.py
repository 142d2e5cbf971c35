"""Faults under load against in-process embedded servers: a new version exported and the old one unloaded,
a config reload that removes a model, and an export killed half-way plus a corrupt version folder.

Each test drives real traffic (gRPC and REST clients in threads, ``tests/reliability/traffic.py``) while the
fault happens, records every request with its start and end times, and checks each answer against the
SavedModel of the version that answered, loaded in-process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from carclf.loadtest.server import ServerAddress, reload_config
from carclf.serving.config import VersionPolicy, models_config_to_text
from carclf.serving.manager import State
from carclf.serving.repository import list_versions
from carclf.train.export import next_version
from tests.ensemble.servers import grpc_url, rest_url, write_ensemble_config
from tests.fixtures import export_tiny
from tests.reliability.servers import BACKBONE, ENSEMBLE, SHIPPED_BATCHING
from tests.reliability.traffic import ClientPerThread, Outcome, Traffic, traffic
from tests.serving.conftest import REPO_ROOT, Rest

OTHER = "tiny_b"
ATOL = 1e-5
LATEST_ONE = VersionPolicy("latest", num_versions=1)


def write_models_config(path: Path, repository: Path, models: dict[str, VersionPolicy]) -> Path:
    path.write_text(models_config_to_text((name, str(repository / name), policy, {})
                                          for name, policy in models.items()), encoding="utf-8")
    return path


class SavedModels:
    """Reference answers: ``tf.saved_model.load`` of any version of the repository, cached, thread-safe."""

    def __init__(self, repository: Path):
        self.repository = repository
        self._loaded: dict = {}
        self._lock = threading.Lock()

    def probabilities(self, model: str, version: int, photos: list[bytes]) -> np.ndarray:
        import tensorflow as tf

        with self._lock:
            key = (model, version, tuple(photos))
            if key not in self._loaded:
                loaded = tf.saved_model.load(str(self.repository / model / str(version)))
                batch = tf.constant(np.array(photos, dtype=object))
                self._loaded[key] = loaded.signatures["serving_default"](image_bytes=batch)["probabilities"].numpy()
            return self._loaded[key]


def backbone_flow(name: str, client: ClientPerThread, model: str, photos: list[bytes], saved: SavedModels,
                  threads: int = 2) -> Traffic:
    """Predict ``model``; the answer must equal the in-process answer of the version the server reports
    (over REST, which reports no version, the answer must equal the one of some version on disk)."""

    def call():
        result = client().predict(model, images=photos)
        return result.version, result.probabilities

    def check(detail):
        version, probs = detail
        candidates = [version] if version is not None else sorted(list_versions(saved.repository / model))
        assert any(np.allclose(probs, saved.probabilities(model, v, photos), atol=ATOL) for v in candidates), \
            f"{model}: the answer matches none of versions {candidates}"

    return Traffic(name, call, threads, check)


def ensemble_flow(name: str, client: ClientPerThread, photos: list[bytes], *, allow_degraded: bool = False) -> Traffic:
    def call():
        return client().predict(ENSEMBLE, images=photos).outputs

    def check(out):
        probs = np.asarray(out["probabilities"])
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-4), "probabilities do not sum to 1"
        assert allow_degraded or not np.asarray(out["degraded"]).any(), "a degraded answer"

    return Traffic(name, call, 1, check)


def started_between(outcomes: list[Outcome], start: float, end: float = float("inf")) -> list[Outcome]:
    return [o for o in outcomes if start <= o.started < end]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def more_requests(flows, count: int, timeout: float = 60) -> None:
    """Let every flow make ``count`` more requests."""
    targets = [(flow, len(flow.outcomes) + count) for flow in flows]
    for flow, target in targets:
        flow.wait_for(target, timeout)


# ---------------------------------------------------------------------------------------------

EXPORT_IN_A_SUBPROCESS = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "import tensorflow as tf\n"
    "from tests.fixtures import export_tiny\n"
    "write = tf.saved_model.save\n"
    "def write_then_wait(*args, **kwargs):\n"
    "    write(*args, **kwargs)\n"
    "    time.sleep(600)  # half-way: written, neither checked nor published; the test kills it here\n"
    "tf.saved_model.save = write_then_wait\n"
    "export_tiny(Path(sys.argv[1]), sys.argv[2], seed=7)\n"
)


def start_export_process(repository: Path, model: str) -> subprocess.Popen:
    """``export_model`` (through the test fixture's tiny model) in a process of its own, which stops once its
    SavedModel is written, to be killed there. (Killed at a moment chosen by polling, a fast export could end
    first on a busy machine.)"""
    return subprocess.Popen([sys.executable, "-c", EXPORT_IN_A_SUBPROCESS, str(repository), model], cwd=REPO_ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_version_lifecycle_under_load(private_server, tiny_repository, tmp_path, photo_bytes_list):
    """While gRPC and REST traffic hits tiny_a, tiny_b and car_ensemble (over both), without one failure:

    1. a process running export_model is killed (-9) half-way: its hidden temp folder is never loaded;
    2. a real export publishes tiny_a version 3: the server loads it, then unloads 2 (latest policy);
    3. a version folder whose variables are cut short (4) is reported broken in the model
       status while version 3 keeps serving.
    """
    repo, base = tiny_repository, tiny_repository / BACKBONE
    export = start_export_process(repo, BACKBONE)  # its TensorFlow import overlaps the server's start
    clients: list[ClientPerThread] = []
    try:
        config = write_models_config(tmp_path / "models.config", repo, {BACKBONE: LATEST_ONE, OTHER: LATEST_ONE})
        server = private_server(model_config_file=str(config), model_repository=str(repo),
                                ensemble_config_file=[str(write_ensemble_config(tmp_path, name=ENSEMBLE))],
                                file_system_poll_wait_seconds=1, enable_batching=True,
                                batching_parameters_file=str(SHIPPED_BATCHING), batching_early_dispatch=True,
                                enable_model_warmup=False)
        photos, saved = photo_bytes_list[:1], SavedModels(repo)
        grpc_client, rest_client = ClientPerThread(grpc_url(server)), ClientPerThread(rest_url(server))
        clients += [grpc_client, rest_client]
        flows = (backbone_flow("gRPC tiny_a", grpc_client, BACKBONE, photos, saved),
                 backbone_flow("REST tiny_b", rest_client, OTHER, photos, saved, threads=1),
                 ensemble_flow("REST car_ensemble", rest_client, photos),
                 ensemble_flow("gRPC car_ensemble", grpc_client, photos))
        with traffic(*flows):
            # 1. kill -9 half-way
            wait_until(lambda: export.poll() is not None or any(base.glob(".tmp-export-*/savedmodel/saved_model.pb")),
                       180, "the export to write its SavedModel")
            assert export.poll() is None, "the export finished before it could be killed"
            os.kill(export.pid, signal.SIGKILL)
            export.wait(30)
            partial = list(base.glob(".tmp-export-*"))
            assert len(partial) == 1 and not partial[0].name.isdigit(), partial
            time.sleep(2.5)  # two polls of the model folder
            assert sorted(list_versions(base)) == [1, 2] and next_version(base) == 3
            assert [s.version for s in server.manager.status(BACKBONE)] == [2]
            # 2. a real export, picked up; the old version unloaded
            assert export_tiny(repo, BACKBONE, seed=4).name == "3"
            assert server.manager.wait_for(BACKBONE, 3, State.AVAILABLE, timeout=90)
            assert server.manager.wait_for(BACKBONE, 2, State.END, timeout=60)
            unloaded_at = time.monotonic()
            more_requests(flows, 3)
            # 3. a corrupt version folder, made outside the model folder and renamed into place: the server sees
            # only its final files. (Built in place, a poll could fail on a half-copied folder and retry when
            # the files changed, so the last status read could catch that retry in LOADING.)
            corrupt = tmp_path / "corrupt-version"
            shutil.copytree(base / "1", corrupt)
            data = next((corrupt / "variables").glob("variables.data-*"))
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
            corrupt.rename(base / "4")
            wait_until(lambda: any(s.version == 4 and s.state == State.END for s in server.manager.status(BACKBONE)),
                       60, "the corrupt version to be tried")
            more_requests(flows, 3)
    finally:
        if export.poll() is None:
            export.kill()
            export.wait(30)
        for client in clients:
            client.close()

    for flow in flows:
        assert not flow.failures, f"{flow.summary()}: {flow.failures[:3]}"
    tiny_a, _, _, grpc_ensemble = flows
    assert {o.detail[0] for o in tiny_a.outcomes} == {2, 3}
    assert {o.detail[0] for o in started_between(tiny_a.outcomes, unloaded_at)} == {3}
    member_versions = [int(o.detail["member_versions"][0][0]) for o in grpc_ensemble.outcomes]
    assert set(member_versions) == {2, 3} and member_versions[-1] == 3
    status = {s["version"]: s for s in Rest(rest_url(server)).get(f"/v1/models/{BACKBONE}").json["model_version_status"]}
    assert (status["3"]["state"], status["2"]["state"], status["4"]["state"]) == ("AVAILABLE", "END", "END")
    assert status["4"]["status"]["error_code"] != "OK" and status["4"]["status"]["error_message"], status["4"]
    print("corrupt version status:", status["4"]["status"])


def test_reload_removing_a_model_under_load(private_server, tiny_repository_template, tmp_path, photo_bytes_list):
    """HandleReloadConfigRequest without tiny_b while tiny_b is under load: requests already inside finish
    with correct answers, later ones get NOT_FOUND, tiny_a never notices."""
    repo = tiny_repository_template
    batching = tmp_path / "batching.config"  # requests wait 150 ms in the queue: some are inside at the reload
    batching.write_text("max_batch_size { value: 16 } batch_timeout_micros { value: 150000 } "
                        "num_batch_threads { value: 2 } max_enqueued_batches { value: 16 }")
    both = write_models_config(tmp_path / "models.config", repo, {BACKBONE: LATEST_ONE, OTHER: LATEST_ONE})
    server = private_server(model_config_file=str(both), model_repository=str(repo), enable_batching=True,
                            batching_parameters_file=str(batching), enable_model_warmup=False)
    photos, saved = photo_bytes_list[:1], SavedModels(repo)
    grpc_client, rest_client = ClientPerThread(grpc_url(server)), ClientPerThread(rest_url(server))
    removed = (backbone_flow("gRPC tiny_b", grpc_client, OTHER, photos, saved, threads=3),
               backbone_flow("REST tiny_b", rest_client, OTHER, photos, saved, threads=1))
    kept = backbone_flow("gRPC tiny_a", grpc_client, BACKBONE, photos, saved, threads=1)
    only_a = _config_proto(models_config_to_text([(BACKBONE, str(repo / BACKBONE), LATEST_ONE, {})]))
    try:
        with traffic(*removed, kept, warmup=4):
            wait_until(lambda: server.gate.inflight >= 2, 30, "requests inside the server")
            reload_started = time.monotonic()
            reload_config(ServerAddress("127.0.0.1", server.grpc_port, server.rest_port), only_a, timeout=60)
            reload_done = time.monotonic()
            for flow in removed:
                wait_until(lambda f=flow: len(started_between(f.outcomes, reload_done)) >= 3, 30,
                           f"{flow.name} requests after the reload")
    finally:
        grpc_client.close()
        rest_client.close()

    assert not kept.failures, f"{kept.summary()}: {kept.failures[:3]}"
    outcomes = [o for flow in removed for o in flow.outcomes]
    margin = 0.05  # a request sent just before the reload may reach the server just after it
    before = started_between(outcomes, 0, reload_started - margin)
    assert before and all(o.ok for o in before), [o for o in before if not o.ok][:3]
    inside = [o for o in outcomes if o.started < reload_started < o.finished and o.ok]
    assert inside, "no request in flight at the reload completed"  # the server had >= 2 inside at that moment
    after = started_between(outcomes, reload_done)
    assert after and all(o.code == "NOT_FOUND" and f"Latest({OTHER})" in o.message for o in after), after[:3]
    assert all(o.ok or o.code == "NOT_FOUND" for o in outcomes), [o for o in outcomes if not o.ok][:3]
    assert server.manager.status(OTHER)[0].state == State.END
    print(f"reload: {len(inside)} request(s) in flight at the reload completed, {len(after)} later ones NOT_FOUND")


def _config_proto(text: str):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
