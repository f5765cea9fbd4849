#!/usr/bin/env bash
# Two or more Kilns side by side, interleaved over three rounds (alternating which goes first),
# on the echo guest (the sandbox alone), digits and embeddings. Each is LABEL=BINARY, optionally
# followed by ,SETTING lines for the [server] table:
#   scripts/bench-ab.sh auto=target/release/kiln 'memset=target/release/kiln,slot_reset = "memset"'
#   scripts/bench-ab.sh old=build/bin/kiln-OLD new=target/release/kiln
# Each Kiln gets scripts/bench.sh's config with batching on (its own state directory under
# build/bench/ab). About 1.5 minutes per Kiln. The load
# generator is always target/release/kiln; the server's CPU µs and wake-ups per request come from
# /v1/stats (absent for a server that predates them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"
out=build/bench
client=target/release/kiln
mkdir -p "$out/ab"
[ $# -ge 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
labels=(); binaries=()
for spec in "$@"; do
    label=${spec%%=*}; rest=${spec#*=}
    IFS=, read -r -a parts <<< "$rest"
    labels+=("$label"); binaries+=("${parts[0]}")
    settings=$(printf '%s\\n' "${parts[@]:1}")
    bench_config "$out/ab" 64 | sed -e "s|^\[server\]|[server]\n$settings|" > "$out/ab-$label.toml"
done
KILN_KEY=$($client tenant add-key demo -c "$out/ab-${labels[0]}.toml" 2>/dev/null)
KILN_ADMIN_KEY=$($client admin add-key -c "$out/ab-${labels[0]}.toml" 2>/dev/null)
export KILN_KEY KILN_ADMIN_KEY
pngs=(build/holdout/digits/*.png)
png=${pngs[0]}
echo '{"sentences": ["The quick brown fox jumps over the lazy dog near the river bank."]}' > "$out/ab-sentence.json"
runs=("echo 1" "echo 16" "digits 1" "digits 16" "digits 64" "embeddings 1" "embeddings 16" "embeddings 64")
header="| round | kiln"; rule="|---|---"
for run in "${runs[@]}"; do header="$header | ${run/ / c=}"; rule="$rule|---:"; done
echo "Cells: req/s (p99 ms; server CPU µs, wake-ups and allocations per request)."
echo "$header |"; echo "$rule|"
for round in 1 2 3; do
    order=("${!labels[@]}")
    [ $((round % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
    for i in "${order[@]}"; do
        label=${labels[$i]}
        start_server "${binaries[$i]}" "$out/ab-$label.log" 18080 -c "$out/ab-$label.toml" \
            --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 || exit 1
        row="| $round | $label"
        for run in "${runs[@]}"; do
            set -- $run
            case $1 in
                echo) args=(--handler echo --path echo) ;;
                digits) args=(--handler digits --body "$png") ;;
                embeddings) args=(--handler embeddings --body "$out/ab-sentence.json") ;;
            esac
            $client bench --url http://127.0.0.1:18080 --duration 3s --json "${args[@]}" --concurrency "$2" > "$out/ab.json"
            row="$row | $(.venv/bin/python -c "
import json; r = json.load(open('$out/ab.json')); e = sum(r['errors'].values()); c = r.get('server_cost')
cost = f\"; {c['cpu_us_per_request']:.0f}, {c['wakeups_per_request']:.1f}, {c.get('allocations_per_request', 0):.0f}\" if c else ''
print(f\"{r['ok'] / r['seconds']:.0f} ({r['latency_ms']['p99']:.1f}{cost})\" + (f' {e} errors' if e else ''))")"
        done
        echo "$row |"
        stop_server
    done
done
