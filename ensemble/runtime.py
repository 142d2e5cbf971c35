"""The ensemble runtime: photos in, aggregated class probabilities out.

For a batch of photos it decodes each photo once (``carclf.imaging.decode_image``), builds the TTA views
once per distinct member input (``InputSpec``: size and resize mode, from the member's model card;
``carclf.tta.make_views``, the training evaluation's code), sends ONE
batched ``serving_pixels`` Predict per member with every view of every photo stacked, calls the members
concurrently under one deadline, averages each photo's views (``carclf.tta.average_views``), aggregates
across members (``carclf.ensemble.aggregate``) and reports what happened: per-member probabilities,
versions actually used, latencies, errors, and whether the answer is degraded.

Failure policy (from the config): ``fail`` raises the first member error; ``degrade`` answers from the
members that did answer when the others failed with a code listed in ``degrade_on``, as long as at least
``quorum`` answered. Only UNAVAILABLE is retried, with exponential backoff, and never past the deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from carclf import imaging
from carclf.cancel import CancelToken
from carclf.ensemble import aggregate as agg
from carclf.ensemble.config import RETRYABLE_CODES, EnsembleConfig, Member
from carclf.ensemble.members import InputSpec, MemberCaller, MemberInfo, MemberReply
from carclf.errors import (
    CarClfError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidInput,
    Unavailable,
    error_for_code,
)
from carclf.serving.options import DEFAULT_GRPC_THREADS
from carclf.tta import average_views, traced_views

# Calls one member may have running at once: as many as the embedded server's default gRPC handler threads,
# so no request's call waits behind other requests' calls to the same member. Each member has its own pool:
# a member that hangs fills only its own, never the workers a healthy member's calls need.
MEMBER_WORKERS = DEFAULT_GRPC_THREADS

# Of a caller's deadline (when it is shorter than the ensemble's own), the members get all but this share,
# at most ANSWER_RESERVE_S: the rest is kept to aggregate and send the answer before the caller gives up, so
# that ``degrade`` can still answer from the members that did.
ANSWER_RESERVE_SHARE = 0.1
ANSWER_RESERVE_S = 0.05


class LabelMismatch(FailedPrecondition):
    """A member's class labels differ from the ensemble's: its probabilities cannot be averaged with theirs."""


@dataclass(frozen=True)
class MemberOutcome:
    """What one member did for one request."""

    name: str
    answered: bool
    probabilities: np.ndarray | None  # [photos, classes], views averaged
    version: int | None
    latency_ms: float
    attempts: int
    error: CarClfError | None = None


@dataclass(frozen=True)
class EnsembleResult:
    probabilities: np.ndarray  # float32 [photos, classes]
    labels: tuple[str, ...]  # class names, index = class id
    members: tuple[MemberOutcome, ...]
    degraded: bool
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def class_ids(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=-1).astype(np.int64)

    @property
    def predicted_labels(self) -> list[str]:
        return [self.labels[i] for i in self.class_ids]

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        ids, probs = agg.top_k(self.probabilities, k)
        return [[(self.labels[c], float(p)) for c, p in zip(row_ids, row_p, strict=True)]
                for row_ids, row_p in zip(ids, probs, strict=True)]

    def member_probabilities(self) -> np.ndarray:
        """float32 [photos, members, classes]; zeros for a member that did not answer."""
        n, c = self.probabilities.shape
        out = np.zeros((n, len(self.members), c), np.float32)
        for j, m in enumerate(self.members):
            if m.answered:
                out[:, j, :] = m.probabilities
        return out


def _spec_text(info: MemberInfo) -> str:
    size = info.input_size if isinstance(info.input_size, int) else "x".join(map(str, info.input_size))
    return f"{size} px {info.resize}"


class EnsembleRuntime:
    """Runs one ensemble config against members reached through a ``MemberCaller``. Thread-safe."""

    def __init__(self, config: EnsembleConfig, caller: MemberCaller, *, max_workers: int | None = None,
                 owns_caller: bool = True):
        self.config = config
        self.caller = caller
        self.owns_caller = owns_caller  # close() closes the caller too (not when runtimes share one)
        self._pools = {m.name: cf.ThreadPoolExecutor(max_workers=max_workers or MEMBER_WORKERS,
                                                     thread_name_prefix=f"{config.name}-{m.name}")
                       for m in config.members}
        self._info: dict[str, MemberInfo] = {}
        self._info_lock = threading.Lock()
        self._labels: tuple[str, ...] | None = config.labels

    # Members ---------------------------------------------------------------------------------

    def describe(self, member: Member) -> MemberInfo:
        """The member's description, cached per version: read again when the version a call would use has
        changed (a new version loaded), so that views are made for the version that answers. A failure is
        not cached (the member may come up later)."""
        version = self.caller.current_version(member)
        with self._info_lock:
            info = self._info.get(member.name)
        if info is None or (version is not None and info.version is not None and info.version != version):
            info = self.caller.describe(member, version)
            with self._info_lock:
                self._info[member.name] = info
                self._check_labels(member, info)
        return info

    def _check_labels(self, member: Member, info: MemberInfo) -> None:
        if info.labels is None:
            return
        if self._labels is None:
            self._labels = info.labels
        elif tuple(self._labels) != tuple(info.labels):
            self._info.pop(member.name, None)
            first = next((i for i, (a, b) in enumerate(zip(info.labels, self._labels, strict=False)) if a != b),
                         min(len(info.labels), len(self._labels)))
            shown = slice(first, first + 3)
            raise LabelMismatch(f"member {member.name!r} has labels {list(info.labels[shown])}... from class {first} "
                                f"({len(info.labels)} in all), different from the ensemble's "
                                f"{list(self._labels[shown])}... ({len(self._labels)})")

    def prepare(self, *, strict: bool = True) -> dict[str, MemberInfo | CarClfError]:
        """Describe every member now (input sizes, labels). With ``strict`` any failure raises."""
        out: dict[str, MemberInfo | CarClfError] = {}
        for m in self.config.members:
            try:
                out[m.name] = self.describe(m)
            except CarClfError as exc:
                if strict:
                    raise
                out[m.name] = exc
        return out

    def warm(self, *, call_members: bool = False) -> bool:
        """Describe the members and trace the decode and view graphs, so the first request pays neither.

        With ``call_members`` one synthetic photo also goes through every member (best effort: their
        ``serving_pixels`` path warms up too); returns whether that call succeeded.
        """
        import tensorflow as tf

        self.prepare(strict=False)
        photo = tf.io.encode_jpeg(tf.zeros([64, 48, 3], tf.uint8)).numpy()
        self.views(self.decode([photo]), [s for s in self.member_inputs().values() if isinstance(s, InputSpec)])
        if not call_members:
            return False
        try:
            self.predict([photo])
            return True
        except CarClfError:
            return False  # members not up yet: the first request that needs them describes them again

    @property
    def labels(self) -> tuple[str, ...]:
        if self._labels is None:
            self.prepare(strict=False)
        if self._labels is None:
            raise FailedPrecondition(f"ensemble {self.config.name!r}: class labels unknown (no member model card "
                                     "could be read and the config names no label_filename)")
        return self._labels

    # Input ------------------------------------------------------------------------------------

    def decode(self, images: Sequence[bytes]) -> list:
        """Check and decode each photo once: uint8 [H, W, 3] tensors, EXIF orientation applied."""
        if len(images) == 0:
            raise InvalidInput("no photos in the request")
        if len(images) > self.config.max_batch_size:
            raise InvalidInput(f"{len(images)} photos in one request, more than max_batch_size "
                               f"{self.config.max_batch_size} of {self.config.name!r}")
        decoded = []
        for i, data in enumerate(images):
            data = bytes(data)
            try:
                imaging.probe_image(data)
            except InvalidInput as exc:
                raise InvalidInput(f"photo {i}: {exc.message}") from None
            decoded.append(imaging.decode_checked(data, f"photo {i}"))
        return decoded

    def views(self, decoded: Sequence, specs: Sequence[InputSpec]) -> dict[InputSpec, np.ndarray]:
        """TTA views of every photo, once per distinct input spec: {spec: uint8 [photos * views, H, W, 3]}, H x W
        the spec's size.

        ``carclf.tta.make_views`` (the training evaluation's function) builds them, as a graph
        (``tta.traced_views``); views of one photo are consecutive rows, as ``carclf.tta.average_views`` expects.
        """
        out = {}
        for key in dict.fromkeys(specs):
            make = traced_views(self.config.tta, key.size, key.resize)
            out[key] = np.concatenate([make(img).numpy() for img in decoded], axis=0)
        return out

    def member_infos(self) -> dict[str, MemberInfo | CarClfError]:
        """Each member's description, or the error that kept it from being described. A member whose labels
        differ from the ensemble's is UNAVAILABLE to it (left out, as a member that is down)."""
        infos: dict[str, MemberInfo | CarClfError] = {}
        for m in self.config.members:
            try:
                infos[m.name] = self.describe(m)
            except LabelMismatch as exc:
                infos[m.name] = Unavailable(f"{exc.message}; left out of the ensemble")
            except CarClfError as exc:
                infos[m.name] = exc
        return infos

    def member_inputs(self) -> dict[str, InputSpec | CarClfError]:
        """Each member's input spec (size and resize mode), or the error that kept it from being described."""
        return {name: info.input_spec if isinstance(info, MemberInfo) else info
                for name, info in self.member_infos().items()}

    # Prediction -------------------------------------------------------------------------------

    def predict(self, images: Sequence[bytes], *, deadline: float | None = None,
                cancel: CancelToken | None = None) -> EnsembleResult:
        """Classify encoded photos. ``deadline``: absolute ``time.monotonic()``; the config's applies too.
        Cancelling ``cancel`` (the request's client gave up) cancels the member calls: CANCELLED."""
        start = time.monotonic()
        deadline = self._deadline(start, deadline)
        decoded = self.decode(images)
        t_decode = time.monotonic()
        inputs = self.member_infos()
        views = self.views(decoded, [i.input_spec for i in inputs.values() if isinstance(i, MemberInfo)])
        t_views = time.monotonic()
        result = self._run_members(views, len(decoded), deadline, inputs, cancel)
        timings = {"decode_ms": (t_decode - start) * 1e3, "views_ms": (t_views - t_decode) * 1e3,
                   **result.timings_ms, "total_ms": (time.monotonic() - start) * 1e3}
        return EnsembleResult(result.probabilities, result.labels, result.members, result.degraded, timings)

    def predict_views(self, views: Mapping[InputSpec, np.ndarray], num_photos: int, *, deadline: float | None = None,
                      inputs: Mapping[str, MemberInfo | InputSpec | CarClfError] | None = None,
                      cancel: CancelToken | None = None) -> EnsembleResult:
        """Run the members on prepared views ({input spec: [photos * views, S, S, 3]}) and aggregate.

        ``inputs``: what the views were made for, per member (``member_infos()``, the default). This is the
        ensemble's own cost with decoding and view building left out (the benchmark uses it).
        """
        return self._run_members(views, num_photos, self._deadline(time.monotonic(), deadline),
                                 dict(inputs) if inputs is not None else self.member_infos(), cancel)

    def _run_members(self, views: Mapping[InputSpec, np.ndarray], num_photos: int, deadline: float,
                     inputs: Mapping[str, MemberInfo | InputSpec | CarClfError],
                     cancel: CancelToken | None = None) -> EnsembleResult:
        start = time.monotonic()
        if start >= deadline:
            raise DeadlineExceeded(f"ensemble {self.config.name!r}: the deadline passed while preparing views")
        scope = CancelToken()  # this request's member calls: cancelled with it, and when the answer leaves
        if cancel is not None:  # without some of them (past the deadline)
            cancel.on_cancel(scope.cancel)
        scope.check(f"ensemble {self.config.name!r} called its members")
        futures: dict[str, cf.Future] = {}
        outcomes: dict[str, MemberOutcome] = {}
        for m in self.config.members:
            info = inputs[m.name]
            if isinstance(info, CarClfError):
                outcomes[m.name] = MemberOutcome(m.name, False, None, None, 0.0, 0, info)
                continue
            if isinstance(info, InputSpec):
                info = MemberInfo(info.size, resize=info.resize)
            futures[m.name] = self._pools[m.name].submit(self._call_member, m, info, views[info.input_spec],
                                                         num_photos, deadline, scope)
            scope.on_cancel(futures[m.name].cancel)  # a call still waiting for a worker never starts
        try:
            done, _ = cf.wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
            scope.check(f"ensemble {self.config.name!r} had its members' answers")
            for name, fut in futures.items():
                if fut in done:
                    outcomes[name] = fut.result()
                else:  # still running: cancelled below; the request does not wait for it
                    elapsed = (time.monotonic() - start) * 1e3
                    outcomes[name] = MemberOutcome(name, False, None, None, elapsed, 1, DeadlineExceeded(
                        f"member {name!r} did not answer within the ensemble deadline"))
        finally:
            scope.cancel()  # nothing works for this request once it leaves here
        t_members = time.monotonic()
        ordered = tuple(outcomes[m.name] for m in self.config.members)
        probabilities, degraded = self._combine(ordered)
        timings = {"members_ms": (t_members - start) * 1e3, "aggregate_ms": (time.monotonic() - t_members) * 1e3}
        return EnsembleResult(probabilities, self.labels, ordered, degraded, timings)

    def _deadline(self, now: float, caller: float | None) -> float:
        """When the members must have answered: the config's budget, or the caller's deadline less what is
        kept back to aggregate and answer (``ANSWER_RESERVE_*``), whichever comes first."""
        own = now + self.config.deadline_s
        if caller is None:
            return own
        reserve = min(ANSWER_RESERVE_S, ANSWER_RESERVE_SHARE * max(0.0, caller - now))
        return min(own, caller - reserve)

    def _call_member(self, member: Member, info: MemberInfo, pixels: np.ndarray, num_photos: int,
                     deadline: float, cancel: CancelToken) -> MemberOutcome:
        """One member, with retries of UNAVAILABLE under the deadline, none once ``cancel`` is; never raises.
        ``info``: what the views were made for; an answer that does not fit it (another version, another
        class count) is left out."""
        start = time.monotonic()
        retry = self.config.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                cancel.check(f"member {member.name!r} was called")
                reply: MemberReply = self.caller.call(member, pixels, deadline=deadline, cancel=cancel)
                probs, problem = malformed(member, reply.probabilities, pixels.shape[0])
                if problem is None:
                    problem = self._unfit_answer(member, info, reply.version, probs.shape[1])
                if problem is not None:
                    return MemberOutcome(member.name, False, None, reply.version, (time.monotonic() - start) * 1e3,
                                         attempt, problem)
                per_photo = average_views(probs, pixels.shape[0] // num_photos).astype(np.float32)
                return MemberOutcome(member.name, True, per_photo, reply.version,
                                     (time.monotonic() - start) * 1e3, attempt)
            except CarClfError as exc:
                error = exc
            except Exception as exc:  # a bug or an unexpected transport failure: keep the request alive
                error = Internal(f"member {member.name!r} failed: {type(exc).__name__}: {exc}")
            pause = retry.backoff(attempt)
            retryable = error.code in RETRYABLE_CODES and attempt < retry.max_attempts
            if not retryable or time.monotonic() + pause >= deadline or cancel.sleep(pause):
                return MemberOutcome(member.name, False, None, None, (time.monotonic() - start) * 1e3, attempt,
                                     error)

    def _unfit_answer(self, member: Member, info: MemberInfo, version: int | None, classes: int) -> CarClfError | None:
        """Why an answer cannot be used (None when it can). A member that answered from another version than
        the one described (a new version was loaded meanwhile) is described again, and the next request makes
        views for that version; this answer stands only if the new version takes the same input and labels.
        Answers with another number of classes than the ensemble's are left out."""
        if version is not None and info.version is not None and version != info.version:
            try:
                now = self.caller.describe(member, version)
            except CarClfError as exc:
                return Unavailable(f"member {member.name!r} answered from version {version}, which cannot be "
                                   f"described ({exc.message}); left out of this answer")
            with self._info_lock:
                self._info[member.name] = now
                try:
                    self._check_labels(member, now)
                except LabelMismatch as exc:
                    return Unavailable(f"{exc.message}; left out of the ensemble")
            if now.input_spec != info.input_spec or now.labels != info.labels:
                return Unavailable(
                    f"member {member.name!r} answered from version {version}, whose input ({_spec_text(now)}) or "
                    f"labels differ from those of version {info.version} ({_spec_text(info)}) the views were made "
                    f"for; left out of this answer (the next request uses version {version})")
        expected = len(self._labels) if self._labels is not None else None
        if expected is not None and classes != expected:
            return Unavailable(f"member {member.name!r} answered {classes} class probabilities, the ensemble has "
                               f"{expected} classes; left out of the ensemble")
        return None

    def _combine(self, outcomes: Sequence[MemberOutcome]) -> tuple[np.ndarray, bool]:
        config = self.config
        failed = [o for o in outcomes if not o.answered]
        answered = [o for o in outcomes if o.answered]
        for o in failed:
            if config.failure_policy == "fail" or o.error.code not in config.degrade_on:
                raise error_for_code(o.error.code, f"ensemble member {o.name!r} failed ({o.error.code}): "
                                                   f"{o.error.message}")
        if len(answered) < config.quorum or not answered:
            detail = "; ".join(f"{o.name}: {o.error.code} {o.error.message}" for o in failed)
            message = (f"ensemble {config.name!r}: only {len(answered)} of {len(outcomes)} members answered, "
                       f"quorum is {config.quorum} ({detail})")
            codes = {o.error.code for o in failed}
            if len(codes) == 1 and codes <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}:  # every member: the same
                raise error_for_code(codes.pop(), message)  # 429 tells an overloaded client to back off
            raise Unavailable(message)
        counts = {o.name: o.probabilities.shape[-1] for o in answered}
        if len(set(counts.values())) > 1:  # no labels anywhere to say which count is right
            raise FailedPrecondition(f"ensemble {config.name!r}: its members answer different numbers of classes "
                                     f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); give the members "
                                     f"model cards with labels, or the ensemble a label_filename")
        weights = {m.name: m.weight for m in config.members}
        stack = np.stack([o.probabilities for o in answered])
        probs = agg.aggregate(config.aggregation, stack, [weights[o.name] for o in answered])
        return probs, bool(failed)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        if self.owns_caller:
            self.caller.close()

    def __enter__(self) -> EnsembleRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def malformed(member: Member, answer, views: int) -> tuple[np.ndarray | None, CarClfError | None]:
    """The member's answer as a [views, classes] float32 matrix of probabilities, or why it cannot be used:
    another shape, text, NaN or infinity, values outside [0, 1] (logits, a diverged export), none at all.
    Such an answer is left out as UNAVAILABLE, as one of another class count is."""
    def unusable(why: str) -> tuple[None, CarClfError]:
        return None, Unavailable(f"member {member.name!r} answered {why}; left out of this answer")

    if answer is None:
        return unusable("no probabilities")
    try:
        probs = np.asarray(answer, dtype=np.float32)
    except (TypeError, ValueError):
        return unusable("probabilities that are not numbers")
    if probs.ndim != 2 or probs.shape[0] != views:
        return unusable(f"shape {probs.shape} for {views} views")
    if not np.isfinite(probs).all() or probs.min(initial=0.0) < 0.0 or probs.max(initial=0.0) > 1.0 + 1e-5:
        return unusable("values that are not probabilities (NaN, infinite, or outside [0, 1])")
    return probs, None
