#!/usr/bin/env bash
# Every GPU check in one call, for a machine with an NVIDIA GPU and PyTorch 2.11 but no Rust
# toolchain (and no internet). Two halves:
#
#   scripts/gpu-check.sh --prepare   here, with Rust: builds kiln, the guests, the models and
#                                    the GPU test binary into build/gpu-check.tar.xz (< 64 MiB)
#   scripts/gpu-check.sh             there, in a copy of this repository with that archive:
#                                    runs the GPU tests (KILN_EXPECT_GPU=1), serves the digits and
#                                    embeddings examples on cuda:0 in fp32, bf16 and auto, checks
#                                    their answers, benchmarks raw libtorch against Kiln end to end
#                                    on ResNet-18 at saturation, and prints one table last.
#
# KILN_GPU_CHECK_DEVICE=cpu runs the second half on the CPU (GPU tests skip): a dry run of the
# script itself on a machine without a GPU. SECONDS_PER_RUN (default 10) sets each load run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="$here/build/gpu-check.tar.xz"

if [ "${1:-}" = "--prepare" ]; then
    source "$here/scripts/env.sh"
    "$here/scripts/setup.sh"
    cd "$here"
    tests=$(cargo test --release -p kiln-tests --test gpu --no-run --message-format=json 2>/dev/null \
        | .venv/bin/python -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/target/release" "$stage/target/wasm32-wasip2/guest" "$stage/build/models" \
        "$stage/build/reference" "$stage/bin"
    strip -o "$stage/target/release/kiln" target/release/kiln
    strip -o "$stage/bin/gpu-tests" "$tests"
    cp target/wasm32-wasip2/guest/{digits,embeddings,misbehave}.wasm "$stage/target/wasm32-wasip2/guest/"
    cp build/models/digits.pt "$stage/build/models/"
    cp -r build/holdout "$stage/build/"
    cp build/reference/embeddings.json "$stage/build/reference/"
    # MiniLM's weights in half precision halve the archive (a frozen trace keeps them as FP32
    # constants, so this trace is not frozen). There they go back to FP32, and the reference
    # embeddings are recomputed from those weights on the CPU.
    .venv/bin/python - "$stage/build/models/minilm-fp16.pt" <<'PY'
import sys
sys.path.insert(0, "examples/export")
import embeddings as export
import torch
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(export.MODEL_DIR)
example = tokenizer(["a short one", "and a somewhat longer example sentence"], padding=True, return_tensors="pt")
with torch.no_grad():
    traced = torch.jit.trace(export.Encoder(AutoModel.from_pretrained(export.MODEL_DIR).eval()),
                             (example["input_ids"], example["attention_mask"]), strict=False)
torch.jit.save(traced.half(), sys.argv[1])
PY
    XZ_OPT=-T0 tar -C "$stage" -cJf "$archive" .
    echo "wrote $archive ($(du -h "$archive" | cut -f1)); carry it to the GPU machine with this repository" >&2
    exit 0
fi

device=${KILN_GPU_CHECK_DEVICE:-cuda:0}
run_s=${SECONDS_PER_RUN:-10}
[ -f "$archive" ] || { echo "missing $archive: run scripts/gpu-check.sh --prepare where Rust is" >&2; exit 1; }
root=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$root"' EXIT
tar -C "$root" -xJf "$archive"
cp -r "$here/examples" "$root/examples"
python=${PYTHON:-python3}
torch_lib=$("$python" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_ROOT="$root" KILN_BIN="$root/target/release/kiln"
kiln="$KILN_BIN"
log="$root/gpu-check.log"
step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

step "preparing models (MiniLM back to FP32 with its CPU reference, ResNet-18 exported)"
"$python" - "$root" <<'PY'
import json, sys, torch
root = sys.argv[1]
model = torch.jit.load(f"{root}/build/models/minilm-fp16.pt").float().eval()
torch.jit.save(model, f"{root}/build/models/minilm.pt")
path = f"{root}/build/reference/embeddings.json"
reference = json.load(open(path))
embeddings = []
with torch.no_grad():
    for ids in reference["input_ids"]:
        ids = torch.tensor([ids])
        mask = torch.ones_like(ids)
        hidden = model(ids, mask)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        embeddings.append(torch.nn.functional.normalize(pooled, p=2, dim=1)[0].tolist())
reference["embeddings"] = embeddings
json.dump(reference, open(path, "w"))
PY
"$python" "$root/examples/export/resnet18.py" "$root/build" >/dev/null

step "devices"
"$kiln" devices | tee "$root/devices.txt"

step "GPU tests (examples on $device in fp32, bf16 and auto)"
expect=1
[ "$device" = cpu ] && expect=0
tests_status=ok
KILN_EXPECT_GPU=$expect KILN_GPU_CHECK_DEVICE=$device "$root/bin/gpu-tests" --test-threads=1 --nocapture 2>&1 | tee "$log" || tests_status=FAILED

step "raw libtorch: ResNet-18 on $device"
cat > "$root/bench.toml" <<TOML
[server]
state_dir = "$root/state"

[[model]]
name = "resnet18"
path = "$root/build/models/resnet18.pt"
device = "$device"
inputs = [{ name = "image", dtype = "FP32", shape = [-1, 3, 224, 224] }]
outputs = [{ name = "logits" }]
batching = { max_batch_size = 64 }
instances = 2
threads = 4

[[tenant]]
name = "bench"
models = ["resnet18"]
quota = { requests_per_second = 1000000, max_concurrent = 4096, max_body_bytes = 4194304 }
TOML
"$kiln" bench-raw -c "$root/bench.toml" --model resnet18 --device "$device" --batch-sizes 1,8,32,64 \
    --duration 3s --json > "$root/raw.json"

step "Kiln end to end: ResNet-18 over OIP (binary tensors), concurrency 128"
"$python" - "$root/body.bin" <<'PY'
import json, random, struct, sys
random.seed(7)
n = 3 * 224 * 224
data = struct.pack(f"<{n}f", *(random.random() for _ in range(n)))
header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                 "parameters": {"binary_data_size": len(data)}}],
                     "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
open(sys.argv[1], "wb").write(header + data)
open(sys.argv[1] + ".len", "w").write(str(len(header)))
PY
export KILN_KEY=$("$kiln" tenant add-key bench -c "$root/bench.toml" 2>/dev/null)
export KILN_ADMIN_KEY=$("$kiln" admin add-key -c "$root/bench.toml" 2>/dev/null)
"$kiln" serve -c "$root/bench.toml" --listen 127.0.0.1:18090 --admin-listen 127.0.0.1:18091 --grpc-listen off > "$root/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do
    "$python" -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:18090/v2/health/ready")' \
        2>/dev/null && break
    sleep 0.2
done
"$kiln" bench --url http://127.0.0.1:18090 --model resnet18 --body "$root/body.bin" \
    --content-type application/octet-stream \
    --header "Inference-Header-Content-Length: $(cat "$root/body.bin.len")" \
    --concurrency 128 --duration "${run_s}s" --json > "$root/e2e.json"
kill "$server"; wait "$server" 2>/dev/null || true

"$python" - "$root" "$device" "$tests_status" "$run_s" <<'PY'
import json, re, sys
root, device, tests, run_s = sys.argv[1:]
raw = json.load(open(f"{root}/raw.json"))
e2e = json.load(open(f"{root}/e2e.json"))
log = open(f"{root}/gpu-check.log").read()
gpu = open(f"{root}/devices.txt").read().strip().splitlines()
best = max(raw, key=lambda r: r["rows_per_second"])
checks = dict(re.findall(r"gpu-check (\w+): (.*)", log))
batching = next(iter(e2e["server_batching"].values()), {})
rows = [
    ("device", " | ".join(gpu)),
    ("GPU tests", tests + "".join(f" ({p} passed, {f} failed)" for p, f in re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", log))
                  + (" (skipped: no GPU)" if "skipped: no GPU" in log else "")),
]
for precision in ("fp32", "bf16", "auto"):
    rows.append((f"examples on {device}, {precision}", checks.get(precision, "not run (no GPU)")))
rows += [
    ("ResNet-18 raw libtorch", f"{best['rows_per_second']:.0f} img/s at batch {best['batch_size']} "
                               f"({best['forward_ms']:.2f} ms per forward)"),
    ("ResNet-18 Kiln end to end", f"{e2e['throughput_rps']:.0f} req/s, p50 {e2e['latency_ms']['p50']:.1f} ms, "
                                  f"p99 {e2e['latency_ms']['p99']:.1f} ms, avg batch {batching.get('average_batch_size', 0):.1f}, "
                                  f"errors {sum(e2e['errors'].values())}"),
    ("Kiln / raw", f"{e2e['throughput_rps'] / best['rows_per_second']:.2f} (c=128, {run_s} s)"),
]
width = max(len(k) for k, _ in rows)
print()
print(f"{'check':<{width}}  result")
for k, v in rows:
    print(f"{k:<{width}}  {v}")
PY
[ "$tests_status" = ok ]
