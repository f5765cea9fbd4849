#!/usr/bin/env bash
# Sets everything up, then runs every test: unit tests, config golden files, and the
# end-to-end suite against a real server with real components and models.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --release reuses the artifacts setup.sh just built instead of compiling everything again.
status=0
cargo test --release --no-fail-fast -p kiln -p kiln-wire -p kiln-top -p kiln-tests "$@" 2>&1 | tee "$log" || status=$?
# One total over every test binary, as the last line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "kiln: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
