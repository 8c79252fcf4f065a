#!/usr/bin/env bash
# Stage 2, saliency (SPEC §12.4): P-NOC CAMs of $SAL_DOMAIN -> C²AM-H trained with them as hints -> C²AM-H maps ->
# threshold + 2-label CRF masks -> PoolNet trained on those masks -> PoolNet saliency -> evaluation on $DOMAIN_VALID
# (foreground/background IoU, MAE, max F; and CAM mIoU with saliency as background). Resumable like 1-priors.sh.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/2-saliency.sh      # after runners/1-priors.sh
#   DATASET=synthetic bash runners/2-saliency.sh                             # the CPU demo recipe (runners/demo.sh)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/pipeline.sh"

STAGES=${STAGES:-"cams ccamh ccamh-inference crf poolnet poolnet-test evaluate"}

ccam_masks_of() { echo "$(cams_of "$TAG_CCAMH" "$1")@t=$CRF_THRESHOLD@crf=$CRF_T"; }
domains=("$SAL_DOMAIN"); [[ "$DOMAIN_VALID" == "$SAL_DOMAIN" ]] || domains+=("$DOMAIN_VALID")

if has_stage cams; then  # the hints: P-NOC CAMs of the domain C²AM-H trains on
  $LAUNCH "$REPO/scripts/cam/inference.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$SAL_DOMAIN" \
    --architecture "$ARCH" --mode normal --dilated false --tag "$TAG_PNOC" --scales "$SCALES" \
    --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER" --batch_size "$BATCH_INFER"
fi

if has_stage ccamh && ! done_already "$TAG_CCAMH"; then
  $LAUNCH "$REPO/scripts/ccam/train_hints.py" --tag "$TAG_CCAMH" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
    --domain "$SAL_DOMAIN" --domain_valid "$DOMAIN_VALID" --cams_dir "$(cams_of "$TAG_PNOC" "$SAL_DOMAIN")" \
    --architecture "$ARCH_SAL" --stage4_out_features "$STAGE4_SAL" --dilated "$DILATED_SAL" \
    --backbone_weights "$SAL_WEIGHTS" \
    --image_size "$IMAGE_SIZE_SAL" --max_epoch "$EPOCHS_SAL" --batch_size "$BATCH_SAL" \
    --accumulate_steps "$ACCUMULATE_SAL" --lr "$LR_SAL" --optimizer "$OPTIMIZER_SAL" --fg_threshold "$FG_T" \
    --label_smoothing 0.1 --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN" --resume true
fi

for DOMAIN in "${domains[@]}"; do
  if has_stage ccamh-inference; then
    $LAUNCH "$REPO/scripts/ccam/inference.py" --tag "$TAG_CCAMH" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
      --domain "$DOMAIN" --architecture "$ARCH_SAL" --stage4_out_features "$STAGE4_SAL" --dilated "$DILATED_SAL" \
      --scales "$SCALES" \
      --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER"
  fi
  if has_stage crf; then
    $PY "$REPO/scripts/ccam/inference_crf.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN" \
      --pred_dir "$(cams_of "$TAG_CCAMH" "$DOMAIN")" --threshold "$CRF_THRESHOLD" --crf_t "$CRF_T" \
      --crf_gt_prob "$CRF_GT" --num_workers "$WORKERS_INFER"
  fi
done

if has_stage poolnet && ! done_already "$TAG_PN"; then
  $LAUNCH "$REPO/poolnet/train.py" --tag "$TAG_PN" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$SAL_DOMAIN" \
    --sal_dir "$(ccam_masks_of "$SAL_DOMAIN")" --architecture "$ARCH_PN" --backbone_weights "$PN_WEIGHTS" \
    --head_scale "$HEAD_SCALE_PN" --small_side "$SMALL_SIDE_PN" \
    --max_epoch "$EPOCHS_PN" --batch_size "$BATCH_PN" --accumulate_steps "$ACCUMULATE_PN" --lr "$LR_PN" \
    --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN" --resume true
fi

for DOMAIN in "${domains[@]}"; do
  if has_stage poolnet-test; then
    $LAUNCH "$REPO/poolnet/test.py" --tag "$TAG_PN" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN" \
      --architecture "$ARCH_PN" --head_scale "$HEAD_SCALE_PN" --small_side "$SMALL_SIDE_PN" \
      --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER"
  fi
done

if has_stage evaluate; then
  # One JSON per row, named after the model that made the maps: saliency_<tag>@<domain>[+bg=<saliency model>].
  mkdir -p "experiments/results/$DATASET"
  json() { echo "experiments/results/$DATASET/saliency_${1//\//_}@$DOMAIN_VALID${2:-}.json"; }
  evaluate() { $PY "$REPO/scripts/evaluate.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN_VALID" \
    --num_workers "$WORKERS_INFER" "$@"; }
  pnoc_cams=$(cams_of "$TAG_PNOC" "$DOMAIN_VALID")
  rows=("$(json "$TAG_PNOC")" "$(json "$TAG_CCAMH" "@crf=$CRF_T")" "$(json "$TAG_PN")"
        "$(json "$TAG_PNOC" "+bg=${TAG_CCAMH//\//_}")" "$(json "$TAG_PNOC" "+bg=${TAG_PN//\//_}")")
  evaluate --mode saliency --pred_dir "$pnoc_cams" "${SAL_THRESHOLDS[@]}" --json "${rows[0]}"
  evaluate --mode saliency --pred_dir "$(ccam_masks_of "$DOMAIN_VALID")" --json "${rows[1]}"
  evaluate --mode saliency --pred_dir "$(poolnet_of "$DOMAIN_VALID")" "${SAL_THRESHOLDS[@]}" --json "${rows[2]}"
  evaluate --mode npy --pred_dir "$pnoc_cams" --sal_dir "$(ccam_masks_of "$DOMAIN_VALID")" --json "${rows[3]}"
  evaluate --mode npy --pred_dir "$pnoc_cams" --sal_dir "$(poolnet_of "$DOMAIN_VALID")" --json "${rows[4]}"
  echo
  echo "Saliency on $DATASET/$DOMAIN_VALID: 'evaluated' rows score maps as foreground vs background (mIoU of the two"
  echo "classes at the best threshold, fg IoU, MAE, max F); 'bg:' rows are the P-NOC CAMs with that saliency as"
  echo "background (bg = 1 - saliency) instead of a threshold:"
  $PY "$REPO/tools/summarize_results.py" "${rows[@]}"
fi
