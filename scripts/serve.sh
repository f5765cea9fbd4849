#!/usr/bin/env bash
# Sets everything up, then serves the bundled examples on http://127.0.0.1:8080 (CPU).
# Extra arguments go to `kiln serve`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"
exec target/release/kiln serve "$@"
