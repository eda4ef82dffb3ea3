#!/usr/bin/env bash
# XLA's GPU compiler options against the Swin-Base train step (bf16, Pallas attention),
# one process per setting (XLA reads XLA_FLAGS once, at start-up). Made for one
# 10-minute device call:
#
#   bash scripts/benchmark_gpu_flags.sh [OUT_DIR] [VARIANT] [BATCH]
#
# Defaults: base, batch 128. Each setting builds the model, compiles the step (45-65 s
# for base on an H200) and times it for 3 s; JAX only, so the rows compare with each
# other, not with PyTorch (scripts/benchmark_gpu.sh has that). The question is how much
# of the step's non-matmul time (LayerNorm, GELU, residual adds, bias gradients: about
# half of the step, BENCHMARKS.md "Fourth GPU session") XLA folds into its matmuls when
# told to:
#   baseline             XLA's defaults
#   triton_gemm_any      Triton GEMMs for every dot, so elementwise producers and
#                        consumers can fuse into them
#   no_triton_gemm       cuBLAS for every dot (GEMM fusions off)
#   cudnn_layer_norm     LayerNorm as a cuDNN fused kernel
#   no_command_buffer    CUDA graphs off (what launch overhead they save)
# Each row goes to OUT_DIR/<name>.json as it is measured; a run cut short keeps them.
# On a CPU, `bash scripts/benchmark_gpu_flags.sh OUT pico 16` checks its mechanics (the
# GPU options are accepted and ignored there).
set -u
mkdir -p "${1:-benchmark_gpu_flags}"
out=$(cd "${1:-benchmark_gpu_flags}" && pwd)
variant=${2:-base}
batch=${3:-128}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
dtype=bfloat16
attention=pallas
if ! python3 -c 'import jax, sys; sys.exit(jax.devices()[0].platform != "gpu")'; then
    dtype=float32        # a CPU check: no Pallas kernels, fp32 matmuls
    attention=xla
fi

settings=(
    "baseline="
    "triton_gemm_any=--xla_gpu_triton_gemm_any=true"
    "no_triton_gemm=--xla_gpu_enable_triton_gemm=false"
    "cudnn_layer_norm=--xla_gpu_enable_cudnn_layer_norm=true"
    "no_command_buffer=--xla_gpu_enable_command_buffer="
)
for setting in "${settings[@]}"; do
    name=${setting%%=*}
    flags=${setting#*=}
    echo "== $name: XLA_FLAGS='$flags' (limit 150 s)"
    XLA_FLAGS="$flags" timeout 150 python3 scripts/benchmark.py --train --no-torch \
        --variants "$variant" --batches "$batch" --dtype "$dtype" --attention "$attention" \
        --min-seconds 3 --json "$out/$name.json" \
        || echo "== $name ended with status $? (124: time limit)"
done
python3 - "$out" <<'EOF'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
    for row in json.loads(path.read_text())['rows']:
        rows.append((path.stem, row.get('jax_images_per_s')))
base = dict(rows).get('baseline')
for name, rate in rows:
    ratio = f'{rate / base:.3f}x' if rate and base else '-'
    print(f'{name:20s} {rate if rate else float("nan"):9.1f} img/s  {ratio}')
EOF
