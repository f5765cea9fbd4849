#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ against kiln-codec, the decoders of untrusted input:
# OIP requests, tensors, batch merge/split, the config file's syntax, API keys and key files.
#   scripts/fuzz.sh              every target for 5 s (what scripts/test.sh runs: they build and
#                                hold their properties)
#   scripts/fuzz.sh 300          every target for 5 minutes
#   scripts/fuzz.sh 300 batch    one target
# A crash leaves its input in fuzz/artifacts/TARGET/; `cargo +nightly fuzz run TARGET FILE`
# replays it. Fixed crashes become unit tests in codec/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

seconds=${1:-5}
shift || true
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: the nightly toolchain is missing (cargo fuzz needs it): rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version > /dev/null 2>&1; then
    printf '\033[1m==> installing cargo-fuzz\033[0m\n' >&2
    cargo install --quiet --locked cargo-fuzz
fi
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
# No sanitizer: kiln-codec has no unsafe code; overflow checks and assertions stay on.
cargo +nightly fuzz build --sanitizer none
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    printf '\033[1m==> fuzz %s for %s s\033[0m\n' "$target" "$seconds" >&2
    status=0
    cargo +nightly fuzz run --sanitizer none "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -print_final_stats=1 > "$log" 2>&1 || status=$?
    grep -E '^stat::number_of_executed_units|^Done' "$log" || true
    if [ "$status" != 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz: $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit "$status"
    fi
done
