"""CPU time of the gRPC Predict handler's own Python work, without sockets and without TensorFlow: the real
server (``ModelServer``, one exported model) with the model's run replaced by fixed outputs, its
``PredictionService.Predict`` called directly on a parsed request, and the reply serialized.

    .venv/bin/python scripts/handler_cpu.py --model mobilenet_v2_320_swa [--batching] [--calls 6000]
    .venv/bin/python scripts/handler_cpu.py --count-calls   # Python function calls per request (cProfile)

Each call is timed with ``time.thread_time()`` (this thread's CPU time), so other load on the machine moves
the figure less than wall time would; ``--count-calls`` counts the Python function calls per request instead,
which no load moves. To compare with an older checkout, run the script from outside the
repository with that checkout's packages first on ``PYTHONPATH`` (``carclf.loadtest.ab.shadow_tree``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class _Context:
    """The two methods of a grpc.ServicerContext that the handler uses."""

    def time_remaining(self):
        return None

    def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_320_swa")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--photo-folder", type=Path, default=ROOT.parent / "shared" / "data" / "sfdl_samples")
    parser.add_argument("--batching", action="store_true", help="--enable_batching with the default parameters")
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--count-calls", action="store_true", help="count Python function calls per request")
    args = parser.parse_args()

    from tensorflow_serving.apis import predict_pb2

    import carclf.serving.metrics
    from carclf import contract
    from carclf.serving.grpc_service import PredictionService
    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer
    from carclf.tensors import make_proto

    photo = sorted(args.photo_folder.glob("*.jpg"))[0].read_bytes()
    options = ServerOptions(port=0, rest_api_port=0, model_name="m", enable_batching=args.batching,
                            model_base_path=str((args.model_repository / args.model).resolve()))
    server = ModelServer(options).start()
    try:
        service = PredictionService(server.predictor, server.gate)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        request.inputs[contract.INPUT_IMAGE_BYTES].CopyFrom(make_proto(np.array([photo], dtype=object)))
        data = request.SerializeToString()
        lease = server.predictor.acquire("m")
        fixed = {contract.OUTPUT_PROBABILITIES: np.full((1, 10), 0.1, np.float32),
                 contract.OUTPUT_CLASS_ID: np.array([3], np.int64), contract.OUTPUT_LABEL: np.array([b"x"], object)}
        lease.servable.run = lambda name, inputs: dict(fixed)  # the handler's work only
        call = lambda: service.Predict(predict_pb2.PredictRequest.FromString(data), _Context()).SerializeToString()  # noqa: E731
        if args.count_calls:
            import cProfile
            import pstats

            for _ in range(100):
                call()
            profile = cProfile.Profile()
            profile.runcall(lambda: [call() for _ in range(args.calls)])
            calls = pstats.Stats(profile).total_calls / args.calls - 1  # less the wrapper ``call`` itself
            print(f"{Path(carclf.serving.metrics.__file__).parent.parent}: {calls:.1f} Python function calls per "
                  f"request (batching {'on' if args.batching else 'off'})")
            lease.release()
            return
        spent = []
        for _ in range(args.calls):
            start = time.thread_time()
            call()
            spent.append(time.thread_time() - start)
        lease.release()
        kept = spent[len(spent) // 10:]  # the first tenth warms caches and lazily built objects
        print(f"{Path(carclf.serving.metrics.__file__).parent.parent}: handler CPU per call p50 "
              f"{1e6 * statistics.median(kept):.1f} us, mean {1e6 * statistics.mean(kept):.1f} us "
              f"(batching {'on' if args.batching else 'off'}, {len(kept)} calls)")
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
