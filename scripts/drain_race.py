"""What a rolling update does to gRPC calls in flight: two embedded replicas of one tiny exported model behind
one pick_first channel (as a client of a load-balanced Service reconnects), threads sending calls back to back,
and the first replica drained mid-traffic, ``--drains`` times. Every caller retries UNAVAILABLE (as
``carclf predict`` and the ensemble gateway do); the counts say how many calls met the drain and how they
ended. Run it on a checkout before and after a change to compare.

    .venv/bin/python scripts/drain_race.py --drains 20 --threads 8
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures builds the tiny model
RETRIES = 3


def drain_once(replica, threads: int) -> collections.Counter[str]:
    """Two new replicas, ``threads`` callers on one channel over both, the first drained mid-traffic: how the
    calls ended."""
    import numpy as np

    from carclf import contract
    from carclf.clients.grpc_client import GrpcClient
    from carclf.errors import CarClfError, Unavailable

    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    first, second = replica(), replica()
    client = GrpcClient(f"ipv4:127.0.0.1:{first.grpc_port},127.0.0.1:{second.grpc_port}", timeout=10)
    seen: collections.Counter[str] = collections.Counter()
    lock, done = threading.Lock(), threading.Event()

    def call() -> None:
        client.predict("tiny_a", {contract.INPUT_PIXELS: pixels}, signature_name=contract.SIGNATURE_PIXELS)

    def count(what: str) -> None:
        with lock:
            seen[what] += 1

    def send() -> None:
        while not done.is_set():
            for attempt in range(RETRIES + 1):
                try:
                    call()
                    count("answered" if attempt == 0 else "answered on a retry")
                    break
                except Unavailable as exc:
                    count("UNAVAILABLE, " + ("the server ended the call" if "ended the call" in exc.message
                                             else exc.message[:60]))
                except CarClfError as exc:
                    count(f"failed {exc.code}: {exc.message[:60]}")
                    break
            else:
                count("failed after the retries")

    call()
    callers = [threading.Thread(target=send) for _ in range(threads)]
    for caller in callers:
        caller.start()
    time.sleep(0.5)
    first.stop(drain_timeout=2.0)
    time.sleep(0.5)
    done.set()
    for caller in callers:
        caller.join()
    second.stop(drain_timeout=2.0)
    client.close()
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drains", type=int, default=20, help="replicas drained, one after another")
    parser.add_argument("--threads", type=int, default=8, help="callers sending back to back")
    args = parser.parse_args(argv)

    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer
    from tests.fixtures import export_tiny

    work = Path(tempfile.mkdtemp(prefix="drain_race_"))
    totals: collections.Counter[str] = collections.Counter()
    try:
        export_tiny(work, "tiny_a", seed=1)

        def replica() -> ModelServer:
            return ModelServer(ServerOptions(port=0, rest_api_port=-1, model_name="tiny_a",
                                             model_base_path=str(work / "tiny_a"), enable_model_warmup=False,
                                             web_ui_model="")).start()

        for drain in range(args.drains):
            seen = drain_once(replica, args.threads)
            print(f"drain {drain}: {dict(seen)}", flush=True)
            totals.update(seen)
        print(f"all {args.drains} drains: {dict(totals)}")
        failed = sum(n for what, n in totals.items() if what.startswith("failed"))
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
