"""A request's cancellation, carried from its transport down to the work done on its behalf.

A transport makes one ``CancelToken`` per request and cancels it when the request ends: its client cancelled,
its connection closed, its deadline passed, or it was answered. Whatever may still be working for the request
registers a callback (``on_cancel``) and stops there: a prediction waiting in the batch queue or for a worker
is taken out, an ensemble's member calls are cancelled (in-process ones leave their queues, gRPC ones are
cancelled on the member's server too) and a member retry's pause ends. A run already started finishes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from carclf.errors import Cancelled

log = logging.getLogger(__name__)


class CancelToken:
    """Cancelled once, from any thread; callbacks run once, in the cancelling thread (at once if registered
    after the cancel)."""

    __slots__ = ("_lock", "_cancelled", "_callbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Cancel and run the callbacks (a second cancel does nothing)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run(callback)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when the token is cancelled; at once when it already is."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        _run(callback)

    def check(self, what: str) -> None:
        """Raise ``Cancelled`` (saying ``what`` did not happen) when the token is cancelled."""
        if self._cancelled:
            raise Cancelled(f"the request was cancelled before {what}")

    def sleep(self, seconds: float) -> bool:
        """Pause up to ``seconds``, less when the token is cancelled meanwhile; True when it is."""
        woken = threading.Event()
        self.on_cancel(woken.set)
        return woken.wait(seconds)


def _run(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - one failing callback must not keep the others from running
        log.exception("a cancel callback failed")
