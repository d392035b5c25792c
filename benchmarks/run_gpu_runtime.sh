#!/usr/bin/env bash
# The GPU check of the memory benchmarks, as one prepared script (needs jax with CUDA on a machine with a GPU).
#
#   bash benchmarks/run_gpu_runtime.sh [OUT_DIR]      # default benchmarks/results
#
# Writes runtime_gpu.{json,csv,md,png} (memory_stats()["peak_bytes_in_use"] of 2 real steps per variant, each in a
# fresh process with preallocation off, plus a device memory profile per variant under runtime_profiles_gpu/) and
# variants_gpu.* (XLA's compile-time figures on the GPU backend) beside the CPU results.
set -euo pipefail
out_dir="${1:-benchmarks/results}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; b = jax.default_backend(); assert b == 'gpu', f'no GPU backend (got {b}: {jax.devices()})'; print(jax.devices())"
python -m benchmarks.memory --experiment=runtime --out_dir="$out_dir"
python -m benchmarks.memory --experiment=variants --out_dir="$out_dir"
