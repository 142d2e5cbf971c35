"""The ensemble runtime on the tiny fixture SavedModels, loaded in-process (no server).

Member callers used here are real ``SavedModelMemberCaller``s; the slow or flaky ones only add a delay
or an error in front of the real call, to drive the deadline, retry and failure-policy paths.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from carclf import imaging
from carclf.cancel import CancelToken
from carclf.ensemble import aggregate as agg
from carclf.ensemble.members import InputSpec
from carclf.ensemble.runtime import EnsembleRuntime
from carclf.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from carclf.tta import make_views
from tests.ensemble.callers import RecordingCaller
from tests.grpc_stubs import serving_prediction_service


def test_single_member_ensemble_equals_the_training_evaluation(tiny_repository_template, photo_bytes, runtime_for):
    """Same decode, same TTA views, same view averaging as ``carclf train`` evaluation."""
    from carclf.train.evaluate import load_savedmodel, predict_policies

    info = load_savedmodel(tiny_repository_template / "tiny_a")
    expected = predict_policies(info.predictor, photo_bytes[:6], ["hflip_crops"], info.input_size)["hflip_crops"]
    runtime = runtime_for(("tiny_a",), tta_policy="hflip_crops")
    result = runtime.predict(photo_bytes[:6])
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5, atol=1e-6)
    assert result.labels == tuple(info.labels)


def test_views_are_bit_identical_to_make_views(photo_bytes, runtime_for):
    import tensorflow as tf

    runtime = runtime_for(tta_policy="hflip_crops")
    decoded = runtime.decode(photo_bytes[:3])
    views = runtime.views(decoded, [InputSpec(32), InputSpec(40)])
    for size in (32, 40):
        eager = np.concatenate([make_views(imaging.decode_image(tf.constant(b)), "hflip_crops", size).numpy()
                                for b in photo_bytes[:3]])
        got = views[InputSpec(size)]
        assert got.dtype == np.uint8 and np.array_equal(got, eager)


def test_one_batched_call_per_member_and_aggregation(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template)
    runtime = runtime_for(caller=caller, tta_policy="hflip_crops", aggregation="weighted_mean",
                          **{"weight.tiny_a": "3", "weight.tiny_b": "1"})
    caller.calls.clear()
    result = runtime.predict(photo_bytes[:5])
    assert sorted((name, shape) for name, shape, _ in caller.calls) == [
        ("tiny_a", (40, 32, 32, 3)), ("tiny_b", (40, 32, 32, 3))]  # 5 photos x 8 views, ONE call each
    a, b = result.members
    assert a.answered and b.answered and not result.degraded
    assert (a.version, b.version) == (2, 1)  # the latest of tiny_a, the only tiny_b
    np.testing.assert_allclose(result.probabilities, agg.weighted_mean(np.stack([a.probabilities, b.probabilities]),
                                                                       [3, 1]), rtol=1e-6)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-5)
    assert result.member_probabilities().shape == (5, 2, 10)
    assert [row[0][0] for row in result.top_k(3)] == result.predicted_labels
    assert set(result.timings_ms) >= {"decode_ms", "views_ms", "members_ms", "aggregate_ms", "total_ms"}


def test_pinned_version_is_the_one_used(photo_bytes, runtime_for):
    runtime = runtime_for({"tiny_a": 1, "tiny_b": -1})
    assert [m.version for m in runtime.predict(photo_bytes[:1]).members] == [1, 1]


def test_members_are_called_concurrently(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template, delays={"tiny_a": 1.2, "tiny_b": 1.2})
    runtime = runtime_for(caller=caller)
    runtime.predict(photo_bytes[:1])  # trace the graphs
    start = time.monotonic()
    runtime.predict(photo_bytes[:2])
    assert time.monotonic() - start < 2.2  # one delay, not two (2.4 s); 1 s of slack for a loaded machine


def test_deadline_is_respected_when_a_member_hangs(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template, delays={"tiny_b": 3.0})
    runtime = runtime_for(caller=caller, deadline_ms="700")
    runtime.views(runtime.decode(photo_bytes[:1]), [InputSpec(32)])  # trace the graphs outside the timed call
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="tiny_b"):
        runtime.predict(photo_bytes[:1])
    assert time.monotonic() - start < 2.0  # the 0.7 s deadline, not tiny_b's 3 s
    # a caller's own deadline, shorter than the config's, wins
    patient = runtime_for(caller=caller, deadline_ms="2500")
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        patient.predict(photo_bytes[:1], deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 1.5  # the caller's 0.3 s, not the config's 2.5 s


def test_degrade_answers_from_the_others_within_the_deadline(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template, delays={"tiny_b": 3.0})
    runtime = runtime_for(caller=caller, deadline_ms="700", failure_policy="degrade", quorum="1")
    runtime.views(runtime.decode(photo_bytes[:1]), [InputSpec(32)])
    start = time.monotonic()
    result = runtime.predict(photo_bytes[:2])
    assert time.monotonic() - start < 2.0  # the 0.7 s deadline, not tiny_b's 3 s
    a, b = result.members
    assert result.degraded and a.answered and not b.answered and b.error.code == "DEADLINE_EXCEEDED"
    np.testing.assert_allclose(result.probabilities, a.probabilities, rtol=1e-6)  # renormalised over tiny_a
    assert np.all(result.member_probabilities()[:, 1] == 0)


def test_a_hung_member_never_holds_up_the_calls_to_a_healthy_one(tiny_repository_template, photo_bytes, runtime_for):
    """More requests at once than a member may have calls running, while tiny_b hangs: every request still gets
    tiny_a's degraded answer. With one pool shared by the members, tiny_b's calls took every worker and tiny_a's
    calls waited behind them past the deadline ("only 0 of 2 members answered")."""
    from carclf.ensemble.runtime import MEMBER_WORKERS

    caller = RecordingCaller(tiny_repository_template, delays={"tiny_b": 3.0})
    runtime = runtime_for(caller=caller, deadline_ms="2000", failure_policy="degrade", quorum="1")
    runtime.predict(photo_bytes[:1])  # trace the graphs
    requests = MEMBER_WORKERS + 8
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(lambda _: runtime.predict(photo_bytes[:1]), range(requests)))
    assert all(r.degraded and [m.answered for m in r.members] == [True, False] for r in results)
    assert {r.members[1].error.code for r in results} == {"DEADLINE_EXCEEDED"}


def test_a_callers_shorter_deadline_leaves_time_to_answer_from_the_members_that_did(
        tiny_repository_template, photo_bytes, runtime_for):
    """The caller's 0.6 s is shorter than the config's 2.5 s: the members get all but a small reserve of it, so
    the degraded answer is ready before the caller stops waiting (not at the same instant, when a transport
    would already have answered DEADLINE_EXCEEDED)."""
    caller = RecordingCaller(tiny_repository_template, delays={"tiny_b": 3.0})
    runtime = runtime_for(caller=caller, deadline_ms="2500", failure_policy="degrade", quorum="1")
    runtime.predict(photo_bytes[:1])  # trace the graphs
    deadline = time.monotonic() + 0.6
    result = runtime.predict(photo_bytes[:1], deadline=deadline)
    assert time.monotonic() < deadline
    assert result.degraded and [m.answered for m in result.members] == [True, False]


def test_missing_member_fails_or_degrades_by_policy(tiny_repository_template, photo_bytes, runtime_for):
    with pytest.raises(NotFound, match="tiny_gone"):
        runtime_for(("tiny_a", "tiny_gone")).predict(photo_bytes[:1])
    result = runtime_for(("tiny_a", "tiny_gone"), failure_policy="degrade", quorum="1").predict(photo_bytes[:1])
    assert result.degraded and [m.answered for m in result.members] == [True, False]
    with pytest.raises(Unavailable, match="quorum is 2"):
        runtime_for(("tiny_a", "tiny_gone"), failure_policy="degrade", quorum="2").predict(photo_bytes[:1])


def test_a_quorum_lost_to_one_cause_keeps_its_code(tiny_repository_template, photo_bytes, runtime_for):
    """Every member overloaded (RESOURCE_EXHAUSTED: a full batching queue) is the ensemble's RESOURCE_EXHAUSTED
    (429, back off), as every member timing out is its DEADLINE_EXCEEDED; mixed causes are UNAVAILABLE. It was
    UNAVAILABLE (503), which clients retry at once, adding to the overload."""
    full = {name: [ResourceExhausted(f"{name}: the batching queue is full")] * 3 for name in ("tiny_a", "tiny_b")}
    overloaded = RecordingCaller(tiny_repository_template, failures=full)
    with pytest.raises(ResourceExhausted, match="quorum is 1"):
        runtime_for(caller=overloaded, failure_policy="degrade", quorum="1").predict(photo_bytes[:1])
    mixed = RecordingCaller(tiny_repository_template, failures={"tiny_a": full["tiny_a"],
                                                                "tiny_b": [NotFound("tiny_b is gone")] * 3})
    with pytest.raises(Unavailable, match="quorum is 1"):
        runtime_for(caller=mixed, failure_policy="degrade", quorum="1").predict(photo_bytes[:1])


def test_only_unavailable_is_retried_with_backoff(tiny_repository_template, photo_bytes, runtime_for):
    caller = RecordingCaller(tiny_repository_template,
                             failures={"tiny_a": [Unavailable("down"), Unavailable("still down")]})
    runtime = runtime_for(caller=caller, retry_max_attempts="3", retry_initial_backoff_ms="50")
    caller.calls.clear()
    result = runtime.predict(photo_bytes[:1])
    a_calls = [t for name, _, t in caller.calls if name == "tiny_a"]
    assert result.members[0].answered and result.members[0].attempts == 3 and len(a_calls) == 3
    assert a_calls[1] - a_calls[0] >= 0.045 and a_calls[2] - a_calls[1] >= 0.095  # 50 ms, then 100 ms

    caller.failures["tiny_a"] = [InvalidInput("bad views")]
    caller.calls.clear()
    with pytest.raises(InvalidInput, match="bad views"):
        runtime.predict(photo_bytes[:1])
    assert [name for name, _, _ in caller.calls].count("tiny_a") == 1

    caller.failures["tiny_a"] = [Unavailable("down")] * 5
    caller.calls.clear()
    with pytest.raises(Unavailable, match="tiny_a"):
        runtime.predict(photo_bytes[:1])
    assert [name for name, _, _ in caller.calls].count("tiny_a") == 3  # retry_max_attempts, not one more


def test_a_retry_that_would_end_past_the_deadline_is_not_made(tiny_repository_template, photo_bytes, runtime_for):
    """A member down for good, a 400 ms budget, 300 ms back-offs: one retry fits, the next would not, so the
    request fails at once with the member's own error (UNAVAILABLE), not later with DEADLINE_EXCEEDED."""
    caller = RecordingCaller(tiny_repository_template, failures={"tiny_a": [Unavailable("down")] * 10})
    runtime = runtime_for(caller=caller, deadline_ms="400", retry_max_attempts="10",
                          retry_initial_backoff_ms="150", retry_max_backoff_ms="300")
    caller.calls.clear()
    with pytest.raises(Unavailable, match="tiny_a.*down"):
        runtime.predict(photo_bytes[:1])
    assert [name for name, _, _ in caller.calls].count("tiny_a") == 2  # at once, then after 150 ms; not at 450


def test_degrade_covers_only_the_codes_degrade_on_names(tiny_repository_template, photo_bytes, runtime_for):
    """degrade_on: DEADLINE_EXCEEDED; a member UNAVAILABLE fails the request under degrade, naming it."""
    failing = RecordingCaller(tiny_repository_template, failures={"tiny_b": [Unavailable("down")] * 5})
    runtime = runtime_for(caller=failing, failure_policy="degrade", quorum="1", degrade_on="DEADLINE_EXCEEDED",
                          retry_max_attempts="1")
    with pytest.raises(Unavailable, match="member 'tiny_b' failed \\(UNAVAILABLE\\): down"):
        runtime.predict(photo_bytes[:1])
    slow = RecordingCaller(tiny_repository_template, delays={"tiny_b": 3.0})
    result = runtime_for(caller=slow, failure_policy="degrade", quorum="1", degrade_on="DEADLINE_EXCEEDED",
                         deadline_ms="700").predict(photo_bytes[:1])
    assert result.degraded and [m.answered for m in result.members] == [True, False]


def test_bad_photos_are_refused_by_index(runtime_for, photo_bytes):
    runtime = runtime_for()
    with pytest.raises(InvalidInput, match="photo 1: data is not a recognised image"):
        runtime.predict([photo_bytes[0], b"not a photo at all"])
    with pytest.raises(InvalidInput, match="photo 0: image is empty"):
        runtime.predict([b""])
    truncated = photo_bytes[0][:len(photo_bytes[0]) // 3]  # a real JPEG cut short: its header still reads
    with pytest.raises(InvalidInput) as cut:
        runtime.predict([photo_bytes[0], truncated])
    assert cut.value.message.startswith("photo 1 does not decode (truncated or corrupt): ")
    # one line, TensorFlow's reason only: no stack of the server's files
    assert "\n" not in cut.value.message and "File " not in cut.value.message and "Detected at" not in cut.value.message
    with pytest.raises(InvalidInput, match="no photos"):
        runtime.predict([])
    with pytest.raises(InvalidInput, match="max_batch_size"):
        runtime.predict([photo_bytes[0]] * 65)


def test_members_get_views_resized_as_their_model_cards_say(tiny_repository_template, photo_bytes, runtime_for,
                                                            tmp_path):
    """A letterbox member (model card ``resize``) gets letterboxed views, a squash member squashed ones, from
    the same decoded photos; members with the same size and mode share their views."""
    import json
    import shutil

    import tensorflow as tf

    from carclf import contract
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository_template, repository)
    card_path = next((repository / "tiny_b").glob("*/assets.extra")) / contract.MODEL_CARD
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "resize": "letterbox"}))
    runtime = runtime_for(("tiny_a", "tiny_b"), caller=RecordingCaller(repository), tta_policy="hflip")
    specs = runtime.member_inputs()
    assert specs["tiny_b"] == InputSpec(card["input_size"], "letterbox") and specs["tiny_a"].resize == "squash"
    views = runtime.views(runtime.decode(photo_bytes[:2]), list(specs.values()))
    for spec in specs.values():
        eager = np.concatenate([make_views(imaging.decode_image(tf.constant(b)), "hflip", spec.size, spec.resize)
                                .numpy() for b in photo_bytes[:2]])
        np.testing.assert_array_equal(views[spec], eager)
    result = runtime.predict(photo_bytes[:2])
    assert result.probabilities.shape[0] == 2 and not result.degraded


@pytest.mark.extension
def test_a_cancelled_request_ends_its_members_retry_pause_and_calls_no_more(tiny_repository_template, photo_bytes,
                                                                            runtime_for):
    """The request is cancelled (its client gave up) while tiny_a, which answered UNAVAILABLE, waits 10 s before
    its retry: the pause ends, tiny_a is not called again and the request is CANCELLED, not UNAVAILABLE."""
    caller = RecordingCaller(tiny_repository_template, failures={"tiny_a": [Unavailable("down")] * 10})
    runtime = runtime_for(caller=caller, deadline_ms="60000", retry_max_attempts="10",
                          retry_initial_backoff_ms="10000", retry_max_backoff_ms="10000")
    caller.calls.clear()
    cancel = CancelToken()
    threading.Timer(0.5, cancel.cancel).start()
    start = time.monotonic()
    with pytest.raises(Cancelled, match="tiny_ensemble"):
        runtime.predict(photo_bytes[:1], cancel=cancel)
    assert time.monotonic() - start < 8.0  # the cancel ended the 10 s pause
    assert [name for name, _, _ in caller.calls].count("tiny_a") == 1
    with pytest.raises(Cancelled):  # a request cancelled before it starts calls no member at all
        runtime.predict(photo_bytes[:1], cancel=cancel)
    assert [name for name, _, _ in caller.calls].count("tiny_a") == 1


def test_a_member_call_its_server_cancels_is_unavailable_to_the_ensemble():
    """A real gRPC server that ends Predict with CANCELLED (what a member shutting down does to a call caught in
    its closing connection): the gateway's member caller reports UNAVAILABLE, which the ensemble retries and
    degrades on; other errors keep their code."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from carclf.clients.grpc_client import GrpcClient
    from carclf.ensemble.config import Member
    from carclf.ensemble.members import GrpcMemberCaller
    from carclf.errors import FailedPrecondition

    answers = {"cancelling": grpc.StatusCode.CANCELLED, "refusing": grpc.StatusCode.FAILED_PRECONDITION}

    class Ending(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the gRPC method's name
            context.abort(answers[request.model_spec.name], "the member ended it")

    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    with serving_prediction_service(Ending()) as port, \
            contextlib.closing(GrpcMemberCaller(GrpcClient(f"127.0.0.1:{port}"))) as caller:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port} ended the call before answering it .the member ended"):
            caller.call(Member("cancelling"), pixels, deadline=time.monotonic() + 5)
        with pytest.raises(FailedPrecondition, match="the member ended it"):
            caller.call(Member("refusing"), pixels, deadline=time.monotonic() + 5)


class FewerClassesCaller(RecordingCaller):
    """tiny_b answers only the first ``classes`` probabilities (a member trained on fewer classes)."""

    def __init__(self, repository, classes: int, **kwargs):
        super().__init__(repository, **kwargs)
        self.classes = classes

    def call(self, member, pixels, *, deadline, cancel=None):
        reply = super().call(member, pixels, deadline=deadline, cancel=cancel)
        if member.name != "tiny_b":
            return reply
        return type(reply)(reply.probabilities[:, :self.classes], reply.version)


def test_a_member_answering_another_number_of_classes_is_left_out_or_named(tiny_repository_template, photo_bytes,
                                                                           runtime_for, monkeypatch):
    """With labels known, a member answering 5 class probabilities of the ensemble's 10 is left out (a degraded
    answer naming it); with no labels anywhere the request fails naming each member's count (it used to end in
    numpy's "all input arrays must have the same shape", which took the server down at start)."""
    caller = FewerClassesCaller(tiny_repository_template, 5)
    result = runtime_for(caller=caller, failure_policy="degrade", quorum="1").predict(photo_bytes[:1])
    a, b = result.members
    assert result.degraded and a.answered and not b.answered
    assert b.error.code == "UNAVAILABLE" and b.error.message == (
        "member 'tiny_b' answered 5 class probabilities, the ensemble has 10 classes; left out of the ensemble")

    from carclf.ensemble import members

    real = members.info_from_card
    monkeypatch.setattr(members, "info_from_card",  # model cards without labels, and no label_filename
                        lambda card, *a, **k: real({k2: v for k2, v in card.items() if k2 != "labels"}, *a, **k))
    unlabelled = runtime_for(caller=FewerClassesCaller(tiny_repository_template, 5), failure_policy="degrade",
                             quorum="1")
    with pytest.raises(FailedPrecondition, match=r"members answer different numbers of classes \(tiny_a: 10, "
                                                 r"tiny_b: 5\); give the members model cards with labels"):
        unlabelled.predict(photo_bytes[:1])


def test_a_label_mismatch_shows_where_the_labels_part(tiny_repository_template, tiny_config):
    """Labels that differ only from class 5 on: the message shows them from there, not the first three that
    agree on both sides."""
    import dataclasses

    from carclf.ensemble.runtime import LabelMismatch

    config = tiny_config(("tiny_a",))
    with EnsembleRuntime(config, RecordingCaller(tiny_repository_template)) as runtime:
        labels = list(runtime.labels)
    swapped = labels[:5] + [labels[6], labels[5]] + labels[7:]
    with EnsembleRuntime(dataclasses.replace(config, labels=tuple(swapped)),
                         RecordingCaller(tiny_repository_template)) as runtime:
        with pytest.raises(LabelMismatch) as info:
            runtime.prepare()
    assert f"has labels {labels[5:8]}... from class 5 (10 in all), different from the ensemble's " \
           f"{swapped[5:8]}... (10)" in info.value.message
