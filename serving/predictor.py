"""The one prediction path shared by gRPC, REST and in-process callers (the ensemble).

``Predictor.predict(model_name, inputs, *, signature_name="serving_default", version=None,
version_label=None, output_filter=(), deadline=None) -> PredictResult`` resolves the version
(``ModelManager``), validates the request, runs it through the shared batch scheduler when batching is
on (or directly), records metrics and raises ``carclf.errors`` types, exactly as a gRPC Predict does,
without serializing anything. Transports use the two halves, ``acquire`` and ``submit``, so that they can
decode a request against the signature of the very version that will answer it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from carclf.cancel import CancelToken
from carclf.errors import Cancelled, CarClfError, DeadlineExceeded, Internal, InvalidInput
from carclf.serving.batching import BatchScheduler
from carclf.serving.manager import Lease, ModelManager
from carclf.serving.metrics import ServingMetrics
from carclf.serving.savedmodel import SavedModelServable
from carclf.serving.servable import Servable
from carclf.serving.validation import DEFAULT_SIGNATURE

IN_PROCESS = "IN_PROCESS"


@dataclass(frozen=True)
class PredictResult:
    """What answered (model, version, signature) and its outputs (numpy, batch first)."""

    model_name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


class Predictor:
    """Resolve, validate, batch or run, and account for one prediction."""

    def __init__(self, manager: ModelManager, metrics: ServingMetrics, *, batcher: BatchScheduler | None = None,
                 executor: Executor | None = None):
        self.manager = manager
        self.metrics = metrics
        self.batcher = batcher
        self.executor = executor

    # -- the in-process API ------------------------------------------------------------------------

    def predict(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
        version_label: str | None = None,
        output_filter: Sequence[str] = (),
        deadline: float | None = None,
        cancel: CancelToken | None = None,
    ) -> PredictResult:
        """Blocking prediction; ``deadline`` is an absolute ``time.monotonic()`` value; cancelling ``cancel``
        ends the wait (CANCELLED) and takes a waiting request out."""
        with self.metrics.track(model_name, "Predict", IN_PROCESS) as info:
            lease = self.acquire(model_name, version, version_label)
            info["version"] = lease.version
            future = self.submit(lease, signature_name, inputs, output_filter=output_filter, deadline=deadline,
                                 inline=True, cancel=cancel)
            return wait(future, deadline)

    # -- the halves the transports use -------------------------------------------------------------

    def acquire(self, model_name: str, version: int | None = None, version_label: str | None = None) -> Lease:
        if version is not None and version_label:
            raise InvalidInput(f"Both model version ({version}) and model version label ({version_label}) cannot "
                               "be supplied.")
        if version is not None and version < 0:
            raise InvalidInput(f"model version must be >= 0, received {version}")
        return self.manager.acquire(model_name, version, version_label)

    def submit(
        self,
        lease: Lease,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        output_filter: Sequence[str] = (),
        deadline: float | None = None,
        inline: bool = False,
        cancel: CancelToken | None = None,
    ) -> Future:
        """Start the prediction; the returned Future gives a PredictResult. Owns ``lease`` (released when
        the Future completes). ``inline`` lets the request run in the calling thread (a thread that may block):
        always when unbatched, and when batched if the scheduler would start its batch at once anyway.
        Cancelling ``cancel`` (or the Future) while the request waits (batching queue, worker pool) means it is
        never run; a servable that is running it (an ensemble) is given ``cancel`` to stop its own work."""
        try:
            servable = lease.servable
            signature = servable.validate(signature_name or DEFAULT_SIGNATURE, inputs, output_filter)
            name = signature.name
            if self.batcher is not None and servable.batchable:
                raw = self.batcher.submit(servable, name, inputs, deadline, inline=inline)
                result: Future = Future()
                raw.add_done_callback(lambda done: _chain(done, result, lease, name, output_filter))
                # a caller that gives up (cancels, or its client went away) takes its request out of the batch
                result.add_done_callback(lambda mine: mine.cancelled() and raw.cancel())
                if cancel is not None:
                    cancel.on_cancel(result.cancel)
                return result
            if inline or self.executor is None:
                result = Future()
                result.set_running_or_notify_cancel()
                try:
                    result.set_result(self._run(lease, servable, name, inputs, output_filter, deadline, cancel))
                except BaseException as exc:  # noqa: BLE001 - delivered through the Future
                    result.set_exception(exc)
                lease.release()
                return result
            future = self.executor.submit(self._run, lease, servable, name, inputs, output_filter, deadline, cancel)
            future.add_done_callback(lambda _: lease.release())
            if cancel is not None:
                cancel.on_cancel(future.cancel)
            return future
        except BaseException:
            lease.release()
            raise

    def _run(self, lease: Lease, servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray],
             output_filter: Sequence[str], deadline: float | None, cancel: CancelToken | None = None) -> PredictResult:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline passed before {lease.model_name} version {lease.version} ran")
        if cancel is not None:
            cancel.check(f"{lease.model_name} version {lease.version} ran")
        start = time.perf_counter()
        if servable.batchable:  # validate() already ran in submit(); run() skips it
            outputs = servable.run(signature_name, inputs)
            if output_filter:
                outputs = {k: outputs[k] for k in output_filter}
        else:
            outputs = servable.predict(signature_name, inputs, output_filter=output_filter, deadline=deadline,
                                       cancel=cancel)
        self.record_runtime(servable, time.perf_counter() - start)
        return PredictResult(lease.model_name, lease.version, signature_name, outputs)

    def record_runtime(self, servable: Servable | str, seconds: float) -> None:
        name = servable if isinstance(servable, str) else servable.name
        runtime = "TF2" if isinstance(servable, str | SavedModelServable) else type(servable).__name__
        self.metrics.child(self.metrics.runtime_latency, name, "Predict", runtime).observe(seconds * 1e6)


def _chain(done: Future, result: Future, lease: Lease, signature_name: str, output_filter: Sequence[str]) -> None:
    try:
        if result.cancelled():  # the caller gave up (deadline, cancel); nothing to deliver
            return
        exc = done.exception()
        if exc is not None:
            result.set_exception(exc)
        else:
            outputs = done.result()
            if output_filter:
                outputs = {k: outputs[k] for k in output_filter}
            result.set_result(PredictResult(lease.model_name, lease.version, signature_name, outputs))
    except InvalidStateError:
        pass  # cancelled between the check and the set
    finally:
        lease.release()


def wait(future: Future, deadline: float | None) -> PredictResult:
    """Block for a Future's result, honouring an absolute monotonic deadline."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise DeadlineExceeded("deadline exceeded while waiting for the prediction") from None
    except CancelledError:
        raise Cancelled("the request was cancelled before its prediction was ready") from None
    except CarClfError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Internal(f"{type(exc).__name__}: {exc}") from exc


async def result_of(future: Future, deadline: float | None) -> PredictResult:
    """Await a prediction Future from an event loop, honouring an absolute monotonic deadline."""
    import asyncio

    waiter = asyncio.wrap_future(future)  # cancelling it (on timeout) cancels ``future`` too
    try:
        if deadline is None:
            return await waiter
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # lighter than wait_for
            return await waiter
    except TimeoutError:
        raise DeadlineExceeded("deadline exceeded while waiting for the prediction") from None
