#!/usr/bin/env bash
# Soak: mixed load with hostile guests beside it for SOAK_MINUTES (default 10). Every 10 s it
# records the server's resident memory, open file descriptors, and the p99 of the digits and
# embeddings traffic of that window; at the end it checks that memory and descriptors stayed flat
# after a minute of warm-up, and draws docs/soak.svg (matplotlib).
#   scripts/soak.sh            (SOAK_MINUTES=10)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"

minutes=${SOAK_MINUTES:-10}
out=build/soak
rm -rf "$out" && mkdir -p "$out"
kiln=target/release/kiln
pngs=(build/holdout/digits/*.png)
echo '{"sentences": ["A man is eating a piece of bread."]}' > "$out/sentence.json"
examples_config "$out" > "$out/kiln.toml"
cat >> "$out/kiln.toml" <<TOML

[[tenant]]
name = "mallory"
models = ["digits"]
quota = { requests_per_second = 1000, max_concurrent = 16, memory_limit_mib = 32, deadline_ms = 500, max_compute_bytes = 4194304 }

[[handler]]
name = "misbehave"
tenant = "mallory"
component = "$KILN_ROOT/target/wasm32-wasip2/guest/misbehave.wasm"
TOML
KILN_KEY=$($kiln tenant add-key demo -c "$out/kiln.toml" 2>/dev/null)
mallory=$($kiln tenant add-key mallory -c "$out/kiln.toml" 2>/dev/null)
export KILN_KEY

pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true; stop_server' EXIT
start_server "$kiln" "$out/serve.log" 18280 -c "$out/kiln.toml" --listen 127.0.0.1:18280 \
    --admin-listen 127.0.0.1:18281 --grpc-listen off

# The attacker, throughout: each misdeed in turn, a few at once.
hostile() {
    local routes=(loop memory recurse answer-then-spin print-flood "nn/long-names?20" "nn/many-dims?20"
                  "nn/contexts?100000" compute-flood big-response panic outgoing)
    while :; do
        for route in "${routes[@]}"; do
            curl -s -o /dev/null --max-time 5 -H "Authorization: Bearer $mallory" \
                "http://127.0.0.1:18280/v1/handlers/misbehave/$route" || true
        done
    done
}
for _ in 1 2; do hostile & pids+=($!); done

echo "t_s,rss_mib,fds,digits_rps,digits_p99_ms,embeddings_rps,embeddings_p99_ms,errors" > "$out/soak.csv"
started=$(date +%s)
windows=$((minutes * 6))
echo "==> soaking for $minutes minutes ($windows windows of 10 s)" >&2
for w in $(seq "$windows"); do
    $kiln bench --url http://127.0.0.1:18280 --handler digits --body "${pngs[0]}" --concurrency 8 --duration 10s --json > "$out/digits.json" &
    digits=$!
    $kiln bench --url http://127.0.0.1:18280 --handler embeddings --body "$out/sentence.json" --concurrency 2 --duration 10s --json > "$out/embeddings.json"
    wait $digits
    rss=$(awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$server/status")
    fds=$(ls "/proc/$server/fd" | wc -l)
    python3 - "$out" "$(( $(date +%s) - started ))" "$rss" "$fds" >> "$out/soak.csv" <<'PY'
import json, sys
out, t, rss, fds = sys.argv[1:5]
d, e = (json.load(open(f"{out}/{n}.json")) for n in ("digits", "embeddings"))
errors = sum(d["errors"].values()) + sum(e["errors"].values())
print(f"{t},{rss},{fds},{d['throughput_rps']:.0f},{d['latency_ms']['p99']:.2f},{e['throughput_rps']:.0f},{e['latency_ms']['p99']:.2f},{errors}")
PY
    tail -1 "$out/soak.csv" >&2
done

# matplotlib only for the plot, installed on first use.
"$KILN_PYTHON" -c 'import matplotlib' 2> /dev/null || "$KILN_PYTHON" -m pip install --quiet --disable-pip-version-check matplotlib==3.11.2
"$KILN_PYTHON" - "$out/soak.csv" docs/soak.svg <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
t = [int(r["t_s"]) / 60 for r in rows]
col = lambda k: [float(r[k]) for r in rows]
fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
axes[0].plot(t, col("rss_mib"), color="tab:blue")
axes[0].set_ylabel("server RSS (MiB)")
axes[1].plot(t, col("fds"), color="tab:green")
axes[1].set_ylabel("open file descriptors")
axes[2].plot(t, col("digits_p99_ms"), label="digits (c=8)")
axes[2].plot(t, col("embeddings_p99_ms"), label="embeddings (c=2)")
axes[2].set_ylabel("p99 per 10 s (ms)")
axes[2].set_xlabel("minutes (hostile guests running throughout)")
axes[2].legend()
for a in axes:
    a.grid(alpha=0.3)
    a.set_ylim(bottom=0)
fig.suptitle("kiln soak: mixed load beside hostile guests")
fig.tight_layout()
fig.savefig(sys.argv[2])
PY

python3 - "$out/soak.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
warm = [r for r in rows if int(r["t_s"]) >= 60] or rows
rss = [int(r["rss_mib"]) for r in warm]
fds = [int(r["fds"]) for r in warm]
p99 = [float(r["digits_p99_ms"]) for r in warm]
errors = sum(int(r["errors"]) for r in rows)
# Flat: no trend (the last quarter's mean within 32 MiB of the first quarter's) and no spike past
# 96 MiB over it (the hostile memory bombs allocate and free 32 MiB guests all the time).
q = max(1, len(rss) // 4)
first, last = sum(rss[:q]) / q, sum(rss[-q:]) / q
print(f"after warm-up: RSS first quarter {first:.0f} MiB, last quarter {last:.0f} MiB, range {min(rss)}-{max(rss)}; "
      f"fds {min(fds)}-{max(fds)}; digits p99 {min(p99):.1f}-{max(p99):.1f} ms; failed requests of the good tenant: {errors}")
ok = last - first <= 32 and max(rss) - first <= 96 and max(fds) - fds[0] <= 32 and errors == 0
print("flat" if ok else "NOT flat (or errors): see build/soak/soak.csv")
sys.exit(0 if ok else 1)
PY
