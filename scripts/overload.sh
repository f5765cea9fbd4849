#!/usr/bin/env bash
# Overload benchmark: the digits handler at 10x its saturated rate, open loop (`kiln bench
# --rate`), with the server's resident memory sampled every second. Every answer must be 200,
# 429 or 503 (both with Retry-After), none a 500 and none lost; memory must level off.
#   scripts/overload.sh            (about a minute on a 2-core machine)
# OVERLOAD_SECONDS (default 10) sets the length of the overload run; OVERLOAD_FACTOR (10) the
# multiple of the measured saturated rate.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"

seconds=${OVERLOAD_SECONDS:-10}
factor=${OVERLOAD_FACTOR:-10}
out=build/overload
rm -rf "$out" && mkdir -p "$out"
kiln=target/release/kiln
pngs=(build/holdout/digits/*.png)
examples_config "$out" > "$out/kiln.toml"
KILN_KEY=$($kiln tenant add-key demo -c "$out/kiln.toml" 2>/dev/null)
KILN_ADMIN_KEY=$($kiln admin add-key -c "$out/kiln.toml" 2>/dev/null)
export KILN_KEY KILN_ADMIN_KEY

trap stop_server EXIT
start_server "$kiln" "$out/serve.log" 18180 -c "$out/kiln.toml" --listen 127.0.0.1:18180 \
    --admin-listen 127.0.0.1:18181 --grpc-listen off
rss() { awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$server/status"; }

bench() { # NAME ARGS...
    local name=$1; shift
    $kiln bench --url http://127.0.0.1:18180 --handler digits --body "${pngs[0]}" --json "$@" > "$out/$name.json"
}
echo "==> saturated rate (closed loop, c=64, 5 s)" >&2
bench saturated --concurrency 64 --duration 5s
saturated=$(python3 -c "import json; print(json.load(open('$out/saturated.json'))['throughput_rps'])")
rate=$(python3 -c "print(round($saturated * $factor))")
idle_rss=$(rss)

echo "==> open loop at $rate req/s (${factor}x) for ${seconds} s" >&2
: > "$out/rss.txt"
( while kill -0 $server 2> /dev/null; do echo "$(date +%s.%N) $(rss)" >> "$out/rss.txt"; sleep 1; done ) &
sampler=$!
bench overload --rate "$rate" --duration "${seconds}s"
kill $sampler 2> /dev/null || true
sleep 2
after_rss=$(rss)
# One request by hand, to see the headers of a refusal while the server is still overloaded.
ready=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18180/v2/health/ready)

python3 - "$out" "$saturated" "$rate" "$idle_rss" "$after_rss" "$ready" <<'PY'
import json, sys
out, saturated, rate, idle, after, ready = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
r = json.load(open(f"{out}/overload.json"))
peak = max((int(line.split()[1]) for line in open(f"{out}/rss.txt") if len(line.split()) == 2), default=0)
errors = r["errors"]
answered = r["ok"] + sum(v for k, v in errors.items() if k.isdigit())
print(f"saturated (closed loop c=64): {saturated:,.0f} req/s")
print(f"offered (open loop): {rate:,.0f} req/s for {r['seconds']:.1f} s: {r['requests']:,} requests sent, "
      f"{r['not_sent']:,} not sent (client at its in-flight cap)")
print(f"answers: 200 x {r['ok']:,}, " + ", ".join(f"{k} x {v:,}" for k, v in sorted(errors.items())))
print(f"answered {answered:,} of {r['requests']:,}; p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms")
print(f"server RSS: idle {idle} MiB, peak under overload {peak} MiB, 2 s after {after} MiB; readiness afterwards {ready}")
bad = {k: v for k, v in errors.items() if k not in ("429", "503")}
if bad:
    print(f"FAIL: answers other than 200/429/503: {bad}")
    sys.exit(1)
PY
