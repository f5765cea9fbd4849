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
