#!/usr/bin/env bash
# The five CAM methods at equal budget: vanilla, Puzzle-CAM, OC-CSE, P-OC and P-NOC, each trained for the same
# epochs, the OC methods against the vanilla model $TAG_OC (default: the one this run trains); then CAM inference,
# the threshold sweep, and one table. Every method starts from $BACKBONE_WEIGHTS (none = from scratch on synthetic),
# or from CG_WEIGHTS when it is set (e.g. a trained classifier standing in for ImageNet weights). The mixing methods
# (mixup, fmix, manifold: scripts/cam/train_mixup.py --mix ...) join the table when METHODS names them.
#
#   DATASET=synthetic bash runners/compare-cams.sh        # the README's methods table (CPU, from scratch)
#   DATASET=synthetic EID=cmp-oc TAG_OC=vanilla/synthetic-resnet18-e6-cmp \
#     CG_WEIGHTS=experiments/models/vanilla/synthetic-resnet18-e6-cmp.pth bash runners/compare-cams.sh
#   DATASET=synthetic METHODS="vanilla mixup fmix manifold" bash runners/compare-cams.sh
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/compare-cams.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/dataset.sh"
source "$REPO/runners/config/cam.sh"

EID=${EID:-cmp}
METHODS=${METHODS:-"vanilla puzzle occse poc pnoc"}
STAGES=${STAGES:-"train inference evaluate"}
tag_of() { echo "$1/$DATASET-$ARCH-e$EPOCHS-$EID"; }
TAG_OC=${TAG_OC:-$(tag_of vanilla)}

method_flags() {
  case "$1" in
    vanilla) echo --augment "$AUGMENT_OC" ;;
    puzzle)  echo --alpha "$PUZZLE_ALPHA" ;;
    occse)   echo --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" ;;
    poc)     echo --alpha "$PUZZLE_ALPHA" --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" ;;
    pnoc)    echo --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" "${pnoc_flags[@]}" ;;
    mixup|fmix|manifold) echo --mix "$1" ;;
    *) echo "error: unknown method $1 (choose from vanilla puzzle occse poc pnoc mixup fmix manifold)" >&2; return 2 ;;
  esac
}
script_of() { case "$1" in mixup|fmix|manifold) echo train_mixup ;; *) echo "train_$1" ;; esac; }

results=()
for METHOD in $METHODS; do
  TAG=$(tag_of "$METHOD")
  if has_stage train && ! done_already "$TAG"; then
    # shellcheck disable=SC2046  # method_flags prints plain words
    $LAUNCH "$REPO/scripts/cam/$(script_of "$METHOD").py" "${cam_common[@]}" --tag "$TAG" --batch_size "$BATCH_OC" \
      --backbone_weights "${CG_WEIGHTS:-$BACKBONE_WEIGHTS}" --max_epoch "$EPOCHS" --label_smoothing 0.1 $(method_flags "$METHOD")
  fi
  cam_infer_and_evaluate "$TAG" "$DOMAIN_VALID"
  results+=("$(result_json "$TAG" "$DOMAIN_VALID")")
done

echo
echo "CAM mIoU of each method on $DATASET/$DOMAIN_VALID ($ARCH, $EPOCHS epochs, init: ${CG_WEIGHTS:-$BACKBONE_WEIGHTS}):"
$PY "$REPO/tools/summarize_results.py" "${results[@]}"
