"""Run a command that the kernel ends when the process that started it ends (Linux only).

``python -S tether.py PARENT_PID COMMAND [ARG ...]`` sets ``PR_SET_PDEATHSIG`` (SIGTERM) on itself, checks that
its parent is still PARENT_PID, and replaces itself with COMMAND (same pid; the setting survives ``exec``).

It is a program rather than a ``preexec_fn`` because any ``preexec_fn`` makes subprocess fork() instead of
vfork(): a fork runs every fork handler in the parent and the child (gRPC's abort or hang a child of a process
that has used gRPC, grpc/grpc#43055) and Python code in the child, where a lock another thread (TensorFlow's)
held at the fork stays held for good. Only the standard library is imported, so it starts in a few
milliseconds with ``-S``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
NOT_RUN = 127  # the shell's status for a command that could not be run


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: tether.py PARENT_PID COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM)) != 0:
        print(f"tether: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return NOT_RUN
    if os.getppid() != parent:  # the parent ended before the tie was made: no signal will come
        return 128 + signal.SIGTERM
    for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these and exec keeps an ignored signal ignored
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"tether: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
    return NOT_RUN


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
