#!/usr/bin/env bash
# The digits handler with and without a response cache, on a load where 90 % of requests repeat
# one image exactly and every other one is new (`kiln bench --repeat-percent 90`: a unique query
# parameter, with the 360 held-out digits in turn), at c = 1, 16 and 64: req/s, p99 and the hit
# ratio. Needs scripts/bench.sh's config (run it once first). About one minute.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"
out=build/bench
kiln=target/release/kiln
[ -f "$out/batching-on.toml" ] || { echo "run scripts/bench.sh first (it writes $out/batching-on.toml)" >&2; exit 1; }
cp "$out/batching-on.toml" "$out/cache-off.toml"
# The digits handler's section gains a cache (the guest marks its answers public).
awk '{ print } /^name = "digits"$/ && handler { print "cache = { ttl_ms = 60000, max_entries = 4096 }" } /^\[\[handler\]\]/ { handler = 1 } /^$/ { handler = 0 }' \
    "$out/batching-on.toml" > "$out/cache-on.toml"
grep -q '^cache = ' "$out/cache-on.toml" || { echo "could not add the cache to the digits handler" >&2; exit 1; }
KILN_KEY=$($kiln tenant add-key demo -c "$out/cache-on.toml" 2>/dev/null)
KILN_ADMIN_KEY=$($kiln admin add-key -c "$out/cache-on.toml" 2>/dev/null)
export KILN_KEY KILN_ADMIN_KEY
pngs=(build/holdout/digits/*.png); png=${pngs[0]}
echo "| cache | c | req/s | p99 ms | hit ratio |"
echo "|---|---:|---:|---:|---:|"
for mode in off on; do
    start_server "$kiln" "$out/cache-$mode.log" 18080 -c "$out/cache-$mode.toml" --listen 127.0.0.1:18080 \
        --admin-listen 127.0.0.1:18081 --grpc-listen off || exit 1
    for c in 1 16 64; do
        before=$(curl -sf -H "Authorization: Bearer $KILN_ADMIN_KEY" http://127.0.0.1:18080/v1/stats)
        $kiln bench --url http://127.0.0.1:18080 --handler digits --body "$png" --vary build/holdout/digits \
            --repeat-percent 90 --duration 5s --json -c "$c" > "$out/cache.json"
        after=$(curl -sf -H "Authorization: Bearer $KILN_ADMIN_KEY" http://127.0.0.1:18080/v1/stats)
        .venv/bin/python - "$mode" "$c" "$before" "$after" <<'PY'
import json, sys
mode, c, before, after = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
r = json.load(open("build/bench/cache.json"))
def counts(s):
    cache = next((x for x in s.get("caches", []) if x["handler"] == "digits"), None)
    return (cache["hits"], cache["misses"]) if cache else (0, 0)
(h0, m0), (h1, m1) = counts(before), counts(after)
looked = (h1 - h0) + (m1 - m0)
ratio = f"{(h1 - h0) / looked:.2f}" if looked else "-"
errors = sum(r["errors"].values())
print(f"| {mode} | {c} | {r['ok'] / r['seconds']:.0f} | {r['latency_ms']['p99']:.1f} | {ratio} |" + (f" {errors} errors" if errors else ""))
PY
    done
    stop_server
done
