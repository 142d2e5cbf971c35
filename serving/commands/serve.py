"""``carclf serve``: the embedded TF-Serving-compatible model server (``make serve``).

Takes tensorflow_model_server's flags (see ``carclf serve --help`` and serving/README.md). Runs until
SIGTERM or Ctrl-C, then drains: new requests are refused with UNAVAILABLE, in-flight ones finish, and
the process exits 0. A second SIGTERM or Ctrl-C during the drain ends the process at once (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from carclf.serving.options import ServerOptions, add_arguments  # noqa: F401 - add_arguments is the CLI hook


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions.from_args(args)  # bad flags fail here, before TensorFlow is imported
    from carclf.serving.server import ModelServer

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if len(received) > 1:  # the operator does not want to wait for the drain
            logging.getLogger("carclf.serving").warning(
                "second signal %s during the drain: exiting now; requests still in flight are lost",
                signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    server = ModelServer(options).start()
    while not stop.wait(1.0):
        pass
    logging.getLogger("carclf.serving").info("signal %s: draining in-flight requests",
                                             signal.Signals(received[0]).name if received else "?")
    drained = server.stop()
    return 0 if drained else 1
