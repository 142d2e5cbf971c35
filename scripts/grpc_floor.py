"""The floor under "added latency" on this machine: a gRPC Predict round trip to a handler that does no model
work, with the same 88 KB request as a real photo, when the handler answers at once and when it first waits
as long as a model would run (sleeping, or busy on the CPU).

    .venv/bin/python scripts/grpc_floor.py --wait-ms 7 --rounds 3

Two grpc servers run in this process (grpc's synchronous server, with and without the embedded server's
interceptor); the client is the plain synchronous stub. Printed per round: median round-trip time minus the
handler's wait, in ms. What an in-process call never pays, and every served call does, is this figure.

With ``--grpc-option NAME=VALUE`` (repeatable) one more case runs: the sleeping handler with those channel
arguments on both the server and the client's channel, e.g. ``--grpc-option grpc.http2.bdp_probe=0``.

With ``--raw-tcp`` the same payload also goes over a bare TCP socket to another process that answers 200
bytes, at once or after the same wait: what the kernel and the machine charge without gRPC.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time
from concurrent import futures

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from carclf.serving.grpc_service import UnparsableRequestInterceptor
from carclf.tensors import make_proto


class Handler(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, wait_s: float, how: str):
        self.wait_s, self.how = wait_s, how
        self.reply = predict_pb2.PredictResponse()
        self.reply.outputs["probabilities"].CopyFrom(make_proto(np.full((1, 10), 0.1, np.float32)))

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        if self.how == "sleep":
            time.sleep(self.wait_s)
        elif self.how == "spin":
            end = time.perf_counter() + self.wait_s
            while time.perf_counter() < end:
                pass
        return self.reply


GrpcOptions = list[tuple[str, int | str]]


def parse_option(text: str) -> tuple[str, int | str]:
    """``NAME=VALUE`` as a grpc channel argument (VALUE as int when it is one)."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("grpc."):
        raise argparse.ArgumentTypeError(f"expected grpc.NAME=VALUE, received {text!r}")
    try:
        return name, int(value)
    except ValueError:
        return name, value


def serve(handler: Handler, interceptor: bool, options: GrpcOptions = ()) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(16), options=list(options),
                         interceptors=[UnparsableRequestInterceptor()] if interceptor else None)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(handler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def round_trip_ms(port: int, payload: bytes, requests: int, options: GrpcOptions = ()) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=list(options)) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "floor"
        request.inputs["image_bytes"].CopyFrom(make_proto(np.array([payload], dtype=object)))
        for _ in range(50):
            stub.Predict(request)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            stub.Predict(request)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


TCP_REPLY_BYTES = 200


def _read_exactly(sock: socket.socket, size: int) -> None:
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        left -= len(chunk)


def _tcp_server(listener: socket.socket, payload_bytes: int, wait_s: float, how: str) -> None:
    """Answer every ``payload_bytes`` received with TCP_REPLY_BYTES, after waiting as ``how`` says."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        try:
            while True:
                _read_exactly(conn, payload_bytes)
                if how == "sleep":
                    time.sleep(wait_s)
                elif how == "spin":
                    end = time.perf_counter() + wait_s
                    while time.perf_counter() < end:
                        pass
                conn.sendall(b"x" * TCP_REPLY_BYTES)
        except EOFError:
            pass


def tcp_round_trip_ms(payload: bytes, wait_s: float, how: str, requests: int) -> float:
    """Median round trip of ``payload`` over loopback TCP to a server process (started and stopped here)."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = multiprocessing.get_context("fork").Process(target=_tcp_server, args=(listener, len(payload), wait_s,
                                                                                    how), daemon=True)
    server.start()
    times = []
    with socket.create_connection(listener.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(requests + 30):
            start = time.perf_counter()
            sock.sendall(payload)
            _read_exactly(sock, TCP_REPLY_BYTES)
            if i >= 30:
                times.append((time.perf_counter() - start) * 1e3)
    server.join(10)
    listener.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait-ms", type=float, default=7.0, help="how long the waiting handlers wait")
    parser.add_argument("--payload-bytes", type=int, default=88_000, help="request size (a 640x480 JPEG: 88 KB)")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--raw-tcp", action="store_true", help="also measure a bare TCP socket (no gRPC)")
    parser.add_argument("--grpc-option", type=parse_option, action="append", default=[], metavar="NAME=VALUE",
                        help="also measure the sleeping handler with this channel argument on both ends")
    args = parser.parse_args()
    wait_s = args.wait_ms / 1000
    cases = {"no wait": ("none", False, []), f"sleep {args.wait_ms:g} ms": ("sleep", False, []),
             f"busy {args.wait_ms:g} ms": ("spin", False, []),
             f"sleep {args.wait_ms:g} ms + interceptor": ("sleep", True, [])}
    if args.grpc_option:
        named = ", ".join(f"{name}={value}" for name, value in args.grpc_option)
        cases[f"sleep {args.wait_ms:g} ms, {named}"] = ("sleep", False, args.grpc_option)
    servers = {name: serve(Handler(wait_s, how), icpt, opts) for name, (how, icpt, opts) in cases.items()}
    payload = b"\xff" * args.payload_bytes
    for number in range(args.rounds):
        figures = []
        for name, (how, _, opts) in cases.items():
            overhead = (round_trip_ms(servers[name][1], payload, args.requests, opts)
                        - (0 if how == "none" else args.wait_ms))
            figures.append(f"{name}: {overhead:.3f}")
        if args.raw_tcp:
            for how in ("none", "sleep", "spin"):
                overhead = tcp_round_trip_ms(payload, wait_s, how, args.requests) - (0 if how == "none" else args.wait_ms)
                figures.append(f"raw TCP {'no wait' if how == 'none' else how}: {overhead:.3f}")
        print(f"round {number + 1} (median round trip minus the wait, ms): " + "; ".join(figures), flush=True)
    for server, _ in servers.values():
        server.stop(0)


if __name__ == "__main__":
    main()
