"""``carclf serve``: the embedded TF-Serving-compatible model server (``make serve``).

Takes tensorflow_model_server's flags (see ``carclf serve --help`` and serving/README.md). Runs until
SIGTERM or Ctrl-C, then drains: new requests are refused with UNAVAILABLE, in-flight ones finish, and
the process exits 0 (1 when the drain runs past ``--drain_timeout_seconds``). A second SIGTERM or Ctrl-C
during the drain ends the process at once (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from carclf.serving.options import ServerOptions, add_arguments  # noqa: F401 - add_arguments is the CLI hook

if TYPE_CHECKING:
    from carclf.serving.server import ModelServer


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions.from_args(args)  # bad flags fail here, before TensorFlow is imported
    from carclf.serving.server import ModelServer

    return serve_until_signalled(lambda: ModelServer(options).start(), logging.getLogger("carclf.serving"))


def serve_until_signalled(start: Callable[[], ModelServer], log: logging.Logger) -> int:
    """Start a server (``carclf serve``'s or the gateway's) and run it until SIGTERM or Ctrl-C, then drain it.

    The exit status: 0 when every in-flight request finished within ``--drain_timeout_seconds``, 1 when the
    drain ran out of time (requests were refused or cut off). A signal during the start drains as soon as the
    server is up; a second signal during the drain ends the process at once (exit 1)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if len(received) > 1:  # the operator does not want to wait for the drain
            log.warning("second signal %s during the drain: exiting now; requests still in flight are lost",
                        signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    server = start()
    while not stop.wait(1.0):
        pass
    log.info("signal %s: draining in-flight requests", signal.Signals(received[0]).name)
    drained = server.stop()
    if not drained:
        log.warning("the drain ran out of time (--drain_timeout_seconds): exit status 1")
    elif not server.still_loading:
        return 0
    # Not sys.exit: the interpreter would join the threads of batches still running however long they take,
    # and finalize TensorFlow under a version load still running.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if drained else 1)
