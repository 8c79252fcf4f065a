#!/usr/bin/env bash
# The README's performance figures, one JSON line each, into experiments/benchmarks/<host>.jsonl:
# the evaluation sweep vs plain reading (1,000 VOC-sized CAM files), training steps of the five CAM methods and
# multi-scale CAM inference for resnet18/resnet50 at 128 and 320 px on the CPU, and at the synthetic recipe's 96 px
# with one image per forward pass and with 16 (BATCH_INFER); PPC's overhead on the vanilla and
# SEAM steps (resnet18, 128 px); the saliency stages (C²AM-H step,
# C²AM inference, PoolNet step and test at --head_scale 1 and 0.25, the saliency-mask CRF) for resnet18 at 96 and
# 128 px on the CPU; and, when CUDA is present, ResNeSt-269 at 512 px (C²AM at 448 px) with AMP and channels_last, and
# the projection of the whole VOC pipeline's hours (tools/benchmark.py pipeline).
#   bash runners/benchmark.sh                 # inside an environment with requirements.txt installed
#   EVAL_N=200 SIZES="128" SAL_SIZES="96" bash runners/benchmark.sh   # a quicker pass
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
PY=${PY:-python}
EVAL_N=${EVAL_N:-1000}
WORKERS=${WORKERS:-$(nproc)}
SIZES=${SIZES:-"128 320"}
ARCHS=${ARCHS:-"resnet18 resnet50"}
SAL_SIZES=${SAL_SIZES:-"96 128"}
SAL_ARCHS=${SAL_ARCHS:-"resnet18"}
OUT=${OUT:-experiments/benchmarks/$(hostname).jsonl}
mkdir -p "$(dirname "$OUT")"

bench() { $PY "$REPO/tools/benchmark.py" "$@" | tee -a "$OUT"; }

bench evaluate --n "$EVAL_N" --height 375 --width 500 --classes 3 --workers "$WORKERS" --thresholds 16
for arch in $ARCHS; do
  for size in $SIZES; do
    bench train --architecture "$arch" --size "$size" --batch_size 8 --steps 3 --warmup 1 --device cpu
    bench inference --architecture "$arch" --size "$size" --images 4 --device cpu
  done
done
for batch in 1 16; do
  bench inference --architecture resnet18 --size 96 --batch_size "$batch" --images 4 --device cpu
done
bench ppc --architecture resnet18 --size 128 --views 128,32 --batch_size 8 --steps 7 --device cpu
for arch in $SAL_ARCHS; do
  for size in $SAL_SIZES; do
    bench saliency --architecture "$arch" --size "$size" --batch_size 8 --steps 3 --warmup 1 --head_scale 1 \
      --device cpu
    bench saliency --architecture "$arch" --size "$size" --batch_size 8 --steps 3 --warmup 1 --head_scale 0.25 \
      --stages poolnet_train,poolnet_test --device cpu
  done
done
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  bench train --architecture resnest269 --size 512 --batch_size 16 --steps 10 --device cuda \
    --mixed_precision --channels_last
  bench inference --architecture resnest269 --size 512 --images 16 --device cuda --mixed_precision --channels_last
  bench saliency --architecture resnest269 --size 448 --batch_size 16 --steps 10 --device cuda \
    --mixed_precision --channels_last --stages ccam_train,ccam_inference
  bench saliency --architecture resnet50 --size 320 --batch_size 8 --steps 10 --device cuda \
    --mixed_precision --channels_last --stages poolnet_train,poolnet_test
  # the whole VOC pipeline projected in hours from its stages' rates at the runners' recipe (AMP on)
  bench pipeline --dataset voc12 --device cuda --channels_last --steps 5 --warmup 2
fi
echo "wrote $OUT"
