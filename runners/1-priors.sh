#!/usr/bin/env bash
# Stage 1, CAM priors: ordinary classifier (vanilla + RandAugment + label smoothing) -> P-NOC -> CAM inference ->
# evaluation (SPEC §12.3). Every step is resumable: rerunning the runner skips finished outputs.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/1-priors.sh
#   DATASET=synthetic bash runners/1-priors.sh          # the CPU demo recipe (see runners/demo.sh)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/pipeline.sh"

EPOCHS_PNOC=${EPOCHS_PNOC:-$EPOCHS}
# The CAM generator starts from ImageNet weights on real data; synthetic has none and starts from the OC's backbone.
if [[ "$DATASET" == synthetic ]]; then CG_WEIGHTS=${CG_WEIGHTS:-$OC_WEIGHTS}; fi
CG_WEIGHTS=${CG_WEIGHTS:-$BACKBONE_WEIGHTS}
STAGES=${STAGES:-"vanilla pnoc inference evaluate"}

if has_stage vanilla && ! done_already "$TAG_OC"; then
  $LAUNCH "$REPO/scripts/cam/train_vanilla.py" "${cam_common[@]}" --tag "$TAG_OC" --batch_size "$BATCH_OC" \
    --backbone_weights "$BACKBONE_WEIGHTS" --max_epoch "$EPOCHS" --augment "$AUGMENT_OC" --label_smoothing 0.1
fi

if has_stage pnoc && ! done_already "$TAG_PNOC"; then
  $LAUNCH "$REPO/scripts/cam/train_pnoc.py" "${cam_common[@]}" --tag "$TAG_PNOC" --batch_size "$BATCH_PNOC" \
    --backbone_weights "$CG_WEIGHTS" --max_epoch "$EPOCHS_PNOC" --accumulate_steps "$ACCUMULATE_PNOC" \
    --label_smoothing 0.1 --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" \
    "${pnoc_flags[@]}"
fi

results=()
for TAG in $TAG_OC $TAG_PNOC; do
  for DOMAIN in $DOMAIN_VALID; do
    cam_infer_and_evaluate "$TAG" "$DOMAIN"
    results+=("$(result_json "$TAG" "$DOMAIN")")
  done
done

if has_stage evaluate; then
  echo
  echo "CAM mIoU on $DATASET/$DOMAIN_VALID ($ARCH; best background threshold of the sweep, chosen on this split's GT):"
  $PY "$REPO/tools/summarize_results.py" "${results[@]}"
fi
