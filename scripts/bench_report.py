"""Formats scripts/bench.sh results into docs/BENCHMARKS.md, between the
<!-- bench:begin --> and <!-- bench:end --> markers (the text around them is kept).
Usage: bench_report.py RESULTS_DIR BENCHMARKS_MD SECONDS_PER_RUN"""

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(d: Path, name: str):
    path = d / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    # Repeated runs NAME-1..3: the one with the median p50.
    runs = sorted((json.loads(p.read_text()) for p in sorted(d.glob(f"{name}-[0-9].json"))),
                  key=lambda r: r["latency_ms"]["p50"])
    return runs[len(runs) // 2]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
            f"{platform.release()}; kiln at {commit}; "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def raw_table(rows, title: str) -> list[str]:
    out = [f"**{title}**", "", "| batch | forward ms | rows/s |", "|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['batch_size']} | {r['forward_ms']:.3f} | {r['rows_per_second']:.0f} |")
    return out + [""]


def batch_of(report, model: str) -> float:
    b = report.get("server_batching", {}).get(model)
    return b["average_batch_size"] if b else 0.0


def cost(report) -> str:
    """The server's CPU µs, wake-ups and allocations per request during the run, and its RSS, as
    table cells."""
    c = report.get("server_cost")
    if not c:
        return "- | - | - | -"
    return (f"{c['cpu_us_per_request']:.0f} | {c['wakeups_per_request']:.2f} "
            f"| {c.get('allocations_per_request', 0):.0f} | {c['rss_mib']:.0f}")


def main(d: Path, md: Path, seconds: str) -> None:
    raw = {m: load(d, f"raw-{m}") for m in ("digits", "minilm", "resnet18")}
    lines = [BEGIN, "", f"Machine: {machine()}.", "",
             f"Each load run lasts {seconds} s; client and server share the machine.", ""]

    lines += ["### 1. Raw libtorch ceiling (`kiln bench-raw`, each model with its configured `threads`)", ""]
    lines += raw_table(raw["digits"], "digits CNN, input [N, 1, 8, 8], 1 thread")
    lines += raw_table(raw["minilm"], "MiniLM-L6, 12 tokens per sentence, 1 thread (one of its two replicas)")
    lines += raw_table(raw["resnet18"], "ResNet-18 (random weights), [N, 3, 224, 224], 2 threads")

    lines += ["### 2. End to end through a guest handler (`kiln bench --handler`)", "",
              "| handler | batching | concurrency | req/s | p50 ms | p90 ms | p99 ms | max ms "
              "| avg batch | server CPU µs/req | wake-ups/req | allocs/req | RSS MiB | errors |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    model_of = {"digits": "digits", "embeddings": "minilm"}
    for handler in ("digits", "embeddings"):
        for mode in ("on", "off"):
            for c in (1, 4, 16, 64):
                r = load(d, f"{handler}-{mode}-c{c}")
                l = r["latency_ms"]
                errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
                lines.append(
                    f"| {handler} | {mode} | {c} | {r['throughput_rps']:.0f} | {l['p50']:.3f} "
                    f"| {l['p90']:.3f} | {l['p99']:.3f} | {l['max']:.3f} "
                    f"| {batch_of(r, model_of[handler]):.2f} | {cost(r)} | {errors} |")
    lines.append("")

    lines += ["### 3. Sandbox overhead (echo guest, no model call; median of three runs each)", "",
              "| route | concurrency | req/s | p50 ms | p99 ms | server CPU µs/req | wake-ups/req "
              "| allocs/req | RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in (1, 16):
        for name, label in ((f"live-c{c}", "GET /v2/health/live (no sandbox)"),
                            (f"echo-c{c}", "echo handler (fresh sandbox)")):
            r = load(d, name)
            lines.append(f"| {label} | {c} | {r['throughput_rps']:.0f} | "
                         f"{r['latency_ms']['p50']:.3f} | {r['latency_ms']['p99']:.3f} | {cost(r)} |")
    e1, l1 = load(d, "echo-c1"), load(d, "live-c1")
    e16, l16 = load(d, "echo-c16"), load(d, "live-c16")
    p50_overhead = (e1["latency_ms"]["p50"] - l1["latency_ms"]["p50"]) * 1000
    cpu_overhead = (1 / e16["throughput_rps"] - 1 / l16["throughput_rps"]) * 1e6
    lines += ["", f"Sandbox overhead at concurrency 1 (p50 echo − p50 plain route): "
              f"**{p50_overhead:.0f} µs**. Saturated (difference of per-request time at "
              f"concurrency 16): **{cpu_overhead:.0f} µs** per request.", ""]

    lines += ["### 4. Served throughput against the raw ceiling", "",
              "| model | served req/s (c=64, batching on) | avg batch | raw rows/s at that batch "
              "| ratio |", "|---|---:|---:|---:|---:|"]
    for handler, model in model_of.items():
        r = load(d, f"{handler}-on-c64")
        b = batch_of(r, model)
        rows = raw[model]
        near = min(rows, key=lambda x: abs(x["batch_size"] - b)) if rows else None
        ceiling = near["rows_per_second"] if near else 0
        ratio = r["throughput_rps"] / ceiling if ceiling else 0
        lines.append(f"| {model} | {r['throughput_rps']:.0f} | {b:.2f} | "
                     f"{ceiling:.0f} (batch {near['batch_size'] if near else '-'}) | {ratio:.2f} |")
    lines += ["", "Concurrency 1 against the raw forward at batch 1:", "",
              "| model | raw forward ms | served p50 ms | difference µs |", "|---|---:|---:|---:|"]
    for handler, model in model_of.items():
        r = load(d, f"{handler}-on-c1")
        f1 = raw[model][0]["forward_ms"]
        p50 = r["latency_ms"]["p50"]
        lines.append(f"| {model} | {f1:.3f} | {p50:.3f} | {(p50 - f1) * 1000:.0f} |")
    lines += ["", END]

    text = md.read_text() if md.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    md.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
