#!/usr/bin/env bash
# The full-size offline quality benchmark on a lent GPU: 200 mosaics and 200 images of the test
# split, RISE 4000 masks, Meaningful Perturbation 300 steps, which take hours on the 2-core CPU.
#
# The images (54 MB) and the converted Lite0 weights (17 MB) exceed one call's 64 MiB carry,
# so they go in two calls on the same warm machine (paths a call does not carry stay there):
#   here:   mkdir -p build/device_data && cp -r ../shared/data/imagenet-samples build/device_data/
#   call 1: run `true`, carry build/device_data
#   call 2: run `bash experiments/quality/gpu_offline.sh`, carry build/device (see gpu_session.sh)
# Scores are stored per item after every batch, so a call cut by its time limit is resumed
# by running call 2 again (without a carry, so nothing on the machine is replaced).
#
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
D=$PWD/build/device
export PYTHONPATH=$PWD:$D/pkgs GFI_JAX_CACHE=$D/cache
DATA=${DATA:-$PWD/build/device_data/imagenet-samples}
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
ls "$DATA" | wc -l
t0=$SECONDS
# Fills the committed per-item store (experiments/results/quality/) on the test split at the
# full settings; a call cut by its limit resumes where it stopped. Copy the store back with $OUT.
timeout "$LIMIT" python -m experiments.quality.offline_benchmark --split test --data "$DATA" \
  --batch "${BATCH:-64}" --rise-masks "${RISE:-4000}" --mp-steps "${MP:-300}" \
  --store "$PWD/experiments/results/quality" --out "$OUT/quality_test.md" >"$OUT/offline.log" 2>&1
echo "== offline_benchmark: exit $? after $((SECONDS - t0)) s (limit $LIMIT s)"
cp -r experiments/results/quality "$OUT/store"
grep -v "^W1\|^I1" "$OUT/offline.log" | tail -40
exit 0
