#!/usr/bin/env bash
# The five CAM methods at equal budget: vanilla, Puzzle-CAM, OC-CSE, P-OC and P-NOC, each trained for the same
# epochs, the OC methods against the vanilla model $TAG_OC (default: the one this run trains); then CAM inference,
# the threshold sweep, and one table. Every method starts from $BACKBONE_WEIGHTS (none = from scratch on synthetic),
# or from CG_WEIGHTS when it is set (e.g. a trained classifier standing in for ImageNet weights). The mixing methods
# (mixup, fmix, manifold: scripts/cam/train_mixup.py --mix ...), SEAM (seam: scripts/cam/train_seam.py, at the
# runner's backbone and output stride), EPS (eps: scripts/cam/train_eps.py on the saliency PNGs of SAL_DIR) and PPC's
# contrast on any of vanilla, pnoc, seam and eps (vanilla-ppc, pnoc-ppc, seam-ppc, eps-ppc; second view
# PPC_VIEW_SIZE px, further PPC flags in PPC_FLAGS; SEAM_VIEW_SCALE and SEAM_DROPOUT set SEAM's) join the table
# when METHODS names them.
#
#   DATASET=synthetic bash runners/compare-cams.sh        # the README's methods table (CPU, from scratch)
#   DATASET=synthetic bash runners/compare-cams.sh --seeds 3   # or SEEDS=3: each method at seeds 0..2, mean ± sd
#   DATASET=synthetic EID=cmp-oc TAG_OC=vanilla/synthetic-resnet18-e6-cmp \
#     CG_WEIGHTS=experiments/models/vanilla/synthetic-resnet18-e6-cmp.pth bash runners/compare-cams.sh
#   DATASET=synthetic METHODS="vanilla mixup fmix manifold" bash runners/compare-cams.sh
#   DATASET=synthetic METHODS="seam seam-ppc" PPC_VIEW_SIZE=48 bash runners/compare-cams.sh
#   DATASET=synthetic METHODS=vanilla-ppc EID=lab PPC_FLAGS="--ppc_prototype_images labelled" bash runners/compare-cams.sh
#   DATASET=synthetic METHODS="eps eps-ppc" SAL_DIR=experiments/predictions/<saliency of train_aug> bash runners/compare-cams.sh
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/compare-cams.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/dataset.sh"
source "$REPO/runners/config/cam.sh"

if [[ "${1:-}" == --seeds ]]; then SEEDS=${2:?--seeds needs a number}; shift 2; fi
(( $# == 0 )) || { echo "error: unknown argument $1 (the runner takes --seeds N; everything else is environment)" >&2; exit 2; }
EID=${EID:-cmp}
SEEDS=${SEEDS:-1}
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "error: SEEDS=$SEEDS must be a positive integer" >&2; exit 2; }
METHODS=${METHODS:-"vanilla puzzle occse poc pnoc"}
STAGES=${STAGES:-"train inference evaluate"}
# tag_of METHOD SEED: seed 0 keeps the single-seed name, so SEEDS=3 reuses an earlier single-seed run.
tag_of() { echo "$1/$DATASET-$ARCH-e$EPOCHS-$EID$(seed_suffix "$2")"; }

method_flags() {
  # shellcheck disable=SC2206  # PPC_FLAGS: more PPC flags, split into words
  local ppc=(--ppc true --ppc_view_size "${PPC_VIEW_SIZE:-128}" ${PPC_FLAGS:-})
  case "$1" in
    vanilla) echo --augment "$AUGMENT_OC" ;;
    puzzle)  echo --alpha "$PUZZLE_ALPHA" ;;
    occse)   echo --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" ;;
    poc)     echo --alpha "$PUZZLE_ALPHA" --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" ;;
    pnoc)    echo --oc-architecture "$ARCH" --oc-pretrained "experiments/models/$TAG_OC.pth" "${pnoc_flags[@]}" ;;
    mixup|fmix|manifold) echo --mix "$1" ;;
    seam)    echo --augment "$AUGMENT_OC" --seam_view_scale "${SEAM_VIEW_SCALE:-0.3}" --feature_dropout "${SEAM_DROPOUT:-0.5}" ;;
    eps)     [[ -n "${SAL_DIR:-}" ]] || { echo "error: METHODS=$1 needs SAL_DIR, a folder of saliency PNGs" >&2; return 2; }
             echo --augment "$AUGMENT_OC" --sal_dir "$SAL_DIR" ;;
    vanilla-ppc|seam-ppc|eps-ppc|pnoc-ppc) local base; base=$(method_flags "${1%-ppc}") || return 2
                                           echo $base "${ppc[@]}" ;;
    *) echo "error: unknown method $1 (choose from vanilla puzzle occse poc pnoc mixup fmix manifold seam eps" \
         "vanilla-ppc pnoc-ppc seam-ppc eps-ppc)" >&2
       return 2 ;;
  esac
}
script_of() {
  local base=${1%-ppc}
  case "$base" in mixup|fmix|manifold) echo train_mixup ;; *) echo "train_$base" ;; esac
}

for METHOD in $METHODS; do  # every name and its settings (SAL_DIR for eps) checked before anything trains
  TAG_OC=${TAG_OC:-none} method_flags "$METHOD" >/dev/null || exit 2
done

results=()
for METHOD in $METHODS; do
  for (( SEED = 0; SEED < SEEDS; SEED++ )); do
    TAG=$(tag_of "$METHOD" "$SEED")
    TAG_OC_SEED=${TAG_OC:-$(tag_of vanilla "$SEED")}  # the OC methods play against the vanilla run of their seed
    if has_stage train && ! done_already "$TAG"; then
      # shellcheck disable=SC2046  # method_flags prints plain words
      $LAUNCH "$REPO/scripts/cam/$(script_of "$METHOD").py" "${cam_common[@]}" --tag "$TAG" --batch_size "$BATCH_OC" \
        --backbone_weights "${CG_WEIGHTS:-$BACKBONE_WEIGHTS}" --max_epoch "$EPOCHS" --label_smoothing 0.1 \
        --seed "$SEED" $(TAG_OC=$TAG_OC_SEED method_flags "$METHOD")
    fi
    cam_infer_and_evaluate "$TAG" "$DOMAIN_VALID"
    results+=("$(result_json "$TAG" "$DOMAIN_VALID")")
  done
done

echo
echo "CAM mIoU of each method on $DATASET/$DOMAIN_VALID ($ARCH, $EPOCHS epochs, init: ${CG_WEIGHTS:-$BACKBONE_WEIGHTS}," \
  "$SEEDS seed(s)):"
over_seeds=false; (( SEEDS == 1 )) || over_seeds=true
$PY "$REPO/tools/summarize_results.py" --over_seeds "$over_seeds" "${results[@]}"
