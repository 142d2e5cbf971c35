"""One dynamic batch scheduler shared by every model, as TF Serving's SharedBatchScheduler.

Requests are queued per (servable, signature, non-batch input shapes and dtypes): only requests that can
be concatenated share a queue. A queue holds at most ``max_enqueued_batches`` batches (the open one
included); a request that would need one more is refused with RESOURCE_EXHAUSTED, and a request cancelled
while it waits (its caller gave up) is taken out of its batch at once, giving its place back. A batch is
handed to one of ``num_batch_threads`` threads once it is full or ``batch_timeout_micros`` after its first
request came; threads take ready batches from the queues in turn, so models interleave fairly.
Batches are padded (repeating the first example) up to the next of ``allowed_batch_sizes``; the padding
is dropped from the outputs. When the server starts draining (``flush``), open batches leave at once instead
of waiting out the timeout, as TF Serving closes its open batches when its scheduler shuts down: nothing new
can join them any more.

At most ``num_batch_threads`` batches run at once. A caller that can block (a gRPC handler thread, an
in-process caller) may pass ``inline=True``: when the request would be dispatched at once anyway (batch
timeout 0, a full batch or early dispatch; nothing else waiting, a free batch slot), it runs in the caller's
thread, which saves two thread hand-offs; the batch still counts against ``num_batch_threads`` and in the
metrics.

Early dispatch (extension, ``early_dispatch=True``; ``carclf serve --batching_early_dispatch``): an open
batch leaves before ``batch_timeout_micros`` when no batch is running (an idle server never holds a lone
request back) or when it is at least as large as the smallest batch running (the threads then run batches of
about equal size, instead of a free thread taking the first request to arrive on its own). The timeout stays
the longest any request waits for company. With it a timeout of a few ms costs nothing at low load and makes
batches larger under load; without it the scheduler follows TF Serving's rule (full or timed out).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from carclf.errors import (
    CarClfError,
    ConfigError,
    DeadlineExceeded,
    Internal,
    InvalidInput,
    ResourceExhausted,
    Unavailable,
)
from carclf.serving.config import BatchingConfig
from carclf.serving.metrics import ServingMetrics
from carclf.serving.servable import Servable

log = logging.getLogger(__name__)

# The longest a batch thread sleeps before it looks at its queues again. A batch_timeout_micros near INT64_MAX
# (an operator's "wait for a full batch") is a legal value, but Condition.wait refuses a timeout past the
# platform's time_t (threading.TIMEOUT_MAX), which used to kill every batch thread. Waking once a minute
# costs nothing and lets the deadline arithmetic stay in plain floats.
MAX_WAIT_S = 60.0


@dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    size: int
    future: Future
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Queue:
    servable: Servable
    signature_name: str
    open: list[_Task] = field(default_factory=list)
    open_size: int = 0
    open_since: float = 0.0
    closed: deque = field(default_factory=deque)   # full batches waiting for a thread

    def batches(self) -> int:
        return len(self.closed) + (1 if self.open else 0)

    def close_open(self) -> None:
        if self.open:
            self.closed.append(self.open)
            self.open, self.open_size = [], 0


class BatchScheduler:
    """Merge concurrent requests into batches; ``submit`` returns a Future of the full outputs."""

    def __init__(self, config: BatchingConfig, metrics: ServingMetrics,
                 on_runtime: Callable[[str, float], None] | None = None, *, early_dispatch: bool = False):
        self.config = config
        self.early_dispatch = early_dispatch
        self.metrics = metrics
        self._on_runtime = on_runtime
        self._timeout = config.batch_timeout_micros / 1e6
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._turn = itertools.count()
        self._stopping = False
        self._flushing = False  # draining or closing: open batches go now
        self._running: list[int] = []  # sizes of the batches running now, in batch threads or inline
        self._threads = [threading.Thread(target=self._work, name=f"{config.thread_pool_name}-{i}", daemon=True)
                         for i in range(config.num_batch_threads)]
        for started, thread in enumerate(self._threads):
            try:
                thread.start()
            except RuntimeError as exc:  # the process's thread limit
                self._threads = self._threads[:started]
                self.close(timeout=1.0)
                raise ConfigError(f"could not start batch thread {started + 1} of {config.num_batch_threads} "
                                  f"({exc}); ask for fewer", field="num_batch_threads") from None

    # -- producers ---------------------------------------------------------------------------------

    def submit(self, servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray],
               deadline: float | None = None, *, inline: bool = False) -> Future:
        """Queue one request (or, with ``inline``, run it now in this thread when nothing would be gained by
        queueing it); the Future gives the request's own rows of every output."""
        sizes = {array.shape[0] if array.ndim else None for array in inputs.values()}
        if None in sizes:
            raise InvalidInput("Batching Run() input tensors must have at least one dimension")
        if len(sizes) != 1:
            raise InvalidInput("Batching Run() input tensors must have equal 0th-dimension size")
        size = sizes.pop()
        if size > self.config.max_batch_size:
            raise InvalidInput(f"Task size {size} is larger than maximum input batch size "
                               f"{self.config.max_batch_size}")
        key = (id(servable), signature_name,
               tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())))
        task = _Task(inputs, size, Future(), deadline)
        with self._cond:
            if self._stopping:
                raise Unavailable("the batch scheduler is shutting down")
            if inline and self._can_run_now(size):
                self._running.append(size)
                run_now = _Queue(servable, signature_name)
            else:
                run_now = None
                self._enqueue(key, servable, signature_name, task)
                self._cond.notify()
        self.metrics.input_batch_size.observe(size)
        if run_now is not None:
            try:
                self._process(run_now, [task])
            finally:
                self._finished(size)
        else:  # a caller that gives up takes its place in the queue back at once
            task.future.add_done_callback(lambda done: done.cancelled() and self._withdraw(key, task))
        return task.future

    def _can_run_now(self, size: int) -> bool:
        """Would a batch thread take this request at once, alone? (call with the lock held)"""
        if self._stopping or len(self._running) >= self.config.num_batch_threads:
            return False
        if (self._timeout > 0 and size < self.config.max_batch_size and not self._flushing
                and not self._may_leave_early(size)):
            return False  # it should wait for others to join its batch
        return not self._queues  # a queue stays in the dict only while it holds waiting work

    def _enqueue(self, key: tuple, servable: Servable, signature_name: str, task: _Task) -> None:
        """Add ``task`` to its queue's open batch (call with the lock held)."""
        size = task.size
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(servable, signature_name)
        if queue.open and queue.open_size + size > self.config.max_batch_size:
            if len(queue.closed) + 1 >= self.config.max_enqueued_batches:
                raise ResourceExhausted("The batch scheduling queue to which this task was submitted is full "
                                        f"(max_enqueued_batches={self.config.max_enqueued_batches})")
            queue.close_open()
        if not queue.open:
            if len(queue.closed) >= self.config.max_enqueued_batches:
                raise ResourceExhausted("The batch scheduling queue to which this task was submitted is full "
                                        f"(max_enqueued_batches={self.config.max_enqueued_batches})")
            queue.open_since = task.enqueued
        queue.open.append(task)
        queue.open_size += size
        if queue.open_size >= self.config.max_batch_size:
            queue.close_open()

    def _withdraw(self, key: tuple, task: _Task) -> None:
        """Take a cancelled request out of its waiting batch, so that it holds no place toward
        ``max_enqueued_batches`` (a batch that has left already runs without it)."""
        with self._cond:
            queue = self._queues.get(key)
            if queue is None:
                return
            if any(t is task for t in queue.open):
                queue.open = [t for t in queue.open if t is not task]  # it leaves when it would have
                queue.open_size -= task.size
            else:
                for batch in queue.closed:
                    if any(t is task for t in batch):
                        batch[:] = [t for t in batch if t is not task]
                        if not batch:
                            queue.closed = deque(b for b in queue.closed if b is not batch)
                        break
            if not queue.open and not queue.closed:
                del self._queues[key]

    def _may_leave_early(self, size: int) -> bool:
        """Early dispatch: may an open batch of ``size`` go before its timeout? (call with the lock held)"""
        return self.early_dispatch and (not self._running or size >= min(self._running))

    def _finished(self, size: int) -> None:
        with self._cond:
            self._running.remove(size)
            self._cond.notify_all()

    # -- batch threads -----------------------------------------------------------------------------

    def _next_batch(self) -> tuple[_Queue, list[_Task]] | None:
        """A ready batch, taking queues in turn; None when nothing is ready (call with the lock held)."""
        if not self._queues:
            return None
        keys = list(self._queues)
        start = next(self._turn) % len(keys)
        now = time.perf_counter()
        for key in keys[start:] + keys[:start]:
            queue = self._queues[key]
            if queue.closed:
                batch = queue.closed.popleft()
            elif queue.open and (now - queue.open_since >= self._timeout or self._flushing
                                 or self._may_leave_early(queue.open_size)):
                batch, queue.open, queue.open_size = queue.open, [], 0
            else:
                continue
            if not queue.open and not queue.closed:
                del self._queues[key]
            return queue, batch
        return None

    def _wait_time(self) -> float | None:
        opens = [q.open_since for q in self._queues.values() if q.open]
        if not opens:
            return None
        return min(MAX_WAIT_S, max(0.0, min(opens) + self._timeout - time.perf_counter()))

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if len(self._running) >= self.config.num_batch_threads:  # every slot taken (inline too)
                        self._cond.wait()
                        continue
                    ready = self._next_batch()
                    if ready is not None:
                        size = sum(task.size for task in ready[1])
                        self._running.append(size)
                        break
                    if self._stopping:
                        return
                    self._cond.wait(self._wait_time())
            try:
                self._process(*ready)
            finally:
                self._finished(size)

    def _process(self, queue: _Queue, tasks: list[_Task]) -> None:
        now = time.perf_counter()
        live = []
        for task in tasks:
            self.metrics.child(self.metrics.queuing_latency, self.config.thread_pool_name).observe(
                (now - task.enqueued) * 1e6)
            if not task.future.set_running_or_notify_cancel():
                continue
            if task.deadline is not None and time.monotonic() > task.deadline:
                task.future.set_exception(DeadlineExceeded("deadline passed while the request waited in the "
                                                           "batching queue"))
                continue
            live.append(task)
        if not live:
            return
        size = sum(task.size for task in live)
        target = next((b for b in self.config.allowed_batch_sizes if b >= size), size)
        try:
            merged = self._merge(live, target - size)
            self.metrics.processed_batch_size.observe(target)
            self.metrics.padding_size.labels(str(target)).observe(target - size)
            start = time.perf_counter()
            outputs = queue.servable.run(queue.signature_name, merged)
            if self._on_runtime:
                self._on_runtime(queue.servable.name, time.perf_counter() - start)
            offset = 0
            for task in live:
                task.future.set_result(self._split(outputs, offset, task.size, target))
                offset += task.size
        except InvalidInput as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # One request's bad data (a truncated JPEG decoded in the graph) fails the merged batch; the
            # requests run again one by one so that only the request it came from fails.
            log.info("a batch of %d requests to %s was refused (%s): running them one by one", len(live),
                     queue.servable.name, exc.message)
            for task in live:
                self._run_alone(queue, task)
        except CarClfError as exc:
            for task in live:
                if not task.future.done():
                    task.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a batch failure must reach every waiting request
            log.exception("batch of %s failed", queue.servable.name)
            for task in live:
                if not task.future.done():
                    task.future.set_exception(Internal(f"batch failed: {type(exc).__name__}: {exc}"))

    def _run_alone(self, queue: _Queue, task: _Task) -> None:
        try:
            outputs = queue.servable.run(queue.signature_name, dict(task.inputs))
            task.future.set_result(self._split(outputs, 0, task.size, task.size))
        except CarClfError as exc:
            task.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - the request must get an answer
            log.exception("request to %s failed", queue.servable.name)
            task.future.set_exception(Internal(f"request failed: {type(exc).__name__}: {exc}"))

    @staticmethod
    def _merge(tasks: list[_Task], padding: int) -> dict[str, np.ndarray]:
        names = tasks[0].inputs.keys()
        if len(tasks) == 1 and not padding:
            return dict(tasks[0].inputs)
        merged = {}
        for name in names:
            parts = [task.inputs[name] for task in tasks]
            if padding:
                parts.append(np.repeat(parts[0][:1], padding, axis=0))
            merged[name] = np.concatenate(parts, axis=0)
        return merged

    @staticmethod
    def _split(outputs: Mapping[str, np.ndarray], offset: int, size: int, batch: int) -> dict[str, np.ndarray]:
        result = {}
        for name, array in outputs.items():
            if np.ndim(array) == 0 or array.shape[0] != batch:
                raise Internal(f"output '{name}' has shape {list(np.shape(array))}; batching needs the batch "
                               f"({batch}) as its first dimension")
            result[name] = array[offset:offset + size]
        return result

    # -- lifecycle ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send every open batch to the threads now, and from now on every batch as soon as it opens (the
        server is draining: no request will come to fill them)."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def refuse_queued(self, error: CarClfError) -> int:
        """Fail every request still waiting in a queue with ``error`` (batches already running finish);
        returns how many were refused. Used when a drain runs out of time."""
        with self._cond:
            waiting = [task for queue in self._queues.values() for batch in (*queue.closed, queue.open)
                       for task in batch]
            self._queues.clear()
            self._cond.notify_all()
        refused = 0
        for task in waiting:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(error)
                refused += 1
        return refused

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, then stop the threads."""
        with self._cond:
            self._stopping = self._flushing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
