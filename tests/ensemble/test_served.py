"""The ensemble served as a model: embedded server (in-process members) and gateway (gRPC members).

Expectations come from the same ensemble run in-process straight on the SavedModels
(``SavedModelMemberCaller``), never from hard-coded numbers.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from carclf.clients import connect
from carclf.ensemble.config import load_config, render
from carclf.ensemble.members import SavedModelMemberCaller
from carclf.ensemble.runtime import EnsembleRuntime
from carclf.errors import ConfigError, DeadlineExceeded, Unavailable
from tests.ensemble.servers import (
    TINY_ENSEMBLE_PARAMETERS,
    TINY_LABELS,
    TINY_MEMBERS,
    embedded_server,
    grpc_url,
    models_config,
    rest_url,
    write_ensemble_config,
)

ENSEMBLE = "tiny_ensemble"


@pytest.fixture(scope="module")
def expected(tiny_repository_template, photos, tmp_path_factory):
    """The ensemble of the served config, run in-process on 4 photos."""
    config = load_config(write_ensemble_config(tmp_path_factory.mktemp("expected")))
    with EnsembleRuntime(config, SavedModelMemberCaller(tiny_repository_template)) as runtime:
        runtime.prepare()
        images = [p.read_bytes() for p in photos[:4]]
        return images, runtime.predict(images)


def _urls(server):
    return [grpc_url(server), rest_url(server)]


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_embedded_ensemble_answers_like_the_in_process_ensemble(tiny_ensemble_server, expected, transport):
    images, want = expected
    url = grpc_url(tiny_ensemble_server) if transport == "grpc" else rest_url(tiny_ensemble_server)
    with connect(url) as client:
        got = client.predict(ENSEMBLE, images=images)
        status = client.status(ENSEMBLE)
        signature = client.metadata(ENSEMBLE).signatures["serving_default"]
    out = got.outputs
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["member_probabilities"], want.member_probabilities(), rtol=1e-5, atol=1e-6)
    assert got.labels == want.predicted_labels
    assert [[n for n, _ in row] for row in got.top_k(3)] == [[n for n, _ in row] for row in want.top_k(3)]
    assert out["member_names"].tolist() == [list(TINY_MEMBERS)] * 4
    assert out["member_versions"].tolist() == [[2, 1]] * 4  # the latest of each member
    assert out["member_answered"].all() and not out["degraded"].any()
    assert [(s.version, s.state) for s in status] == [(1, "AVAILABLE")]
    assert signature.inputs["image_bytes"].dtype == "DT_STRING"
    assert signature.outputs["probabilities"].shape == (-1, 10)
    assert signature.outputs["member_probabilities"].shape == (-1, 2, 10)
    if transport == "grpc":
        assert (got.model_name, got.version) == (ENSEMBLE, 1)


def _reload(server, repository, names):
    """HandleReloadConfigRequest over gRPC (models left out are unloaded), as an operator would."""
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    labels = {name: TINY_LABELS[name] for name in names if name in TINY_LABELS}
    config = text_format.Parse(models_config(repository, names, labels), model_server_config_pb2.ModelServerConfig())
    with connect(grpc_url(server)) as client:
        stub = model_service_pb2_grpc.ModelServiceStub(client.channel)
        reply = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=120)
    assert reply.status.error_code == 0, reply.status.error_message


def test_degraded_answer_when_a_member_is_stopped(tiny_ensemble_server, tiny_repository_template, expected):
    images, want = expected
    _reload(tiny_ensemble_server, tiny_repository_template, ["tiny_a"])
    try:
        for url in _urls(tiny_ensemble_server):
            with connect(url) as client:
                got = client.predict(ENSEMBLE, images=images)
            out = got.outputs
            assert out["degraded"].all() and out["member_answered"].tolist() == [[True, False]] * 4
            # the answer is tiny_a's own probabilities (weights renormalised over the members that answered)
            np.testing.assert_allclose(got.probabilities, want.members[0].probabilities, rtol=1e-5, atol=1e-6)
            assert np.all(out["member_probabilities"][:, 1] == 0) and out["member_versions"][:, 1].tolist() == [0] * 4
    finally:
        _reload(tiny_ensemble_server, tiny_repository_template, list(TINY_MEMBERS))
    with connect(grpc_url(tiny_ensemble_server)) as client:
        assert not client.predict(ENSEMBLE, images=images[:1]).outputs["degraded"].any()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_client_deadline_is_respected(tiny_ensemble_server, photos, transport):
    url = grpc_url(tiny_ensemble_server) if transport == "grpc" else rest_url(tiny_ensemble_server)
    images = [p.read_bytes() for p in photos[:32]]
    with connect(url) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.predict(ENSEMBLE, images=images, timeout=0.01)
        assert time.monotonic() - start < 1.0
        assert client.predict(ENSEMBLE, images=images[:1], timeout=30).probabilities.shape == (1, 10)


@pytest.mark.slow
def test_gateway_over_grpc_members_and_a_member_server_going_down(tiny_ensemble_server, tiny_repository_template,
                                                                   expected, tmp_path):
    """Gateway: tiny_a on the shared server, tiny_b on its own server, which is then stopped."""
    from carclf.ensemble.gateway import Gateway
    from carclf.serving.options import ServerOptions

    images, want = expected
    degrade = write_ensemble_config(tmp_path / "degrade", deadline_ms="5000", retry_initial_backoff_ms="50")
    fail = write_ensemble_config(tmp_path / "fail", name="tiny_strict", failure_policy="fail", quorum="1")
    with embedded_server(tiny_repository_template, tmp_path / "b", models=["tiny_b"]) as server_b:
        gateway = Gateway(ServerOptions(ensemble_config_file=[str(degrade), str(fail)], port=0, rest_api_port=-1,
                                        model_repository=str(tiny_repository_template),
                                        file_system_poll_wait_seconds=0, drain_timeout_seconds=2.0),
                          grpc_url(tiny_ensemble_server), member_urls={"tiny_b": grpc_url(server_b)}).start()
        try:
            for url in _urls(gateway):
                with connect(url) as client:
                    got = client.predict(ENSEMBLE, images=images)
                np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
                assert got.outputs["member_versions"].tolist() == [[2, 1]] * 4
            server_b.stop(drain_timeout=1.0)
            errors = []
            for url in _urls(gateway):
                with connect(url) as client:
                    start = time.monotonic()
                    got = client.predict(ENSEMBLE, images=images)
                    assert time.monotonic() - start < 5.0
                    assert got.outputs["degraded"].all() and got.outputs["member_answered"].tolist() == \
                        [[True, False]] * 4
                    np.testing.assert_allclose(got.probabilities, want.members[0].probabilities, rtol=1e-5,
                                               atol=1e-6)
                    with pytest.raises(Unavailable) as info:
                        client.predict("tiny_strict", images=images[:1])
                    errors.append(info.value)
            assert all("tiny_b" in e.message and e.code == "UNAVAILABLE" for e in errors)
        finally:
            gateway.stop(drain_timeout=1.0)


def test_gateway_command_refuses_a_rest_members_address(tmp_path, capsys):
    from carclf import cli

    config = write_ensemble_config(tmp_path)
    code = cli.main(["gateway", "--members", "http://127.0.0.1:8501", "--ensemble_config_file", str(config),
                     "--port", "0", "--rest_api_port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "carclf gateway: error: field '--members': members are called over gRPC: expected " \
                      "grpc://host:port, received 'http://127.0.0.1:8501'"
    for address in ("127.0.0.1:8500", "grpc://h:notaport"):  # a bare host:port; a bad port: named as --members
        assert cli.main(["gateway", "--members", address, "--ensemble_config_file", str(config)]) == 2
        assert "error: field '--members': " in capsys.readouterr().err
    member = TINY_MEMBERS[1]  # a member placed elsewhere at a bare or REST address: named as --member NAME
    for address in ("127.0.0.1:8500", "http://127.0.0.1:8501"):
        assert cli.main(["gateway", "--members", "grpc://h:1", "--member", f"{member}={address}",
                         "--ensemble_config_file", str(config)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"carclf gateway: error: field '--member {member}': members are called over gRPC: expected " \
            f"grpc://host:port, received {address!r}"
    assert cli.main(["gateway", "--members", "grpc://h:1", "--member", "oops", "--ensemble_config_file",
                     str(config)]) == 2
    assert "expected NAME=URL, received 'oops'" in capsys.readouterr().err
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate")
    assert cli.main(["gateway", "--members", "grpcs://h:1", "--members_root_cert", str(not_pem),
                     "--ensemble_config_file", str(config)]) == 2
    assert f"error: --members_root_cert {str(not_pem)!r} holds no PEM certificate" in capsys.readouterr().err
    assert cli.main(["gateway", "--members", "grpc://h:1"]) == 2  # named the gateway's own missing flag
    assert "error: --ensemble_config_file: the gateway serves ensembles" in capsys.readouterr().err


@pytest.mark.parametrize("item", ["tiny_b=", "=grpc://127.0.0.1:1", "tiny_b"])
def test_gateway_command_refuses_a_member_flag_without_its_name_or_url(tmp_path, capsys, item):
    """``--member NAME=URL`` with the name or the URL left out is refused at once, naming the flag and value."""
    from carclf import cli

    config = write_ensemble_config(tmp_path)
    assert cli.main(["gateway", "--members", "grpc://127.0.0.1:1", "--member", item, "--ensemble_config_file",
                     str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"carclf gateway: error: --member: expected NAME=URL, received {item!r}"


def test_gateway_command_requires_members(tmp_path, capsys):
    """Where the members live has no default: without --members the command stops with usage status 2."""
    from carclf import cli

    # (were --members optional, the missing --model_repository would stop the server this would start)
    with pytest.raises(SystemExit) as info:
        cli.main(["gateway", "--ensemble_config_file", str(write_ensemble_config(tmp_path)), "--model_repository",
                  str(tmp_path / "no_such_folder")])
    assert info.value.code == 2
    assert "the following arguments are required: --members" in capsys.readouterr().err


def test_member_version_label_picks_the_canary(tiny_ensemble_server, photos):
    images = [photos[0].read_bytes()]
    with connect(grpc_url(tiny_ensemble_server)) as client:
        canary = client.predict("tiny_canary", images=images).outputs
        latest = client.predict(ENSEMBLE, images=images).outputs
        tiny_a_v1 = client.predict("tiny_a", images=images, version=1)
    assert canary["member_versions"].tolist() == [[1, 1]] and latest["member_versions"].tolist() == [[2, 1]]
    assert canary["member_labels"][0][0] == tiny_a_v1.labels[0]


def test_an_ensemble_without_its_members_is_not_available_until_they_are_served(tiny_repository_template, photos,
                                                                                tmp_path):
    """As after `make demo` then `make serve` with another ensemble's config: the ensemble must not read
    AVAILABLE (readiness probes, load tests) while this server lacks the members it needs."""
    import json
    import urllib.error
    import urllib.request

    config = write_ensemble_config(tmp_path, name="strict", failure_policy="fail")  # needs tiny_a and tiny_b
    with embedded_server(tiny_repository_template, tmp_path / "server", models=("tiny_a",),
                         ensembles=[config]) as server:
        for url in _urls(server):
            with connect(url) as client:
                (status,) = client.status("strict")
                assert (status.state, status.error_code) == ("END", "UNAVAILABLE")
                assert "tiny_b (not in the model config)" in status.error_message
                assert "this server's models: tiny_a" in status.error_message
                with pytest.raises(Unavailable, match="needs 2 of its 2 members"):
                    client.predict("strict", images=[photos[0].read_bytes()])
                assert client.status("tiny_a")[0].state == "AVAILABLE"  # the rest serves on
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"{rest_url(server)}/v1/ready", timeout=10)
        assert ready.value.code == 503 and json.loads(ready.value.read())["models"]["strict"] is False

        _reload(server, tiny_repository_template, list(TINY_MEMBERS))  # the operator adds the member
        with connect(rest_url(server)) as client:
            assert client.status("strict")[0].state == "AVAILABLE"
            answer = client.predict("strict", images=[photos[0].read_bytes()])
            assert answer.outputs["member_answered"].tolist() == [[True, True]]
        _reload(server, tiny_repository_template, ["tiny_b"])  # and takes one away again
        with connect(grpc_url(server)) as client:
            (status,) = client.status("strict")
            assert status.state == "END" and "tiny_a (not in the model config)" in status.error_message


def test_an_ensemble_calling_a_version_label_its_member_lacks_is_not_available(tiny_repository_template, photos,
                                                                              tmp_path):
    """Every call would fail with "Unrecognized servable version label": the ensemble reads END and says why,
    like an ensemble whose members are missing."""
    config = write_ensemble_config(tmp_path, name="labelled", failure_policy="fail",
                                   **{"version_label.tiny_a": "nolabel"})
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config],
                         labels=TINY_LABELS) as server:
        with connect(grpc_url(server)) as client:
            (status,) = client.status("labelled")
            assert (status.state, status.error_code) == ("END", "UNAVAILABLE")
            assert "tiny_a (no version label 'nolabel' (labels: canary, stable))" in status.error_message
            with pytest.raises(Unavailable, match="needs 2 of its 2 members"):
                client.predict("labelled", images=[photos[0].read_bytes()])
            assert client.status("tiny_a")[0].state == "AVAILABLE"


def test_an_ensemble_whose_label_file_disagrees_with_its_members_does_not_start(tiny_repository_template, tmp_path):
    config = write_ensemble_config(tmp_path, name="relabelled")
    (config.parent / "labels.txt").write_text("a\nb\nc\n")
    text = config.read_text().replace('name: "probabilities"', 'name: "probabilities"\n  label_filename: "labels.txt"')
    config.write_text(text)
    with pytest.raises(ConfigError) as refused:
        with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]):
            pass
    message = refused.value.message
    assert str(config) in message and "output.label_filename" in message
    assert "has labels" in message and "from class 0 (10 in all), different from the ensemble's ['a', 'b', 'c']... " \
        "(3)" in message



def test_an_ensemble_answering_without_a_member_says_so_once(tiny_repository_template, photos, tmp_path, caplog):
    """Under failure_policy 'degrade' a misspelt member leaves the quorum met: the ensemble serves, and the
    server's log says once which member it answers without (not on every state change)."""
    config = tmp_path / "degraded" / "config.pbtxt"
    config.parent.mkdir()
    parameters = {k: v for k, v in TINY_ENSEMBLE_PARAMETERS.items() if k != "weight.tiny_b"}
    config.write_text(render("degraded", ["tiny_a", "tiny_typo"], parameters={**parameters, "weight.tiny_typo": "1"}))
    with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]) as server:
        with connect(grpc_url(server)) as client:
            assert client.status("degraded")[0].state == "AVAILABLE"
            answer = client.predict("degraded", images=[photos[0].read_bytes()])
            assert answer.outputs["member_answered"].tolist() == [[True, False]]
        _reload(server, tiny_repository_template, ["tiny_a", "tiny_b"])  # more state changes, same members
    said = [r.getMessage() for r in caplog.records if "answers without" in r.getMessage()]
    assert said == ["model degraded answers without tiny_typo (not in the model config) (1 of 2 members needed)"]


def test_a_bad_ensemble_config_is_refused_before_any_model_loads(tiny_repository_template, tmp_path, monkeypatch):
    """The server reads --ensemble_config_file before it loads the models (which takes minutes for real
    backbones), so a slip in the ensemble's file is reported at once, naming the file."""
    from carclf.serving.server import ModelServer

    loaded = []
    real_load = ModelServer._load_version
    monkeypatch.setattr(ModelServer, "_load_version", lambda self, *a: loaded.append(a) or real_load(self, *a))
    config = write_ensemble_config(tmp_path)
    config.write_text(config.read_text() + "\nmax_batch_sise: 8\n")
    with pytest.raises(ConfigError, match="max_batch_sise") as caught:
        with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]):
            pass
    assert str(config) in str(caught.value)
    assert loaded == []  # no model was loaded first
    with embedded_server(tiny_repository_template, tmp_path / "good", ensembles=[write_ensemble_config(
            tmp_path / "good_config")]) as server:  # the check passes a good file: the same server starts
        assert server.manager.readiness()[ENSEMBLE] and {name for name, *_ in loaded} == set(TINY_MEMBERS)


def test_a_model_name_served_twice_is_refused_before_any_model_loads(tiny_repository_template, tmp_path,
                                                                      monkeypatch):
    """An ensemble named like a model of the models config, or two ensemble files declaring one name, used to be
    found after every model had loaded ("already served"), naming neither file."""
    from carclf.serving.server import ModelServer

    loaded = []
    monkeypatch.setattr(ModelServer, "_load_version", lambda self, *a: loaded.append(a))
    clash = write_ensemble_config(tmp_path / "clash", name="tiny_b")
    with pytest.raises(ConfigError) as caught:
        with embedded_server(tiny_repository_template, tmp_path / "server1", ensembles=[clash]):
            pass
    assert caught.value.message == (f"{clash}: field 'name': declares model 'tiny_b', which "
                                    f"{tmp_path / 'server1' / 'models.config'} serves too; give one of them another name")
    first, second = (write_ensemble_config(tmp_path / folder) for folder in ("first", "second"))
    with pytest.raises(ConfigError) as caught:
        with embedded_server(tiny_repository_template, tmp_path / "server2", ensembles=[first, second]):
            pass
    assert caught.value.message == (f"{second}: field 'name': declares model '{ENSEMBLE}', as {first} does; give "
                                    "one of them another name")
    assert loaded == []


def test_a_fixed_output_size_that_disagrees_with_the_classes_stops_the_server(tiny_repository_template, tmp_path):
    """probabilities declared with 5 classes while the members have 10 used to load, its metadata then saying
    10: the classes are known once the members' cards are read, and the server refuses the file, naming it."""
    config = write_ensemble_config(tmp_path, name="five")
    config.write_text(config.read_text().replace('name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1',
                                                 'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: 5'))
    with pytest.raises(ConfigError) as refused:
        with embedded_server(tiny_repository_template, tmp_path / "server", ensembles=[config]):
            pass
    assert refused.value.message == (f"{config}: field 'output[0].dims': output 'probabilities' declares 5 classes, "
                                     "but the ensemble has 10; declare -1 (variable) or 10")


def _wait_for_version(server, model: str, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with connect(grpc_url(server)) as client:
        while time.monotonic() < deadline:
            if any(s.version == version and s.state == "AVAILABLE" for s in client.status(model)):
                return
            time.sleep(0.2)
    raise AssertionError(f"{model} version {version} did not become AVAILABLE")


def test_a_new_member_version_is_described_again_before_views_are_made_for_it(tiny_repository_template, photos,
                                                                              tmp_path):
    """A member's new version takes another input size: the ensemble makes views of that size for it (it used
    to keep the old version's size and answer wrongly without a word). A later version whose labels differ
    from the ensemble's is left out (a degraded answer), not a failure of every request."""
    import json
    import shutil

    from carclf import contract
    from tests.fixtures import TINY_SIZE, export_tiny

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository_template, repository)
    shutil.rmtree(repository / "tiny_a" / "2")  # tiny_a: version 1 only, TINY_SIZE px
    config = write_ensemble_config(tmp_path, name="swapping")
    images = [p.read_bytes() for p in photos[:2]]

    def in_process():
        with EnsembleRuntime(load_config(config), SavedModelMemberCaller(repository)) as runtime:
            return runtime.predict(images)

    with embedded_server(repository, tmp_path / "server", ensembles=[config],
                         file_system_poll_wait_seconds=1) as server, connect(grpc_url(server)) as client:
        before = client.predict("swapping", images=images)
        assert before.outputs["member_versions"].tolist() == [[1, 1], [1, 1]]

        bigger = TINY_SIZE + 16
        export_tiny(repository, "tiny_a", seed=7, size=bigger)  # version 2
        _wait_for_version(server, "tiny_a", 2)
        after = client.predict("swapping", images=images)
        assert after.outputs["member_versions"][0].tolist() == [2, 1]
        assert not after.outputs["degraded"].any()
        expected = in_process()  # the repository's newest versions, run straight on the SavedModels
        assert [m.version for m in expected.members] == [2, 1]
        np.testing.assert_allclose(after.outputs["member_probabilities"], expected.member_probabilities(), atol=1e-5)
        np.testing.assert_allclose(after.probabilities, expected.probabilities, atol=1e-5)

        relabelled = repository / "tiny_b" / "2"  # tiny_b version 2: its card lists the classes in another order
        shutil.copytree(repository / "tiny_b" / "1", tmp_path / "staging")
        card_path = tmp_path / "staging" / "assets.extra" / contract.MODEL_CARD
        card = json.loads(card_path.read_text())
        card_path.write_text(json.dumps({**card, "labels": list(reversed(card["labels"]))}))
        (tmp_path / "staging").rename(relabelled)
        _wait_for_version(server, "tiny_b", 2)
        degraded = client.predict("swapping", images=images)
        assert degraded.outputs["member_answered"].tolist() == [[True, False], [True, False]]
        assert degraded.outputs["degraded"].all()
        np.testing.assert_allclose(degraded.outputs["member_probabilities"][:, 0], expected.member_probabilities()[:, 0],
                                   atol=1e-5)


def test_a_member_version_without_its_model_card_does_not_fail_every_request(tiny_repository_template, photos,
                                                                             tmp_path):
    """tiny_b's new version loads before its assets.extra/ is there (a folder copied in place, or a SavedModel
    exported by another tool): the ensemble, under failure_policy degrade with its quorum met by tiny_a, still
    answers 200 from tiny_a (with or without tiny_b). It answered 400 FAILED_PRECONDITION "model card ... is
    missing" to every request: a client error for a file on the server, which the degrade policy did not cover."""
    import shutil

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository_template, repository)
    config = write_ensemble_config(tmp_path, name="carded")  # degrade, quorum 1
    images = [p.read_bytes() for p in photos[:2]]
    with embedded_server(repository, tmp_path / "server", ensembles=[config],
                         file_system_poll_wait_seconds=1) as server, connect(rest_url(server)) as client:
        staging = tmp_path / "staging"
        shutil.copytree(repository / "tiny_b" / "1", staging, ignore=shutil.ignore_patterns("assets.extra"))
        staging.rename(repository / "tiny_b" / "2")
        _wait_for_version(server, "tiny_b", 2)
        got = client.predict("carded", images=images)
    assert got.outputs["member_answered"][:, 0].all()
    assert np.isfinite(got.probabilities).all()
