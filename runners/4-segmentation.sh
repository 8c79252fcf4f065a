#!/usr/bin/env bash
# Stage 4, segmentation (SPEC §12.6): DeepLabV3+ trained on a label folder (stage 3's pseudo masks, or the ground
# truth for the fully supervised upper bound) -> multi-scale + flip inference (+ dense CRF) on $SEG_DOMAINS ->
# evaluation of the PNGs against GT on train/val -> the VOC test-server archive. Resumable like 1-priors.sh.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/4-segmentation.sh   # on stage 3's pseudo masks
#   DATASET=voc12 LABEL_NAME=gt bash runners/4-segmentation.sh          # fully supervised upper bound
#   DATASET=synthetic LABEL_NAME=gt bash runners/4-segmentation.sh      # the CPU recipe (~2 min after 1-priors.sh)
# LABEL_NAME names a folder under experiments/predictions/ (the reference's --label_name; default: the pseudo masks
# of runners/3-rw.sh) or gt = ground truth; TAG_SEG carries it, so each label source trains its own model.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/pipeline.sh"  # LABEL_NAME defaults to stage 3's pseudo masks (config/tags.sh)

STAGES=${STAGES:-"train inference evaluate export"}

if [[ "$LABEL_NAME" == gt ]]; then label_flags=(); else label_flags=(--label_name "$LABEL_NAME"); fi
if [[ "$LABEL_NAME" != gt && ! -d "experiments/predictions/$LABEL_NAME" ]]; then
  echo "error: label folder experiments/predictions/$LABEL_NAME does not exist; run runners/3-rw.sh (pseudo masks)" \
    "first, or pass LABEL_NAME=gt" >&2
  exit 2
fi
if [[ "$SEG_WEIGHTS" == *.pth && ! -f "$SEG_WEIGHTS" ]]; then
  echo "error: backbone weights $SEG_WEIGHTS do not exist; run runners/1-priors.sh first (or set SEG_WEIGHTS)" >&2
  exit 2
fi

if has_stage train && ! done_already "$TAG_SEG"; then
  $LAUNCH "$REPO/scripts/segmentation/train.py" --tag "$TAG_SEG" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
    --domain_train "$DOMAIN_TRAIN_SEG" --domain_valid "$DOMAIN_VALID_SEG" "${label_flags[@]}" \
    --architecture "$ARCH_SEG" --backbone_weights "$SEG_WEIGHTS" --mode normal --use_gn "$USE_GN" \
    --dilated "$DILATED_SEG" --seed "$SEED_SEG" \
    --optimizer "$OPTIMIZER_SEG" --lr "$LR_SEG" --wd "$WD_SEG" --max_epoch "$EPOCHS_SEG" --batch_size "$BATCH_SEG" \
    --label_smoothing 0.1 --augment "$AUGMENT_SEG" --image_size "$IMAGE_SIZE_SEG" \
    --min_image_size "$MIN_SIZE_SEG" --max_image_size "$MAX_SIZE_SEG" \
    --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN" --resume true
fi

for DOMAIN in $SEG_DOMAINS; do
  if has_stage inference; then
    $LAUNCH "$REPO/scripts/segmentation/inference.py" --tag "$TAG_SEG" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
      --domain "$DOMAIN" --architecture "$ARCH_SEG" --mode normal --use_gn "$USE_GN" --dilated "$DILATED_SEG" \
      --scale "$SEG_SCALES" \
      --crf_t "$SEG_CRF_T" --crf_gt_prob "$SEG_CRF_GT" --mixed_precision "$MIXED_PRECISION" \
      --num_workers "$WORKERS_INFER"
  fi
done

results=()
for DOMAIN in $SEG_DOMAINS; do
  [[ "$DOMAIN" == test ]] && continue  # no public ground truth: the server scores it (export below)
  results+=("experiments/results/$DATASET/${TAG_SEG//\//_}@$DOMAIN.json")
  if has_stage evaluate; then
    mkdir -p "experiments/results/$DATASET"
    $PY "$REPO/scripts/evaluate.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN" --mode png \
      --pred_dir "$(seg_pred "$DOMAIN")" --crf_t 0 --num_workers "$WORKERS_INFER" --json "${results[-1]}"
  fi
done

if has_stage export && [[ " $SEG_DOMAINS " == *" test "* && "$DATASET" == voc12 ]]; then
  $PY "$REPO/tools/export_voc_test.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain test \
    --pred_dir "$(seg_pred test)"
fi

if has_stage evaluate && (( ${#results[@]} )); then
  echo
  echo "DeepLabV3+ ($ARCH_SEG, trained on $LABEL_NAME) mIoU on $DATASET, PNG predictions against GT:"
  $PY "$REPO/tools/summarize_results.py" "${results[@]}"
fi
