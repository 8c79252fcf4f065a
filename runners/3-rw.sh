#!/usr/bin/env bash
# Stage 3, random walk (SPEC §12.5): affinity labels (P-NOC CAMs + PoolNet saliency, label CRF) on $AFF_DOMAIN ->
# AffinityNet trained on them -> random walk of the P-NOC CAMs on $RW_DOMAINS -> evaluation of the RW maps (threshold
# sweep) and of the affinity labels (how much they label, how precisely) -> pseudo masks of $PSEUDO_DOMAINS in one
# folder (threshold, label CRF) -> their evaluation. Resumable like 1-priors.sh.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/3-rw.sh     # after runners/1-priors.sh and 2-saliency.sh
#   DATASET=synthetic bash runners/3-rw.sh                            # the CPU demo recipe (runners/demo.sh)
#   AFF_SALIENCY=false AFF_FG=0.30 AFF_BG=0.05 bash runners/3-rw.sh   # IRN / Puzzle-CAM labels, no saliency stage
#   RW_METHOD=psa bash runners/3-rw.sh                                # PSA's AffinityNet (SEAM/PPC recipe), no saliency
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/pipeline.sh"

STAGES=${STAGES:-"cams affinity-labels affinitynet rw evaluate pseudo-masks"}
require() {  # require PATH STAGE: a missing input names the runner that makes it
  [[ -e "$1" ]] || { echo "error: $1 does not exist; run $2 first" >&2; exit 2; }
}

for DOMAIN in $RW_DOMAINS; do  # the P-NOC CAMs the walk starts from (1-priors.sh made those of $DOMAIN_VALID)
  if has_stage cams; then
    require "experiments/models/$TAG_PNOC.pth" runners/1-priors.sh
    $LAUNCH "$REPO/scripts/cam/inference.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN" \
      --architecture "$ARCH" --mode normal --dilated false --tag "$TAG_PNOC" --scales "$SCALES" \
      --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER" --batch_size "$BATCH_INFER"
  fi
done

method_flags=(--method "$RW_METHOD")  # irn: the CAM thresholds below; psa: la/ha CRF score maps
[[ "$RW_METHOD" == psa ]] && method_flags+=(--alpha_low "$AFF_ALPHA_LOW" --alpha_high "$AFF_ALPHA_HIGH")
if has_stage affinity-labels; then
  sal_flags=()  # AFF_SALIENCY=false: the IRN / Puzzle-CAM recipe, two CAM thresholds and no saliency stage
  crf_flags=(--fg_threshold "$AFF_FG" --bg_threshold "$AFF_BG" --crf_t "$AFF_CRF_T" --crf_gt_prob "$AFF_CRF_GT")
  [[ "$RW_METHOD" == psa ]] && crf_flags=(--crf_t "$AFF_PSA_CRF_T")
  if [[ "$AFF_SALIENCY" == true ]]; then
    require "$(poolnet_of "$AFF_DOMAIN")" runners/2-saliency.sh
    sal_flags=(--sal_dir "$(poolnet_of "$AFF_DOMAIN")")
  fi
  $PY "$REPO/scripts/rw/make_affinity_labels.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$AFF_DOMAIN" \
    --cams_dir "$(cams_of "$TAG_PNOC" "$AFF_DOMAIN")" "${sal_flags[@]}" "${method_flags[@]}" "${crf_flags[@]}" \
    --output "$AFF_LABELS" --num_workers "$WORKERS_INFER"
fi

if has_stage affinitynet && ! done_already "$TAG_AFF"; then
  require "$AFF_LABELS" "runners/3-rw.sh with STAGES=affinity-labels"
  $LAUNCH "$REPO/scripts/rw/train_affinity.py" --tag "$TAG_AFF" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
    --method "$RW_METHOD" --domain "$AFF_DOMAIN" --label_dir "$AFF_LABELS" --architecture "$ARCH_AFF" \
    --backbone_weights "$AFF_WEIGHTS" \
    --image_size "$IMAGE_SIZE_AFF" --min_image_size "$MIN_SIZE_AFF" --max_image_size "$MAX_SIZE_AFF" \
    --batch_size "$BATCH_AFF" --max_epoch "$EPOCHS_AFF" --lr "$LR_AFF" --optimizer "$OPTIMIZER_AFF" \
    --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN" --resume true
fi

walk_flags=(--image_size "$IMAGE_SIZE_AFF")  # irn pads for the boundary map; psa: its background instead
[[ "$RW_METHOD" == psa ]] && walk_flags=(--bg_score "$RW_BG")
for DOMAIN in $RW_DOMAINS; do
  if has_stage rw; then
    $LAUNCH "$REPO/scripts/rw/inference.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN" \
      --method "$RW_METHOD" --model_name "$TAG_AFF" --architecture "$ARCH_AFF" "${walk_flags[@]}" \
      --cam_dir "$(cams_of "$TAG_PNOC" "$DOMAIN")" --beta "$RW_BETA" --exp_times "$RW_EXP" \
      --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER"
  fi
done

pseudo_dir=experiments/predictions/$PSEUDO_MASKS
if has_stage pseudo-masks; then
  rw_dirs=(); for DOMAIN in ${PSEUDO_DOMAINS//,/ }; do rw_dirs+=("$(rw_of "$DOMAIN")"); done
  $PY "$REPO/scripts/rw/make_pseudo_labels.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
    --domains "$PSEUDO_DOMAINS" --rw_dirs "$(IFS=,; echo "${rw_dirs[*]}")" --threshold "$PSEUDO_T" \
    --crf_t "$PSEUDO_CRF_T" --crf_gt_prob "$PSEUDO_CRF_GT" --min_foreground "$PSEUDO_MIN_FG" \
    --output "$pseudo_dir" --num_workers "$WORKERS_INFER"
fi

if has_stage evaluate; then
  # One JSON per row, named after what was scored: affinity labels, RW maps, pseudo masks (on $DOMAIN_VALID's GT).
  mkdir -p "experiments/results/$DATASET"
  json() { echo "experiments/results/$DATASET/$1@$DOMAIN_VALID.json"; }
  evaluate() { $PY "$REPO/scripts/evaluate.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN_VALID" \
    --num_workers "$WORKERS_INFER" "$@"; }
  rows=()
  if [[ "$AFF_DOMAIN" == "$DOMAIN_VALID" ]]; then  # the affinity labels exist on AffinityNet's domain only
    rows+=("$(json "afflabels_${TAG_PNOC//\//_}")")
    evaluate --mode png --pred_dir "$AFF_LABELS" --json "${rows[-1]}"
  fi
  rows+=("$(json "rw_${TAG_AFF//\//_}")")
  evaluate --mode npy --pred_dir "$(rw_of "$DOMAIN_VALID")" "${RW_THRESHOLDS[@]}" --json "${rows[-1]}"
  rows+=("$(json "pseudo_${TAG_AFF//\//_}")")
  evaluate --mode png --pred_dir "$pseudo_dir" --json "${rows[-1]}"
  echo
  echo "Random walk on $DATASET/$DOMAIN_VALID: affinity labels ('labelled (acc)': % of pixels they label, % of those"
  echo "right), RW maps (best threshold of the sweep), pseudo masks (threshold $PSEUDO_T, CRF t=$PSEUDO_CRF_T):"
  $PY "$REPO/tools/summarize_results.py" "${rows[@]}"
fi
