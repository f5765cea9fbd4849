#!/usr/bin/env bash
# Slot reset side by side: the same server with `slot_reset = "auto"` (PAGEMAP_SCAN, 4 MiB kept
# mapped) and `"memset"` (384 KiB reset in place), interleaved over three rounds, on the echo
# guest (the sandbox alone) and digits. Needs scripts/bench.sh's configs (run it once first).
#   scripts/bench-reset.sh     (about 2 minutes)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"
out=build/bench
kiln=target/release/kiln
[ -f "$out/batching-on.toml" ] || { echo "run scripts/bench.sh first (it writes $out/batching-on.toml)" >&2; exit 1; }
for mode in auto memset; do
    sed -e "s|^\[server\]|[server]\nslot_reset = \"$mode\"|" "$out/batching-on.toml" > "$out/reset-$mode.toml"
done
KILN_KEY=$($kiln tenant add-key demo -c "$out/reset-auto.toml" 2>/dev/null)
export KILN_KEY
png=$(ls build/holdout/digits/*.png | head -1)
printf '| round | slot_reset | echo c=1 req/s | echo c=16 req/s | digits c=16 req/s | digits c=64 req/s (p99 ms) |\n|---|---|---:|---:|---:|---:|\n'
for round in 1 2 3; do
    # Alternate which mode goes first, so neither always follows the other.
    modes=(auto memset); [ $((round % 2)) = 0 ] && modes=(memset auto)
    for mode in "${modes[@]}"; do
        $kiln serve -c "$out/reset-$mode.toml" --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 > "$out/reset-$mode.log" 2>&1 &
        server=$!
        for _ in $(seq 300); do curl -sf http://127.0.0.1:18080/v2/health/ready > /dev/null 2>&1 && break; sleep 0.2; done
        row="| $round | $mode"
        for run in "echo 1" "echo 16" "digits 16" "digits 64"; do
            set -- $run
            if [ "$1" = echo ]; then args=(--handler echo --path echo); else args=(--handler digits --body "$png"); fi
            $kiln bench --server http://127.0.0.1:18080 --duration 3s --json "${args[@]}" -c "$2" > "$out/reset.json"
            row="$row | $(.venv/bin/python -c "
import json; r = json.load(open('$out/reset.json')); e = sum(r['errors'].values())
cell = f\"{r['ok'] / 3:.0f}\" + (f\" ({r['latency_ms']['p99']:.1f})\" if '$1 $2' == 'digits 64' else '')
print(cell + (f' ({e} errors)' if e else ''))")"
        done
        echo "$row |"
        grep -q 'reset=DirtyPages' "$out/reset-$mode.log" && [ "$mode" = memset ] && echo "memset asked for, PAGEMAP_SCAN used" >&2
        kill "$server"; wait "$server" 2>/dev/null || true
    done
done
