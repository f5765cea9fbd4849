#!/usr/bin/env bash
# Direct model calls over the Open Inference Protocol, HTTP (JSON) against gRPC (raw contents),
# on the same server and the same one-row requests for digits and MiniLM, at c = 1, 16 and 64:
# req/s, p50 and p99. About two minutes on a 2-core machine.
#   scripts/bench-grpc.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"
run_s=${SECONDS_PER_RUN:-5}
out=build/bench-grpc
rm -rf "$out" && mkdir -p "$out"
kiln=target/release/kiln
examples_config "$out" > "$out/kiln.toml"
KILN_KEY=$($kiln tenant add-key demo -c "$out/kiln.toml" 2>/dev/null)
KILN_ADMIN_KEY=$($kiln admin add-key -c "$out/kiln.toml" 2>/dev/null)
export KILN_KEY KILN_ADMIN_KEY
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
pixels = [((i * 37) % 17) / 16 for i in range(64)]
json.dump({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels}]},
          open(f"{out}/digits.json", "w"))
ids = [101, 1037, 2158, 2003, 5983, 1037, 3538, 1997, 7852, 1012, 102]
json.dump({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids},
                      {"name": "attention_mask", "datatype": "INT64", "shape": [1, len(ids)], "data": [1] * len(ids)}]},
          open(f"{out}/minilm.json", "w"))
PY
trap stop_server EXIT
start_server "$kiln" "$out/serve.log" 18080 -c "$out/kiln.toml" --listen 127.0.0.1:18080 \
    --admin-listen 127.0.0.1:18081 --grpc-listen 127.0.0.1:18001
echo "| model | c | HTTP req/s | gRPC req/s | HTTP p50 / p99 ms | gRPC p50 / p99 ms |"
echo "|---|---:|---:|---:|---:|---:|"
for model in digits minilm; do
    for c in 1 16 64; do
        $kiln bench --url http://127.0.0.1:18080 --model "$model" --body "$out/$model.json" \
            --duration "${run_s}s" -c "$c" --json > "$out/http.json"
        $kiln bench --url http://127.0.0.1:18080 --model "$model" --body "$out/$model.json" \
            --grpc 127.0.0.1:18001 --duration "${run_s}s" -c "$c" --json > "$out/grpc.json"
        .venv/bin/python - "$model" "$c" "$out" <<'PY'
import json, sys
model, c, out = sys.argv[1:4]
h, g = (json.load(open(f"{out}/{n}.json")) for n in ("http", "grpc"))
def errors(r):
    n = sum(r["errors"].values())
    return f" ({n} errors)" if n else ""
print(f"| {model} | {c} | {h['ok'] / h['seconds']:.0f}{errors(h)} | {g['ok'] / g['seconds']:.0f}{errors(g)} "
      f"| {h['latency_ms']['p50']:.2f} / {h['latency_ms']['p99']:.2f} | {g['latency_ms']['p50']:.2f} / {g['latency_ms']['p99']:.2f} |")
PY
    done
done
