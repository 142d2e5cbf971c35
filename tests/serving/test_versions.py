"""Versions coming and going under a private embedded server: new versions under load, broken folders,
in-flight requests, config reloads (RPC and file polling) and labels."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from carclf.errors import FailedPrecondition
from carclf.serving.manager import State
from tests.fixtures import break_version, version_numbers
from tests.serving.conformance_setup import MODEL, OTHER_MODEL, models_config_text
from tests.serving.conftest import Rest
from tests.serving.test_grpc import expect_code, outputs, predict_request
from tests.serving.test_rest import b64


def publish_copy(repo: Path, model: str, source: int, version: int) -> Path:
    """Publish ``source`` as a new ``version`` atomically (hidden folder, then rename), as export does."""
    staging = repo / model / f".incoming-{version}"
    shutil.copytree(repo / model / str(source), staging)
    final = repo / model / str(version)
    os.rename(staging, final)
    return final


def single_model_config(repo: Path, model: str = MODEL, policy: str = "") -> Path:
    path = repo / f"{model}.config"
    path.write_text(f'model_config_list {{ config {{ name: "{model}" base_path: "{repo / model}" '
                    f'model_platform: "tensorflow" {policy} }} }}')
    return path


def reload_request(text: str) -> model_management_pb2.ReloadConfigRequest:
    from google.protobuf import text_format

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return request


def which_version(probs: np.ndarray, candidates: dict[int, np.ndarray]) -> int | None:
    return next((v for v, ref in candidates.items() if np.allclose(probs, ref, atol=1e-5)), None)


@pytest.mark.slow
def test_new_version_is_picked_up_while_requests_keep_flowing(private_server, private_repository, reference, jpegs):
    repo = private_repository
    server = private_server(model_config_file=str(single_model_config(repo)), model_repository=str(repo),
                            file_system_poll_wait_seconds=1, enable_batching=True)
    data = np.array(jpegs[:1], dtype=object)
    refs = {v: reference(MODEL, v, image_bytes=data)["probabilities"][0] for v in (1, 2)}  # v3 is a copy of v1
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    stop, failures, seen = threading.Event(), [], []

    def grpc_traffic():
        while not stop.is_set():
            try:
                response = stub.Predict(predict_request(image_bytes=data), timeout=30)
                version = response.model_spec.version.value
                expected = refs[1] if version == 3 else refs[version]
                assert np.allclose(outputs(response)["probabilities"][0], expected, atol=1e-5)
                seen.append(version)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))

    def rest_traffic():
        while not stop.is_set():
            reply = rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[0])]})
            if reply.status != 200:
                failures.append(reply.body)
            elif which_version(np.array(reply.json["predictions"][0]["probabilities"]), refs) is None:
                failures.append("REST answer matches no version")

    threads = [threading.Thread(target=f) for f in (grpc_traffic, grpc_traffic, rest_traffic)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        publish_copy(repo, MODEL, source=1, version=3)
        assert server.manager.wait_for(MODEL, 3, State.AVAILABLE, timeout=60)
        assert server.manager.wait_for(MODEL, 2, State.END, timeout=30)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert 2 in seen and 3 in seen
    assert seen[-1] == 3


def test_inflight_request_finishes_on_the_version_it_started(private_server, private_repository, reference, jpegs,
                                                             tmp_path):
    repo = private_repository
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 3000000 } "
                        "num_batch_threads { value: 1 }")
    server = private_server(model_config_file=str(single_model_config(repo)), model_repository=str(repo),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    data = np.array(jpegs[:1], dtype=object)
    future = stub.Predict.future(predict_request(image_bytes=data), timeout=60)   # waits 3 s in the batch queue
    deadline = time.monotonic() + 10
    while server.gate.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    publish_copy(repo, MODEL, source=1, version=3)
    server.manager.poll()                      # loads 3, starts unloading 2
    assert server.manager.status(MODEL, 2)[0].state == State.UNLOADING
    # a version being unloaded takes no new request, even one naming it (TF Serving: not found)
    expect_code(lambda: stub.Predict(predict_request(version=2, image_bytes=data), timeout=30),
                grpc.StatusCode.NOT_FOUND, f"Specific({MODEL}, 2)")
    response = future.result()
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(outputs(response)["probabilities"], reference(MODEL, 2, image_bytes=data)["probabilities"],
                               atol=1e-5)
    assert server.manager.wait_for(MODEL, 2, State.END, timeout=10)
    assert stub.Predict(predict_request(image_bytes=data), timeout=30).model_spec.version.value == 3


def test_broken_version_is_reported_and_never_takes_down_the_rest(private_server, private_repository, reference, jpegs):
    repo = private_repository
    server = private_server(model_config_file=str(repo / "models.config"), model_repository=str(repo),
                            enable_model_warmup=False)
    broken = repo / MODEL / "3"
    (broken / "variables").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"\x08\x01 this is not a SavedModel")
    server.manager.poll()
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    states = {s["version"]: s for s in rest.get(f"/v1/models/{MODEL}").json["model_version_status"]}
    assert states["3"]["state"] == "END"
    assert states["3"]["status"]["error_code"] != "OK" and states["3"]["status"]["error_message"]
    assert states["2"]["state"] == "AVAILABLE" and states["1"]["state"] == "AVAILABLE"
    reply = rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[0])]})
    assert reply.status == 200
    expected = reference(MODEL, 2, image_bytes=np.array(jpegs[:1], dtype=object))["probabilities"]
    np.testing.assert_allclose(reply.json["predictions"][0]["probabilities"], expected[0], atol=1e-5)
    assert rest.post(f"/v1/models/{OTHER_MODEL}:predict", {"instances": [b64(jpegs[0])]}).status == 200
    # Repaired in place (new files): retried and loaded.
    shutil.rmtree(broken)
    publish_copy(repo, MODEL, source=1, version=3)
    server.manager.poll()
    assert server.manager.status(MODEL, 3)[0].state == State.AVAILABLE


def test_a_folder_named_by_other_digits_is_no_version_and_polling_goes_on(private_server, private_repository):
    """Version folders are named by ASCII digits, as TF Serving reads them: a stray '²' or '٣' folder beside the
    versions is ignored (it stopped every poll with a ValueError, so no new version was ever loaded)."""
    repo = private_repository
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(repo / OTHER_MODEL),
                            enable_model_warmup=False)
    for name in ("\u00b2", "\u0663"):
        shutil.copytree(repo / OTHER_MODEL / "1", repo / OTHER_MODEL / name)
    publish_copy(repo, OTHER_MODEL, source=1, version=2)
    server.manager.poll()
    assert {s.version: s.state for s in server.manager.status(OTHER_MODEL)} == {2: State.AVAILABLE, 1: State.END}


def test_a_broken_newest_version_under_the_latest_policy_leaves_the_previous_one_serving(
        private_server, private_repository, reference, jpegs):
    """Policy latest (1): version 2 appears but cannot load. Version 1 is no longer the one the policy wants, yet
    nothing else can answer, so it stays AVAILABLE and keeps answering (TF Serving's availability-preserving
    swap) instead of being unloaded for a version that never came."""
    repo = private_repository
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(repo / OTHER_MODEL),
                            enable_model_warmup=False)
    broken = repo / OTHER_MODEL / "2"
    (broken / "variables").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"\x08\x01 this is not a SavedModel")
    server.manager.poll()
    states = {s.version: s.state for s in server.manager.status(OTHER_MODEL)}
    assert states == {1: State.AVAILABLE, 2: State.END}, states
    reply = Rest(f"http://127.0.0.1:{server.rest_port}").post(f"/v1/models/{OTHER_MODEL}:predict",
                                                              {"instances": [b64(jpegs[0])]})
    assert reply.status == 200, reply.json
    expected = reference(OTHER_MODEL, 1, image_bytes=np.array(jpegs[:1], dtype=object))["probabilities"]
    np.testing.assert_allclose(reply.json["predictions"][0]["probabilities"], expected[0], atol=1e-5)


def test_a_policy_moved_to_a_version_that_fails_to_load_keeps_the_old_one_serving(private_repository):
    """The config moves from version 1 to version 3, whose files are broken: version 3 ends with its error and
    version 1, the only one that can answer, stays AVAILABLE and answers (never unloaded for nothing)."""
    from carclf.serving.config import BasePathResolver, parse_models_config
    from carclf.serving.manager import ModelManager
    from carclf.serving.savedmodel import SavedModelServable

    repo = private_repository
    broken = repo / MODEL / "3"
    (broken / "variables").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"\x08\x01 this is not a SavedModel")

    def config(version: int):
        return parse_models_config(f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / MODEL}" '
                                   f'model_version_policy {{ specific {{ versions: {version} }} }} }} }}',
                                   BasePathResolver(repo))

    manager = ModelManager(lambda name, version, path: SavedModelServable(name, version, path))
    try:
        manager.apply_config(config(1))
        manager.apply_config(config(3))
        states = {s.version: s.state for s in manager.status(MODEL)}
        assert states == {1: State.AVAILABLE, 3: State.END}, states
        with manager.acquire(MODEL) as lease:
            assert lease.version == 1
    finally:
        manager.close(timeout=5)


def test_reload_config_request(private_server, private_repository, reference, jpegs, tmp_path):
    repo = private_repository
    server = private_server(model_config_file=str(repo / "models.config"), model_repository=str(repo),
                            enable_model_warmup=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    data = np.array(jpegs[:1], dtype=object)
    only_a = (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / MODEL}" model_platform: '
              '"tensorflow" model_version_policy { all {} } version_labels { key: "stable" value: 2 } } }')
    reply = models.HandleReloadConfigRequest(reload_request(only_a), timeout=60)
    assert reply.status.error_code == 0
    expect_code(lambda: predict.Predict(predict_request(OTHER_MODEL, image_bytes=data), timeout=30),
                grpc.StatusCode.NOT_FOUND)
    assert server.manager.status(OTHER_MODEL)[0].state == State.END
    assert predict.Predict(predict_request(label="stable", image_bytes=data), timeout=30).model_spec.version.value == 2
    expect_code(lambda: predict.Predict(predict_request(label="canary", image_bytes=data), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label")

    outside = only_a.replace(str(repo / MODEL), str(tmp_path))
    expect_code(lambda: models.HandleReloadConfigRequest(reload_request(outside), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT, "outside the model repository")
    traversal = only_a.replace(str(repo / MODEL), f"{repo}/../{repo.name}/{MODEL}")
    expect_code(lambda: models.HandleReloadConfigRequest(reload_request(traversal), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT, "..")
    dangling = only_a.replace("value: 2", "value: 7")
    expect_code(lambda: models.HandleReloadConfigRequest(reload_request(dangling), timeout=60),
                grpc.StatusCode.FAILED_PRECONDITION, "stable->7")

    models.HandleReloadConfigRequest(reload_request(models_config_text(str(repo))), timeout=60)
    assert predict.Predict(predict_request(OTHER_MODEL, image_bytes=data), timeout=30).model_spec.version.value == 1

    moved = only_a.replace(str(repo / MODEL), str(repo / OTHER_MODEL)).replace("value: 2", "value: 1")
    models.HandleReloadConfigRequest(reload_request(moved), timeout=60)  # same name, other files
    response = predict.Predict(predict_request(image_bytes=data), timeout=30)
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(outputs(response)["probabilities"],
                               reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"], atol=1e-5)
    channel.close()


def test_config_file_is_polled(private_server, private_repository):
    repo = private_repository
    config = single_model_config(repo)
    server = private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False,
                            model_config_file_poll_wait_seconds=1)
    assert server.manager.model_names() == [MODEL]
    config.write_text(models_config_text(str(repo)))
    deadline = time.monotonic() + 60
    while OTHER_MODEL not in server.manager.readiness() or not server.manager.readiness()[OTHER_MODEL]:
        assert time.monotonic() < deadline, "the changed config file was not picked up"
        time.sleep(0.2)


def _polled_server(private_server, repo: Path, poll_s: float):
    """A server over ``repo/models.config``, polled every ``poll_s``; (server, channel, ModelService stub,
    PredictionService stub)."""
    server = private_server(model_config_file=str(repo / "models.config"), model_repository=str(repo),
                            enable_model_warmup=False, model_config_file_poll_wait_seconds=poll_s)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return (server, channel, model_service_pb2_grpc.ModelServiceStub(channel),
            prediction_service_pb2_grpc.PredictionServiceStub(channel))


def test_a_config_without_model_config_list_takes_no_action(private_server, private_repository, jpegs, caplog):
    """TF Serving takes no action for a config file without model_config_list (and refuses such a
    HandleReloadConfigRequest). So a polled config file caught between truncation and writing (empty) never
    unloads the models; ``model_config_list {}`` still means "serve nothing"."""
    repo = private_repository
    config_file = repo / "models.config"
    good = config_file.read_text()
    server, channel, models, predict = _polled_server(private_server, repo, 0.1)
    before = _served(server)
    assert before and all(ready for ready, _, _ in before.values())
    data = np.array(jpegs[:1], dtype=object)

    caplog.set_level(logging.INFO, logger="carclf.serving")
    caplog.clear()
    config_file.write_text("")  # what a poll sees between an editor's truncation and its write
    deadline = time.monotonic() + 30
    while not any("changed: reloading the model config" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the emptied config file was not read"
        time.sleep(0.05)
    time.sleep(0.5)  # five more polls
    assert _served(server) == before
    assert any("holds no model_config_list: taking no action" in r.getMessage() for r in caplog.records)
    assert predict.Predict(predict_request(image_bytes=data), timeout=30).model_spec.version.value
    config_file.write_text(good.replace("stable", "steady"))  # the new text, once written, is applied
    deadline = time.monotonic() + 30
    while "steady" not in server.manager.labels(MODEL):
        assert time.monotonic() < deadline, "the rewritten config file was not applied"
        time.sleep(0.05)

    served = _served(server)  # over gRPC, TF Serving refuses such a config outright
    expect_code(lambda: models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT, "Only ModelConfigList is currently supported")
    assert _served(server) == served
    assert predict.Predict(predict_request(label="steady", image_bytes=data), timeout=30).model_spec.version.value

    reply = models.HandleReloadConfigRequest(reload_request("model_config_list {}"), timeout=60)
    assert reply.status.error_code == 0 and _served(server) == {}  # an empty list is another matter
    expect_code(lambda: predict.Predict(predict_request(image_bytes=data), timeout=30), grpc.StatusCode.NOT_FOUND)
    channel.close()


@pytest.mark.extension
def test_a_configured_model_without_an_available_version_is_unavailable_not_unknown(private_server,
                                                                                  private_repository, jpegs):
    """serving/README.md: a configured model with no AVAILABLE version answers UNAVAILABLE / 503 (retry later),
    unlike an unknown model (NOT_FOUND / 404); the message says whether a version failed or none is there yet."""
    repo = private_repository
    waiting, broken = repo / "later", repo / "broken"
    waiting.mkdir()
    shutil.copytree(repo / OTHER_MODEL / "1", broken / "1")
    break_version(broken / "1")
    config = repo / "unavailable.config"
    config.write_text("model_config_list { " + "".join(
        f'config {{ name: "{path.name}" base_path: "{path}" model_platform: "tensorflow" }} '
        for path in (waiting, broken)) + "}")
    server = private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    body = {"instances": [b64(jpegs[0])]}
    reply = rest.post("/v1/models/later:predict", body)
    assert reply.status == 503 and "no version of model later is AVAILABLE yet" in reply.json["error"], reply.json
    reply = rest.post("/v1/models/broken:predict", body)
    assert reply.status == 503 and "(versions: 1 END: " in reply.json["error"], reply.json
    assert rest.post("/v1/models/no_such_model:predict", body).status == 404
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        expect_code(lambda: stub.Predict(predict_request("later", image_bytes=np.array(jpegs[:1], dtype=object)),
                                         timeout=30), grpc.StatusCode.UNAVAILABLE, "AVAILABLE yet")


def test_labels_on_unavailable_versions(private_server, private_repository):
    repo = private_repository
    config = repo / "dangling.config"
    config.write_text(models_config_text(str(repo)).replace("value: 2", "value: 9"))
    with pytest.raises(FailedPrecondition, match="canary->9"):
        private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False)
    server = private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False,
                            allow_version_labels_for_unavailable_models=True)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    reply = rest.post(f"/v1/models/{MODEL}/labels/canary:predict", {"instances": ["x"]})
    assert reply.status == 404 and "Specific(tiny_a, 9)" in reply.json["error"]


def test_broken_newest_version_at_startup_falls_back_to_the_previous(private_server, private_repository, reference,
                                                                      jpegs):
    repo = private_repository
    broken = repo / MODEL / "3"
    (broken / "variables").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"truncated")
    server = private_server(model_config_file=str(single_model_config(repo)), model_repository=str(repo),
                            enable_model_warmup=False)
    assert [(s.version, s.state) for s in server.manager.status(MODEL)] == [(3, State.END), (2, State.AVAILABLE)]
    assert "saved_model.pb" in server.manager.status(MODEL, 3)[0].error_message
    (broken / "saved_model.pb").write_bytes(b"")  # an empty file parses as an empty SavedModel: said plainly
    server.manager.poll()
    assert "saved_model.pb holds no meta graph" in server.manager.status(MODEL, 3)[0].error_message
    data = np.array(jpegs[:1], dtype=object)
    result = server.predictor.predict(MODEL, {"image_bytes": data})
    assert result.version == 2
    np.testing.assert_allclose(result.outputs["probabilities"],
                               reference(MODEL, 2, image_bytes=data)["probabilities"], atol=1e-5)


def _served(server) -> dict:
    """What a client sees: readiness per model, and each model's AVAILABLE versions and labels."""
    manager = server.manager
    return {name: (ready, sorted(s.version for s in manager.status(name) if s.state == State.AVAILABLE),
                   manager.labels(name)) for name, ready in manager.readiness().items()}


def test_a_failed_reload_changes_nothing_and_a_restored_file_is_not_needed(private_server, private_repository,
                                                                           jpegs, caplog):
    """A reload that cannot be applied whole is not applied at all (TF Serving applies it in part): a base_path
    typo with labels is refused before anything unloads, and a new model whose labelled version fails to load
    is taken away again. The polled config file is tried again every poll, but its refusal is logged once while
    it reads the same."""
    repo = private_repository
    config_file = repo / "models.config"
    good = config_file.read_text()
    server, channel, models, predict = _polled_server(private_server, repo, 0.2)
    before = _served(server)
    assert all(ready for ready, _, _ in before.values()) and before[MODEL][2]
    data = np.array(jpegs[:1], dtype=object)

    typo = good.replace(f'"{repo / MODEL}"', f'"{repo / MODEL}_typo"')
    expect_code(lambda: models.HandleReloadConfigRequest(reload_request(typo), timeout=60),
                grpc.StatusCode.FAILED_PRECONDITION, "Nothing of this config was applied")
    assert _served(server) == before
    assert predict.Predict(predict_request(label="stable", image_bytes=data), timeout=30).model_spec.version.value

    broken = repo / "broken"
    (broken / "5" / "variables").mkdir(parents=True)
    (broken / "5" / "saved_model.pb").write_bytes(b"")
    with_broken = good.replace("model_config_list {", 'model_config_list {\n  config { name: "broken" base_path: '
                               f'"{broken}" model_platform: "tensorflow" version_labels {{ key: "canary" value: 5 }} }}')
    expect_code(lambda: models.HandleReloadConfigRequest(reload_request(with_broken), timeout=60),
                grpc.StatusCode.FAILED_PRECONDITION, "broken (canary->5; version 5 failed to load: ")  # why, too
    assert _served(server) == before  # "broken" left again: /v1/ready stays 200
    assert Rest(f"http://127.0.0.1:{server.rest_port}").get("/v1/ready").status == 200

    caplog.clear()
    config_file.write_text(typo)  # the same refusal through the polled file: logged once
    deadline = time.monotonic() + 30
    while not any("config reload from" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the changed config file was not tried"
        time.sleep(0.1)
    time.sleep(1.0)  # five more polls
    assert sum("config reload from" in r.getMessage() for r in caplog.records) == 1
    assert _served(server) == before
    config_file.write_text(good)
    time.sleep(1.0)
    assert _served(server) == before
    channel.close()


def test_a_version_folder_given_as_base_path_gets_a_hint(private_server, private_repository, caplog):
    """TF Serving keeps running with a base path that holds no version folder; so does this server, and when
    that path is itself a version folder (a common slip) the warning says which folder to give instead."""
    version_folder = private_repository / MODEL / "1"
    server = private_server(model_name=MODEL, model_base_path=str(version_folder),
                            model_repository=str(private_repository), enable_model_warmup=False)
    assert server.manager.readiness() == {MODEL: False}
    (warning,) = [r.getMessage() for r in caplog.records if "no version folder under" in r.getMessage()]
    assert f"{version_folder} is itself a SavedModel" in warning and f"here {private_repository / MODEL}" in warning


def test_a_training_run_folder_given_as_base_path_gets_a_hint(private_server, private_repository, caplog):
    """A run folder of ``carclf train`` (weights, a recipe and run.json, no SavedModel) given as the base path: the
    warning says to export it and which folder to give then."""
    from carclf.train import runs

    run = private_repository / "mobilenet_v2-20261208-013000"
    run.mkdir()
    runs.write_json(run / runs.RUN_INFO, {"finished": True})
    (run / runs.CONFIG).write_text("name: mobilenet_v2\n")
    server = private_server(model_name=MODEL, model_base_path=str(run), model_repository=str(private_repository),
                            enable_model_warmup=False)
    assert server.manager.readiness() == {MODEL: False}
    (warning,) = [r.getMessage() for r in caplog.records if "no version folder under" in r.getMessage()]
    assert f"{run} is a training run folder: carclf export RUN --repository REPO" in warning, warning


def test_the_repository_given_as_base_path_gets_a_hint(private_server, private_repository, caplog):
    """``--model_base_path model_repository`` (the folder of every model): the warning names one model's folder."""
    server = private_server(model_name=MODEL, model_base_path=str(private_repository),
                            model_repository=str(private_repository), enable_model_warmup=False)
    assert server.manager.readiness() == {MODEL: False}
    (warning,) = [r.getMessage() for r in caplog.records if "no version folder under" in r.getMessage()]
    models = sorted(p.name for p in private_repository.iterdir() if p.is_dir() and any(
        c.name.isdigit() for c in p.iterdir()))
    assert (f"{private_repository} is a model repository, of models {models}: base_path is one model's folder, such "
            f"as {private_repository / models[0]}") in warning, warning


def test_labels_may_point_at_the_versions_served_around_a_broken_newest_one(private_server, private_repository,
                                                                             jpegs):
    """With ``latest { num_versions: 2 }`` and a newest version that fails to load, the server serves the two
    before it; a reload that labels those two is accepted (the label check passes over the broken version as
    the policy does), and a label on the broken version is still refused naming it."""
    repo = private_repository
    broken = repo / MODEL / "9"
    (broken / "variables").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    policy = "model_version_policy { latest { num_versions: 2 } }"
    server = private_server(model_config_file=str(single_model_config(repo, policy=policy)),
                            model_repository=str(repo), enable_model_warmup=False)
    states = {s.version: s.state for s in server.manager.status(MODEL)}
    assert states == {1: State.AVAILABLE, 2: State.AVAILABLE, 9: State.END}
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    text = (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / MODEL}" model_platform: '
            f'"tensorflow" {policy} version_labels {{ key: "stable" value: 1 }} '
            'version_labels { key: "canary" value: 2 } } }')

    reply = models.HandleReloadConfigRequest(reload_request(text), timeout=60)
    assert reply.status.error_code == 0, reply.status.error_message
    assert server.manager.labels(MODEL) == {"stable": 1, "canary": 2}
    data = np.array(jpegs[:1], dtype=object)
    for label, version in (("stable", 1), ("canary", 2)):
        assert predict.Predict(predict_request(label=label, image_bytes=data),
                               timeout=30).model_spec.version.value == version

    on_broken = text.replace("value: 2", "value: 9")
    details = expect_code(lambda: models.HandleReloadConfigRequest(reload_request(on_broken), timeout=60),
                          grpc.StatusCode.FAILED_PRECONDITION, "canary->9")
    assert "[1, 2]" in details and "passing over [9] that failed to load" in details
    assert server.manager.labels(MODEL) == {"stable": 1, "canary": 2}
    channel.close()


def test_a_refused_config_file_applies_once_the_version_its_label_needs_is_exported(private_server,
                                                                                     private_repository, jpegs,
                                                                                     caplog):
    """The canary rollout with the config written first: ``canary -> 3`` is refused while version 3 does not
    exist, and applies by itself once version 3 is exported (the file unchanged), as TF Serving re-reads its
    file every poll. The refusal is logged once, not every poll."""
    repo = private_repository
    config_file = single_model_config(repo, policy="model_version_policy { all {} }")
    server = private_server(model_config_file=str(config_file), model_repository=str(repo),
                            enable_model_warmup=False, model_config_file_poll_wait_seconds=0.2,
                            file_system_poll_wait_seconds=0.2)
    on_disk = version_numbers(repo / MODEL)
    new = on_disk[-1] + 1
    caplog.set_level(logging.INFO, logger="carclf.serving")
    caplog.clear()
    config_file.write_text(config_file.read_text().replace(
        "model_version_policy { all {} }", f'model_version_policy {{ all {{}} }} version_labels {{ key: "canary" '
                                           f'value: {new} }}'))
    deadline = time.monotonic() + 30
    while not any("config reload from" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the changed config file was not tried"
        time.sleep(0.1)
    time.sleep(1.0)  # five more polls, each trying the file again
    assert sum("config reload from" in r.getMessage() for r in caplog.records) == 1
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    data = np.array(jpegs[:1], dtype=object)
    expect_code(lambda: predict.Predict(predict_request(label="canary", image_bytes=data), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: canary")

    publish_copy(repo, MODEL, on_disk[-1], new)
    deadline = time.monotonic() + 60
    while "canary" not in server.manager.labels(MODEL):
        assert time.monotonic() < deadline, "the refused config file was not applied once its version was there"
        time.sleep(0.1)
    reply = predict.Predict(predict_request(label="canary", image_bytes=data), timeout=30)
    assert reply.model_spec.version.value == new
    assert any("applied on a later try" in r.getMessage() for r in caplog.records)
    channel.close()


@pytest.mark.slow
@pytest.mark.extension
def test_a_model_moved_to_another_base_path_keeps_answering_while_the_new_files_load(private_server,
                                                                                     private_repository, reference,
                                                                                     jpegs, caplog):
    """HandleReloadConfigRequest moves a model to another folder under load: its loaded versions keep answering
    until a version of the new folder is AVAILABLE, then go (it used to unload them first: 51 failed calls
    while the new one loaded). Status lists what answers meanwhile."""
    repo = private_repository
    server = private_server(model_config_file=str(single_model_config(repo)), model_repository=str(repo),
                            enable_model_warmup=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    data = np.array(jpegs[:1], dtype=object)
    old_latest = max(version_numbers(repo / MODEL))
    refs = {"old": reference(MODEL, old_latest, image_bytes=data)["probabilities"][0],
            "new": reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"][0]}
    stop, failures, answers = threading.Event(), [], []

    def traffic():
        while not stop.is_set():
            try:
                probs = outputs(predict.Predict(predict_request(image_bytes=data), timeout=30))["probabilities"][0]
                answers.append(next(k for k, ref in refs.items() if np.allclose(probs, ref, atol=1e-5)))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))

    caplog.set_level(logging.INFO, logger="carclf.serving")
    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        moved = (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / OTHER_MODEL}" '
                 'model_platform: "tensorflow" } }')
        assert models.HandleReloadConfigRequest(reload_request(moved), timeout=120).status.error_code == 0
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert answers[0] == "old" and answers[-1] == "new", (answers[:3], answers[-3:])
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"versions [{old_latest}] keep answering until one from {repo / OTHER_MODEL} is AVAILABLE" in said
    assert f"unloading {MODEL} version {old_latest} of its previous base_path" in said
    assert [s.version for s in server.manager.status(MODEL)] == [1]  # the new folder's version alone
    channel.close()


@pytest.mark.extension
def test_grpc_health_follows_readiness(private_server, private_repository, tmp_path):
    """grpc.health.v1 (extension): "" is SERVING only while every configured model has an AVAILABLE version,
    as /v1/ready; each model's name answers for that model. A model whose folder has no version yet used to
    leave "" SERVING, so a probe passed a server that could not answer it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = private_repository
    config = repo / "models.config"
    waiting = repo / "later"
    config.write_text(config.read_text().replace("model_config_list {", 'model_config_list {\n  config { name: '
                                                 f'"later" base_path: "{waiting}" model_platform: "tensorflow" }}', 1))
    server = private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False,
                            enable_grpc_healthcheck_service=True, file_system_poll_wait_seconds=0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status(service: str) -> str:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    assert (status(""), status("later"), status(MODEL)) == ("NOT_SERVING", "NOT_SERVING", "SERVING")
    assert Rest(f"http://127.0.0.1:{server.rest_port}").get("/v1/ready").status == 503
    shutil.copytree(repo / MODEL / "1", waiting / ".incoming-1")  # published whole, as export does
    os.rename(waiting / ".incoming-1", waiting / "1")
    deadline = time.monotonic() + 60
    while status("") != "SERVING":
        assert time.monotonic() < deadline, "health did not follow the model that became AVAILABLE"
        time.sleep(0.2)
    assert status("later") == "SERVING"
    channel.close()


def test_a_version_folder_linked_from_outside_the_repository_is_refused(private_server, private_repository, jpegs,
                                                                         tmp_path):
    """Base paths must stay inside --model_repository (no symlink out); a version folder symlinked to files
    outside it used to load and serve. It is reported END with why, and the others keep serving."""
    repo = private_repository
    server = private_server(model_config_file=str(repo / "models.config"), model_repository=str(repo),
                            enable_model_warmup=False)
    outside = tmp_path / "elsewhere" / "7"
    shutil.copytree(repo / MODEL / "1", outside)
    (repo / MODEL / "7").symlink_to(outside)
    server.manager.poll()
    (status,) = server.manager.status(MODEL, 7)
    assert status.state == State.END and status.error_code == "INVALID_ARGUMENT"
    assert status.error_message == (f"version folder {repo / MODEL / '7'} resolves to {outside.resolve()}, outside "
                                    f"the model repository {repo.resolve()}; copy the version into the repository "
                                    "instead of linking to it")
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    assert rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[0])]}).status == 200


def test_unloading_a_labelled_version_says_the_label_now_points_at_nothing(private_server, private_repository,
                                                                           caplog):
    """The rolling canary done out of order: with latest {2}, stable -> 1 and canary -> 2, exporting version 3
    unloads 1 while stable still points at it. As in TF Serving the label stays (requests by it fail); the
    log says so instead of only "unloading"."""
    repo = private_repository
    config = single_model_config(repo, policy='model_version_policy { latest { num_versions: 2 } } '
                                              'version_labels { key: "stable" value: 1 } '
                                              'version_labels { key: "canary" value: 2 }')
    server = private_server(model_config_file=str(config), model_repository=str(repo), enable_model_warmup=False)
    caplog.set_level(logging.INFO, logger="carclf.serving")
    publish_copy(repo, MODEL, source=2, version=3)
    server.manager.poll()
    assert server.manager.status(MODEL, 1)[0].state == State.END
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{MODEL} version 1 is unloaded while label(s) stable point at it: requests by label fail (NOT_FOUND) " \
           "until the model config moves them" in said


def test_a_version_number_past_int64_is_no_version(private_server, private_repository):
    """A folder named by a number TF Serving's int64 cannot hold is ignored, as TF Serving ignores it: it was
    loaded, then every model status, metadata and latest-version predict answered 500 (protobuf's int64 overflow),
    even after the folder was deleted."""
    repo = private_repository
    shutil.copytree(repo / OTHER_MODEL / "1", repo / OTHER_MODEL / str(2**63))
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(repo / OTHER_MODEL),
                            enable_model_warmup=False)
    assert {s.version: s.state for s in server.manager.status(OTHER_MODEL)} == {1: State.AVAILABLE}
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    reply = rest.get(f"/v1/models/{OTHER_MODEL}")
    assert reply.status == 200, reply.body
    assert [s["version"] for s in reply.json["model_version_status"]] == ["1"]
    assert rest.get(f"/v1/models/{OTHER_MODEL}/metadata").status == 200


def test_a_failed_version_is_retried_once_a_file_in_a_sub_folder_is_fixed(private_server, private_repository):
    """A version whose warmup record is cut short fails to load; copying the right file over it in place (the
    folders' own times do not change) is a change of its files, so the next poll loads it."""
    from carclf import contract

    repo = private_repository
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(repo / OTHER_MODEL))
    good = repo / OTHER_MODEL / "1" / "assets.extra" / contract.WARMUP_FILE
    staging = repo / OTHER_MODEL / ".incoming-2"
    shutil.copytree(repo / OTHER_MODEL / "1", staging)
    warmup = staging / "assets.extra" / contract.WARMUP_FILE
    warmup.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    os.rename(staging, repo / OTHER_MODEL / "2")
    server.manager.poll()
    status = server.manager.status(OTHER_MODEL, 2)[0]
    assert status.state == State.END and status.error_message
    server.manager.poll()  # unchanged: not loaded again
    assert server.manager.status(OTHER_MODEL, 2)[0] == status
    shutil.copyfile(good, repo / OTHER_MODEL / "2" / "assets.extra" / contract.WARMUP_FILE)
    server.manager.poll()
    assert {s.version: s.state for s in server.manager.status(OTHER_MODEL)} == {2: State.AVAILABLE, 1: State.END}


def test_a_base_path_that_cannot_be_listed_for_a_while_keeps_its_versions_serving(private_server, private_repository,
                                                                                  jpegs, caplog):
    """The model's folder renamed away (a swap, an unmount, a network filesystem's hiccup) and back: its loaded
    versions keep answering, as in TF Serving, which skips a base path it cannot list; they were unloaded and
    loaded again, with requests failing meanwhile. A model leaves by the model config."""
    repo = private_repository
    server = private_server(model_config_file=str(single_model_config(repo, OTHER_MODEL)), model_repository=str(repo),
                            enable_model_warmup=False)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    before = rest.post(f"/v1/models/{OTHER_MODEL}:predict", {"instances": [b64(jpegs[0])]})
    assert before.status == 200
    (repo / OTHER_MODEL).rename(repo / "elsewhere")
    with caplog.at_level(logging.INFO, logger="carclf.serving.manager"):
        server.manager.poll()
        server.manager.poll()
        reply = rest.post(f"/v1/models/{OTHER_MODEL}:predict", {"instances": [b64(jpegs[0])]})
        assert reply.status == 200, reply.body
        assert reply.json == before.json
        assert {s.version: s.state for s in server.manager.status(OTHER_MODEL)} == {1: State.AVAILABLE}
        (repo / "elsewhere").rename(repo / OTHER_MODEL)
        server.manager.poll()
    assert {s.version: s.state for s in server.manager.status(OTHER_MODEL)} == {1: State.AVAILABLE}
    said = [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()]
    assert len(said) == 1 and str(repo / OTHER_MODEL) in said[0] and "keep serving" in said[0], said
    assert any("can be listed again" in r.getMessage() for r in caplog.records)
    assert not any("loading" in r.getMessage() or "unloading" in r.getMessage() for r in caplog.records)


def test_a_model_back_in_the_config_while_its_last_request_runs_answers_again_at_once(
        private_server, private_repository, reference, jpegs, tmp_path):
    """The model leaves the config while a request holds its version, then comes back (with a label on that
    version) before the request ends. The version is still loaded: it answers again at once and stays loaded.
    Before, it was left UNLOADING and then END, the reload said OK and requests answered 503 until a file-system
    poll (never, without one); with the label, the reload was refused."""
    repo = private_repository
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 5000000 } "
                        "num_batch_threads { value: 1 }")
    server = private_server(model_config_file=str(repo / "models.config"), model_repository=str(repo),
                            enable_batching=True, batching_parameters_file=str(batching), enable_model_warmup=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    data = np.array(jpegs[:1], dtype=object)
    held = predict.Predict.future(predict_request(OTHER_MODEL, image_bytes=data), timeout=60)  # 5 s in the queue
    deadline = time.monotonic() + 10
    while server.gate.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    without = f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{repo / MODEL}" model_platform: "tensorflow" }} }}'
    assert models.HandleReloadConfigRequest(reload_request(without), timeout=60).status.error_code == 0
    assert server.manager.status(OTHER_MODEL, 1)[0].state == State.UNLOADING
    back = without.replace(" } }", f' }} config {{ name: "{OTHER_MODEL}" base_path: "{repo / OTHER_MODEL}" '
                                     'model_platform: "tensorflow" version_labels { key: "stable" value: 1 } } }')
    reply = models.HandleReloadConfigRequest(reload_request(back), timeout=60)
    assert reply.status.error_code == 0, reply.status.error_message
    expected = reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"]
    again = predict.Predict(predict_request(OTHER_MODEL, label="stable", image_bytes=data), timeout=60)
    assert again.model_spec.version.value == 1
    np.testing.assert_allclose(outputs(again)["probabilities"], expected, atol=1e-5)
    response = held.result()
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(outputs(response)["probabilities"], expected, atol=1e-5)
    assert server.manager.status(OTHER_MODEL, 1)[0].state == State.AVAILABLE
    assert predict.Predict(predict_request(OTHER_MODEL, image_bytes=data), timeout=60).model_spec.version.value == 1
    channel.close()
