#!/usr/bin/env bash
# Installs and builds everything Kiln's examples and tests need. Idempotent: each step is
# skipped (or is a no-op for cargo) when its output is already up to date.
#   1. the wasm32-wasip2 Rust target
#   2. a project-local Python venv with torch 2.11.0 and the export/test dependencies
#   3. the example models: digits (trained here) and MiniLM (traced), with test references
#   4. the guest components, and 5. the release build of `kiln`
# With --serve (as scripts/serve.sh runs it), only what serving the examples needs: no test
# models, test guests, ResNet-18 or the tests' Debian packages.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

serve_only=false
case "${1:-}" in
    "") ;;
    --serve) serve_only=true ;;
    *) echo "usage: scripts/setup.sh [--serve]" >&2; exit 2 ;;
esac

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    step "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

# Debian packages the tests use: tmux (kiln-top's test runs it in a real terminal), and
# docker-registry with htpasswd (apache2-utils) for the OCI registry tests.
if ! $serve_only; then
missing=()
command -v tmux > /dev/null || missing+=(tmux)
command -v docker-registry > /dev/null || missing+=(docker-registry)
command -v htpasswd > /dev/null || missing+=(apache2-utils)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get install -y -qq "${missing[@]}" > /dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" > /dev/null; }
fi

# Prometheus for the autoscaling test: Debian's package unpacked into build/tools, not
# installed, so that no Prometheus service starts on the host.
prometheus=build/tools/prometheus/usr/bin/prometheus
if [ ! -x "$prometheus" ]; then
    step "unpacking Debian's prometheus package into build/tools"
    mkdir -p build/tools
    rm -rf build/tools/prometheus build/tools/prometheus_*.deb
    (cd build/tools && { apt-get download -qq prometheus 2> /dev/null || { sudo=; [ "$(id -u)" = 0 ] || sudo=sudo; $sudo apt-get update -qq && apt-get download -qq prometheus; }; } \
        && dpkg-deb -x prometheus_*.deb prometheus && rm prometheus_*.deb)
fi
fi

stamp=.venv/.kiln-requirements
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    step "creating the Python venv (.venv) with torch 2.11.0"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
    echo "$want" > "$stamp"
fi

# Re-export a model when it is missing or older than the script that makes it.
export_if_stale() {
    local script=$1; shift
    for out in "$@"; do
        if [ ! -e "$out" ] || [ "$script" -nt "$out" ] || [ "$stamp" -nt "$out" ]; then
            step "exporting $(basename "$script" .py)"
            .venv/bin/python "$script" build
            return
        fi
    done
}
export_if_stale examples/export/digits.py build/models/digits.pt build/holdout/digits
export_if_stale examples/export/embeddings.py build/models/minilm.pt build/models/minilm-vocab.txt \
    build/reference/embeddings.json

# The same cargo command in both modes: another set of packages would unify other features of
# their dependencies and rebuild kiln when switching between serving and testing.
if $serve_only; then
    step "building the examples' guest components (wasm32-wasip2)"
    cargo build --quiet --profile guest --target wasm32-wasip2 -p digits -p embeddings
    step "building kiln and kiln-top (release)"
    cargo build --quiet --release -p kiln -p kiln-top -p kiln-tests
    exit 0
fi

export_if_stale tests/python/export_test_models.py build/models/tokenwise.pt build/models/positions.pt \
    build/models/positions-frozen.pt build/models/normed.pt build/models/unmasked.pt \
    build/models/offset-1.pt build/models/offset-2.pt build/models/offset-3.pt build/models/hang.pt \
    build/models/from-file.pt build/models/odd-op.pt build/models/sort-from-file.pt \
    build/models/setstate-from-file.pt build/models/drift.pt \
    build/models/drift-frozen.pt
export_if_stale examples/export/resnet18.py build/models/resnet18.pt

step "building the guest components (wasm32-wasip2)"
cargo build --quiet --profile guest --target wasm32-wasip2 -p digits -p embeddings \
    -p misbehave -p forbidden -p greeter -p foreign

step "building kiln and kiln-top (release)"
cargo build --quiet --release -p kiln -p kiln-top -p kiln-tests
