#!/usr/bin/env bash
# Do Kiln's example guests run unchanged on another wasi:nn host? Serves each of them under Kiln
# and under `wasmtime serve -S nn` (wasmtime-cli 48.0.8 with its PyTorch backend) with the same
# model files, sends both the same requests and compares the answers: digits the same class and
# probabilities within 1e-5, embeddings a cosine distance of at most 1e-5. Prints a table and
# writes it into docs/PORTABILITY.md. Exits non-zero when any answer differs.
#
# wasmtime's PyTorch backend is built against libtorch 2.4.0 (tch 0.17), not the 2.11.0 Kiln
# uses, so the first run makes a second venv with torch 2.4.0 from PyPI and builds wasmtime-cli
# with it, both in a cache outside the repository ($KILN_PORTABILITY_CACHE, by default
# ~/.cache/kiln-portability): about 5 GB and 25 minutes on two cores, which is why this is not
# part of scripts/test.sh. Later runs take under a minute.
#   scripts/portability.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$KILN_ROOT/scripts/setup.sh"
cd "$KILN_ROOT"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

cache=${KILN_PORTABILITY_CACHE:-$HOME/.cache/kiln-portability}
mkdir -p "$cache"
torch24="$cache/torch24"
if ! "$torch24/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.4.0")' 2> /dev/null; then
    step "creating a venv with torch 2.4.0 for wasmtime's PyTorch backend ($torch24)"
    python3 -m venv "$torch24"
    "$torch24/bin/pip" install --quiet --disable-pip-version-check torch==2.4.0
fi
wasmtime="$cache/wasmtime/bin/wasmtime"
if [ ! -x "$wasmtime" ]; then
    step "building wasmtime-cli 48.0.8 with wasi-nn's PyTorch backend (about 25 minutes, once)"
    # tch finds libtorch through the python first on PATH: the 2.4.0 venv, not Kiln's.
    env -u VIRTUAL_ENV PATH="$torch24/bin:$PATH" LIBTORCH_USE_PYTORCH=1 CARGO_TARGET_DIR="$cache/target" \
        cargo install wasmtime-cli --version =48.0.8 --locked --root "$cache/wasmtime" --no-default-features \
        --features run,serve,wasi-nn,wasi-http,cranelift,component-model,component-model-async,pooling-allocator,parallel-compilation,wasmtime-wasi-nn/pytorch
fi
torch24_lib=$("$torch24/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")' 2> /dev/null)
wasmtime_version=$(LD_LIBRARY_PATH="$torch24_lib" "$wasmtime" --version)

out=build/portability
rm -rf "$out" && mkdir -p "$out"
# wasmtime registers a graph under its folder's name and loads DIR/model.pt: the same files.
for model in digits minilm; do
    mkdir -p "$out/models/$model"
    ln -s "$KILN_ROOT/build/models/$model.pt" "$out/models/$model/model.pt"
done
# The other direction: tests/guests/foreign, written for wasmtime serve (no Kiln SDK), loads
# `mnist8` (the digits file), sends its input as `input` and reads `output`.
mkdir -p "$out/models/mnist8"
ln -s "$KILN_ROOT/build/models/digits.pt" "$out/models/mnist8/model.pt"

kiln=target/release/kiln
examples_config "$out" -e 's|^models = \["digits", "minilm"\]$|models = ["digits", "minilm", "mnist8"]|' > "$out/kiln.toml"
# On Kiln the foreign guest needs only a config naming the model's input and output its way.
cat >> "$out/kiln.toml" <<EOF

[[model]]
name = "mnist8"
path = "$KILN_ROOT/build/models/digits.pt"
inputs = [{ name = "input", dtype = "FP32", shape = [-1, 1, 8, 8] }]
outputs = [{ name = "output" }]

[[handler]]
name = "foreign"
tenant = "demo"
component = "$KILN_ROOT/target/wasm32-wasip2/guest/foreign.wasm"
EOF
grep -q '"mnist8"\]' "$out/kiln.toml" || { echo "portability: could not give tenant demo the mnist8 model" >&2; exit 1; }
KILN_KEY=$($kiln tenant add-key demo -c "$out/kiln.toml" 2> /dev/null)
KILN_ADMIN_KEY=$($kiln admin add-key -c "$out/kiln.toml" 2> /dev/null)
export KILN_KEY KILN_ADMIN_KEY

# A handler as an author makes one: the text template, pre-initialised by `kiln build`.
step "making a handler from kiln new's text template"
$kiln new words --template text --dir "$out" > /dev/null
CARGO_TARGET_DIR="$KILN_ROOT/target/authors" $kiln build "$out/words" > "$out/build-words.log" 2>&1 \
    || { cat "$out/build-words.log"; exit 1; }
words="$KILN_ROOT/target/authors/wasm32-wasip2/release/words.initialized.wasm"
pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT
$kiln serve -c "$out/kiln.toml" --listen 127.0.0.1:18180 --admin-listen 127.0.0.1:18181 \
    --grpc-listen off > "$out/kiln.log" 2>&1 &
pids+=($!)
serve_wasmtime() { # COMPONENT MODEL PORT
    LD_LIBRARY_PATH="$torch24_lib" "$wasmtime" serve -S cli=y -S nn=y -S "nn-graph=pytorch::$out/models/$2" \
        --addr "127.0.0.1:$3" "$1" > "$out/wasmtime-$3.log" 2>&1 &
    pids+=($!)
}
serve_wasmtime target/wasm32-wasip2/guest/digits.wasm digits 18190
serve_wasmtime target/wasm32-wasip2/guest/embeddings.wasm minilm 18191
serve_wasmtime "$words" minilm 18192
serve_wasmtime target/wasm32-wasip2/guest/foreign.wasm mnist8 18193
for url in http://127.0.0.1:18180/v2/health/ready http://127.0.0.1:18190/ http://127.0.0.1:18191/ http://127.0.0.1:18192/ \
    http://127.0.0.1:18193/; do
    for _ in $(seq 300); do curl -s -o /dev/null "$url" 2> /dev/null && break; sleep 0.2; done
done
$kiln handler deploy "$words" --name words --tenant demo --admin-url http://127.0.0.1:18181 > /dev/null

step "sending the same requests to both hosts"
"$KILN_PYTHON" - "$out" "$wasmtime_version" <<'PY'
import io, json, math, os, re, sys, urllib.request
from datetime import datetime, timezone

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

out, wasmtime_version = sys.argv[1:3]
KILN = "http://127.0.0.1:18180/v1/handlers"
WASMTIME = {"digits": "http://127.0.0.1:18190", "embeddings": "http://127.0.0.1:18191", "words": "http://127.0.0.1:18192",
            "foreign": "http://127.0.0.1:18193"}
key = os.environ["KILN_KEY"]

def post(url, body, content_type, auth):
    headers = {"content-type": content_type}
    if auth:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")

def both(guest, path, body, content_type="application/json"):
    kiln = post(f"{KILN}/{guest}{path}", body, content_type, True)
    other = post(f"{WASMTIME[guest]}{path}", body, content_type, False)
    return kiln, other

rows, failures = [], []

def record(guest, request, kiln, other, difference, ok):
    verdict = "same" if ok else "DIFFERENT"
    rows.append(f"| {guest} | {request} | {kiln} | {other} | {difference} | {verdict} |")
    if not ok:
        failures.append(f"{guest} {request}")

# digits: ten handwritten digits as 8x8 PNGs, one per request.
images = load_digits()
for index in range(10):
    pixels = (images.images[index] * (255 / 16)).round().astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(png, format="PNG")
    (ks, k), (ws, w) = both("digits", "/", png.getvalue(), "image/png")
    if ks != 200 or ws != 200:
        record("digits", f"digit #{index}", f"{ks} {k}", f"{ws} {w}", "-", False)
        continue
    off = max(abs(a - b) for a, b in zip(k["probabilities"], w["probabilities"]))
    same = k["digit"] == w["digit"] and off <= 1e-5
    record("digits", f"PNG of digit #{index} (label {images.target[index]})", f"class {k['digit']}",
           f"class {w['digit']}", f"{off:.1e} max prob.", same)

def cosine_distance(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

# embeddings: the reference sentences, one at a time and all in one request (padded rows).
sentences = json.load(open("build/reference/embeddings.json"))["sentences"]
for label, batch in [(f"sentence {i}", [s]) for i, s in enumerate(sentences[:4])] + [(f"{len(sentences)} sentences in one request", sentences)]:
    (ks, k), (ws, w) = both("embeddings", "/", json.dumps({"sentences": batch}).encode())
    if ks != 200 or ws != 200:
        record("embeddings", label, f"{ks} {k}", f"{ws} {w}", "-", False)
        continue
    worst = max(cosine_distance(a, b) for a, b in zip(k["embeddings"], w["embeddings"]))
    same = len(k["embeddings"]) == len(w["embeddings"]) == len(batch) and worst <= 1e-5
    record("embeddings", label, f"{len(k['embeddings'])} x {len(k['embeddings'][0])}",
           f"{len(w['embeddings'])} x {len(w['embeddings'][0])}", f"{worst:.1e} cosine", same)

# The OpenAI-compatible route of the same guest.
body = json.dumps({"model": "all-MiniLM-L6-v2", "input": sentences[:3]}).encode()
(ks, k), (ws, w) = both("embeddings", "/v1/embeddings", body)
if ks == 200 and ws == 200:
    worst = max(cosine_distance(a["embedding"], b["embedding"]) for a, b in zip(k["data"], w["data"]))
    record("embeddings", "OpenAI `/v1/embeddings`, 3 inputs", f"{len(k['data'])} vectors", f"{len(w['data'])} vectors",
           f"{worst:.1e} cosine", worst <= 1e-5 and k["usage"] == w["usage"])
else:
    record("embeddings", "OpenAI `/v1/embeddings`", f"{ks} {k}", f"{ws} {w}", "-", False)

# The text template's handler, pre-initialised: texts in, one unit vector each out.
body = json.dumps({"texts": sentences[:5]}).encode()
(ks, k), (ws, w) = both("words", "/", body)
if ks == 200 and ws == 200:
    worst = max(cosine_distance(a, b) for a, b in zip(k["vectors"], w["vectors"]))
    record("`kiln new --template text` (pre-initialised)", "5 texts in one request", f"{len(k['vectors'])} vectors",
           f"{len(w['vectors'])} vectors", f"{worst:.1e} cosine", worst <= 1e-5 and len(k["vectors"]) == len(w["vectors"]) == 5)
else:
    record("`kiln new --template text`", "5 texts", f"{ks} {k}", f"{ws} {w}", "-", False)

# A guest written for wasmtime serve, on Kiln: the same logits from both.
for index in range(3):
    pixels = (images.images[index] / 16).flatten().tolist()
    (ks, k), (ws, w) = both("foreign", "/", json.dumps(pixels).encode())
    if ks == 200 and ws == 200:
        off = max(abs(a - b) for a, b in zip(k["logits"], w["logits"]))
        record("tests/guests/foreign (written for wasmtime)", f"digit #{index} as 64 numbers", f"{len(k['logits'])} logits",
               f"{len(w['logits'])} logits", f"{off:.1e} max logit", off <= 1e-5 and len(k["logits"]) == 10)
    else:
        record("tests/guests/foreign", f"digit #{index}", f"{ks} {k}", f"{ws} {w}", "-", False)

stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
table = "\n".join([
    f"Run {stamp}: Kiln {os.popen('git rev-parse --short HEAD').read().strip()} (libtorch 2.11.0) against "
    f"`{wasmtime_version}` with wasi-nn's PyTorch backend (libtorch 2.4.0), the same `.pt` files and the same components.",
    "",
    "| guest | request | Kiln | wasmtime serve | difference | |",
    "|---|---|---|---|---|---|",
    *rows,
])
print(table)
doc = "docs/PORTABILITY.md"
text = open(doc).read()
start, end = "<!-- portability:latest -->", "<!-- /portability:latest -->"
text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
open(doc, "w").write(text)
if failures:
    sys.exit(f"portability: answers differ for {failures} (logs in {out})")
print("portability: every answer is the same on both hosts")
PY
