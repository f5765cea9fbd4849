#!/usr/bin/env bash
# Sets everything up, then runs every test: unit tests, config golden files, the end-to-end
# suite against a real server with real components and models, and a short run of every fuzz
# target (scripts/fuzz.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"
log=$(mktemp)
# Tests that cannot run here (no GPU, no Docker daemon) say so in this file (kiln_tests::skip).
export KILN_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$KILN_SKIP_LOG"' EXIT
# --release reuses the artifacts setup.sh just built instead of compiling everything again.
status=0
cargo test --release --no-fail-fast -p kiln -p kiln-torchscan -p kiln-wire -p kiln-codec -p kiln-top -p kiln-guest -p kiln-tests "$@" 2>&1 | tee "$log" || status=$?
# Only for a full run: arguments to this script narrow the tests above.
if [ $# -eq 0 ]; then
    "$KILN_ROOT/scripts/fuzz.sh" 5 || status=$?
fi
# What was skipped, then one total over every test binary as the last line (a skipped test
# counts as skipped, not passed).
sed 's/^/skipped: /' "$KILN_SKIP_LOG"
skipped=$(wc -l < "$KILN_SKIP_LOG")
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "kiln: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
