"""What the bench's interleaved latency figure is made of: one photo at a time, the same model in-process and
served (gRPC, REST), called alone (one slice each) and in turn (in-process, served, in-process, ...), with and
without a pause between calls.

    .venv/bin/python scripts/interleave_gap.py --rounds 2 --gaps 0,1,5,20 --transports grpc,rest

One embedded server runs as `make serve` does (serving/batching.config with early dispatch). Each round, gap
and transport takes four measurements of ``--calls`` calls: in-process alone, served alone, then both in turn.
A pause of G ms is slept before every call, off the clock; served answers are checked off the clock too.

Printed per measurement: the p50 of the calls and the in-process mean (ms), and for the served calls the
server's mean model run per request (from its metrics). The served p50 minus that mean run is the time around
the model (the bench's decomposed figure); the mean run minus the in-process mean is how much slower the model
itself ran in the server. Each round starts with a check that the server's code path (SavedModelServable.run)
runs the model as fast as the bench's in-process one (LoadedModel.predict), both in this process, in turn.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from batch_sizes import workload_parser

from carclf import contract
from carclf.loadtest import bench, inprocess, metrics, protocol
from carclf.loadtest import server as srv
from carclf.loadtest.photos import load_photos
from carclf.serving.savedmodel import SavedModelServable

Sender = Callable[[int], object]


def timed(send: Sender, calls: int, gap_s: float, offset: int = 0) -> list[float]:
    """Milliseconds of each of ``calls`` calls, with ``gap_s`` slept before each (off the clock); a callable
    that a call returns is its answer's check, run off the clock."""
    out = []
    for i in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        check = send(offset + i)
        out.append((time.perf_counter() - t0) * 1000.0)
        if callable(check):
            check()
    return out


def in_turn(a: Sender, b: Sender, calls: int, gap_s: float) -> tuple[list[float], list[float]]:
    """``a`` then ``b``, ``calls`` times each, alternating; milliseconds of each call, per sender."""
    first, second = [], []
    for i in range(calls):
        first += timed(a, 1, gap_s, i)
        second += timed(b, 1, gap_s, i)
    return first, second


def measure(local: Sender, served: Sender, server: srv.EmbeddedServer, model: str, transport: str, calls: int,
            gap_s: float) -> str:
    """In-process alone, served alone, both in turn: one line of figures (ms)."""
    p50, mean = statistics.median, statistics.fmean

    def model_run(before: metrics.Samples, after: metrics.Samples) -> float:
        return metrics.breakdown(before, after, model, transport.upper())["runtime_ms_per_batch"]

    alone_local = timed(local, calls, gap_s)
    before = metrics.scrape(server.address.rest_url, bench.METRICS_PATH)
    alone_served = timed(served, calls, gap_s)
    mid = metrics.scrape(server.address.rest_url, bench.METRICS_PATH)
    turn_local, turn_served = in_turn(local, served, calls, gap_s)
    after = metrics.scrape(server.address.rest_url, bench.METRICS_PATH)
    parts = []
    for name, here, there, run in (("alone", alone_local, alone_served, model_run(before, mid)),
                                   ("in turn", turn_local, turn_served, model_run(mid, after))):
        parts.append(f"{name}: in-process p50 {p50(here):.2f} mean {mean(here):.2f}; served p50 {p50(there):.2f}, "
                     f"model run mean {run:.2f}; added p50 {p50(there) - p50(here):.2f} = around the run "
                     f"{p50(there) - run:.2f} + run mean over in-process mean {run - mean(here):.2f} + "
                     f"in-process mean over p50 {mean(here) - p50(here):.2f}")
    return " | ".join(parts)


def main() -> int:
    p = workload_parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=120, help="timed calls per sender and measurement")
    p.add_argument("--gaps", default="0,5,20", help="pauses before each call to try, ms, comma-separated")
    p.add_argument("--transports", default="grpc", help="comma-separated: grpc, rest")
    args = p.parse_args()
    gaps = [float(g) / 1000.0 for g in args.gaps.split(",")]
    transports = args.transports.split(",")
    if not set(transports) <= {"grpc", "rest"}:
        p.error(f"--transports: expected grpc and/or rest, received {args.transports!r}")

    photos = load_photos(args.photo_folder, None)
    inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, ph.data) for ph in photos]
    repository = Path(args.model_repository)
    model = inprocess.LoadedModel.load(repository, args.model)
    servable = SavedModelServable(args.model, 1, model.path)
    work = bench.Workload(args.model, contract.SIGNATURE_BYTES, inputs, model.labels)

    def local(i: int) -> None:
        model.predict(contract.SIGNATURE_BYTES, inputs[i % len(inputs)])

    def server_path(i: int) -> None:
        servable.run(contract.SIGNATURE_BYTES, inputs[i % len(inputs)])

    with tempfile.TemporaryDirectory() as tmp:
        flags = srv.batching_flags(Path("serving/batching.config").resolve())
        with bench.measured_server(Path(tmp), repository, {args.model: repository / args.model}, flags,
                                   "early") as server:
            server.wait_ready([args.model], timeout=300)
            senders = {t: work.factory(t, server.address)(0) for t in transports}
            try:
                timed(local, 30, 0.0)
                timed(server_path, 30, 0.0)
                for served, _ in senders.values():
                    timed(served, 30, 0.0)
                for number in range(1, args.rounds + 1):
                    a, b = in_turn(local, server_path, args.calls, 0.0)
                    print(f"round {number} code paths in this process, in turn: LoadedModel.predict p50 "
                          f"{statistics.median(a):.2f} mean {statistics.fmean(a):.2f}; SavedModelServable.run "
                          f"p50 {statistics.median(b):.2f} mean {statistics.fmean(b):.2f}", flush=True)
                    for gap in gaps:
                        for transport, (served, _) in senders.items():
                            print(f"round {number} gap {gap * 1000:.0f} ms {transport}: "
                                  f"{measure(local, served, server, args.model, transport, args.calls, gap)}",
                                  flush=True)
            finally:
                for _, close in senders.values():
                    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
