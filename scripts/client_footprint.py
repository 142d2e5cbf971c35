"""What a client process costs to start: wall time and peak resident memory of ``carclf predict`` over gRPC,
and of a process that loads the locust file, with TF Serving's protocol modules loaded alone
(``carclf.tfprotos``, the product's way) and through TensorFlow (the child also imports TensorFlow: first for
``carclf predict``, so the modules come the ordinary way; after the locust file, which must patch the standard
library with gevent before anything else runs; either way what every client process paid before).

    .venv/bin/python scripts/client_footprint.py --server grpc://127.0.0.1:8500 --model demo_mobilenet_v2 \
        --photo ../shared/data/sfdl_samples/3076.jpg --rounds 5

The two ways run in turn, round after round, so a noisy host slows both alike; printed: the median of each
and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PREDICT = "import sys\nfrom carclf.cli import main\nsys.exit(main(sys.argv[1:]))\n"
LOCUSTFILE = "import carclf.loadtest.locustfile\n"
TENSORFLOW = "import tensorflow\n"


def measure(code: str, args: list[str]) -> tuple[float, float]:
    """Seconds and peak resident MB of one child running ``code`` with ``args``."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    errors = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if child.returncode != 0:
        raise SystemExit(f"child failed with status {child.returncode}: {errors[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="grpc://127.0.0.1:8500")
    parser.add_argument("--model", default="car_ensemble")
    parser.add_argument("--photo", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    predict = ["predict", args.photo, "--server", args.server, "--model", args.model]
    cases = {"carclf predict, one photo over gRPC": (PREDICT, TENSORFLOW + PREDICT, predict),
             "a process that loads the locust file": (LOCUSTFILE, LOCUSTFILE + TENSORFLOW, [])}
    for name, (code, code_through, argv) in cases.items():
        alone, through = [], []
        for _ in range(args.rounds):
            alone.append(measure(code, argv))
            through.append(measure(code_through, argv))
        a_s, a_mb = (statistics.median(x) for x in zip(*alone, strict=True))
        t_s, t_mb = (statistics.median(x) for x in zip(*through, strict=True))
        print(f"{name} ({args.rounds} rounds, medians): protocol modules alone {a_s:.2f} s, {a_mb:.0f} MB; "
              f"through TensorFlow {t_s:.2f} s, {t_mb:.0f} MB; ratio {t_s / a_s:.1f}x time, {t_mb / a_mb:.1f}x memory")


if __name__ == "__main__":
    main()
