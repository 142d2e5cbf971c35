"""TensorFlow's intra-op thread count side by side: in-process and served, one photo per call.

    .venv/bin/python scripts/tf_threads.py --intra 0,1 --rounds 2 --backbones xception,efficientnet_b3

Two parts, each alternating the settings of ``--intra`` round by round so all see the same machine:

1. In-process, one new process per setting and subject (a thread count can only be set before TensorFlow
   starts): single-photo p50 latency (one caller) and photos/s with two callers. Subjects: the exported
   ``--model`` (``serving_default``, real JPEG bytes, every answer checked) and each ``--backbones`` entry of
   the registry at its own input size, built with ``weights=None`` (same speed as trained weights).
2. Served: one embedded server per setting, started as ``make serve`` starts them (serving/batching.config,
   early dispatch), ``--model`` over gRPC, closed loop at concurrency 1 and 8, every answer checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from batch_sizes import workload_parser

CHILD_FLAG = "--child"


def child(subject: str, intra: int, repository: str, photo_folder: str, duration: float) -> dict:
    """Runs in a fresh process: one subject's single-photo latency and two-caller throughput."""
    from carclf import tf_threads

    assert not tf_threads.configure(intra, 0)
    import numpy as np

    if subject.startswith("model:"):
        from carclf import contract
        from carclf.loadtest import inprocess, protocol
        from carclf.loadtest.photos import load_photos

        name = subject.split(":", 1)[1]
        inputs = [protocol.photo_inputs(contract.SIGNATURE_BYTES, ph.data) for ph in load_photos(photo_folder, None)]
        model = inprocess.LoadedModel.load(Path(repository), name)
        rows = inprocess.measure_batches(model, contract.SIGNATURE_BYTES, inputs, [1], duration, 1.0, threads=[1, 2])
        one, two = rows
        return {"p50_ms": one["p50_ms"], "photos_per_s_2": two["throughput"]}

    import tensorflow as tf

    from carclf import backbones

    net = backbones.get(subject).build(weights=None)
    run = tf.function(lambda x: net(x, training=False))
    x = tf.constant(np.random.default_rng(0).random((1, *net.input_shape[1:]), dtype=np.float32))
    for _ in range(3):
        run(x).numpy()
    times = []
    end = time.monotonic() + duration
    while time.monotonic() < end or len(times) < 5:
        t = time.perf_counter()
        run(x).numpy()
        times.append(time.perf_counter() - t)
    counts = [0, 0]
    end = time.monotonic() + duration

    def caller(i: int) -> None:
        while time.monotonic() < end:
            run(x).numpy()
            counts[i] += 1

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    start = time.monotonic()
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    return {"p50_ms": round(1000 * float(np.median(times)), 2),
            "photos_per_s_2": round(sum(counts) / (time.monotonic() - start), 2)}


def in_process(args, intras: list[int]) -> None:
    subjects = [f"model:{args.model}"] + [b for b in args.backbones.split(",") if b]
    for number in range(1, args.rounds + 1):
        for subject in subjects:
            for intra in intras:
                out = subprocess.run([sys.executable, __file__, CHILD_FLAG, subject, str(intra), args.model_repository,
                                      args.photo_folder, str(args.duration)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{subject} intra-op {intra} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {number} in-process {subject:28s} intra-op {intra}: p50 {row['p50_ms']:7.2f} ms, "
                      f"2 callers {row['photos_per_s_2']:6.1f} photos/s", flush=True)


def served(args, intras: list[int]) -> None:
    from carclf import tf_threads
    from carclf.loadtest import bench
    from carclf.loadtest import server as srv

    work = bench.Workload.of_photos(args.model, args.model_repository, args.photo_folder)
    repository = Path(args.model_repository)
    settings = {"duration_s": args.duration, "warmup_s": 1.0, "max_requests": 1_000_000}
    batching = srv.batching_flags(Path("serving/batching.config").resolve())
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {}
        for intra in intras:
            folder = Path(tmp) / str(intra)
            folder.mkdir()
            flags = [*batching, *tf_threads.server_flags(intra)]
            servers[intra] = stack.enter_context(bench.measured_server(
                folder, repository, {args.model: repository / args.model}, flags, f"intra{intra}"))
        for server in servers.values():
            server.wait_ready([args.model], timeout=300)
        for number in range(1, args.rounds + 1):
            for intra, server in servers.items():
                for concurrency in (1, 8):
                    row = bench.measure_point(work, "grpc", server, concurrency, settings)
                    print(f"round {number} served gRPC {args.model} intra-op {intra} c={concurrency}: "
                          f"{row['throughput']:6.1f} photos/s, p50 {row['p50_ms']:7.2f} ms, "
                          f"mean batch {row['breakdown']['mean_batch'] or 1:.2f}, errors {row['errors']}", flush=True)


def main() -> int:
    if sys.argv[1:2] == [CHILD_FLAG]:
        subject, intra, repository, photos, duration = sys.argv[2:7]
        print(json.dumps(child(subject, int(intra), repository, photos, float(duration))))
        return 0
    p = workload_parser(__doc__)
    p.add_argument("--intra", default="0,1", help="intra-op thread counts to compare (0: TensorFlow's default)")
    p.add_argument("--backbones", default="xception,efficientnet_b3", help="registry backbones to time in-process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per slice")
    p.add_argument("--parts", default="inprocess,served")
    args = p.parse_args()
    intras = [int(x) for x in args.intra.split(",")]
    parts = args.parts.split(",")
    if bad := [x for x in parts if x not in ("inprocess", "served")] or [i for i in intras if i < 0]:
        p.error(f"--parts takes inprocess,served and --intra counts >= 0; received {bad}")
    if "inprocess" in parts:
        in_process(args, intras)
    if "served" in parts:
        served(args, intras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
