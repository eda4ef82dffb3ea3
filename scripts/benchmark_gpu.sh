#!/usr/bin/env bash
# The GPU benchmark set of BENCHMARKS.md, in one go (made for a time-boxed GPU session):
#
#   bash scripts/benchmark_gpu.sh [OUT_DIR]
#
# 1. a quick check that JAX sees the GPU and the model runs (fails fast otherwise);
# 2. the train step, Swin-Base, bf16, batch 128: XLA's window attention and the Pallas
#    kernels in one process (same weights), against PyTorch (autocast) on the same card;
# 3. the train step with the Pallas kernels at batch 32 and 64, against PyTorch;
# 4. inference, Swin-Base, bf16, batch 128: XLA and Pallas, against PyTorch;
# 5. window attention alone, XLA against the Pallas kernels with a sweep of their launch
#    settings (scripts/benchmark_attention.py).
# Parts 1-4 take about 9.5 minutes on an H200 (building Swin-Base and its PyTorch twin
# takes about a minute, compiling its train step about 70 s per batch size and
# attention), so they fit one 10-minute device call; part 5 runs in whatever time is
# left. The next open question is where the step with the Pallas kernels spends its
# time (BENCHMARKS.md, fourth GPU session); for that, one call of about 3 minutes:
#   python scripts/profile_step.py --variant base --batches 128 --attention pallas --out OUT
# and then XLA's GPU options, one 10-minute call: bash scripts/benchmark_gpu_flags.sh OUT.
# Each part has its own time limit and writes its JSON as rows come in, so a run cut
# short keeps what it measured. Earlier figures (tiny, fp32) came from
# `benchmark.py --variants tiny base --batches 32 128 --dtype bfloat16` and
# `benchmark.py --variants base --batches 32 --dtype float32`.
set -u
mkdir -p "${1:-benchmark_gpu}"
out=$(cd "${1:-benchmark_gpu}" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX and PyTorch share the card: let each allocate what it needs instead of JAX taking 75%.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'EOF' || exit 1
import jax, jax.numpy as jnp, flax, optax, torch, timm
from flax import nnx
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__,
      '| torch', torch.__version__, torch.cuda.is_available(), '| timm', timm.__version__)
assert jax.devices()[0].platform == 'gpu', 'JAX does not see the GPU'
model = SmartIQA(ModelConfig('nano', dtype='bfloat16'), rngs=nnx.Rngs(0))
print('nano bf16 forward:', model.predict(jnp.zeros((2, 224, 224, 3)))['score'])
EOF

bench() {  # seconds, json name, benchmark.py arguments...
    local limit=$1 name=$2
    shift 2
    echo "== benchmark.py $* (limit ${limit}s)"
    timeout "$limit" python3 scripts/benchmark.py --json "$out/$name.json" "$@" \
        || echo "== ended with status $? (124: time limit)"
}
bench 270 train_b128 --train --variants base --batches 128 --dtype bfloat16 --attention xla pallas \
    --min-seconds 3
bench 200 train_pallas --train --variants base --batches 32 64 --dtype bfloat16 --attention pallas \
    --min-seconds 3
bench 100 infer_b128 --variants base --batches 128 --dtype bfloat16 --attention xla pallas \
    --min-seconds 2
echo "== benchmark_attention.py (limit 120s)"
timeout 120 python3 scripts/benchmark_attention.py --variant base --batch 128 --impls xla pallas \
    --pallas-windows 4 64 --pallas-warps 8 --json "$out/attention.json" || echo "== ended with status $?"
