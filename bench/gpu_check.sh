#!/usr/bin/env bash
# One prepared command for a lent H100/H200 (Python 3.12, torch 2.11, Triton 3.6 preinstalled,
# no network): CUDA correctness of the fused Triton path, then the benchmark table.
# Budget: under 10 minutes (BUDGET below: each section's timeout is cut to what is left).
# Usage, from the repository root:  bash bench/gpu_check.sh
# Optional peers: put wheels in bench/wheels/ first (pip download zennit==0.5.1 --no-deps -d
# bench/wheels) and carry that folder along; they are installed offline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py would default to the interpreter)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"

# rlrp_fast without installing anything: a copy of the tree with kernels/ placed where the
# package expects it (rlrp_fast.kernels); the C++ extension is not needed on CUDA.
work=$(mktemp -d)
tar --exclude=.git --exclude=.venv --exclude='*.so' -cf - . | tar -xf - -C "$work"
cp -r kernels "$work/rlrp_fast/kernels"
cd "$work"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
if ls bench/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index --target "$work/_peers" bench/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$work/_peers" || echo "peer wheels: install failed"
fi

# Every section's timeout is cut to what is left of BUDGET (the device tool allows 600 s a
# command): correctness first, then the per-kernel timings, then the model tables.
BUDGET=${GPU_CHECK_BUDGET:-560}
limit() {  # min(wanted seconds, what is left of the budget), at least 5
  local left=$((BUDGET - (SECONDS - start)))
  (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"
}
TESTS="env RLRP_TRITON_AUTOTUNE=0 RLRP_FAST_NO_JIT=1"  # no C++ build here (excluded)
BENCH="env RLRP_TRITON_AUTOTUNE=0"  # the first config of each kernel: one compile each

echo "== correctness on CUDA ($((SECONDS - start)) s)"
# the per-primitive tests' Triton cases (-k triton: their torch and cpp cases are CPU-only and
# run everywhere)
$TESTS timeout "$(limit 100)" $PY -m pytest -q -x -p no:cacheprovider \
  -k triton tests/test_affine_relevance.py tests/test_affine_relevance_l1.py 2>&1 | tail -12
echo "per-primitive correctness exit: ${PIPESTATUS[0]}"
$TESTS timeout "$(limit 160)" $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_triton_kernels.py tests/test_cuda_explainer.py tests/test_affine_forward_abs.py \
  2>&1 | tail -20
echo "correctness exit: ${PIPESTATUS[0]}"
# attention without the (L, S) matrix (~80 kernel variants to compile: dtypes, strides, flags)
$TESTS timeout "$(limit 150)" $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_attention_relevance.py 2>&1 | tail -8
echo "attention correctness exit: ${PIPESTATUS[0]}"

# Per-primitive timings, torch vs triton side by side on real layers (the model tables below
# are autotuned). Each layer's line is printed as it is done, so a timeout keeps the finished
# ones.
for primitive in affine_relevance affine_relevance_l1; do
  echo "== $primitive, batch 32 ($((SECONDS - start)) s)"
  $BENCH timeout "$(limit 40)" $PY -m bench.$primitive --device cuda --batch 32 \
    --suite classic 2>&1 | tail -14
done
# depthwise and grouped layers (EfficientNet-B0, MobileNetV3-L, ConvNeXt-T, RegNetY-800MF):
# the narrow-group kernel, NCHW and channels-last
for run in "affine_relevance_l1" "affine_relevance_l1 --channels-last"; do
  echo "== $run, grouped layers, batch 32 ($((SECONDS - start)) s)"
  $BENCH timeout "$(limit 35)" $PY -m bench.$run --device cuda --batch 32 \
    --suite grouped 2>&1 | tail -19
done
# norm="neuron"'s z and |W||a|: two cuDNN calls vs one packed call vs the fused Triton kernel
echo "== affine_forward_abs, batch 32 ($((SECONDS - start)) s)"
$BENCH timeout "$(limit 40)" $PY -m bench.affine_forward_abs --device cuda --batches 32 \
  --reps 5 2>&1 | tail -32
# materialised vs torch's fused backward vs Triton at ViT-B/16 and long-sequence shapes
echo "== attention_relevance ($((SECONDS - start)) s)"
$BENCH timeout "$(limit 40)" $PY -m bench.attention_relevance --device cuda 2>&1 | tail -16

methods="forward gxi rlrp-torch rlrp-triton neuron-triton"
$PY -c "import zennit" 2>/dev/null && methods="$methods zennit-EpsilonPlus"
for dtype in float32 bfloat16; do
  echo "== table, $dtype ($((SECONDS - start)) s)"
  timeout "$(limit 120)" $PY -m bench --device cuda --dtype "$dtype" --models vgg16 resnet50 \
    --batches 1 32 256 --methods $methods --reps 5 --budget 15 --check-size 64 \
    --json "bench/results_cuda_$dtype.json" 2>&1 | tail -40
done
echo "== done in $((SECONDS - start)) s"
if [ -n "${OUT:-}" ]; then cp bench/results_cuda_*.json "$OUT"/ 2>/dev/null || true; fi
