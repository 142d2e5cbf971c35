"""CPU per photo when each request already holds a batch: the embedded server (batching off) against the same
batch in-process, so the transport's cost is seen without the batcher's.

    .venv/bin/python scripts/batched_requests.py --batch 4 --callers 2 --rounds 3

Each round: ``--callers`` gRPC clients in this process send requests of ``--batch`` photos each to
``serving_default`` (closed loop, every answer checked) for ``--duration`` seconds, the server's CPU read from
/proc and the callers' own CPU from their threads; then the same batch in-process with as many calling threads.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from batch_sizes import workload_parser
from cpu_per_photo import by_name, thread_cpu

from carclf import contract
from carclf.clients.grpc_client import GrpcClient
from carclf.loadtest import bench, checks, inprocess, protocol
from carclf.loadtest.photos import load_photos


def served(target: str, model: str, photos: list[bytes], labels, batch: int, callers: int, duration: float,
           pid: int) -> tuple[float, float, float]:
    """(photos/s, server CPU ms per photo, callers' CPU ms per photo) over the measured window."""
    photos_done, cpu = [0] * callers, [0.0] * callers
    go = threading.Barrier(callers + 1)
    window: dict[str, float] = {}

    def caller(index: int) -> None:
        with GrpcClient(target) as client:
            def one(i: int) -> None:
                images = [photos[(index * 7 + i + j) % len(photos)] for j in range(batch)]
                result = client.predict(model, images=images)
                checks.check_prediction(result.outputs, labels, batch=batch)

            for i in range(3):  # warm the channel and the model
                one(i)
            go.wait()
            start, i = time.thread_time(), 0
            while time.monotonic() < window["end"]:
                one(i)
                i += 1
                photos_done[index] += batch
            cpu[index] = time.thread_time() - start

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    window["end"] = time.monotonic() + 3600.0
    go.wait()
    before, start = thread_cpu(pid), time.monotonic()
    window["end"] = start + duration
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    server_s = sum(by_name(before, thread_cpu(pid)).values())
    done = max(1, sum(photos_done))
    return done / wall, 1000 * server_s / done, 1000 * sum(cpu) / done


def main() -> int:
    p = workload_parser(__doc__)
    p.add_argument("--batch", type=int, default=4, help="photos per request")
    p.add_argument("--callers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per slice")
    args = p.parse_args()
    if args.batch < 1 or args.callers < 1 or args.rounds < 1 or args.duration <= 0:
        p.error("--batch, --callers and --rounds take counts >= 1, --duration seconds > 0")

    photos = [ph.data for ph in load_photos(args.photo_folder, None)]
    inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, data) for data in photos]
    repository = Path(args.model_repository)
    model = inprocess.LoadedModel.load(repository, args.model)
    with tempfile.TemporaryDirectory() as tmp, bench.measured_server(
            Path(tmp), repository, {args.model: repository / args.model}, [], "plain") as server:
        server.wait_ready([args.model], timeout=300)
        for number in range(1, args.rounds + 1):
            rate, server_ms, client_ms = served(server.address.grpc_target, args.model, photos, model.labels,
                                                args.batch, args.callers, args.duration, server.pid)
            local = inprocess.measure_batches(model, contract.SIGNATURE_BYTES, inputs, [args.batch], args.duration,
                                              2.0, threads=[args.callers])[0]
            total = server_ms + client_ms
            print(f"round {number}: served batch {args.batch} x {args.callers} callers {rate:.1f} photos/s, CPU "
                  f"{server_ms:.1f} (server) + {client_ms:.1f} (callers) = {total:.1f} ms/photo; in-process "
                  f"{local['throughput']:.1f} photos/s, {local['cpu_ms_per_photo']:.1f} ms/photo; served over "
                  f"in-process: CPU {total / local['cpu_ms_per_photo'] - 1:+.1%}, photos/s "
                  f"{rate / local['throughput']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
