"""A closed-loop load generator for the benchmark: N workers, each sending its next request as soon as the
previous one is answered, for a fixed time, with per-request latencies kept for percentiles.

Threads are enough here: gRPC and socket I/O release the GIL, and requests are pre-built so the workers
spend little CPU of their own. Loops are bounded by time and by a request cap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# A worker factory: called once per worker with its index, returns (send_one, close).
# ``send_one(i)`` sends request number ``i`` of that worker, raises on a failed call, and returns the check of
# its answer (raising on a wrong one), which runs after the clock stops: checking an answer is the
# benchmark's own work, the same for an in-process and a served call, and not part of the call's latency.
Check = Callable[[], None]
WorkerFactory = Callable[[int], tuple[Callable[[int], Check | None], Callable[[], None]]]


@dataclass
class LoadResult:
    """What one closed-loop run measured (latencies in ms of the requests finished after the warmup)."""

    concurrency: int
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    cpu_s: float = 0.0  # CPU time of this (client) process during the measured window
    server_cpu_s: float | None = None  # CPU time of the server process in the same window, when probed

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def record_error(self, exc: BaseException) -> None:
        """Count a failed call (or a wrong answer); the first one's message is kept."""
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:300]

    def flag_if_empty(self) -> None:
        """A window in which nothing completed and nothing failed is an error too."""
        if not self.latencies_ms and not self.errors:
            self.errors, self.first_error = 1, f"no request completed within the {self.duration_s:.1f} s window"

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self, items_per_request: int = 1) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "duration_s": round(self.duration_s, 3),
            "throughput": round(self.throughput * items_per_request, 3),
            "p50_ms": _round(self.percentile(50)),
            "p95_ms": _round(self.percentile(95)),
            "p99_ms": _round(self.percentile(99)),
            "mean_ms": _round(float(np.mean(self.latencies_ms)) if self.latencies_ms else None),
            "client_cpu_s": round(self.cpu_s, 3),
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 3),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _timed_call(send_one: Callable[[int], Check | None], i: int) -> tuple[float, float]:
    """Send request ``i``; its start and answer times (the answer's check runs after, off the clock).
    Raises what the call or the check raised."""
    t0 = time.perf_counter()
    check = send_one(i)
    t1 = time.perf_counter()
    if check is not None:
        check()
    return t0, t1


def closed_loop(factory: WorkerFactory, concurrency: int, duration_s: float, warmup_s: float = 0.5,
                max_requests: int = 1_000_000, server_cpu: Callable[[], float] | None = None,
                on_window: Callable[[str], None] | None = None) -> LoadResult:
    """Run ``concurrency`` workers for ``warmup_s + duration_s``; measure only after the warmup.

    Each worker first sends one unmeasured priming request (``send_one(-1)``). A request counts when it
    completes inside the measured window (so throughput is completions per second); ``server_cpu``
    (seconds of CPU used so far by the server) is read at both ends of the window. ``on_window("start")``
    runs when the window opens (every priming and warm-up request sent before it) and ``on_window("end")``
    once the last request has returned, so server-side figures read there leave the cold priming calls out.
    """
    workers = [factory(i) for i in range(concurrency)]
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)  # every worker primed
    go = threading.Event()  # the window is set
    state = {"measure_from": 0.0, "stop_at": 0.0}
    result = LoadResult(concurrency, duration_s)
    per_worker = max(1, max_requests // concurrency)

    def loop(index: int, send_one: Callable[[int], Check | None]) -> None:
        latencies = []
        try:  # one unmeasured request first: connects, and pays any lazy first-call cost
            check = send_one(-1)
            if check is not None:
                check()
        except Exception:  # noqa: BLE001 - counted with the measured ones if it keeps failing
            pass
        start_gate.wait()
        go.wait()
        for i in range(per_worker):
            if time.perf_counter() >= state["stop_at"]:
                break
            try:
                t0, t1 = _timed_call(send_one, i)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the first one is kept
                with lock:
                    result.record_error(exc)
                continue
            if state["measure_from"] <= t1 <= state["stop_at"]:
                latencies.append((t1 - t0) * 1000.0)
        with lock:
            result.latencies_ms.extend(latencies)

    threads = [threading.Thread(target=loop, args=(i, w[0]), daemon=True) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    now = time.perf_counter()
    state["measure_from"] = now + warmup_s
    state["stop_at"] = now + warmup_s + duration_s
    go.set()
    time.sleep(max(0.0, state["measure_from"] - time.perf_counter()))
    if on_window is not None:
        on_window("start")
    cpu0, server0 = time.process_time(), server_cpu() if server_cpu else None
    time.sleep(max(0.0, state["stop_at"] - time.perf_counter()))
    result.cpu_s = time.process_time() - cpu0
    if server_cpu is not None:
        result.server_cpu_s = server_cpu() - server0
    for thread in threads:
        thread.join(timeout=120.0)
    if on_window is not None:
        on_window("end")
    for _, close in workers:
        close()
    result.flag_if_empty()
    return result


def alternating(senders: Sequence[Callable[[int], Check | None]], duration_s: float,
                warmup_s: float = 0.5) -> list[LoadResult]:
    """One caller, one request at a time, taking the ``senders`` in turn (a, b, a, b, ...) for
    ``warmup_s + duration_s``; a result per sender, of the requests sent after the warmup.

    Made for side-by-side latency: consecutive calls of two senders are milliseconds apart, so a machine
    whose speed drifts over seconds slows both alike, which separate slices (first all a, then all b) cannot
    promise. A failed call is counted as an error of its sender; answers are checked off the clock.
    """
    results = [LoadResult(1, duration_s) for _ in senders]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    i = 0
    while time.perf_counter() < stop_at:
        for send, result in zip(senders, results, strict=True):
            try:
                t0, t1 = _timed_call(send, i)
            except Exception as exc:  # noqa: BLE001 - counted, the first one kept
                result.record_error(exc)
                continue
            if t0 >= measure_from:
                result.latencies_ms.append((t1 - t0) * 1000.0)
        i += 1
    for result in results:
        result.flag_if_empty()
    return results
