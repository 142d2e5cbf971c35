"""How a child process ended, in words and as a shell exit status (a negative Popen code is a signal)."""

from __future__ import annotations

import signal
import subprocess


def terminate(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, ``grace_s`` for ``child`` to end, then SIGKILL."""
    child.terminate()
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def describe(code: int) -> str:
    """``exit status 3``, or ``killed by SIGKILL (the system may have run out of memory)`` for ``-9``."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


def shell_status(code: int) -> int:
    """The status a shell gives the same ending: the code itself, or 128 + the signal's number
    (``sys.exit(-6)`` would exit 250, which reads as neither)."""
    return 128 - code if code < 0 else code
