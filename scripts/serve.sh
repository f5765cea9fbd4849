#!/usr/bin/env bash
# Sets up what serving needs (scripts/setup.sh --serve), then serves the bundled examples on http://127.0.0.1:8080 (CPU), with the
# admin API on 127.0.0.1:8081. Extra arguments go to `kiln serve`.
#
# The examples run as tenant 'demo'. On first use this makes an API key for it and an admin key,
# and keeps them in build/demo.key and build/admin.key (mode 600) so the README's examples can use
# them: a convenience for trying Kiln out. The server itself stores only their hashes
# (build/state); production keys are made with `kiln tenant add-key` and handed out once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh" --serve
cd "$KILN_ROOT"

# KEYFILE is still valid when its id is among the hashes in KEYS.
key_is_live() { # KEYFILE KEYS
    [ -s "$1" ] && [ -s "$2" ] && grep -q " $(cut -c6-21 "$1") " "$2"
}
umask 077
if ! key_is_live build/demo.key build/state/tenant-keys/demo.keys; then
    target/release/kiln tenant add-key demo 2>/dev/null > build/demo.key
    echo "==> made an API key for tenant 'demo' in build/demo.key" >&2
fi
if ! key_is_live build/admin.key build/state/admin.keys; then
    target/release/kiln admin add-key 2>/dev/null > build/admin.key
    echo "==> made an admin key in build/admin.key" >&2
fi
exec target/release/kiln serve "$@"
