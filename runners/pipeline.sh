#!/usr/bin/env bash
# The whole pipeline, image-level labels in, a segmentation model and its mIoU out: 1-priors (CAMs) -> 2-saliency
# (C²AM-H, PoolNet) -> 3-rw (affinity labels, AffinityNet, random walk, pseudo masks) -> 4-segmentation (DeepLabV3+).
# Every stage resumes and skips what is done; the run names come from runners/config/tags.sh, so each stage reads
# exactly what the one before it wrote. Ends with one table: a row per stage, scored on GT.
#
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/pipeline.sh
#   DATASET=coco14 NGPU=8 DATASETS_DIR=/data bash runners/pipeline.sh
#   sbatch --nodes=2 --gres=gpu:4 runners/slurm/pipeline.sbatch          # SLURM, several nodes
#   PIPELINE="rw segmentation" bash runners/pipeline.sh                   # some stages only (their inputs must exist)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/pipeline.sh"

PIPELINE=${PIPELINE:-"priors saliency rw segmentation"}
for stage in $PIPELINE; do
  case "$stage" in
    priors) bash "$REPO/runners/1-priors.sh" ;;
    saliency) bash "$REPO/runners/2-saliency.sh" ;;
    rw) bash "$REPO/runners/3-rw.sh" ;;
    segmentation) bash "$REPO/runners/4-segmentation.sh" ;;
    *) echo "error: unknown pipeline stage $stage (choose from priors saliency rw segmentation)" >&2; exit 2 ;;
  esac
done

# One row per stage, in pipeline order (the JSON names of the stage runners' evaluations).
result() { echo "experiments/results/$DATASET/$1@$2.json"; }
rows=("$(result "${TAG_OC//\//_}" "$DOMAIN_VALID")" "$(result "${TAG_PNOC//\//_}" "$DOMAIN_VALID")"
      "$(result "saliency_${TAG_PN//\//_}" "$DOMAIN_VALID")"
      "$(result "saliency_${TAG_PNOC//\//_}" "$DOMAIN_VALID+bg=${TAG_PN//\//_}")"
      "$(result "afflabels_${TAG_PNOC//\//_}" "$DOMAIN_VALID")"
      "$(result "rw_${TAG_AFF//\//_}" "$DOMAIN_VALID")" "$(result "pseudo_${TAG_AFF//\//_}" "$DOMAIN_VALID")")
for DOMAIN in $SEG_DOMAINS; do [[ "$DOMAIN" == test ]] || rows+=("$(result "${TAG_SEG//\//_}" "$DOMAIN")"); done
present=(); for row in "${rows[@]}"; do [[ -f "$row" ]] && present+=("$row"); done
if (( ${#present[@]} )); then
  echo
  echo "The pipeline on $DATASET, stage by stage: CAMs (best background threshold on $DOMAIN_VALID's GT), PoolNet"
  echo "saliency (foreground/background), P-NOC CAMs with it as background ('bg'), affinity labels ('labelled (acc)':"
  echo "% of pixels labelled, % of those right), RW maps, pseudo masks, DeepLabV3+ trained on them (${SEG_DOMAINS// /, }):"
  $PY "$REPO/tools/summarize_results.py" "${present[@]}" --markdown "experiments/results/$DATASET/pipeline-$EID.md"
fi
