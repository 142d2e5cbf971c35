"""Batch sizes and throughput under closed-loop gRPC load, for batching setups side by side.

    .venv/bin/python scripts/batch_sizes.py --model mobilenet_v2_224x448 --concurrency 8 --rounds 4
    .venv/bin/python scripts/batch_sizes.py --early-timeouts 5000,20000 --rounds 5

Embedded servers run at once over the same SavedModel: "tf_serving" with serving/batching.config's parameters
but a batch timeout of 0 and TF Serving's dispatch rule (the shipped setup before early dispatch), and one
"early" server per early-dispatch timeout: the same parameters with ``--batching_early_dispatch``, as ``make
serve`` runs (by default only the file's own timeout; with ``--early-timeouts`` each one given, in µs, named
"early_<µs>"). Rounds alternate between them, so all see the same machine; an idle server costs next to nothing.
Printed per round and setup: photos/s, p50 and p95 latency, mean batch, and how many batches of each size ran in the measured window
(from the server's Prometheus histogram). Every answer is checked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from google.protobuf import text_format

from carclf.loadtest import bench, loadgen, metrics
from carclf.loadtest import server as srv
from carclf.serving import protos

HISTOGRAM = metrics.PREFIX + "batching_session:processed_batch_size"


def histogram(address: srv.ServerAddress) -> tuple[dict[float, float], dict[str, float]]:
    """Cumulative batch counts per bucket bound (``le``), and the photos (sum) and batches (count) so far."""
    samples = metrics.scrape(address.rest_url, bench.METRICS_PATH) or {}
    buckets = {float(dict(labels)["le"]): value for (name, labels), value in samples.items()
               if name == HISTOGRAM + "_bucket"}
    totals = {key: samples.get((f"{HISTOGRAM}_{key}", frozenset()), 0.0) for key in ("sum", "count")}
    return buckets, totals


def with_timeout(path: Path, micros: int) -> str:
    """The batching parameters of ``path`` with ``batch_timeout_micros`` set to ``micros``."""
    params = text_format.Parse(path.read_text(), protos.BatchingParameters())
    params.batch_timeout_micros.value = micros
    return text_format.MessageToString(params)


def window(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Batches per size band that ran between two histogram readings, e.g. {"1": 3, "3-4": 50}."""
    bands, lower, previous = {}, 0.0, 0.0
    for le in sorted(after):
        cumulative = after[le] - before.get(le, 0.0)
        count = int(round(cumulative - previous))
        if count and le != float("inf"):
            low = int(lower) + 1
            bands[str(int(le)) if low >= int(le) else f"{low}-{int(le)}"] = count
        previous, lower = cumulative, le
    return bands


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """The scripts' parser with the served model and the photos it is sent (``bench.Workload.of_photos``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2_224x448")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--photo-folder", default="../shared/data/sfdl_samples")
    return p


def main() -> int:
    p = workload_parser(__doc__)
    p.add_argument("--batching-config", default="serving/batching.config", help="the parameters every setup starts from")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--early-timeouts", default="",
                   help="early-dispatch setups to run, by batch timeout in µs, e.g. 5000,20000 (default: one, the "
                        "file's own timeout, named 'early')")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per slice")
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args()

    work = bench.Workload.of_photos(args.model, args.model_repository, args.photo_folder)
    repository = Path(args.model_repository)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        batching = Path(args.batching_config).resolve()
        (tmp_path / "timeout0.config").write_text(with_timeout(batching, 0))
        setups = {"tf_serving": srv.batching_flags(tmp_path / "timeout0.config", early_dispatch=False)}
        timeouts = [int(t) for t in args.early_timeouts.split(",") if t.strip()]
        if not timeouts:
            setups["early"] = srv.batching_flags(batching)
        for micros in timeouts:
            path = tmp_path / f"timeout{micros}.config"
            path.write_text(with_timeout(batching, micros))
            setups[f"early_{micros}us"] = srv.batching_flags(path)
        served = {args.model: repository / args.model}
        servers = {name: bench.measured_server(tmp_path, repository, served, flags, name)
                   for name, flags in setups.items()}
        try:
            for server in servers.values():
                server.start()
            for server in servers.values():
                server.wait_ready([args.model], timeout=300)
            rates: dict[str, list[float]] = {name: [] for name in servers}
            for number in range(1, args.rounds + 1):
                for name, server in servers.items():
                    (buckets0, totals0), result, (buckets1, totals1) = (
                        histogram(server.address),
                        loadgen.closed_loop(work.factory("grpc", server.address), args.concurrency, args.duration,
                                            args.warmup),
                        histogram(server.address))
                    batches = totals1["count"] - totals0["count"]
                    mean = (totals1["sum"] - totals0["sum"]) / batches if batches else float("nan")
                    rates[name].append(result.throughput)
                    summary = result.summary()
                    print(f"round {number} {name:>14}: {result.throughput:6.1f} photos/s, p50 {summary['p50_ms']} ms, "
                          f"p95 {summary['p95_ms']} ms, errors {result.errors}; "
                          f"whole slice (warm-up included): mean batch {mean:.2f}, batches by size "
                          f"{window(buckets0, buckets1)}", flush=True)
            for name, values in rates.items():
                print(f"{name:>14}: median {statistics.median(values):.1f} photos/s over {len(values)} rounds "
                      f"({', '.join(f'{v:.1f}' for v in values)})")
            early = [name for name in rates if name != "tf_serving"]
            pairs = [(name, "tf_serving") for name in early] + [(name, early[0]) for name in early[1:]]
            for name, base in pairs:
                ratios = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
                print(f"{name} / {base} per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
                      f"median {statistics.median(ratios):.3f}")
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
