"""The benchmark's outputs: targets judged from the figures, a markdown report and a PNG plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from carclf import contract, tf_threads

# Targets of the serving and ensemble issues: (key, description, threshold).
TARGETS = (
    ("grpc_c8_ratio", "gRPC throughput at concurrency 8 >= 0.9x in-process best batch", 0.9),
    ("rest_c8_ratio", "REST throughput at concurrency 8 >= 0.85x in-process best batch", 0.85),
    ("grpc_added_p50_c1_ms", "gRPC added latency at concurrency 1 <= 2 ms over in-process", 2.0),
    ("rest_added_p50_c1_ms", "REST added latency at concurrency 1 <= 2 ms over in-process", 2.0),
    ("ensemble_overhead", "ensemble overhead < 10% over its members run in-process one after another", 0.10),
)
HIGHER_IS_BETTER = {"grpc_c8_ratio", "rest_c8_ratio"}


def _worst_of(*values: float | None, higher_is_better: bool) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if higher_is_better else max(present)


def _median(figures: dict, name: str) -> float | None:
    entry = figures.get(name)
    return None if entry is None else entry["median"]


def _verdict_of(first: float | None, second: float | None, threshold: float, higher: bool,
                strict: bool = False) -> str:
    """met when both figures meet the threshold, missed when both miss it, inconclusive when they disagree
    (on a busy shared machine the noisier one can fall either side); one figure alone decides."""

    def meets(value: float) -> bool:
        if higher:
            return value >= threshold
        return value < threshold if strict else value <= threshold

    results = [meets(v) for v in (first, second) if v is not None]
    if not results:
        return "not measured"
    if all(results):
        return "met"
    if not any(results):
        return "missed"
    return "inconclusive"


def judge_targets(paired: dict, ensemble: dict | None, transports: Sequence[str] = ("grpc", "rest")) -> list[dict]:
    """Each target from the paired rounds (medians), with two independent figures and a verdict.

    * throughput at c=8: the wall-clock ratio to the in-process limit, and the CPU-per-photo ratio (what the
      throughput ratio is when both sides are CPU-bound, without the noise of the share each side got);
    * added latency at c=1: the decomposed added mean (what the client waited beyond the server's own
      TensorFlow run time, from the server's metrics, in the same requests), and the interleaved p50
      difference (served and in-process calls of the same photo taken in turn, one at a time, so the machine's
      drift between slices cancels; the slice-paired p50 difference stays in the rounds, not judged);
    * the ensemble: its p50 overhead over the members run in-process one after another, and its CPU overhead.

    ``met`` when both figures meet the target, ``missed`` when both miss it, ``inconclusive`` otherwise.
    The better batching mode (or transport, for the ensemble) counts.
    """
    figures_for = {
        "c8_ratio": ("c8_ratio", "c8_cpu_ratio", True),
        "added_p50_c1_ms": ("added_mean_ms", "interleaved_added_p50_ms", False),
    }
    found: dict[str, tuple[float | None, float | None, str]] = {}
    for transport in ("grpc", "rest"):
        for suffix, (first, second, higher) in figures_for.items():
            key = f"{transport}_{suffix}"
            options = [(mode, _median(f, f"{transport}_{first}"), _median(f, f"{transport}_{second}"))
                       for mode, f in paired.items() if transport in transports]
            options = [o for o in options if o[1] is not None or o[2] is not None]
            if not options:
                found[key] = (None, None, f"{transport} not measured")
                continue
            pick = (max if higher else min)(options, key=lambda o: _worst_of(o[1], o[2], higher_is_better=higher))
            rounds = max(paired[pick[0]].get(f"{transport}_{n}", {}).get("n", 0) for n in (first, second))
            found[key] = (pick[1], pick[2], f"batching {pick[0]}, medians of {rounds} paired rounds")
    summary = (ensemble or {}).get("summary") or {}
    options = [(t, _median(summary, f"{t}_overhead"), _median(summary, f"{t}_cpu_overhead"))
               for t in transports if _median(summary, f"{t}_overhead") is not None]
    if options:
        pick = min(options, key=lambda o: _worst_of(o[1], o[2], higher_is_better=False))
        found["ensemble_overhead"] = (pick[1], pick[2], f"over {pick[0]} at concurrency 1, medians of "
                                      f"{summary[f'{pick[0]}_overhead']['n']} paired rounds")
    else:
        found["ensemble_overhead"] = (None, None, (ensemble or {}).get("skipped", "ensemble not measured"))
    verdicts = []
    for key, text, threshold in TARGETS:
        value, second, basis = found[key]
        verdict = _verdict_of(value, second, threshold, key in HIGHER_IS_BETTER, strict=key == "ensemble_overhead")
        verdicts.append({"target": key, "description": text, "threshold": threshold, "value": value,
                         "second_value": second, "basis": basis, "verdict": verdict,
                         "met": {"met": True, "missed": False}.get(verdict)})
    return verdicts


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _batching_line(result: dict) -> list[str]:
    """How "batching on" was served: the parameters (comments dropped) and the early-dispatch extension."""
    text = result.get("batching_parameters")
    if not text:
        return []
    params = " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    early = result["settings"].get("early_dispatch")
    return [f"Batching on: `{params}`" + ("" if early is None else f"; early dispatch {'on' if early else 'off'}") + "."]


def _threads_line(settings: dict) -> list[str]:
    """The TensorFlow threading both sides ran with (reports written before it was a setting have none)."""
    threads = settings.get("tf_threads")
    if threads is None:
        return []
    return [f"TensorFlow threads, in-process and in the server alike: "
            f"{tf_threads.describe(**threads)}."]


def markdown(result: dict) -> str:
    """The whole benchmark as markdown tables (what docs/PERFORMANCE.md quotes)."""
    s, lim = result["settings"], result["inprocess"]["limit"]
    lines = [
        f"# carclf bench: {s['model']} (version {result['model_version']}), signature {s['signature']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Run at {result['started_at']} on {result['environment']['cpus']} CPU cores "
        f"(load average {result['environment']['loadavg_start']} at start, "
        f"{result['environment']['loadavg_end']} at end); {len(result['photos'])} photos from {s['photo_folder']}.",
        *_batching_line(result),
        *_threads_line(s),
        "",
        "## In-process limit (the same signature called directly, closed loop)",
        "",
        "| batch | threads | photos/s | p50 ms | p95 ms | p99 ms | CPU ms/photo |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["inprocess"]["batches"]:
        lines.append(f"| {r['batch_size']} | {r['threads']} | {_fmt(r['throughput'])} | {_fmt(r['p50_ms'])} "
                     f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['cpu_ms_per_photo'])} |")
    lines += [
        "",
        f"Limit: batch {lim['batch_size']} x {lim['threads']} thread(s) at **{_fmt(lim['throughput'])} photos/s** "
        f"(measured before the served runs: {_fmt(lim['throughput_start'])}, after: {_fmt(lim['throughput_end'])}; "
        f"ratios use the higher) and {_fmt(lim['cpu_ms_per_photo'])} CPU ms/photo. One photo at a time: "
        f"p50 {_fmt(lim['p50_batch1_ms'])} ms, {_fmt(lim['cpu_ms_per_photo_batch1'])} CPU ms/photo.",
        "",
        "## Served (one photo per request, closed loop)",
        "",
        "| transport | batching | concurrency | photos/s | x limit | p50 ms | p95 ms | p99 ms | added p50 ms "
        "| server CPU ms/photo | client CPU ms/photo | CPU ratio | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["served"]:
        lines.append(
            f"| {r['transport']} | {r['batching']} | {r['concurrency']} | {_fmt(r['throughput'])} "
            f"| {_fmt(r['throughput_ratio'], 2)} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} "
            f"| {_fmt(r['added_p50_ms'])} | {_fmt(r.get('server_cpu_ms_per_photo'))} "
            f"| {_fmt(r.get('client_cpu_ms_per_photo'))} | {_fmt(r.get('cpu_ratio'), 2)} | {r['errors']} |")
    lines += ["", "x limit: photos/s over the in-process limit. CPU ratio: in-process CPU per photo at the limit "
                  "over served (server + client) CPU per photo; it does not depend on the share of a busy "
                  "machine each side got."]
    lines += breakdown_markdown(result)
    ens = result.get("ensemble") or {}
    lines += ["", "## Ensemble", ""]
    if ens.get("skipped"):
        lines.append(f"Not measured: {ens['skipped']}")
    else:
        ref = ens["inprocess"]
        lines += [
            f"{ens['model']} = {', '.join(ens['members'])}, TTA {ens['tta']} ({ens['views']} views), "
            f"aggregation {ens['aggregation']}; served with batching {ens['batching']}.",
            "",
            "| path | concurrency | photos/s | p50 ms | p95 ms | p99 ms | overhead (p50) | CPU ms/photo | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| in-process, members one after another | 1 | {_fmt(ref['throughput'])} | {_fmt(ref['p50_ms'])} "
            f"| {_fmt(ref['p95_ms'])} | {_fmt(ref['p99_ms'])} | — | {_fmt(ref['cpu_ms_per_photo'])} | 0 |",
        ]
        for r in ens["served"]:
            cpu = (r.get("server_cpu_ms_per_photo") or 0.0) + (r.get("client_cpu_ms_per_photo") or 0.0)
            lines.append(f"| served {r['transport']} | {r['concurrency']} | {_fmt(r['throughput'])} | {_fmt(r['p50_ms'])} "
                         f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r.get('overhead_pct'))}% "
                         f"| {_fmt(cpu)} | {r['errors']} |")
    pay = result.get("payload") or {}
    if pay:
        lines += ["", f"## Payload: bytes per request (mean over {pay['photos']} photos; pixels at "
                      f"{contract.size_text(pay['input_size'])} px)", "",
                  "| format | bytes | x gRPC JPEG | served p50 at c=1 (ms) |", "|---|---:|---:|---:|"]
        for key, value in pay["mean_bytes"].items():
            lines.append(f"| {key} | {value} | {_fmt(pay['relative_to_jpeg_grpc'][key], 2)} "
                         f"| {_fmt(pay.get('p50_c1_ms', {}).get(key))} |")
        if pay.get("recommendation"):
            lines += ["", pay["recommendation"]]
    mem = result.get("memory") or {}
    lines += ["", "## Memory", ""]
    for key, value in mem.items():
        lines.append(f"- {key}: {value}")
    lines += paired_markdown(result)
    lines += ["", "## Targets", "", "First figure: wall-clock ratio at c=8 / decomposed added mean latency at c=1 (ms) / "
              "ensemble p50 overhead. Second: CPU-per-photo ratio / interleaved p50 difference (ms) / ensemble CPU "
              "overhead. met = both meet the target; inconclusive = they disagree.", "",
              "| target | first figure | second figure | basis | verdict |", "|---|---:|---:|---|---|"]
    for t in result["targets"]:
        verdict = t["verdict"] if t["verdict"] != "missed" else "**missed**"
        lines.append(f"| {t['description']} | {_fmt(t['value'], 3)} | {_fmt(t['second_value'], 3)} | {t['basis']} "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def breakdown_markdown(result: dict) -> list[str]:
    """Where a served request's time went (means, from the server's metrics), per sweep point."""
    rows = [r for r in result["served"] if r.get("breakdown")]
    if not rows:
        return []
    lines = ["", "### Where the time goes (mean per request, ms; from the server's Prometheus metrics)", "",
             "| transport | batching | c | client sees | in server | queued | TF run per batch | mean batch "
             "| server other | outside server |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = r["breakdown"]
        lines.append(f"| {r['transport']} | {r['batching']} | {r['concurrency']} | {_fmt(r['mean_ms'])} "
                     f"| {_fmt(b['server_ms'])} | {_fmt(b['queue_ms'])} | {_fmt(b['runtime_ms_per_batch'])} "
                     f"| {_fmt(b['mean_batch'], 2)} | {_fmt(b['server_other_ms'])} | {_fmt(b.get('outside_ms'))} |")
    lines += ["", "server other = in server - queued - TF run (request decoding, validation, thread hand-offs, "
                  "answer encoding); outside server = what the client saw beyond that (client library, sockets, "
                  "HTTP/2 or HTTP framing)."]
    return lines


def paired_markdown(result: dict) -> list[str]:
    """The paired rounds: medians (min..max) of each ratio, per batching mode, and for the ensemble."""
    lines = ["", "## Side by side (paired rounds: in-process and served slices alternate)", ""]
    summary = result.get("paired", {}).get("summary", {})
    names = [("c8_ratio", "photos/s at c=8 / in-process limit"), ("c8_cpu_ratio", "CPU ratio at c=8"),
             ("added_mean_ms", "decomposed added mean at c=1 (ms)"),
             ("interleaved_added_p50_ms", "interleaved p50 difference at c=1 (ms)"),
             ("added_p50_ms", "slice-paired p50 difference at c=1 (ms)"),
             ("added_cpu_ms", "added CPU at c=1 (ms/request)")]
    lines += ["| batching | figure | gRPC median (min..max) | REST median (min..max) |", "|---|---|---:|---:|"]

    def cell(figures: dict, name: str) -> str:
        entry = figures.get(name)
        if not entry:
            return "—"
        return f"{entry['median']:.3g} ({entry['min']:.3g}..{entry['max']:.3g})"

    for mode, figures in summary.items():
        for name, text in names:
            lines.append(f"| {mode} | {text} | {cell(figures, 'grpc_' + name)} | {cell(figures, 'rest_' + name)} |")
    ens = (result.get("ensemble") or {}).get("summary")
    if ens:
        lines += ["", "| ensemble figure | gRPC median (min..max) | REST median (min..max) |", "|---|---:|---:|",
                  f"| p50 overhead over members in-process one after another | {cell(ens, 'grpc_overhead')} "
                  f"| {cell(ens, 'rest_overhead')} |",
                  f"| CPU overhead | {cell(ens, 'grpc_cpu_overhead')} | {cell(ens, 'rest_cpu_overhead')} |",
                  f"| in-process p50 (ms) | {cell(ens, 'inprocess_p50_ms')} | |"]
    return lines


def _nan(value: float | None) -> float:
    """A figure to plot: a point without one (no request answered) is left out as NaN."""
    return float("nan") if value is None else float(value)


def plot(result: dict, path: str | Path) -> Path:
    """Throughput and p95 latency against concurrency, per transport and batching mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_p95) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in result["served"]:
        series.setdefault(f"{r['transport']}, batching {r['batching']}", []).append(r)
    for label, rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        ax_tput.plot(xs, [_nan(r["throughput"]) for r in rows], marker="o", label=label)
        ax_p95.plot(xs, [_nan(r["p95_ms"]) for r in rows], marker="o", label=label)
    lim = result["inprocess"]["limit"]
    if lim.get("throughput") is not None:
        ax_tput.axhline(lim["throughput"], color="black", linestyle="--",
                        label=f"in-process limit (batch {lim['batch_size']} x {lim.get('threads', 1)} thread(s))")
    if lim.get("p95_batch1_ms") is not None:
        ax_p95.axhline(lim["p95_batch1_ms"], color="black", linestyle="--", label="in-process, batch 1")
    ticks = sorted({r["concurrency"] for r in result["served"]})
    for ax, ylabel in ((ax_tput, "photos / s"), (ax_p95, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_p95.set_yscale("log")
    ax_tput.legend(fontsize=7)
    fig.suptitle(f"{result['settings']['model']}: served vs in-process ({result['environment']['cpus']} cores)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
