"""What a gzip REST body that inflates past ``--max_request_bytes`` costs a running server: the time to its
answer and the server's resident memory after each such request.

    .venv/bin/python scripts/compressed_body_cost.py --rest http://127.0.0.1:8501 --model demo_mobilenet_v2 \
        --server-pid "$(pgrep -f 'carclf serve' | head -1)" --inflated-mb 500 --requests 8

The body is ``{"instances": [`` and spaces, gzip level 9 (500 MB of it is about 0.5 MB on the wire). Printed:
one line per request (status, seconds, server RSS), then the RSS growth over the run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import urllib.error
import urllib.request

import psutil


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rest", default="http://127.0.0.1:8501")
    parser.add_argument("--model", default="demo_mobilenet_v2")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--inflated-mb", type=int, default=500)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    server = psutil.Process(args.server_pid)
    body = gzip.compress(b'{"instances": [' + b" " * (args.inflated_mb << 20) + b"]}", 9)
    url = f"{args.rest}/v1/models/{args.model}:predict"
    start_rss = server.memory_info().rss >> 20
    print(f"{len(body)} bytes of gzip inflating to {args.inflated_mb} MiB; server RSS {start_rss} MiB")
    for index in range(args.requests):
        request = urllib.request.Request(url, data=body, headers={"Content-Encoding": "gzip",
                                                                  "Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        seconds = time.perf_counter() - started
        time.sleep(0.5)  # let the server finish with the connection before reading its memory
        error = json.loads(text).get("error", "") if text.startswith("{") else text
        print(f"request {index + 1}: {status} in {seconds:.2f} s, server RSS {server.memory_info().rss >> 20} MiB"
              f"  ({error[:90]})")
    print(f"server RSS grew {(server.memory_info().rss >> 20) - start_rss} MiB over {args.requests} requests")


if __name__ == "__main__":
    main()
