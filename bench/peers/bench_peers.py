#!/usr/bin/env python3
"""Kiln against TorchServe 0.12, side by side in one run, on the same machine, models and bodies.

Run by scripts/bench-peers.sh, which installs what this needs. For each system and
configuration: start it, check it answers correctly (digits hold-out accuracy, embeddings against
the Python reference, a bad body refused with a 4xx), warm up, then load it with `hey` at each
concurrency RUNS times and keep the median run (by throughput). TorchServe runs in the
configurations a user tuning it would try (1 worker x 2 torch threads or 2 workers x 1, each with
batching on and off, plus its defaults); the best of them per concurrency is what Kiln is compared
with. Kiln runs the bundled examples config, as scripts/serve.sh serves it.

Writes OUT/results.json, OUT/hey/*.txt (every raw hey output), the table between the
`peers:latest` markers of docs/BENCHMARKS.md and the plot docs/peers.svg.
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build"
VENV_BIN = Path(sys.executable).parent
TS_PORTS = (18380, 18381, 18382)  # inference, management, metrics
KILN_PORTS = (18390, 18391)  # API, admin
FOX = "The quick brown fox jumps over the lazy dog near the river bank."


def log(msg):
    print(f"[bench-peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http(method, url, data=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(check, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {seconds} s")


# --------------------------------------------------------------------------------- workloads ----
class Workload:
    """One workload as both systems see it: the same body, the same checks."""

    def __init__(self, name, body, content_type):
        self.name, self.body, self.content_type = name, body, content_type


def workloads(out):
    from PIL import Image

    # The table used a 64x64 PNG: the first hold-out digit, scaled up.
    first = sorted((BUILD / "holdout" / "digits").glob("*.png"))[0]
    digit = out / "digit.png"
    Image.open(first).resize((64, 64), Image.NEAREST).save(digit)
    sentence = out / "sentence.json"
    sentence.write_text(json.dumps({"sentences": [FOX]}))
    return {
        "digits": Workload("digits", digit, "image/png"),
        "embeddings": Workload("embeddings", sentence, "application/json"),
    }


def check_digits(url, headers):
    """Every hold-out digit sent at once (so batches form), and a body that is not an image."""
    samples = sorted((BUILD / "holdout" / "digits").glob("*.png"))

    def one(path):
        status, body = http("POST", url, path.read_bytes(), {**headers, "Content-Type": "image/png"})
        if status != 200:
            return False
        answer = json.loads(body)
        assert abs(sum(answer["probabilities"]) - 1) < 1e-3, answer
        return answer["digit"] == int(path.stem.split("_")[1])

    with cf.ThreadPoolExecutor(16) as pool:
        right = sum(pool.map(one, samples))
    bad, _ = http("POST", url, b"not an image", {**headers, "Content-Type": "image/png"})
    accuracy = right / len(samples)
    if accuracy < 0.9 or not 400 <= bad < 500:
        raise RuntimeError(f"digits answers wrong: accuracy {accuracy:.3f}, bad image -> {bad}")
    return {"accuracy": round(accuracy, 4), "samples": len(samples), "bad_body_status": bad}


def check_embeddings(url, headers):
    """The reference sentences together and one per request (batched with each other), compared
    with the Python reference embeddings made at export; and a body without sentences."""
    ref = json.loads((BUILD / "reference" / "embeddings.json").read_text())

    def embed(sentences):
        status, body = http("POST", url, json.dumps({"sentences": sentences}).encode(),
                            {**headers, "Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"embeddings answered {status}: {body[:200]!r}")
        return json.loads(body)["embeddings"]

    together = embed(ref["sentences"])
    with cf.ThreadPoolExecutor(len(ref["sentences"])) as pool:
        apart = [e[0] for e in pool.map(lambda s: embed([s]), ref["sentences"])]
    pairs = [(a, b) for got in (together, apart) for a, b in zip(got, ref["embeddings"])]
    worst = max(abs(x - y) for a, b in pairs for x, y in zip(a, b))

    def norm(v):
        return sum(x * x for x in v) ** 0.5

    # Every answer a unit vector, within the e2e tests' stated cosine distance (5e-3) of Python's
    # FP32: what a reduced precision (bf16) keeps. FP32 answers are within rounding of it.
    off_unit = max(abs(norm(a) - 1) for a, _ in pairs)
    distance = max(1 - sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b) or 1) for a, b in pairs)
    bad, _ = http("POST", url, b'{"text": "x"}', {**headers, "Content-Type": "application/json"})
    if distance > 5e-3 or off_unit > 1e-2 or not 400 <= bad < 500:
        raise RuntimeError(f"embeddings answers wrong: cosine distance {distance:.2e}, norm off 1 by "
                           f"{off_unit:.2e} (max |diff| {worst:.2e}), bad body -> {bad}")
    return {"max_abs_diff_vs_reference": worst, "max_cosine_distance": distance,
            "sentences": len(ref["sentences"]), "bad_body_status": bad}


CHECKS = {"digits": check_digits, "embeddings": check_embeddings}


# ------------------------------------------------------------------------------------- hey ----
def parse_hey(text):
    def number(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors_part = text.split("Error distribution:")[1] if "Error distribution:" in text else ""
    transport = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\s", errors_part, re.M))
    total = number(r"Total:\s+([\d.]+) secs") or 0.0
    ok = codes.get(200, 0)
    p50, p99 = number(r"50% in ([\d.]+) secs"), number(r"99% in ([\d.]+) secs")
    return {"ok": ok, "seconds": total, "rps": ok / total if total else 0.0,
            "errors": sum(n for c, n in codes.items() if c != 200) + transport,
            "p50_ms": p50 * 1e3 if p50 is not None else None,
            "p99_ms": p99 * 1e3 if p99 is not None else None}


def hey(url, work, conc, duration, headers, save=None):
    """One hey run; adds the CPU seconds hey itself spent (`client_cpu_s`)."""
    cmd = ["hey", "-z", duration, "-c", str(conc), "-m", "POST", "-T", work.content_type,
           "-D", str(work.body)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd + [url], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if save:
        save.write_text(done.stdout + done.stderr)
    run = parse_hey(done.stdout)
    run["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(roots):
    """CPU seconds (user + system, all threads) of the live processes in `roots` and every
    descendant of theirs: a server's whole cost, TorchServe's Java frontend and Python workers
    together."""
    parent, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        parent[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    tree, frontier = set(), set(roots)
    while frontier:
        tree |= frontier
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree}
    return sum(cpu.get(pid, 0.0) for pid in tree)


def measure(system, config, url, work, args, headers=None, batches=None, server=None):
    """Warm-up, then RUNS runs per concurrency; the median run by throughput is kept. `server`
    gives the server's process ids, to charge it its CPU time per request (and hey its own)."""
    headers = headers or {}
    hey(url, work, max(args.conc), args.warmup, headers)
    rows = []
    for conc in args.conc:
        runs = []
        for i in range(args.runs):
            before = batches() if batches else None
            cpu_before = tree_cpu_seconds(server()) if server else None
            tag = f"{system}_{config}_{work.name}_c{conc}_{i}".replace(" ", "-")
            run = hey(url, work, conc, args.duration, headers, args.out / "hey" / f"{tag}.txt")
            answered = run["ok"] + run["errors"]
            if cpu_before is not None and answered:
                run["server_cpu_us"] = (tree_cpu_seconds(server()) - cpu_before) * 1e6 / answered
            if answered:
                run["client_cpu_us"] = run["client_cpu_s"] * 1e6 / answered
            if batches and before is not None:
                after = batches()
                run["mean_batch"] = after_minus(after, before)
            runs.append(run)
        median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        row = {"system": system, "config": config, "workload": work.name, "conc": conc,
               **median, "runs_rps": [round(r["rps"], 1) for r in runs]}
        rows.append(row)
        log(f"  {system:<10} {config:<24} {work.name:<10} c={conc:<3} {row['rps']:8.1f} req/s  "
            f"p50 {row['p50_ms'] or -1:7.2f} ms  p99 {row['p99_ms'] or -1:7.2f} ms  "
            f"errors {row['errors']}  batch {row.get('mean_batch') or '-'}  "
            f"CPU µs/req server {row.get('server_cpu_us', -1):.0f} hey {row.get('client_cpu_us', -1):.0f}  "
            f"runs {row['runs_rps']}")
    return rows


def after_minus(after, before):
    requests, forwards = after[0] - before[0], after[1] - before[1]
    return round(requests / forwards, 2) if forwards else None


# ------------------------------------------------------------------------------- TorchServe ----
class TorchServe:
    def __init__(self, out, models):
        self.dir = out.resolve() / "torchserve"
        self.store = self.dir / "model-store"
        self.models = models
        self.proc = None

    def archive(self):
        self.store.mkdir(parents=True, exist_ok=True)
        archiver = str(VENV_BIN / "torch-model-archiver")
        handlers = HERE / "torchserve"
        for name, model, extra in (("digits", "digits.pt", []),
                                   ("embeddings", "minilm.pt", [BUILD / "models" / "minilm-vocab.txt"])):
            cmd = [archiver, "-f", "--model-name", name, "--version", "1.0",
                   "--serialized-file", str(BUILD / "models" / model),
                   "--handler", str(handlers / f"{name}_handler.py"), "--export-path", str(self.store)]
            if extra:
                cmd += ["--extra-files", ",".join(map(str, extra))]
            subprocess.run(cmd, check=True)

    def start(self, threads, quiet, precision):
        for pid in self.processes():  # left by an interrupted earlier run of this harness
            os.kill(pid, signal.SIGKILL)
        logs = self.dir / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        inference, management, metrics = TS_PORTS
        conf = self.dir / "config.properties"
        conf.write_text(f"inference_address=http://127.0.0.1:{inference}\n"
                        f"management_address=http://127.0.0.1:{management}\n"
                        f"metrics_address=http://127.0.0.1:{metrics}\n"
                        "disable_system_metrics=true\n")
        env = dict(os.environ, LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs),
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("PEER_TORCH_THREADS", None)
        env.pop("PEER_PRECISION", None)
        if threads:
            env["PEER_TORCH_THREADS"] = str(threads)
        if precision:
            env["PEER_PRECISION"] = precision
        # --foreground keeps TorchServe our child, so it is stopped with us whatever happens.
        cmd = [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
               "--enable-model-api", "--model-store", str(self.store), "--ts-config", str(conf)]
        if quiet:
            cmd += ["--log-config", str(HERE / "torchserve" / "log4j2.xml")]
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.dir, stdout=open(self.dir / "stdout.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.alive() and http("GET", self.url("/ping"), timeout=2)[0] == 200, 180,
                   "TorchServe")

    def alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited; see {self.dir / 'stdout.log'}")
        return True

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        # The Java frontend can outlive the launcher: wait for every process started on this
        # model store to go, and kill what has not after 30 s.
        deadline = time.time() + 30
        while self.processes() and time.time() < deadline:
            time.sleep(0.3)
        for pid in self.processes():
            os.kill(pid, signal.SIGKILL)

    def processes(self):
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if str(self.store).encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def url(self, path, management=False):
        return f"http://127.0.0.1:{TS_PORTS[1] if management else TS_PORTS[0]}{path}"

    def register(self, name, batch, workers):
        query = (f"url={name}.mar&model_name={name}&batch_size={batch}&max_batch_delay=5"
                 f"&initial_workers={workers}&synchronous=true")
        status, body = http("POST", self.url(f"/models?{query}", True), timeout=300)
        if status != 200:
            raise RuntimeError(f"registering {name} failed: {status} {body[:300]!r}")

    def unregister(self, name):
        http("DELETE", self.url(f"/models/{name}", True), timeout=120)

    def batches(self, name):
        """Requests and batches so far, from the HandlerTime lines of model_metrics.log."""
        path = self.dir / "logs" / "model_metrics.log"
        requests = forwards = 0
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if "HandlerTime" in line and f"ModelName:{name}," in line:
                    m = re.search(r"requestID:(.*?),timestamp:", line)
                    if m:
                        forwards += 1
                        requests += m.group(1).count(",") + 1
        return requests, forwards


TS_CONFIGS = [
    # label, torch threads per worker, workers, batch size (max delay 5 ms), quiet logging,
    # precision (None: FP32, as exported; "bf16": weights cast in the handler's initialize)
    ("1 worker x 2 threads, batch 32", 2, 1, 32, True, None),
    ("1 worker x 2 threads, no batching", 2, 1, 1, True, None),
    ("2 workers x 1 thread, batch 32", 1, 2, 32, True, None),
    ("2 workers x 1 thread, no batching", 1, 2, 1, True, None),
    ("defaults, batch 32", None, 2, 32, False, None),
    ("bf16, 1 worker x 2 threads, batch 32", 2, 1, 32, True, "bf16"),
    ("bf16, 2 workers x 1 thread, batch 32", 1, 2, 32, True, "bf16"),
]
# The row each Kiln is also compared with: TorchServe as it comes (FP32, its default threads).
TS_DEFAULT = "defaults, batch 32"


def run_torchserve(args, works):
    ts = TorchServe(args.out, works)
    ts.archive()
    rows, checks = [], {}
    try:
        for threads, quiet, precision in dict.fromkeys((t, q, p) for _, t, _, _, q, p in TS_CONFIGS):
            ts.start(threads, quiet, precision)
            for label, t, workers, batch, q, p in TS_CONFIGS:
                if (t, q, p) != (threads, quiet, precision):
                    continue
                for name in args.workloads:
                    ts.register(name, batch, workers)
                    url = ts.url(f"/predictions/{name}")
                    key = f"{name} ({p})" if p else name
                    if batch > 1 and key not in checks:
                        checks[key] = CHECKS[name](url, {})
                        log(f"TorchServe answers {key} correctly: {checks[key]}")
                    rows += measure("TorchServe", label, url, works[name], args,
                                    batches=lambda: ts.batches(name),
                                    server=lambda: [ts.proc.pid, *ts.processes()])
                    ts.unregister(name)
            ts.stop()
    finally:
        ts.stop()
    return rows, checks


# ------------------------------------------------------------------------------------- Kiln ----
def run_kiln(args, works, label, binary, settings):
    out = args.out / f"kiln-{label}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = (ROOT / "examples" / "kiln.toml").read_text()
    config = config.replace("../build/state", str(out / "state")).replace("../", f"{ROOT}/")
    # `precision = "..."` is the examples' models' (instead of "auto"); other settings are the
    # [server] table's.
    for s in [s for s in settings if s.replace(" ", "").startswith("precision=")]:
        config = config.replace('precision = "auto"', s.strip())
    settings = [s for s in settings if not s.replace(" ", "").startswith("precision=")]
    if settings:
        config = config.replace("[server]\n", "[server]\n" + "".join(f"{s}\n" for s in settings), 1)
    (out / "kiln.toml").write_text(config)
    conf = str(out / "kiln.toml")
    key = subprocess.run([binary, "tenant", "add-key", "demo", "-c", conf], check=True,
                         capture_output=True, text=True).stdout.strip()
    admin = subprocess.run([binary, "admin", "add-key", "-c", conf], check=True,
                           capture_output=True, text=True).stdout.strip()
    api, admin_port = KILN_PORTS
    proc = subprocess.Popen([binary, "serve", "-c", conf, "--listen", f"127.0.0.1:{api}",
                             "--admin-listen", f"127.0.0.1:{admin_port}", "--grpc-listen", "off"],
                            stdout=open(out / "kiln.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{api}"
    headers = {"Authorization": f"Bearer {key}"}
    model_of = {"digits": "digits", "embeddings": "minilm"}

    def stats():
        status, body = http("GET", f"{base}/v1/stats", headers={"Authorization": f"Bearer {admin}"})
        return json.loads(body) if status == 200 else None

    def rss_mib():
        process = (stats() or {}).get("process") or {}
        return round(process["rss_bytes"] / 2**20) if process.get("rss_bytes") else None

    def batches(name):
        snapshot = stats()
        if snapshot is None:
            return None
        for m in snapshot["models"]:
            if m["name"] == model_of[name]:
                return m["inferences"], m["executions"]
        return None

    rows, checks = [], {}
    try:
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"kiln exited; see {out / 'kiln.log'}")
            return http("GET", f"{base}/v2/health/ready", timeout=2)[0] == 200
        wait_until(ready, 300, "kiln")
        checks["idle_rss_mib"] = rss_mib()
        for name in args.workloads:
            url = f"{base}/v1/handlers/{name}/"
            checks[name] = CHECKS[name](url, headers)
            log(f"Kiln ({label}) answers {name} correctly: {checks[name]}")
            rows += measure("Kiln", label, url, works[name], args, headers,
                            batches=lambda: batches(name), server=lambda: [proc.pid])
        checks["rss_after_load_mib"] = rss_mib()
        log(f"Kiln ({label}) resident memory: {checks['idle_rss_mib']} MiB idle, "
            f"{checks['rss_after_load_mib']} MiB after the load")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows, checks


# ----------------------------------------------------------------------------------- report ----
def best_rows(rows, system):
    """Per workload and concurrency, the row of `system` with the most requests per second."""
    best = {}
    for r in rows:
        if r["system"] == system:
            key = (r["workload"], r["conc"])
            if key not in best or r["rps"] > best[key]["rps"]:
                best[key] = r
    return best


def kiln_row(rows, label, work, conc):
    """The row of the Kiln labelled `label` for `work` at concurrency `conc`, if it ran."""
    return next((r for r in rows if r["system"] == "Kiln" and r["config"] == label
                 and r["workload"] == work and r["conc"] == conc), None)


def ms(v):
    return f"{v:.1f}" if v is not None and v >= 10 else (f"{v:.2f}" if v is not None else "-")


def table(results):
    rows, kilns = results["rows"], results["kiln_labels"]
    ts = best_rows(rows, "TorchServe")
    lines = ["| workload | c | TorchServe best (config) | req/s | p50 ms | p99 ms |"
             + "".join(f" Kiln {k} req/s | p50 ms | p99 ms | x TorchServe |" for k in kilns),
             "|---|---:|---|---:|---:|---:|" + "---:|---:|---:|---:|" * len(kilns)]
    for (work, conc), t in sorted(ts.items()):
        line = f"| {work} | {conc} | {t['config']} | {t['rps']:,.0f} | {ms(t['p50_ms'])} | {ms(t['p99_ms'])} |"
        for label in kilns:
            k = kiln_row(rows, label, work, conc)
            if k is None:
                line += " - | - | - | - |"
                continue
            ratio = k["rps"] / t["rps"] if t["rps"] else float("nan")
            line += f" {k['rps']:,.0f} | {ms(k['p50_ms'])} | {ms(k['p99_ms'])} | **{ratio:.2f}** |"
        lines.append(line)
    return "\n".join(lines)


def default_table(results):
    """Each Kiln against TorchServe as it comes (FP32, its default threads, batch 32), and
    against TorchServe's best in bf16: the issue-27 goals (MiniLM at least 2x the default and
    1.1x at the same precision)."""
    rows, kilns = results["rows"], results["kiln_labels"]
    default = {(r["workload"], r["conc"]): r for r in rows
               if r["system"] == "TorchServe" and r["config"] == TS_DEFAULT}
    bf16 = best_rows([r for r in rows if r["config"].startswith("bf16")], "TorchServe")
    lines = ["| workload | c | TorchServe default req/s | p99 ms | TorchServe best bf16 req/s | p99 ms |"
             + "".join(f" Kiln {k} x default | x bf16 |" for k in kilns),
             "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(kilns)]
    for (work, conc), d in sorted(default.items()):
        b = bf16.get((work, conc))
        line = (f"| {work} | {conc} | {d['rps']:,.0f} | {ms(d['p99_ms'])} | "
                + (f"{b['rps']:,.0f} | {ms(b['p99_ms'])} |" if b else "- | - |"))
        for label in kilns:
            k = kiln_row(rows, label, work, conc)
            if k is None:
                line += " - | - |"
                continue
            vs_default = k["rps"] / d["rps"] if d["rps"] else float("nan")
            vs_bf16 = f"{k['rps'] / b['rps']:.2f}" if b and b["rps"] else "-"
            line += f" {vs_default:.2f} | {vs_bf16} |"
        lines.append(line)
    return "\n".join(lines)


def cpu_table(results):
    """Where the two cores went in the rows of the main table: each server's CPU time per request
    and hey's, and what the server's own cost alone would allow on all the machine's cores."""
    rows, kilns = results["rows"], results["kiln_labels"]
    ts = best_rows(rows, "TorchServe")
    cores = os.cpu_count() or 1

    def cells(r):
        server, client = r.get("server_cpu_us"), r.get("client_cpu_us")
        if server is None or client is None:
            return " - | - | - |"
        return f" {server:,.0f} | {client:,.0f} | {cores * 1e6 / server:,.0f} |"

    lines = ["| workload | c | TorchServe server µs/req | hey µs/req | server-only bound req/s |"
             + "".join(f" Kiln {k} server µs/req | hey µs/req | server-only bound req/s |" for k in kilns),
             "|---|---:|---:|---:|---:|" + "---:|---:|---:|" * len(kilns)]
    for (work, conc), t in sorted(ts.items()):
        line = f"| {work} | {conc} |{cells(t)}"
        for label in kilns:
            k = kiln_row(rows, label, work, conc)
            line += cells(k) if k else " - | - | - |"
        lines.append(line)
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = sorted({r["workload"] for r in results["rows"]})
    fig, axes = plt.subplots(2, len(works), figsize=(5.5 * len(works), 7), squeeze=False)
    series = [("TorchServe", None, best_rows(results["rows"], "TorchServe"))]
    for label in results["kiln_labels"]:
        series.append(("Kiln", label, {(r["workload"], r["conc"]): r for r in results["rows"]
                                        if r["system"] == "Kiln" and r["config"] == label}))
    for col, work in enumerate(works):
        for system, label, best in series:
            points = sorted((c, r) for (w, c), r in best.items() if w == work)
            concs = [c for c, _ in points]
            name = f"{system} ({label})" if label else f"{system} (best config per point)"
            axes[0][col].plot(concs, [r["rps"] for _, r in points], marker="o", label=name)
            axes[1][col].plot(concs, [r["p99_ms"] for _, r in points], marker="o", label=name)
        axes[0][col].set_title(f"{work}: throughput")
        axes[0][col].set_ylabel("requests / s")
        axes[1][col].set_title(f"{work}: p99 latency")
        axes[1][col].set_ylabel("ms")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(results["conc"], [str(c) for c in results["conc"]])
            axes[row][col].set_xlabel("concurrent clients (hey -c)")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Kiln and TorchServe 0.12, one run on {results['machine']}, {results['date']}")
    fig.tight_layout()
    fig.savefig(path)


def describe(check):
    """One system's correctness checks, in words."""
    said = []
    for key, d in check.items():
        if key.startswith("digits"):
            said.append(f"{key} {d['accuracy']:.1%} of {d['samples']} hold-out images right, a body "
                        f"that is not an image refused with {d['bad_body_status']}")
        elif key.startswith("embeddings"):
            said.append(f"{key} within {d['max_abs_diff_vs_reference']:.1e} of the Python reference "
                        f"(cosine distance {d.get('max_cosine_distance', float('nan')):.1e}; "
                        f"{d['sentences']} sentences, together and one per request), a body without "
                        f"sentences refused with {d['bad_body_status']}")
    if check.get("idle_rss_mib"):
        said.append(f"resident memory {check['idle_rss_mib']} MiB idle, {check['rss_after_load_mib']} MiB "
                    "after the load")
    return "; ".join(said)


def write_doc(results, doc, svg):
    text = doc.read_text()
    start, end = "<!-- peers:latest:start -->", "<!-- peers:latest:end -->"
    checks = "".join(f"- {system}: {describe(check)}.\n" for system, check in results["checks"].items())
    body = (f"{start}\n"
            f"Measured {results['date']} on {results['machine']}, kiln at {results['commit']}, with "
            f"`{results['command']}` (hey -z {results['duration']} per run, median of {results['runs']} "
            f"runs, warm-up {results['warmup']}). Raw hey outputs: `build/peers/hey/`.\n\n"
            f"{table(results)}\n\n"
            f"Against TorchServe as it comes and TorchServe in bf16 (ratios of req/s):\n\n"
            f"{default_table(results)}\n\n"
            f"![throughput and p99 against concurrency]({svg.name})\n\n"
            f"CPU time per request in the same runs (each server's processes and threads together, "
            f"from /proc; hey's from its own rusage). The bound is the machine's cores divided by the "
            f"server's cost alone: what it could serve with the client elsewhere.\n\n"
            f"{cpu_table(results)}\n\n"
            f"Checked before loading:\n\n{checks}"
            f"{end}")
    if start in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text += f"\n## Side by side with TorchServe (latest run)\n\n{body}\n"
    doc.write_text(text)


def machine():
    """The cores, the CPU's name and the flags that decide what bf16 and fp16 cost on it."""
    cpu, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "unknown CPU":
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    present = ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"
    return f"{os.cpu_count()} cores ({cpu}; {present})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", default="8s", help="hey -z for each run")
    ap.add_argument("--warmup", default="3s")
    ap.add_argument("--runs", type=int, default=3, help="runs per row; the median is kept")
    ap.add_argument("--conc", default="1,16,64")
    ap.add_argument("--workloads", default="digits,embeddings")
    ap.add_argument("--systems", default="torchserve,kiln")
    ap.add_argument("--kiln", action="append", default=[],
                    help="LABEL=BINARY[,server setting...]: a Kiln to measure, e.g. "
                         "'memset=target/release/kiln,slot_reset = \"memset\"' (default: now=target/release/kiln)")
    ap.add_argument("--out", default=str(BUILD / "peers"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--no-doc", action="store_true", help="only write OUT/results.json")
    args = ap.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    args.workloads = args.workloads.split(",")
    args.out = Path(args.out).resolve()
    (args.out / "hey").mkdir(parents=True, exist_ok=True)
    for old in (args.out / "hey").glob("*.txt"):
        old.unlink()
    works = workloads(args.out)
    kilns = []
    for spec in args.kiln or [f"now={ROOT / 'target' / 'release' / 'kiln'}"]:
        label, rest = spec.split("=", 1)
        binary, *settings = rest.split(",")
        kilns.append((label, str(Path(binary).resolve()), settings))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench-peers: stopped by a signal"))
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "commit": commit,
               "command": "scripts/bench-peers.sh " + " ".join(sys.argv[1:]),
               "duration": args.duration, "warmup": args.warmup, "runs": args.runs,
               "conc": args.conc, "rows": [], "checks": {}, "kiln_labels": []}
    systems = args.systems.split(",")
    if "torchserve" in systems:
        rows, checks = run_torchserve(args, works)
        results["rows"] += rows
        results["checks"]["TorchServe"] = checks
    if "kiln" in systems:
        for label, binary, settings in kilns:
            rows, checks = run_kiln(args, works, label, binary, settings)
            results["rows"] += rows
            results["checks"][f"Kiln {label}"] = checks
            results["kiln_labels"].append(label)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out / 'results.json'}")
    if not args.no_doc and "torchserve" in systems and "kiln" in systems:
        doc = Path(args.doc)
        svg = doc.parent / "peers.svg"
        plot(results, svg)
        write_doc(results, doc, svg)
        log(f"wrote {doc} and {svg}")
    print(table(results))
    print(default_table(results))
    print(cpu_table(results))


if __name__ == "__main__":
    main()
