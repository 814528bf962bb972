#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, on a bare H100/H200 machine without internet access, in about 5 minutes.
#
#   benchmarks/fetch_gpu_wheels.sh     # once, where PyPI is reachable: the missing packages as wheels, into .whl/
#   benchmarks/gpu_check.sh            # on the GPU machine, from a copy of the repository holding .whl/
#
# Installs the wheels into /tmp/site (no network, no dependency resolution), then runs, each step under its own
# time budget so that one slow or failing step cannot eat the others': the torchvision decoder's tests on the GPU
# (nvjpeg against PIL); the engine against its floor for three models in bf16 and float32 at batch 128, with peak
# memory; the worker loop against the engine alone for vit_base_patch16_224 bf16 with 16 PIL decoder threads; the
# PIL and torchvision (nvjpeg) decoders alone and in the worker loop. Tables go to stdout and, with JSON rows,
# under $OUT (a new temporary folder when OUT is unset). Ray is neither installed nor imported.
#
# Environment: PYTHON (python3), WHEELS (.whl; without wheels the installed packages are used), and for a quick
# rehearsal on a small machine MODELS, MODEL, BATCH, IMAGES, PER_SHARD, THREADS, DTYPES (the engine's), DTYPE (the
# worker loop's) (defaults: the GPU figures).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
MODELS=${MODELS:-vit_small_patch16_224 vit_base_patch16_224 vit_small_patch8_224}
MODEL=${MODEL:-vit_base_patch16_224}
BATCH=${BATCH:-128}
IMAGES=${IMAGES:-3072}
PER_SHARD=${PER_SHARD:-512}
THREADS=${THREADS:-16}
DTYPES=${DTYPES:-bfloat16 float32}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT:-$(mktemp -d /tmp/daam-gpu-check-XXXXXX)}
WORK=$(mktemp -d /tmp/daam-gpu-work-XXXXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$REPO
else
  echo "no wheels in $WHEELS (benchmarks/fetch_gpu_wheels.sh makes them): using the installed packages"
  export PYTHONPATH=$REPO
fi

cat >"$WORK/environment.py" <<'PYTHON'
import importlib.metadata as m
import sys

import pipeline.worker  # noqa: F401  the per-GPU worker loop must not need Ray
import torch

assert "ray" not in sys.modules, "importing pipeline.worker imported ray"
names = ["torch", "torchvision", "timm", "pillow", "numpy", "pyarrow", "zarr", "pydantic"]
print("python", sys.version.split()[0], "|", ", ".join(f"{n} {m.version(n)}" for n in names))
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
print("device:", card, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("pipeline.worker imports without ray")
PYTHON

RESULTS=()
began=$(date +%s)
step() {  # step NAME BUDGET_S COMMAND...: run COMMAND, stopped after BUDGET_S seconds
  local name=$1 budget=$2 start rc
  shift 2
  echo
  echo "=== $name (budget $budget s)"
  start=$(date +%s)
  timeout --kill-after=15 "$budget" "$@"
  rc=$?
  RESULTS+=("$(printf '%-64s rc=%-3s %4d s' "$name" "$rc" $(($(date +%s) - start)))")
}

nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
step "environment" 60 "$PY" "$WORK/environment.py"
step "decoder tests on this device (nvjpeg vs PIL)" 90 "$PY" -m pytest -q tests/data/test_data_gpu_decode.py
for model in $MODELS; do
  # shellcheck disable=SC2046  # one --dtype per word of DTYPES
  step "engine vs floor: $model" 80 "$PY" benchmarks/engine.py --model "$model" $(printf -- '--dtype %s ' $DTYPES) \
    --batch "$BATCH" --json-out "$OUT/engine-$model.json"
done
step "worker loop vs engine: $MODEL $DTYPE, $THREADS PIL threads" 120 "$PY" benchmarks/worker.py --model "$MODEL" \
  --dtype "$DTYPE" --batch "$BATCH" --images "$IMAGES" --per-shard "$PER_SHARD" --decode-threads "$THREADS" \
  --overlap auto --overlap sequential --workdir "$WORK"
step "evaluation with and without perturbation: $MODEL" 120 "$PY" benchmarks/evaluation.py --model "$MODEL" \
  --batch 16 --rounds 2 --json-out "$OUT/evaluation-$MODEL.json"
step "decoders: PIL x$THREADS vs torchvision" 150 "$PY" benchmarks/decoders.py --model "$MODEL" --dtype "$DTYPE" \
  --batch "$BATCH" --images "$IMAGES" --per-shard "$PER_SHARD" --pil-threads "$THREADS" --workdir "$WORK"

echo
echo "=== summary: $(($(date +%s) - began)) s; tables above; files in $OUT"
printf '%s\n' "${RESULTS[@]}"
rm -rf "$WORK"
