#!/usr/bin/env bash
# The one script to run on a machine with an NVIDIA GPU (H100/H200 image: torch, triton, transformers, peft,
# pybind11 and ninja preinstalled, no network):
#   bash benchmarks/device_check.sh RESULTS_DIR
# Installs curvsafe without touching the preinstalled stack, runs the optimizer's GPU tests and its step-time
# benchmark (CurvSafe(AdamW) / AdamW on a synthetic bf16 Llama), the LLM-scale benchmark (Llama-3.2-1B in full,
# Llama-3-8B with 8 of its 32 layers: peak memory, curvature memory and time per restore iteration / optimizer
# step against `curvsafe plan`), the kernel tests natively on the GPU (bf16 included; one fixed Triton config per
# kernel) with the count of the curvature passes' synchronisations (CUDA's sync debug mode), then the autotuned kernel benchmark (each op against the best plain-PyTorch formulation at the same
# input precision), which rewrites its table after every row, and writes everything into RESULTS_DIR; the peers
# benchmark (kronfluence, curvlinops) runs where the image has them; then the step time of the guarded recipe
# (benign side, screening, rescale) and, last, example screening's own cost per step. Each step has its own timeout
# (17 minutes in all, plus the install); the device session has 15, so the last steps are the ones a slow machine
# may cut short.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/device_check.sh RESULTS_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== install"
if ! timeout 240 $PY -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1; then
  # old pips route `-e` through an isolated build that needs the network: run from the source tree instead
  echo "pip install failed (install.log); using the source tree (curvsafe/kernels -> kernels/)"
  ln -sfn ../kernels curvsafe/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== optimizer GPU tests"
CURVSAFE_TRITON_AUTOTUNE=0 timeout 90 $PY -m pytest -q tests/test_optim.py -k "cuda or trainer" -p no:cacheprovider 2>&1 | tee "$OUT/optim_tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== optimizer step time"
timeout 150 $PY benchmarks/optimizer.py --out "$OUT" --timing-only --model large --steps 100 --repeats 3 2>&1 | tee "$OUT/optimizer.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== LLM scale (plan against measured)"
timeout 110 $PY benchmarks/scale.py --out "$OUT" --device cuda --shapes llama-3.2-1b --targets all --layers 16 \
  --batch-size 8 --seq-len 512 --error-batches 4 --tag _1b 2>&1 | tee "$OUT/scale_1b.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 100 $PY benchmarks/scale.py --out "$OUT" --device cuda --shapes llama-3-8b --targets all --layers 8 \
  --batch-size 8 --seq-len 512 --error-batches 0 --kinds train,kfac,ekfac,lbfgs,curvsafe --tag _8b_8layers 2>&1 \
  | tee "$OUT/scale_8b.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== peers (kronfluence, curvlinops: only where the image has them)"
if $PY -c "import kronfluence, curvlinops" 2>/dev/null; then
  timeout 90 $PY benchmarks/peers.py --out "$OUT" --device cuda --repeats 3 --no-peaks 2>&1 | tee "$OUT/peers.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "kronfluence or curvlinops not importable here: skipped" | tee "$OUT/peers.log"
fi

echo "== GPU kernel tests"
CURVSAFE_TRITON_AUTOTUNE=0 timeout 150 $PY -m pytest -q --maxfail=25 tests/test_kernels.py tests/test_device_waits.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmark"
timeout 150 $PY benchmarks/kernels.py --out "$OUT" --device cuda --repeats 10 2>&1 | tee "$OUT/benchmark.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== optimizer step time, the guarded recipe (benign side, screen 0.05, rescale 2: the demo's guarded row)"
timeout 120 $PY benchmarks/optimizer.py --out "$OUT" --timing-only --model large --steps 100 --repeats 2 --benign-side \
  --screen 0.05 --rescale 2 2>&1 | tee "$OUT/optimizer_recipe.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== example screening's cost per step (capture and step, against a LoRA training step)"
timeout 60 $PY benchmarks/screen.py --out "$OUT" --device cuda --repeats 3 2>&1 | tee "$OUT/screen.log" | tail -6
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit $status
