# Sourced by the other scripts: the project-local Python venv and the libtorch it carries.
KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_ROOT
export VIRTUAL_ENV="$KILN_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
# tch builds against the torch wheel in the venv (PyTorch 2.11.0, pinned for tch 0.24).
export LIBTORCH_USE_PYTORCH=1
export KILN_PYTHON="$VIRTUAL_ENV/bin/python"

# The bundled examples' config (examples/kiln.toml) on stdout, with absolute paths and its state
# directory under DIR; more sed arguments (`-e EXPR`) change it further.
examples_config() { # DIR [SED_ARGS...]
    local dir=$1
    shift
    sed -e "s|\.\./build/state|$dir/state|" -e "s|\.\./|$KILN_ROOT/|g" "$@" "$KILN_ROOT/examples/kiln.toml"
}

# The benchmarks' config on stdout: the examples (state under DIR) with batches of up to
# MAX_BATCH, plus the echo guest (misbehave.wasm) and ResNet-18. BENCH_PRECISION, when set,
# pins the examples' models to that precision instead of "auto" (to compare with a Kiln from
# before precision = "auto", or one precision with another).
bench_config() { # DIR MAX_BATCH
    examples_config "$1" -e "s|max_batch_size = 64|max_batch_size = $2|" \
        -e "s|precision = \"auto\"|precision = \"${BENCH_PRECISION:-auto}\"|"
    cat <<TOML

[[handler]]
name = "echo"
tenant = "demo"
component = "$KILN_ROOT/target/wasm32-wasip2/guest/misbehave.wasm"

[[model]]
name = "resnet18"
path = "$KILN_ROOT/build/models/resnet18.pt"
inputs = [{ name = "image", dtype = "FP32", shape = [-1, 3, 224, 224] }]
outputs = [{ name = "logits" }]
threads = 2
TOML
}

# Starts `BINARY serve ARGS...` in the background, its output in LOG, and waits until
# http://127.0.0.1:PORT/v2/health/ready answers; sets $server to its process id. Fails (having
# stopped it) when it exits first or is not ready within 60 s, so that nothing is measured against
# a server that never started.
start_server() { # BINARY LOG PORT ARGS...
    local binary=$1 log=$2 port=$3
    shift 3
    "$binary" serve "$@" > "$log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null 2>&1 && return 0
        if ! kill -0 "$server" 2> /dev/null; then
            echo "kiln serve exited before it was ready; see $log" >&2
            server=
            return 1
        fi
        sleep 0.2
    done
    echo "kiln serve was not ready on port $port within 60 s; see $log" >&2
    stop_server
    return 1
}

# Stops the server start_server started, if it still runs, and waits for it.
stop_server() {
    [ -n "${server:-}" ] || return 0
    kill "$server" 2> /dev/null || true
    wait "$server" 2> /dev/null || true
    server=
}
