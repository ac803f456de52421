#!/usr/bin/env bash
# GPU checks for a machine with one NVIDIA GPU, in one short run (typically ~5 min; every step
# is capped by `timeout`: 90 + 110 + 150 + 150 s, ~8.5 min in the worst case):
#
#   bash benchmarks/gpu.sh                 # results under runs/gpu/
#   OUT=/tmp/gpu PY=/opt/venv/bin/python bash benchmarks/gpu.sh
#
#   (a) incremental step vs full recompute on cuda, batch 1/64/256, history 64/256
#       (benchmarks/step.py --device cuda)                             -> $OUT/step_gpu.json
#   (b) FAISS GPU flat search (GpuIndexFlatIP) over 1M items, d = 64: QPS at batch 1/64/1024
#       and recall@100 against the CPU flat index on a sample of queries -> $OUT/faiss_gpu.json
#   (c) the service with the model on the GPU: benchmarks/echo.py with SESSIONREC_DEVICE=cuda
#       (service vs a bare FastAPI echo; its start_everything passes the environment on to
#       `sessionrec serve`)                                            -> $OUT/echo_gpu.json
#       and benchmarks/serve.py as it is (batched vs unbatched)        -> $OUT/serve_gpu.json
#       LIMITATION: serve.py drops inherited SESSIONREC_* variables and pins
#       SESSIONREC_DEVICE=cpu for its servers, so serve_gpu.json measures the CPU path on this
#       machine's cores, not the GPU; echo_gpu.json is the GPU figure for the service.
#   then a summary table of whatever JSON files the steps wrote.
#
# Every step checks what it needs and says why it is skipped; a failed step is reported and the
# next one runs. Exit status: 0 when every step ran, 1 when any failed, 2 without a GPU.
# Note: the project's default venv installs torch from the CPU index and faiss-cpu; for (a) and
# (c) PY must be a Python whose torch has CUDA (e.g. the image of docker-compose.gpu.yml), and
# (b) needs a faiss build with GPU support.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu}"
PY="${PY:-.venv/bin/python}"
FAILED=()
SKIPPED=()

say() { printf '\n=== %s\n' "$*"; }

step() {  # step NAME TIMEOUT_S CMD...: run CMD under a timeout; report, never abort
    # SIGINT first: the benchmarks clean up on KeyboardInterrupt (they stop the servers and the
    # redis-server they started); SIGKILL 20 s later if that hangs.
    local name=$1 limit=$2 rc=0
    shift 2
    say "$name (at most ${limit} s)"
    timeout --signal=INT --kill-after=20 "$limit" "$@" || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "!!! $name: timed out after ${limit} s"
        FAILED+=("$name")
    elif [[ $rc -ne 0 ]]; then
        echo "!!! $name: failed with exit code $rc"
        FAILED+=("$name")
    fi
}

# ----------------------------------------------------------------------------- prerequisites
if [[ ! -x "$PY" ]]; then
    echo "no Python at $PY: create the venv (make install) or set PY=/path/to/python" >&2
    exit 1
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "nvidia-smi cannot see a GPU (driver not loaded, or no device visible here)" >&2
    exit 2
fi
mkdir -p "$OUT"
START=$SECONDS

say "GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu \
    --format=csv
nvidia-smi -L

TORCH_CUDA=0
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
    TORCH_CUDA=1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          "device", torch.cuda.get_device_name(0))'
else
    echo "torch in $PY cannot use CUDA ($("$PY" -c 'import torch; print(torch.__version__)' \
        2>/dev/null || echo 'torch not importable')): steps (a) and (c)-echo are skipped;" \
        "set PY to a Python with a CUDA build of torch"
fi

# ----------------------------------------------------------------------------- (a) step
if [[ $TORCH_CUDA -eq 1 ]]; then
    step "(a) step vs recompute on cuda" 90 \
        "$PY" benchmarks/step.py --device cuda --batches 1 64 256 --histories 64 256 \
        --out "$OUT/step_gpu.json"
else
    SKIPPED+=("(a) step: no CUDA torch")
fi

# ----------------------------------------------------------------------------- (b) FAISS GPU
FAISS_GPU=0
if "$PY" -c 'import sys, faiss
sys.exit(0 if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else 1)' \
    2>/dev/null
then
    FAISS_GPU=1
fi
if [[ $FAISS_GPU -eq 1 ]]; then
    step "(b) FAISS GPU flat, 1M x 64" 110 "$PY" - "$OUT/faiss_gpu.json" <<'EOF'
import json, sys, time
from pathlib import Path

sys.path.insert(0, ".")
import faiss
import numpy as np

from benchmarks.ann import clustered

N, D, K, SAMPLE = 1_000_000, 64, 100, 256
rng = np.random.default_rng(0)
t0 = time.perf_counter()
data = clustered(N + 2048, D, 1000, rng)  # the same generator as benchmarks/ann.py
xb, xq = data[:N], data[N:]
print(f"data: {N} x {D} in {time.perf_counter() - t0:.1f} s", flush=True)

res = faiss.StandardGpuResources()
gpu = faiss.GpuIndexFlatIP(res, D)
t0 = time.perf_counter()
gpu.add(xb)
add_s = time.perf_counter() - t0
cpu = faiss.IndexFlatIP(D)
cpu.add(xb)

qps = {}
for batch, calls in ((1, 500), (64, 100), (1024, 20)):
    gpu.search(xq[:batch], K)  # warm-up
    t0 = time.perf_counter()
    for i in range(calls):
        start = (i * batch) % (len(xq) - batch + 1)
        gpu.search(xq[start : start + batch], K)
    qps[str(batch)] = round(batch * calls / (time.perf_counter() - t0), 1)
    print(f"GPU flat batch {batch:4d}: {qps[str(batch)]:12,.0f} QPS", flush=True)

t0 = time.perf_counter()
_, exact = cpu.search(xq[:SAMPLE], K)
cpu_qps = SAMPLE / (time.perf_counter() - t0)
_, got = gpu.search(xq[:SAMPLE], K)
recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, exact, strict=True)]))
print(f"recall@{K} GPU vs CPU flat on {SAMPLE} queries: {recall:.4f}; "
      f"CPU flat batch {SAMPLE}: {cpu_qps:,.0f} QPS ({faiss.omp_get_max_threads()} threads)")
out = {"n": N, "d": D, "k": K, "faiss": faiss.__version__, "gpu_add_s": round(add_s, 2),
       "gpu_qps": qps, f"recall_at_{K}_vs_cpu_flat": round(recall, 4), "recall_sample": SAMPLE,
       f"cpu_flat_qps_batch_{SAMPLE}": round(cpu_qps, 1),
       "cpu_threads": faiss.omp_get_max_threads()}
Path(sys.argv[1]).write_text(json.dumps(out, indent=2) + "\n")
EOF
else
    say "(b) FAISS GPU flat"
    echo "faiss has no GPU support in this venv (faiss-cpu, or no GPU visible to faiss):" \
        "step (b) skipped; install a faiss GPU build to run it"
    SKIPPED+=("(b) FAISS: no GPU faiss")
fi

# ----------------------------------------------------------------------------- (c) service
if [[ $TORCH_CUDA -eq 1 ]]; then
    step "(c) service on cuda vs bare FastAPI echo (echo.py)" 150 \
        env SESSIONREC_DEVICE=cuda "$PY" benchmarks/echo.py --requests 2000 \
        --half-load-seconds 5 --rounds 1 --out "$OUT/echo_gpu.json"
else
    SKIPPED+=("(c) echo.py on cuda: no CUDA torch")
fi
echo "note: serve.py pins SESSIONREC_DEVICE=cpu for its servers (it drops inherited" \
    "SESSIONREC_* variables): serve_gpu.json is the CPU path on this machine's cores"
step "(c) batched vs unbatched (serve.py, CPU path)" 150 \
    "$PY" benchmarks/serve.py --requests 2000 --warmup 200 --rounds 1 --sample 50 \
    --full-users 2 --long-users 1 --out "$OUT/serve_gpu.json"

# ----------------------------------------------------------------------------- summary
say "summary ($((SECONDS - START)) s)"
"$PY" - "$OUT" <<'EOF' || echo "!!! could not print the summary"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None


print("| check | figure | value |")
print("|---|---|---|")
if (s := load("step_gpu.json")) is not None:
    for r in s["results"]:
        print(f"| step, cuda, T={r['T']} B={r['B']} | step / full recompute (tokens) ms "
              f"| {r['step_ms']:.3f} / {r['full_tokens_ms']:.3f} ({r['speedup_tokens']:.1f}x, "
              f"target {r['target']:.0f}x) |")
if (f := load("faiss_gpu.json")) is not None:
    for b, q in f["gpu_qps"].items():
        print(f"| FAISS GPU flat {f['n']:,} x {f['d']}, batch {b} | QPS | {q:,.0f} |")
    key = f"recall_at_{f['k']}_vs_cpu_flat"
    print(f"| FAISS GPU flat | recall@{f['k']} vs CPU flat | {f[key]} |")
if (e := load("echo_gpu.json")) is not None:
    m = e["summary"]
    print(f"| service (cuda) vs echo | throughput ratio (target >= 0.5) | {m['service_rps']:,.0f} "
          f"/ {m['echo_rps']:,.0f} req/s = {m['throughput_ratio']} |")
    print(f"| service (cuda) vs echo | p99 ratio at half load (target <= 3) "
          f"| {m['service_half_p99_ms']} / {m['echo_half_p99_ms']} ms = {m['p99_ratio']} |")
if (v := load("serve_gpu.json")) is not None:
    for client, c in v["throughput"]["by_client"].items():
        print(f"| serve.py (CPU path), {client} client | batched / unbatched req/s "
              f"| {c['batched_rps']:,.0f} / {c['unbatched_rps']:,.0f} = {c['ratio']}x |")
EOF

for s in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do echo "skipped: $s"; done
if [[ ${#FAILED[@]} -gt 0 ]]; then
    for f in "${FAILED[@]}"; do echo "FAILED: $f"; done
    exit 1
fi
echo "done: results in $OUT"
