"""The server's front door: counts requests in flight and refuses new ones while draining.

On SIGTERM (or ``ModelServer.stop``) the gate closes: new requests on either transport are answered
UNAVAILABLE ("server is shutting down"), requests already inside finish, and the server stops once the
gate is idle. Also defines REST's body timeout and the transports' grace at shutdown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from carclf.errors import DeadlineExceeded, Unavailable

TRANSPORT_GRACE_S = 1.0  # once the gate is idle (or given up on), how long each transport finishes writing answers


class BodyTimeout(DeadlineExceeded):
    """A REST request body that did not arrive within ``--rest_api_timeout_in_ms`` (REST answers 408)."""


class RequestGate:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._inflight = 0
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def inflight(self) -> int:
        return self._inflight

    @contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            if self._draining:
                raise Unavailable("server is shutting down; send the request to another replica")
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._lock.notify_all()

    def start_draining(self) -> None:
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float | None) -> bool:
        """True once no request is in flight; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._inflight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True
