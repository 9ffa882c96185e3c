#!/usr/bin/env bash
# The full-size offline quality benchmark (issue 7) on a lent GPU: the script's defaults (200
# mosaics, 300 images, RISE 4000 masks, Meaningful Perturbation 300 steps), which take hours
# on the project's 2-core CPU.
#
# The images (54 MB) and the converted Lite0 weights (17 MB) exceed one call's 64 MiB carry,
# so they go in two calls on the same warm machine (paths a call does not carry stay there):
#   here:   mkdir -p build/device_data && cp -r ../shared/data/imagenet-samples build/device_data/
#   call 1: run `true`, carry build/device_data
#   call 2: run `bash experiments/gpu_offline.sh`, carry build/device (see gpu_session.sh)
# Saliency maps are cached in build/device_cache, so a call cut by its time limit is resumed
# by running call 2 again (without a carry, so nothing on the machine is replaced).
#
#   SMALL=1 OUT=/tmp/o bash experiments/gpu_offline.sh   # a quick dry run here (CPU)
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
D=$PWD/build/device
export PYTHONPATH=$PWD:$D/pkgs GFI_JAX_CACHE=$D/cache
DATA=${DATA:-$PWD/build/device_data/imagenet-samples}
if [ "${SMALL:-0}" = 1 ]; then
  A=(--mosaics 2 --images 2 --rise-masks 100 --mp-steps 3 --smoothgrad-samples 2 --ig-steps 2
     --steps 4 --randomization-images 1 --randomization-every 30 --stability-images 1
     --figure-images 2 --batch 2)
  LIMIT=${LIMIT:-600}
else
  A=(--batch 64 --randomization-images 8 --stability-images 8)
  LIMIT=${LIMIT:-560}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
ls "$DATA" | wc -l
t0=$SECONDS
timeout "$LIMIT" python experiments/offline_benchmark.py --data "$DATA" "${A[@]}" \
  --gfi 'GFI contrastive:preset=contrastive' --stability-presets detached_lite0,contrastive_lite0,contrastive \
  --cache "$PWD/build/device_cache" --out "$OUT/offline_benchmark.md" \
  --figure "$OUT/offline_benchmark.png" >"$OUT/offline.log" 2>&1
echo "== offline_benchmark: exit $? after $((SECONDS - t0)) s (limit $LIMIT s)"
grep -v "^W1\|^I1" "$OUT/offline.log" | tail -40
exit 0
