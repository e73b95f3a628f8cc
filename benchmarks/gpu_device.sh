#!/usr/bin/env bash
# The one prepared call for an offline CUDA machine (BENCHMARKS.md, "GPU check"): installs the
# carried wheels, runs benchmarks/gpu_check.py, then the checks only a GPU can make (the CUDA
# tests, strict determinism of the built-in GPT, an fp16 cohort), and packs every output.
#   bash benchmarks/gpu_device.sh COMMIT OUT_DIR      (wheels in .whl/, see BENCHMARKS.md)
set -uo pipefail
commit=${1:?usage: gpu_device.sh COMMIT OUT_DIR}
out=${2:?usage: gpu_device.sh COMMIT OUT_DIR}
mkdir -p "$out" /tmp/gc
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

timeout 290 python3 benchmarks/gpu_check.py --out /tmp/gc --commit "$commit" >"$out/log.txt" 2>&1
echo "gpu_check exit $?" | tee -a "$out/log.txt"

{
    echo "== CUDA tests"
    timeout 90 python3 -m pytest -p no:cacheprovider -q -k cuda tests/test_streams.py 2>&1 | tail -5
    echo "== gpt under strict determinism on CUDA"
    timeout 60 python3 - <<'PY' 2>&1 | tail -5
import os
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
from dml_cluster.models import build_model
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
model = build_model("gpt", (64,), 257, n_layer=2, n_head=2, n_embd=64).cuda()
x = torch.randint(0, 257, (4, 64), device="cuda")
for precision in (None, torch.bfloat16):
    with torch.autocast("cuda", dtype=precision or torch.float32, enabled=precision is not None):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 257), x.reshape(-1))
    loss.backward()
    print("gpt strict", precision or "fp32", "forward+backward ok, loss", round(loss.item(), 4))
PY
    echo "== fp16 cohort (GradScaler, unscaled before clipping) on CUDA, one process, 30 steps"
    timeout 90 python3 -m dml_cluster train configs/digits-dml.yaml --set run.out_dir=/tmp/fp16 \
        --set run.precision=fp16 --set optim.grad_clip=1.0 --set train.max_steps=30 \
        --set metrics.enabled=false \
        --set checkpoint.enabled=false 2>&1 | grep -v "^|" | tail -4
} >"$out/extra.txt" 2>&1
cat "$out/extra.txt"
tar czf "$out/gc.tgz" -C /tmp gc
cat /tmp/gc/summary.md 2>/dev/null
