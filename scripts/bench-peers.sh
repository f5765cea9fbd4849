#!/usr/bin/env bash
# Kiln against TorchServe 0.12, side by side in one run (bench/peers/bench_peers.py says how):
#   scripts/bench-peers.sh                       (about 25 minutes on a 2-core machine)
#   scripts/bench-peers.sh --duration 3s --runs 1    (a quick look; do not record it)
# Installs what it needs: Kiln's own set-up, the load client hey and Java 17 from Debian, and
# TorchServe with the handlers' libraries in its own venv (build/peers/venv). Rewrites the
# `peers:latest` part of docs/BENCHMARKS.md and docs/peers.svg. Arguments go to bench_peers.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

missing=()
command -v hey > /dev/null || missing+=(hey)
command -v java > /dev/null || missing+=(openjdk-17-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get install -y -qq "${missing[@]}" > /dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" > /dev/null; }
fi

venv=build/peers/venv
stamp=$venv/.requirements
want=$(sha256sum bench/peers/requirements.txt | cut -d' ' -f1)
if [ ! -x $venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    step "creating TorchServe's venv ($venv)"
    [ -x $venv/bin/python ] || python3 -m venv $venv
    $venv/bin/pip install --quiet --disable-pip-version-check -r bench/peers/requirements.txt
    echo "$want" > "$stamp"
fi

exec $venv/bin/python bench/peers/bench_peers.py "$@"
