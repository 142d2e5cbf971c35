"""CPU per photo at concurrency 8: the embedded server over gRPC against the same model in-process, at the
batch size the server actually formed.

    .venv/bin/python scripts/cpu_per_photo.py --model mobilenet_v2_224x448 --rounds 3

One embedded server runs as `make serve` does (serving/batching.config with early dispatch). Each round takes a
served gRPC slice (closed loop, c=8, every answer checked; the server's CPU and its mean batch from its own
metrics), then in-process slices at batch 2, 3 and 4 with 2 calling threads, as `carclf bench` measures its
limit. The in-process CPU per photo at the served mean batch is read off those three by linear interpolation,
so the excess printed is what the served path costs beyond a batch of the same size. The server's CPU is also
split by thread name (`/proc/<pid>/task/*/comm`: TensorFlow's pool is `tf_Compute`; Python's threads, which
run the handlers and the model calls, are `python`; grpc's I/O is `event_engine`). "CPUs busy" is the CPU
seconds of the slice (server and client, or in-process) per wall second, out of the machine's cores.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

from carclf import contract
from carclf.loadtest import bench, inprocess, protocol
from carclf.loadtest import server as srv
from carclf.loadtest.photos import load_photos

BATCHES = (2, 3, 4)
TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """CPU seconds so far of each thread of ``pid``, with its name: {tid: (name, seconds)}."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and the read
        found[tid] = (name, (int(fields[11]) + int(fields[12])) / TICKS)  # utime + stime
    return found


def by_name(before: dict, after: dict) -> Counter:
    """CPU seconds spent between two ``thread_cpu`` readings, summed per thread name."""
    spent: Counter = Counter()
    for tid, (name, seconds) in after.items():
        spent[name] += seconds - before.get(tid, (name, 0.0))[1]
    return spent


def at_batch(rows: list[dict], batch: float) -> float:
    """In-process CPU ms per photo at ``batch`` photos, linear between the measured batch sizes."""
    points = sorted((r["batch_size"], r["cpu_ms_per_photo"]) for r in rows)
    batch = min(max(batch, points[0][0]), points[-1][0])
    for (b0, c0), (b1, c1) in itertools.pairwise(points):
        if b0 <= batch <= b1:
            return c0 + (c1 - c0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2_224x448")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--photo-folder", default="../shared/data/sfdl_samples")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds of the served slice")
    p.add_argument("--batch-duration", type=float, default=8.0, help="measured seconds of each in-process slice")
    args = p.parse_args()

    photos = load_photos(args.photo_folder, None)
    inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, ph.data) for ph in photos]
    repository = Path(args.model_repository)
    model = inprocess.LoadedModel.load(repository, args.model)
    work = bench.Workload(args.model, contract.SIGNATURE_BYTES, inputs, model.labels)
    settings = {"duration_s": args.duration, "warmup_s": 2.0, "max_requests": 1_000_000}
    cores = os.cpu_count() or 1
    excess = []
    with tempfile.TemporaryDirectory() as tmp:
        flags = srv.batching_flags(Path("serving/batching.config").resolve())
        with bench.measured_server(Path(tmp), repository, {args.model: repository / args.model}, flags,
                                   "early") as server:
            server.wait_ready([args.model], timeout=300)
            for number in range(1, args.rounds + 1):
                before = thread_cpu(server.pid)
                row = bench.measure_point(work, "grpc", server, 8, settings)
                spent = by_name(before, thread_cpu(server.pid))
                rows = inprocess.measure_batches(model, contract.SIGNATURE_BYTES, inputs, BATCHES,
                                                 args.batch_duration, 1.0, threads=[2])
                batch = row["breakdown"]["mean_batch"]
                served = row["server_cpu_ms_per_photo"] + row["client_cpu_ms_per_photo"]
                local = at_batch(rows, batch)
                excess.append(served / local - 1)
                total = sum(spent.values()) or 1.0  # the split of the whole slice, warm-up included
                names = ", ".join(f"{name} {row['server_cpu_ms_per_photo'] * seconds / total:.1f}"
                                  for name, seconds in spent.most_common(4))
                print(f"round {number} served gRPC c=8: {row['throughput']:.1f} photos/s, mean batch {batch:.2f}, "
                      f"CPU {row['server_cpu_ms_per_photo']:.1f} ms/photo in the server ({names}) + "
                      f"{row['client_cpu_ms_per_photo']:.1f} in the client; CPUs busy "
                      f"{served * row['throughput'] / 1000:.2f} of {cores}", flush=True)
                for r in rows:
                    print(f"round {number} in-process batch {r['batch_size']} x 2 threads: {r['throughput']:.1f} "
                          f"photos/s, CPU {r['cpu_ms_per_photo']:.1f} ms/photo; CPUs busy "
                          f"{r['cpu_ms_per_photo'] * r['throughput'] / 1000:.2f}", flush=True)
                print(f"round {number}: served CPU per photo over in-process at batch {batch:.2f} "
                      f"({local:.1f} ms): {served / local - 1:+.1%}", flush=True)
    print(f"served CPU per photo over in-process at the same batch, per round: "
          f"{', '.join(f'{e:+.1%}' for e in excess)}; median {statistics.median(excess):+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
