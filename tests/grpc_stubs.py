"""A real gRPC server for a stand-in PredictionService, on a free loopback port (the tests' peers that
misbehave: end calls, hold them, answer something else)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def serving_prediction_service(servicer, *, workers: int = 2) -> Iterator[int]:
    """Serve ``servicer`` (a ``PredictionServiceServicer``) until the block ends; yields its port."""
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)
