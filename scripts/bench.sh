#!/usr/bin/env bash
# Runs every benchmark and rewrites the measured part of docs/BENCHMARKS.md. One command, so it
# can be rerun after any change to the request path:
#   scripts/bench.sh            (about 5 minutes on a 2-core machine)
# SECONDS_PER_RUN (default 5) sets the length of each load run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"

run_s=${SECONDS_PER_RUN:-5}
out=build/bench
rm -rf "$out" && mkdir -p "$out"
kiln=target/release/kiln
pngs=(build/holdout/digits/*.png)
png=${pngs[0]}
echo '{"sentences": ["A man is eating a piece of bread."]}' > "$out/sentence.json"

# Configs: the examples with batching on and off, plus the echo guest and ResNet-18.
bench_config "$out" 64 > "$out/batching-on.toml"
bench_config "$out" 1 > "$out/batching-off.toml"
KILN_KEY=$($kiln tenant add-key demo -c "$out/batching-on.toml" 2>/dev/null)
KILN_ADMIN_KEY=$($kiln admin add-key -c "$out/batching-on.toml" 2>/dev/null)
export KILN_KEY KILN_ADMIN_KEY

echo "==> raw libtorch ceiling" >&2
$kiln bench-raw -c "$out/batching-on.toml" --model digits --duration 1s --json > "$out/raw-digits.json"
$kiln bench-raw -c "$out/batching-on.toml" --model minilm --dim 12 --duration 3s --json > "$out/raw-minilm.json"
$kiln bench-raw -c "$out/batching-on.toml" --model resnet18 --batch-sizes 1,2,4,8,16 --duration 2s --json > "$out/raw-resnet18.json"

serve() { # CONFIG
    start_server "$kiln" "$out/$1.log" 18080 -c "$out/$1.toml" --listen 127.0.0.1:18080 \
        --admin-listen 127.0.0.1:18081 --grpc-listen off || exit 1
}
load() { # NAME ARGS...
    local name=$1; shift
    $kiln bench --url http://127.0.0.1:18080 --duration "${run_s}s" --json "$@" > "$out/$name.json"
}

for mode in on off; do
    echo "==> end to end, batching $mode" >&2
    serve "batching-$mode"
    for c in 1 4 16 64; do
        load "digits-$mode-c$c" --handler digits --body "$png" --concurrency "$c"
        load "embeddings-$mode-c$c" --handler embeddings --body "$out/sentence.json" --concurrency "$c"
    done
    if [ "$mode" = on ]; then
        echo "==> sandbox overhead" >&2
        # Interleaved and repeated: the median of three is steadier on a shared VM.
        for c in 1 16; do
            for i in 1 2 3; do
                load "live-c$c-$i" --endpoint /v2/health/live --concurrency "$c"
                load "echo-c$c-$i" --handler echo --path echo --concurrency "$c"
            done
        done
    fi
    stop_server
done

.venv/bin/python scripts/bench_report.py "$out" docs/BENCHMARKS.md "$run_s"
echo "==> wrote docs/BENCHMARKS.md" >&2
