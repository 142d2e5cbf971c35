"""How the ensemble reaches and describes its members, and what it promises around them: version folders,
config overrides of the model card, version labels over gRPC, chunks through a batching server, the gateway's
--member names, output_filter, answers of members that failed, quorum errors, the photo limit, aggregation.

Expectations come from the same ensemble run in-process on the SavedModels, or from closed forms computed here.
"""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from carclf.clients import connect
from carclf.ensemble import aggregate as agg
from carclf.ensemble.config import load_config, render
from carclf.ensemble.members import InputSpec, SavedModelMemberCaller
from carclf.ensemble.runtime import EnsembleRuntime
from carclf.ensemble.servable import EnsembleServable
from carclf.errors import ConfigError, DeadlineExceeded, InvalidInput, Unavailable
from tests.clients.test_tls import certificate, tls_ports  # noqa: F401 - fixtures, asked for by name
from tests.ensemble.callers import RecordingCaller
from tests.ensemble.servers import TINY_LABELS, embedded_server, grpc_url, write_ensemble_config
from tests.fixtures import version_numbers
from tests.grpc_stubs import serving_prediction_service
from tests.serving.test_grpc import outputs, predict_request


def in_process(repository, config_path, images):
    """The ensemble of ``config_path`` run in-process straight on the SavedModels of ``repository``."""
    with EnsembleRuntime(load_config(config_path), SavedModelMemberCaller(repository)) as runtime:
        runtime.prepare()
        return runtime.predict(images)


# -- describing members -------------------------------------------------------------------------------

def test_version_folders_are_ordered_as_numbers_so_10_is_newer_than_2(tiny_repository_template, tmp_path,
                                                                     photo_bytes, tiny_config):
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository_template / "tiny_a" / "1", repository / "tiny_a" / "2")
    shutil.copytree(tiny_repository_template / "tiny_a" / "2", repository / "tiny_a" / "10")
    images = photo_bytes[:2]
    with EnsembleRuntime(tiny_config(("tiny_a",)), SavedModelMemberCaller(repository)) as runtime:
        got = runtime.predict(images)
    with EnsembleRuntime(tiny_config({"tiny_a": 2}), SavedModelMemberCaller(tiny_repository_template)) as runtime:
        want = runtime.predict(images)  # the same files as folder 10
    assert got.members[0].version == 10
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)


class ViewRecordingCaller(RecordingCaller):
    """Also keeps the views each member was sent."""

    def __init__(self, repository):
        super().__init__(repository)
        self.pixels: dict[str, np.ndarray] = {}

    def call(self, member, pixels, *, deadline, cancel=None):
        self.pixels[member.name] = pixels
        return super().call(member, pixels, deadline=deadline, cancel=cancel)


def test_config_input_size_and_resize_override_the_model_card(tiny_repository_template, photo_bytes, runtime_for):
    """``input_size.<m>`` and ``resize.<m>`` win over what the member's model card says."""
    import tensorflow as tf

    from carclf import imaging
    from carclf.ensemble.members import read_model_card
    from carclf.tta import make_views

    card = read_model_card(tiny_repository_template / "tiny_a" / "2")
    size, resize = int(card["input_size"]) + 8, "letterbox" if card.get("resize", "squash") != "letterbox" else "squash"
    caller = ViewRecordingCaller(tiny_repository_template)
    runtime = runtime_for(("tiny_a",), caller=caller, **{"input_size.tiny_a": str(size), "resize.tiny_a": resize})
    assert runtime.member_inputs()["tiny_a"] == InputSpec(size, resize)
    images = photo_bytes[:2]
    runtime.predict(images)
    eager = np.concatenate([make_views(imaging.decode_image(tf.constant(b)), "none", size, resize).numpy()
                            for b in images])
    np.testing.assert_array_equal(caller.pixels["tiny_a"], eager)


# -- members over gRPC (the gateway) ------------------------------------------------------------------

def test_the_gateway_calls_a_member_by_its_version_label(tiny_ensemble_server, tiny_repository_template,
                                                        photo_bytes, tmp_path):
    """``version_label.<m>`` travels in the gRPC member call: the labelled version answers, not the latest."""
    from carclf.ensemble.gateway import build_ensemble

    canary = TINY_LABELS["tiny_a"]["canary"]
    latest = version_numbers(tiny_repository_template / "tiny_a")[-1]
    assert canary != latest
    config = write_ensemble_config(tmp_path, name="tiny_labelled", **{"version_label.tiny_a": "canary"})
    images = np.array(photo_bytes[:2], dtype=object)
    servable = build_ensemble(config, grpc_url(tiny_ensemble_server), model_repository=tiny_repository_template)
    try:
        got = servable.predict("serving_default", {"image_bytes": images})
    finally:
        servable.close()
    assert got["member_versions"][:, 0].tolist() == [canary] * len(images)
    pinned = write_ensemble_config(tmp_path, name="tiny_pinned", members={"tiny_a": canary, "tiny_b": -1})
    want = in_process(tiny_repository_template, pinned, list(images))
    np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-5, atol=1e-6)


def test_the_gateway_refuses_a_member_url_for_a_name_that_is_not_a_member(tiny_ensemble_server, tmp_path):
    from carclf.ensemble.gateway import build_ensemble

    config = write_ensemble_config(tmp_path)
    with pytest.raises(ConfigError, match=r"--member names \['tiny_c'\], which are not members of 'tiny_ensemble'"):
        build_ensemble(config, grpc_url(tiny_ensemble_server), member_urls={"tiny_c": grpc_url(tiny_ensemble_server)})


def test_a_gateway_of_two_ensembles_places_a_member_of_only_one_of_them_elsewhere(tiny_ensemble_server,
                                                                                   tiny_repository_template,
                                                                                   photo_bytes, tmp_path):
    """``--member tiny_a=...`` with two ensembles, one over tiny_a and tiny_b, one over tiny_b alone: tiny_a is
    called where ``--member`` puts it (``--members`` serves tiny_b only) and the other ensemble is not refused for
    lacking it; a ``--member`` that no ensemble calls is refused before anything starts, naming every ensemble."""
    from carclf.ensemble.gateway import Gateway
    from carclf.serving.options import ServerOptions

    pair = write_ensemble_config(tmp_path, failure_policy="fail", quorum="2")
    solo = tmp_path / "tiny_solo.pbtxt"
    solo.write_text(render("tiny_solo", ("tiny_b",), parameters={"failure_policy": "fail"}), encoding="utf-8")
    options = ServerOptions(ensemble_config_file=[str(pair), str(solo)], port=0, rest_api_port=0,
                            model_repository=str(tiny_repository_template), file_system_poll_wait_seconds=0)
    images = list(photo_bytes[:2])
    with embedded_server(tiny_repository_template, tmp_path / "b", models=["tiny_b"]) as server_b:
        gateway = Gateway(options, grpc_url(server_b), member_urls={"tiny_a": grpc_url(tiny_ensemble_server)}).start()
        try:
            with connect(f"grpc://127.0.0.1:{gateway.grpc_port}") as client:
                got = {name: client.predict(name, images=images) for name in ("tiny_ensemble", "tiny_solo")}
        finally:
            gateway.stop(drain_timeout=1.0)
    for name, config in (("tiny_ensemble", pair), ("tiny_solo", solo)):
        assert got[name].outputs["member_answered"].all()
        want = in_process(tiny_repository_template, config, images)
        np.testing.assert_allclose(got[name].probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError) as info:
        Gateway(options, grpc_url(tiny_ensemble_server), member_urls={"tiny_c": grpc_url(tiny_ensemble_server)})
    assert info.value.field == "--member"
    assert info.value.detail == (f"no ensemble of --ensemble_config_file calls ['tiny_c'] "
                                 f"({pair}: ['tiny_a', 'tiny_b']; {solo}: ['tiny_b'])")


def test_the_gateway_gives_its_root_certificates_to_a_member_placed_elsewhere(request, tiny_ensemble_server,
                                                                              tiny_repository_template,
                                                                              photo_bytes, tmp_path):
    """``--member NAME=grpcs://...`` with ``--members_root_cert``: that member's TLS server (a private CA) is
    trusted, while the members behind a plaintext ``--members grpc://...`` are still called in plaintext (the
    certificates are for grpcs:// only)."""
    from carclf.ensemble.gateway import build_ensemble

    certificate_pem = request.getfixturevalue("certificate")[0]
    tls_grpc_port, _ = request.getfixturevalue("tls_ports")
    config = write_ensemble_config(tmp_path, failure_policy="fail")
    tls_url = f"grpcs://127.0.0.1:{tls_grpc_port}"  # the shared server's services again, behind TLS
    servable = build_ensemble(config, grpc_url(tiny_ensemble_server), model_repository=tiny_repository_template,
                              member_urls={"tiny_b": tls_url}, root_certificates=certificate_pem)
    images = np.array(photo_bytes[:1], dtype=object)
    try:
        got = servable.predict("serving_default", {"image_bytes": images})
    finally:
        servable.close()
    assert got["member_answered"].tolist() == [[True, True]]
    want = in_process(tiny_repository_template, config, list(images))
    np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-5, atol=1e-6)


class GarbageMember(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A member server (a stand-in for TF Serving) answering every Predict of tiny_b with ``self.answer``: a
    well-formed one (uniform probabilities, one row per view) or a broken one."""

    def __init__(self):
        self.answer = "uniform"

    def Predict(self, request, context):  # noqa: N802 - the gRPC method's name
        from tensorflow_serving.apis import predict_pb2

        from carclf.tensors import fill_proto, to_ndarray

        rows = to_ndarray(request.inputs["pixels"]).shape[0]
        response = predict_pb2.PredictResponse()
        response.model_spec.name, response.model_spec.signature_name = "tiny_b", "serving_pixels"
        response.model_spec.version.value = 1
        classes = 10
        probabilities = {"uniform": np.full((rows, classes), 1 / classes, np.float32),
                         "nan": np.full((rows, classes), np.nan, np.float32),
                         "logits": np.linspace(-2.0, 3.0, rows * classes, dtype=np.float32).reshape(rows, classes),
                         "one_row": np.full((1, classes), 1 / classes, np.float32)}.get(self.answer)
        name = "probabilities" if probabilities is not None else "scores"  # "no_probabilities": another output
        fill_proto(response.outputs[name], probabilities if probabilities is not None
                   else np.full((rows, classes), 1 / classes, np.float32))
        return response


@pytest.mark.parametrize("answer", ["nan", "logits", "one_row", "no_probabilities"])
def test_a_member_answering_garbage_is_left_out_under_degrade(tiny_ensemble_server, tiny_repository_template,
                                                              photo_bytes, tmp_path, answer):
    """A member server whose answer cannot be probabilities for the views sent (NaN from a diverged export, one
    row for 4 views, logits, no ``probabilities`` output) is left out under ``failure_policy: degrade``, as a member
    answering another number of classes is (ensemble/README.md): the photo is answered from the members that
    did, marked degraded. Not a 200 of NaN probabilities with an arbitrary label, nor an INTERNAL error for the
    whole request while tiny_a answered."""
    from carclf.ensemble.gateway import build_ensemble

    member = GarbageMember()
    config = write_ensemble_config(tmp_path, failure_policy="degrade", quorum="1")
    images = np.array(photo_bytes[:2], dtype=object)
    with serving_prediction_service(member) as port:
        servable = build_ensemble(config, grpc_url(tiny_ensemble_server), model_repository=tiny_repository_template,
                                  member_urls={"tiny_b": f"grpc://127.0.0.1:{port}"})
        try:
            member.answer = answer
            got = servable.predict("serving_default", {"image_bytes": images})
        finally:
            servable.close()
    assert got["member_answered"].tolist() == [[True, False]] * len(images)
    assert got["degraded"].all()
    assert np.isfinite(got["probabilities"]).all()


def test_carclf_gateway_reaches_members_by_its_flags_and_exits_0_on_sigterm(request, tiny_ensemble_server,
                                                                          tiny_repository_template, photo_bytes,
                                                                          tmp_path):
    """The command as a user runs it: ``--members`` names a server that is down, ``--member`` places tiny_a on the
    plaintext shared server and tiny_b behind its TLS port, trusted through ``--members_root_cert``. Only if both
    flags reach the gateway does each member answer; the answer equals the in-process ensemble's, and SIGTERM
    ends the gateway with status 0."""
    import signal

    from tests.serving.test_drain import ServeProcess

    cert_file = request.getfixturevalue("certificate")[2]
    tls_grpc_port, _ = request.getfixturevalue("tls_ports")
    config = write_ensemble_config(tmp_path, failure_policy="fail")
    gateway = ServeProcess("--members", "grpc://127.0.0.1:1", "--member", f"tiny_a={grpc_url(tiny_ensemble_server)}",
                           "--member", f"tiny_b=grpcs://127.0.0.1:{tls_grpc_port}", "--members_root_cert",
                           str(cert_file), "--ensemble_config_file", str(config), "--model_repository",
                           str(tiny_repository_template), command="gateway")
    try:
        gateway.wait_ready()
        with connect(f"grpc://127.0.0.1:{gateway.ports['grpc']}") as client:
            got = client.predict("tiny_ensemble", images=photo_bytes[:1]).outputs
        assert np.asarray(got["member_answered"]).tolist() == [[True, True]]
        want = in_process(tiny_repository_template, config, photo_bytes[:1])
        np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-5, atol=1e-6)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=60) == 0, "".join(gateway.lines[-20:])
    finally:
        gateway.kill()



class HangingMember(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A member server whose Predict answers UNAVAILABLE at once until ``hang`` is set, then never answers
    (until ``release``): a member stuck mid-call, after the gateway's start-up warmup has gone by."""

    def __init__(self):
        self.hang, self.release = threading.Event(), threading.Event()

    def Predict(self, request, context):  # noqa: N802 - the gRPC method's name
        if not self.hang.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        self.release.wait()
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")


def test_carclf_gateway_exits_1_at_once_when_its_drain_runs_out_of_time(tiny_repository_template, photo_bytes,
                                                                       tmp_path):
    """A member stuck mid-call keeps a request in flight at the gateway; SIGTERM with --drain_timeout_seconds 0.5
    ends the gateway with status 1 (the drain failed) soon after twice that time, not when the member call's
    60 s deadline would have ended it; the caller hears UNAVAILABLE (it may retry elsewhere)."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from tests.serving.conformance_setup import MONITORING
    from tests.serving.conftest import Rest
    from tests.serving.test_drain import ServeProcess

    member = HangingMember()
    member_server = grpc.server(ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(member, member_server)
    member_port = member_server.add_insecure_port("127.0.0.1:0")
    member_server.start()
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text(MONITORING)
    config = write_ensemble_config(tmp_path, failure_policy="fail", deadline_ms="60000")
    gateway = ServeProcess("--members", f"grpc://127.0.0.1:{member_port}", "--ensemble_config_file", str(config),
                           "--model_repository", str(tiny_repository_template), "--monitoring_config_file",
                           str(monitoring), "--drain_timeout_seconds", "0.5", command="gateway")
    try:
        gateway.wait_ready()
        member.hang.set()
        channel = grpc.insecure_channel(f"127.0.0.1:{gateway.ports['grpc']}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        call = stub.Predict.future(predict_request("tiny_ensemble", image_bytes=np.array(photo_bytes[:1], dtype=object)),
                                   timeout=120)
        rest = Rest(f"http://127.0.0.1:{gateway.ports['rest']}")
        deadline = time.monotonic() + 20
        while 'carclf_serving_inflight_requests{entrypoint="GRPC"} 1.0' not in rest.get(
                "/monitoring/prometheus/metrics").body.decode():
            assert time.monotonic() < deadline, "the request never became in flight:\n" + "".join(gateway.lines[-20:])
            time.sleep(0.05)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 1, "".join(gateway.lines[-20:])
        with pytest.raises(grpc.RpcError) as cut:
            call.result(timeout=10)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
        channel.close()
        deadline = time.monotonic() + 5  # the log reader may be a line behind the exit
        while not any("the drain ran out of time (--drain_timeout_seconds): exit status 1" in line
                      for line in gateway.lines):
            assert time.monotonic() < deadline, "".join(gateway.lines[-20:])
            time.sleep(0.05)
    finally:
        gateway.kill()
        member.release.set()
        member_server.stop(grace=None)

# -- members in-process, through a batching server ----------------------------------------------------

def test_member_calls_larger_than_the_batchers_max_batch_size_are_chunked_on_one_version(tiny_repository_template,
                                                                                           photo_bytes, tmp_path):
    """3 photos x hflip_crops views are more rows than max_batch_size 4: every member still answers, by the
    version (or label) its config names, exactly as the in-process ensemble."""
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 4 } batch_timeout_micros { value: 0 } "
                        "num_batch_threads { value: 2 } max_enqueued_batches { value: 16 }")
    work = tmp_path / "server"
    latest = write_ensemble_config(work, tta_policy="hflip_crops")
    labelled = write_ensemble_config(work, name="tiny_canary", tta_policy="hflip_crops",
                                     **{"version_label.tiny_a": "canary"})
    canary = TINY_LABELS["tiny_a"]["canary"]
    pinned = write_ensemble_config(tmp_path / "expected", name="tiny_canary", tta_policy="hflip_crops",
                                   members={"tiny_a": canary, "tiny_b": -1})
    images = photo_bytes[:3]
    with embedded_server(tiny_repository_template, work, ensembles=[latest, labelled], labels=TINY_LABELS,
                         enable_batching=True, batching_parameters_file=str(batching)) as server:
        with connect(grpc_url(server)) as client:
            got = {name: client.predict(name, images=images, timeout=60) for name in ("tiny_ensemble", "tiny_canary")}
    for name, config in (("tiny_ensemble", latest), ("tiny_canary", pinned)):
        want = in_process(tiny_repository_template, config, images)
        out = got[name].outputs
        assert out["member_answered"].all() and not out["degraded"].any(), name
        assert out["member_versions"].tolist() == [[m.version for m in want.members]] * len(images), name
        np.testing.assert_allclose(got[name].probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    assert got["tiny_canary"].outputs["member_versions"][0][0] == canary


# -- the served ensemble's outputs --------------------------------------------------------------------

def test_the_served_ensemble_honours_grpc_output_filter(tiny_ensemble_server, photo_bytes):
    wanted = ["probabilities", "member_versions"]
    with grpc.insecure_channel(f"127.0.0.1:{tiny_ensemble_server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        reply = stub.Predict(predict_request("tiny_ensemble", output_filter=wanted,
                                             image_bytes=np.array(photo_bytes[:2], dtype=object)), timeout=60)
        everything = stub.Predict(predict_request("tiny_ensemble", image_bytes=np.array(photo_bytes[:2],
                                                                                        dtype=object)), timeout=60)
    assert set(reply.outputs) == set(wanted) and set(everything.outputs) > set(wanted)
    np.testing.assert_allclose(outputs(reply)["probabilities"], outputs(everything)["probabilities"], rtol=1e-6)


def test_a_member_that_did_not_answer_has_an_empty_member_label(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template, failures={"tiny_b": [Unavailable("tiny_b is down")] * 3})
    runtime = runtime_for(caller=caller, failure_policy="degrade", quorum="1")
    servable = EnsembleServable(runtime)
    images = np.array(photo_bytes[:2], dtype=object)
    out = servable.predict("serving_default", {"image_bytes": images})
    assert out["member_answered"].tolist() == [[True, False]] * 2 and out["degraded"].all()
    labels = runtime.labels
    assert out["member_labels"][:, 1].tolist() == [b""] * 2
    assert out["member_labels"][:, 0].tolist() == [labels[int(i)].encode() for i in
                                                    np.argmax(out["member_probabilities"][:, 0], axis=-1)]


# -- quorum and limits --------------------------------------------------------------------------------

def test_a_quorum_missed_for_mixed_reasons_is_unavailable_and_deadline_only_when_all_timed_out(
        tiny_repository_template, photo_bytes, runtime_for):
    mixed = RecordingCaller(tiny_repository_template, failures={
        "tiny_a": [DeadlineExceeded("tiny_a was too slow")], "tiny_b": [Unavailable("tiny_b is down")] * 3})
    runtime = runtime_for(caller=mixed, failure_policy="degrade", quorum="1")
    with pytest.raises(Unavailable, match="only 0 of 2 members answered") as info:
        runtime.predict(photo_bytes[:1])
    assert not isinstance(info.value, DeadlineExceeded)
    timed_out = RecordingCaller(tiny_repository_template, failures={
        "tiny_a": [DeadlineExceeded("tiny_a was too slow")], "tiny_b": [DeadlineExceeded("tiny_b was too slow")]})
    runtime = runtime_for(caller=timed_out, failure_policy="degrade", quorum="1")
    with pytest.raises(DeadlineExceeded, match="only 0 of 2 members answered"):
        runtime.predict(photo_bytes[:1])


def test_exactly_max_batch_size_photos_are_accepted(tiny_repository_template, photo_bytes, tmp_path):
    path = tmp_path / "tiny_small" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text(render("tiny_small", ("tiny_a", "tiny_b"), max_batch_size=3), encoding="utf-8")
    config = load_config(path)
    with EnsembleRuntime(config, RecordingCaller(tiny_repository_template)) as runtime:
        result = runtime.predict(photo_bytes[:config.max_batch_size])
        assert result.probabilities.shape[0] == config.max_batch_size
        with pytest.raises(InvalidInput, match="max_batch_size"):
            runtime.predict(photo_bytes[:config.max_batch_size + 1])


# -- aggregation --------------------------------------------------------------------------------------

def test_geometric_mean_floors_probabilities_at_log_floor_before_the_logs():
    """A member's hard zero counts as LOG_FLOOR (1e-7): softmax(sum_m w_m log clip(p, 1e-7, 1))."""
    probs = np.array([[[0.0, 0.5, 0.5], [0.2, 0.8, 0.0]],
                      [[0.9, 0.05, 0.05], [0.3, 0.3, 0.4]]])
    weights = np.array([1.0, 3.0])
    w = weights / weights.sum()
    logs = np.tensordot(w, np.log(np.clip(probs, 1e-7, 1.0)), axes=1)
    expected = np.exp(logs) / np.exp(logs).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(agg.geometric_mean(probs, weights), expected, rtol=1e-5)


@pytest.mark.parametrize("method", ["weighted_mean", "geometric_mean"])
def test_a_negative_weight_is_refused_even_when_the_weights_sum_above_zero(method):
    with pytest.raises(InvalidInput, match="weights must be finite, >= 0"):
        agg.aggregate(method, np.full((2, 1, 3), 1 / 3), [-0.5, 2.0])
