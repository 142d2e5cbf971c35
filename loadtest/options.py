"""Checks of command-line values shared by run, soak, ab and bench: one line naming the flag and the value."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Sequence

from carclf.errors import ConfigError

TRANSPORTS = ("grpc", "rest")
_TIMESPAN = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def require(ok: bool, flag: str, value: object, expected: str, where: str = "") -> None:
    """Raise ConfigError naming ``flag`` and ``value`` (and ``where`` it came from) unless ``ok``."""
    if not ok:
        source = f" (from {where})" if where else ""
        raise ConfigError(f"expected {expected}, received {value!r}{source}", field=flag)


def thread_count(count: int, flag: str) -> int:
    """A TensorFlow thread count given to ``flag``: 0 (TensorFlow's default) or more."""
    require(count >= 0, flag, count, "a thread count >= 0 (0: TensorFlow's default)")
    return count


def choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    """A non-empty comma-separated subset of ``allowed``."""
    values = [x.strip() for x in str(text).split(",") if x.strip()]
    require(bool(values) and all(v in allowed for v in values), flag, text,
            f"a comma-separated subset of {list(allowed)}")
    return values


def transports(text: str, flag: str = "--transports") -> list[str]:
    """The served transports to measure: a subset of grpc,rest."""
    return choices(text, TRANSPORTS, flag)


def timespan_s(text: str) -> int | None:
    """Seconds of a locust run time (``90``, ``30s``, ``2m``, ``1h30m``), None when it is not one. (The same
    rule as ``locust.util.timespan``, which cannot be imported here: importing locust monkey-patches the whole
    process with gevent.)"""
    text = str(text).strip()
    if text.isdigit():
        return int(text)
    match = _TIMESPAN.fullmatch(text)
    if not text or match is None:
        return None
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop the servers and locust it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
