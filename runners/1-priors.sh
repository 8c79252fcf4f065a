#!/usr/bin/env bash
# Stage 1, CAM priors: ordinary classifier (vanilla + RandAugment + label smoothing) -> P-NOC -> CAM inference ->
# evaluation (SPEC §12.3). Every step is resumable: rerunning the runner skips finished outputs.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/1-priors.sh
#   DATASET=synthetic bash runners/1-priors.sh          # the CPU demo recipe (see runners/demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source runners/config/env.sh
source runners/config/dataset.sh

EID=${EID:-r1}
TAG_OC=${TAG_OC:-vanilla/$DATASET-$ARCH-lr$LR-ls-ra-$EID}
TAG_PNOC=${TAG_PNOC:-pnoc/$DATASET-$ARCH-pnoc-b$BATCH_PNOC-lr$LR-ls@$ARCH-lsra-$EID}
SCALES=${SCALES:-0.5,1.0,1.5,2.0}
EPOCHS_PNOC=${EPOCHS_PNOC:-$EPOCHS}
# The CAM generator starts from ImageNet weights on real data; synthetic has none and starts from the OC's backbone.
if [[ "$DATASET" == synthetic ]]; then CG_WEIGHTS=${CG_WEIGHTS:-experiments/models/$TAG_OC.pth}; fi
CG_WEIGHTS=${CG_WEIGHTS:-$BACKBONE_WEIGHTS}
STAGES=${STAGES:-"vanilla pnoc inference evaluate"}

common=(--dataset "$DATASET" --data_dir "$DATA_DIR" --architecture "$ARCH" --mode normal --dilated false
        --trainable-stem true --image_size "$IMAGE_SIZE" --min_image_size "$MIN_IMAGE_SIZE" --max_image_size "$MAX_IMAGE_SIZE" --lr "$LR" --wd "$WD"
        --optimizer "$OPTIMIZER" --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN"
        --domain_train "$DOMAIN_TRAIN" --domain_valid "$DOMAIN_VALID" --resume true)

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
done_already() { [[ -f "experiments/models/$1.pth" ]] && echo "[skip] experiments/models/$1.pth exists"; }

if has_stage vanilla && ! done_already "$TAG_OC"; then
  $LAUNCH scripts/cam/train_vanilla.py "${common[@]}" --tag "$TAG_OC" --batch_size "$BATCH_OC" \
    --backbone_weights "$BACKBONE_WEIGHTS" --max_epoch "$EPOCHS" --augment "$AUGMENT_OC" --label_smoothing 0.1
fi

if has_stage pnoc && ! done_already "$TAG_PNOC"; then
  $LAUNCH scripts/cam/train_pnoc.py "${common[@]}" --tag "$TAG_PNOC" --batch_size "$BATCH_PNOC" \
    --backbone_weights "$CG_WEIGHTS" --max_epoch "$EPOCHS_PNOC" --accumulate_steps "$ACCUMULATE_PNOC" \
    --label_smoothing 0.1 \
    --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" \
    --alpha 4.0 --alpha_init 0.0 --alpha_schedule 0.5 \
    --oc-alpha 1.0 --oc-alpha-init 0.3 --oc-alpha-schedule 1.0 --oc-strategy random \
    --ow 1.0 --ow-init 0.0 --ow-schedule 1.0 --oc-train-masks cams --oc_train_mask_t 0.2 --oc-train-interval-steps 1
fi

for TAG in $TAG_OC $TAG_PNOC; do
  for DOMAIN in $DOMAIN_VALID; do
    if has_stage inference; then
      $LAUNCH scripts/cam/inference.py --dataset "$DATASET" --data_dir "$DATA_DIR" --domain "$DOMAIN" \
        --architecture "$ARCH" --mode normal --dilated false --tag "$TAG" --scales "$SCALES" \
        --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER"
    fi
    if has_stage evaluate; then
      mkdir -p "experiments/results/$DATASET"
      $PY scripts/evaluate.py --dataset "$DATASET" --data_dir "$DATA_DIR" --domain "$DOMAIN" --mode npy \
        --experiment_name "$TAG@$DOMAIN@scale=$SCALES" --min_th 0.05 --max_th 0.80 --step_th 0.05 \
        --num_workers "$WORKERS_INFER" --json "experiments/results/$DATASET/${TAG//\//_}@$DOMAIN.json"
    fi
  done
done
