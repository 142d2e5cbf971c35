"""The request cancellation token that transports hand down to the work done for a request."""

from __future__ import annotations

import threading
import time

import pytest

from carclf.cancel import CancelToken
from carclf.errors import Cancelled


def test_callbacks_run_once_when_cancelled_and_at_once_when_registered_after():
    token, ran = CancelToken(), []
    token.on_cancel(lambda: ran.append("before"))
    token.check("anything ran")  # not cancelled: nothing raised
    assert ran == [] and not token.cancelled
    token.cancel()
    token.cancel()
    assert ran == ["before"] and token.cancelled
    token.on_cancel(lambda: ran.append("after"))
    assert ran == ["before", "after"]
    with pytest.raises(Cancelled, match="cancelled before the member was called"):
        token.check("the member was called")


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog):
    token, ran = CancelToken(), []
    token.on_cancel(lambda: 1 / 0)
    token.on_cancel(lambda: ran.append(True))
    token.cancel()
    assert ran == [True]
    assert "a cancel callback failed" in caplog.text and "ZeroDivisionError" in caplog.text


def test_sleep_ends_early_when_cancelled_from_another_thread():
    token = CancelToken()
    assert token.sleep(0.01) is False  # the full pause, not cancelled
    threading.Timer(0.1, token.cancel).start()
    start = time.monotonic()
    assert token.sleep(30) is True
    assert time.monotonic() - start < 20  # woken by the cancel, not the 30 s pause
    assert token.sleep(30) is True  # already cancelled: no pause at all
