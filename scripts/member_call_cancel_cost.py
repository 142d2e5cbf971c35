"""What making the gateway's member calls cancellable costs: ``GrpcClient.predict`` as a blocking call (no
``cancel``) against the same call with a ``CancelToken`` (gRPC's future API, whose ``cancel()`` another thread
may call), on one tiny exported model served by a real embedded server over loopback, the two ways interleaved
call by call.

    .venv/bin/python scripts/member_call_cancel_cost.py --calls 1000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures and tests.ensemble.servers build the tiny model and server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls each way")
    args = parser.parse_args(argv)

    import numpy as np

    from carclf import contract
    from carclf.cancel import CancelToken
    from carclf.clients.grpc_client import GrpcClient
    from tests.ensemble.servers import embedded_server
    from tests.fixtures import export_tiny

    work = Path(tempfile.mkdtemp(prefix="member_call_cancel_cost_"))
    try:
        export_tiny(work / "repository", "tiny_a", seed=1)
        with embedded_server(work / "repository", work / "server", models=["tiny_a"]) as server, \
                GrpcClient(f"127.0.0.1:{server.grpc_port}") as client:
            pixels = np.zeros((2, 32, 32, 3), np.uint8)  # one photo, two views, as a member call sends

            def call(cancellable: bool) -> float:
                start = time.perf_counter()
                client.predict("tiny_a", {contract.INPUT_PIXELS: pixels}, signature_name=contract.SIGNATURE_PIXELS,
                               output_filter=(contract.OUTPUT_PROBABILITIES,),
                               cancel=CancelToken() if cancellable else None)
                return time.perf_counter() - start

            for _ in range(50):  # warm both paths
                call(False), call(True)
            seconds: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.calls):
                for cancellable in ((False, True) if i % 2 else (True, False)):
                    seconds[cancellable].append(call(cancellable))
            p50 = {way: statistics.median(xs) * 1e3 for way, xs in seconds.items()}
            for way, name in ((False, "blocking"), (True, "cancellable")):
                xs = sorted(seconds[way])
                print(f"{name:12s} p50 {p50[way]:.3f} ms  p90 {xs[int(0.9 * len(xs))] * 1e3:.3f} ms")
            print(f"added p50: {p50[True] - p50[False]:+.3f} ms per member call")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
