"""Where a bare gRPC round trip spends its time when the handler waits as long as a model runs: the request
leg (client sends -> handler starts) and the response leg (handler returns -> client has the answer).

    .venv/bin/python scripts/grpc_legs.py --wait-ms 33 --server sync,aio --rounds 2
    .venv/bin/python scripts/grpc_legs.py --wait-ms 33 --idle-spinners 2   # keep both vCPUs out of idle

The server runs in another process (grpc's synchronous server, or grpc.aio with the wait run inline on its
event loop); it stamps ``time.perf_counter()`` (CLOCK_MONOTONIC, shared by the processes) when the handler
starts and ends and returns both stamps, so the two legs are measured separately. ``--idle-spinners N``
starts N busy loops at SCHED_IDLE priority for the duration: they only run when nothing else wants a CPU,
so the CPUs never go idle, which shows how much of the floor is waking an idle (virtual) CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time
from concurrent import futures

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from carclf.tensors import make_proto, to_ndarray

PAYLOAD_BYTES = 88_000  # a real photo's JPEG


def _answer(started: float) -> predict_pb2.PredictResponse:
    reply = predict_pb2.PredictResponse()
    reply.outputs["probabilities"].CopyFrom(make_proto(np.full((1, 10), 0.1, np.float32)))
    reply.outputs["stamps"].CopyFrom(make_proto(np.array([started, time.perf_counter()], np.float64)))
    return reply


class SyncHandler(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, wait_s: float):
        self.wait_s = wait_s

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        started = time.perf_counter()
        time.sleep(self.wait_s)
        return _answer(started)


class AioHandler(SyncHandler):
    async def Predict(self, request, context):  # noqa: N802 - the wait blocks the loop, as an inline model would
        started = time.perf_counter()
        time.sleep(self.wait_s)
        return _answer(started)


def _serve(kind: str, wait_s: float, ports) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(16))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(SyncHandler(wait_s), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(AioHandler(wait_s), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _spin() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while True:
        pass


def legs_ms(port: int, requests: int) -> tuple[float, float]:
    """Median request leg and response leg, in ms."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "legs"
        request.inputs["image_bytes"].CopyFrom(make_proto(np.array([b"x" * PAYLOAD_BYTES], dtype=object)))
        for _ in range(20):
            stub.Predict(request)
        up, down = [], []
        for _ in range(requests):
            sent = time.perf_counter()
            reply = stub.Predict(request)
            received = time.perf_counter()
            started, finished = to_ndarray(reply.outputs["stamps"])
            up.append(started - sent)
            down.append(received - finished)
    return statistics.median(up) * 1e3, statistics.median(down) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-ms", type=float, default=33.0, help="how long the handler waits (a model's run)")
    parser.add_argument("--server", default="sync,aio", help="server kinds: sync, aio")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=150, help="requests per round")
    parser.add_argument("--idle-spinners", type=int, default=0, help="SCHED_IDLE busy loops to run meanwhile")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    spinners = [ctx.Process(target=_spin, daemon=True) for _ in range(args.idle_spinners)]
    for s in spinners:
        s.start()
    try:
        for rnd in range(args.rounds):
            for kind in [k.strip() for k in args.server.split(",") if k.strip()]:
                ports = ctx.Queue()
                server = ctx.Process(target=_serve, args=(kind, args.wait_ms / 1e3, ports), daemon=True)
                server.start()
                try:
                    up, down = legs_ms(ports.get(timeout=60), args.requests)
                finally:
                    server.terminate()
                    server.join()
                print(f"round {rnd + 1} server={kind:<4} wait {args.wait_ms:g} ms: request leg {up:.2f} ms, "
                      f"response leg {down:.2f} ms, both {up + down:.2f} ms", flush=True)
    finally:
        for s in spinners:
            s.terminate()


if __name__ == "__main__":
    main()
