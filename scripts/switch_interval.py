"""Does the server's GIL switch interval matter? Servers that differ only in ``sys.setswitchinterval``, side by side.

    .venv/bin/python scripts/switch_interval.py --intervals-ms 5,1,0.5 --rounds 6

One embedded server per interval (5 ms is Python's default), each as ``make serve`` runs it (serving/batching.config,
early dispatch), over the same SavedModel. The interval is set at interpreter start by a ``sitecustomize`` module
that this script writes to a temporary folder and puts on the server's PYTHONPATH. Each round measures every server
in turn (the order reverses every other round): a closed-loop gRPC slice at concurrency 8 (photos/s, server CPU per
photo, mean batch), then one at concurrency 1 (p50). Printed: per round, then each interval's ratio to the first.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from batch_sizes import histogram, workload_parser

from carclf.loadtest import bench, loadgen
from carclf.loadtest import server as srv

SITECUSTOMIZE = """import os, sys
if os.environ.get("CARCLF_SWITCH_INTERVAL_S"):
    sys.setswitchinterval(float(os.environ["CARCLF_SWITCH_INTERVAL_S"]))
"""


def main() -> int:
    p = workload_parser(__doc__)
    p.add_argument("--intervals-ms", default="5,1,0.5", help="switch intervals to compare; the first is the baseline")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds of each concurrency-8 slice")
    p.add_argument("--c1-duration", type=float, default=8.0, help="measured seconds of each concurrency-1 slice")
    args = p.parse_args()

    repository = Path(args.model_repository)
    work = bench.Workload.of_photos(args.model, repository, args.photo_folder)
    intervals = [float(x) for x in args.intervals_ms.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "site").mkdir()
        (folder / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        servers = {}
        for ms in intervals:
            name = f"{ms:g}ms"
            server = bench.measured_server(folder, repository, {args.model: repository / args.model},
                                           srv.batching_flags(Path("serving/batching.config").resolve()), name)
            os.environ["PYTHONPATH"] = str(folder / "site")  # read by this server's start (its environment)
            os.environ["CARCLF_SWITCH_INTERVAL_S"] = str(ms / 1000)
            servers[name] = server.start()
        os.environ.pop("CARCLF_SWITCH_INTERVAL_S")
        results = {name: {"c8": [], "cpu": [], "c1": []} for name in servers}
        try:
            for server in servers.values():
                server.wait_ready([args.model], timeout=300)
            for number in range(1, args.rounds + 1):
                order = list(servers.items()) if number % 2 else list(reversed(servers.items()))
                for name, server in order:
                    _, totals0 = histogram(server.address)
                    busy = loadgen.closed_loop(work.factory("grpc", server.address), 8, args.duration, 2.0,
                                               1_000_000, bench.cpu_probe(server.pid))
                    _, totals1 = histogram(server.address)
                    batch = (totals1["sum"] - totals0["sum"]) / max(1.0, totals1["count"] - totals0["count"])
                    alone = loadgen.closed_loop(work.factory("grpc", server.address), 1, args.c1_duration, 1.0)
                    cpu_ms = busy.server_cpu_s * 1000 / max(1, busy.requests)
                    p50 = alone.summary()["p50_ms"]
                    for key, value in (("c8", busy.throughput), ("cpu", cpu_ms), ("c1", p50)):
                        results[name][key].append(value)
                    print(f"round {number} {name:>6}: c=8 {busy.throughput:5.1f} photos/s, server CPU {cpu_ms:.1f} "
                          f"ms/photo, mean batch {batch:.2f}, errors {busy.errors}; c=1 p50 {p50:.2f} ms, "
                          f"errors {alone.errors}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    base = results[next(iter(servers))]
    for name, got in results.items():
        ratios = [a / b for a, b in zip(got["c8"], base["c8"], strict=True)]
        shifts = [a - b for a, b in zip(got["c1"], base["c1"], strict=True)]
        print(f"{name:>6}: c=8 median {statistics.median(got['c8']):.1f} photos/s, over the first "
              f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f}); server CPU median "
              f"{statistics.median(got['cpu']):.1f} ms/photo; c=1 p50 median {statistics.median(got['c1']):.2f} ms, "
              f"minus the first {', '.join(f'{d:+.2f}' for d in shifts)} (median {statistics.median(shifts):+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
