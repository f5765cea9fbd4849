#!/usr/bin/env bash
# Builds Kiln's container image from this checkout, pulling nothing from a container registry:
#
#   scripts/image.sh [--cuda] [--tag NAME]     (default tag kiln:cpu, or kiln:cuda with --cuda)
#   scripts/image.sh --lb                      kiln-lb: nginx on the same base, the load balancer
#                                              of deploy/docker (for replicas without a routing mesh)
#
#   1. a minimal Debian base (bookworm, ca-certificates, user kiln with uid 10001) made with
#      mmdebstrap from Debian's archive and `docker import`ed; kept, by a hash of how it is made,
#      so later builds reuse it;
#   2. the build context: the libtorch libraries kiln loads (from the torch wheel in .venv; with
#      --cuda also libtorch's CUDA half and NVIDIA's libraries from the wheel's dependencies),
#      the bundled examples (deploy/docker/kiln.toml, the digits and MiniLM models and their
#      handlers) and the kiln binary;
#   3. deploy/docker/Dockerfile over them.
#
# Fast when nothing changed: setup.sh and cargo are no-ops, the base is reused and Docker keeps
# every unchanged layer. Prints the image's tag and size last.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

cuda=0
lb=0
tag=
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) cuda=1 ;;
        --lb) lb=1 ;;
        --tag) tag=${2:?--tag needs a name}; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scripts/image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "scripts/image.sh: $*" >&2; exit 1; }

[ -n "$tag" ] || { [ $lb = 1 ] && tag=kiln-lb:latest; } || { [ $cuda = 1 ] && tag=kiln:cuda; } || tag=kiln:cpu
[ $lb = 0 ] || [ $cuda = 0 ] || die "--lb and --cuda are two images: build them one at a time"

command -v docker > /dev/null || die "docker is not installed"
docker info > /dev/null 2>&1 || die "the Docker daemon is not running (docker info fails)"

# 1. The base. Everything that decides its content is in $recipe, and its hash names the image.
suite=bookworm
mirrors=("deb http://deb.debian.org/debian $suite main"
         "deb http://deb.debian.org/debian $suite-updates main"
         "deb http://deb.debian.org/debian-security $suite-security main")
include=ca-certificates
[ $lb = 0 ] || include=ca-certificates,nginx-light
mmdebstrap_args=(--variant=minbase --include="$include" --quiet
    # No manuals, translations or docs in an image; the copyright files stay.
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/info/*'
    # The user kiln runs as, and its state directory (the image's volume), owned by it.
    --customize-hook='chroot "$1" useradd --uid 10001 --user-group --home-dir /var/lib/kiln --no-create-home --shell /usr/sbin/nologin kiln'
    --customize-hook='mkdir -p "$1/var/lib/kiln" && chown 10001:10001 "$1/var/lib/kiln"')
recipe=$(printf '%s\n' "$suite" "${mirrors[@]}" "${mmdebstrap_args[@]}")
base=kiln-base:$suite-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
if ! docker image inspect "$base" > /dev/null 2>&1; then
    if ! command -v mmdebstrap > /dev/null; then
        step "installing mmdebstrap"
        sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get install -y -qq mmdebstrap > /dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq mmdebstrap > /dev/null; }
    fi
    step "making the Debian $suite base ($base, with $include) with mmdebstrap"
    mkdir -p build/image
    rm -f build/image/base.tar
    mmdebstrap "${mmdebstrap_args[@]}" "$suite" build/image/base.tar "${mirrors[@]}"
    docker import --message "Debian $suite minbase for Kiln (scripts/image.sh)" build/image/base.tar "$base" > /dev/null
    rm -f build/image/base.tar
fi

# The load balancer: nginx as user kiln, its config mounted (deploy/docker/nginx.conf).
if [ $lb = 1 ]; then
    step "building $tag"
    mkdir -p build/image/lb
    cat > build/image/lb/Dockerfile <<'DOCKERFILE'
ARG BASE
FROM ${BASE}
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["nginx", "-e", "stderr", "-g", "daemon off;", "-c", "/etc/kiln-lb/nginx.conf"]
DOCKERFILE
    DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$base" --tag "$tag" build/image/lb > /dev/null
    echo "$tag $(( $(docker image inspect --format '{{.Size}}' "$tag") / 1000000 )) MB"
    exit 0
fi

# The tests (tests/fleet) have set up already and build the image from what they test.
[ -n "${KILN_IMAGE_SKIP_SETUP:-}" ] || "$KILN_ROOT/scripts/setup.sh"
for f in target/release/kiln build/models/digits.pt build/models/minilm.pt \
         target/wasm32-wasip2/guest/digits.wasm target/wasm32-wasip2/guest/embeddings.wasm; do
    [ -e "$f" ] || die "$f is missing: run scripts/setup.sh"
done

# 2. The build context.
step "assembling the image's files (build/image/context)"
context=build/image/context
rm -rf "$context"
mkdir -p "$context/lib" "$context/examples/models" "$context/examples/handlers"
torch_lib=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
# Hard links where the filesystem allows (libtorch is half a gigabyte), copies elsewhere.
put() { ln -f "$1" "$2" 2> /dev/null || cp "$1" "$2"; }
# The shared libraries FILE needs that are not the system's: libtorch's and what it brings.
own_libraries() {
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | while read -r name path; do
        case $path in /lib/*|/usr/lib/*|/lib64/*) ;; *) echo "$name $path" ;; esac
    done
}
own_libraries target/release/kiln > build/image/libraries
if [ $cuda = 1 ]; then
    [ -e "$torch_lib/libtorch_cuda.so" ] || die "this torch ($torch_lib) has no CUDA libraries"
    own_libraries "$torch_lib/libtorch_cuda.so" >> build/image/libraries
    echo "libtorch_cuda.so $torch_lib/libtorch_cuda.so" >> build/image/libraries
    # libtorch and CUDA open libraries by name at run time (libtorch's NVRTC and linalg halves,
    # cuDNN's engines, NVRTC's builtins): every one of the wheel's, but Python's own.
    for f in "$torch_lib"/*.so* "$(dirname "$torch_lib")"/../nvidia/*/lib/*.so*; do
        case $(basename "$f") in libtorch_python.so|libshm*.so) continue ;; esac
        echo "$(basename "$f") $f"
    done >> build/image/libraries
fi
grep -q '^libtorch_cpu\.so ' build/image/libraries || die "ldd target/release/kiln names no libtorch_cpu.so"
sort -u build/image/libraries | while read -r name path; do put "$(readlink -f "$path")" "$context/lib/$name"; done
if [ $cuda = 0 ] && [ -e "$context/lib/libtorch_cuda.so" ]; then
    die "ldd found libtorch_cuda.so among kiln's libraries: kiln must load it at run time, not link it (runtime/build.rs)"
fi
put deploy/docker/kiln.toml "$context/examples/kiln.toml"
put build/models/digits.pt "$context/examples/models/digits.pt"
put build/models/minilm.pt "$context/examples/models/minilm.pt"
put target/wasm32-wasip2/guest/digits.wasm "$context/examples/handlers/digits.wasm"
put target/wasm32-wasip2/guest/embeddings.wasm "$context/examples/handlers/embeddings.wasm"
# Without its DWARF (200 MB of the 250): panics still name functions, not lines. Its run path
# is cut to the folder beside it: the build's venv is no place for a packaged kiln to look.
objcopy --strip-debug target/release/kiln "$context/kiln"
if ! command -v patchelf > /dev/null; then
    step "installing patchelf"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get install -y -qq patchelf > /dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq patchelf > /dev/null; }
fi
patchelf --set-rpath '$ORIGIN/../lib/kiln' "$context/kiln"
cp deploy/docker/Dockerfile "$context/Dockerfile"

# 3. The image. The classic builder: it needs no BuildKit and pulls nothing for a local base.
step "building $tag"
DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$base" --tag "$tag" "$context" > /dev/null
rm -rf "$context"
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "$tag $((size / 1000000)) MB"
