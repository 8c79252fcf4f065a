#!/usr/bin/env bash
# The main job on the embedded default: generate the synthetic VOC-layout benchmark, run every stage that exists
# (CAMs, saliency) on CPU and print a table of mIoU per stage. Rerunning resumes (finished outputs are kept and skipped).
#   make demo              # creates .venv first
#   bash runners/demo.sh   # inside an environment that already has requirements.txt installed
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export DATASET=synthetic NGPU=${NGPU:-1} PY=${PY:-python}
export WORKERS_TRAIN=${WORKERS_TRAIN:-2} WORKERS_INFER=${WORKERS_INFER:-2}
export DATA_DIR=${DATA_DIR:-experiments/data/synthetic/VOC2012}
export EID=${EID:-demo}
export LAUNCH=${LAUNCH:-$PY}  # one CPU process: no torchrun needed (runners/1-priors.sh uses torchrun by default)
source "$REPO/runners/config/env.sh"  # after the demo's defaults, which it would otherwise replace

if [[ ! -f "$DATA_DIR/synthetic.json" ]]; then
  $PY "$REPO/tools/make_synthetic_voc.py" --out "$DATA_DIR" --train "${SYN_TRAIN:-200}" --val "${SYN_VAL:-100}" \
    --aug "${SYN_AUG:-300}" --size "${SYN_SIZE:-96}" --classes "${SYN_CLASSES:-8}" --seed 0
fi

start=$(date +%s)
bash "$REPO/runners/1-priors.sh"    # CAMs: ordinary classifier, P-NOC
bash "$REPO/runners/2-saliency.sh"  # saliency: C²AM-H on the P-NOC CAMs, CRF, PoolNet
echo
echo "Every stage on $DATASET/train (CAM rows: mIoU at the best background threshold; saliency rows: foreground/"
echo "background IoU, MAE, max F; 'bg': the P-NOC CAMs with the saliency named after '+bg=' as background):"
$PY "$REPO/tools/summarize_results.py" experiments/results/"$DATASET"/*-"$EID"@*.json
echo "demo done in $(( $(date +%s) - start )) s; outputs under $WORK_DIR/experiments/"
