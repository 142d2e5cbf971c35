"""How children fare when a process that has used gRPC starts them: forked (what any ``preexec_fn`` makes
subprocess do, as ``call_child`` and ``EmbeddedServer`` once did) or through ``loadtest/tether.py`` (vfork
and exec, nothing between).

    .venv/bin/python scripts/fork_children.py --children 300

The pattern is run.py's: one gRPC channel kept open, then for each child a status call on a channel of its
own, closed, and the child (``true``) started at once. A gRPC health server runs in another process. Printed
per way: how the children ended (exit status, negative for a signal, ``hung`` for one not ended in 10 s).
A forked child runs gRPC's fork handlers, which can abort it before exec or wait for good (grpc/grpc#43055);
the parent can wait for good in them too, so each way runs in a process of its own, given 5 minutes.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from concurrent import futures

WAYS = ("fork", "tether")


def serve() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


def start_children(way: str, port: int, children: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from carclf.loadtest import server as srv

    def check(channel: grpc.Channel) -> None:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    kept = grpc.insecure_channel(f"127.0.0.1:{port}")
    check(kept)
    endings: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for _ in range(children):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check(channel)
        if way == "fork":
            child = subprocess.Popen(["true"], process_group=0, preexec_fn=lambda: None)
        else:
            child = subprocess.Popen(srv.tethered(["true"]), process_group=0)
        try:
            endings[child.wait(timeout=10)] += 1
        except subprocess.TimeoutExpired:
            child.kill()
            endings["hung"] += 1
    print(f"{way}: {children} children in {time.perf_counter() - started:.1f} s: {dict(endings)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=300)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of fork,tether")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one way, in a process of its own
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the health server's process
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.way:
        start_children(args.way, args.port, args.children)
        return 0
    health_server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(health_server.stdout.readline())
        for way in args.ways.split(","):
            try:
                subprocess.run([sys.executable, __file__, "--way", way, "--port", str(port),
                                "--children", str(args.children)], timeout=300, check=False)
            except subprocess.TimeoutExpired:
                print(f"{way}: the starting process itself did not end within 300 s (waiting in a fork "
                      "handler)", flush=True)
    finally:
        health_server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
