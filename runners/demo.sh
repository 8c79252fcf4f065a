#!/usr/bin/env bash
# The main job on the embedded default: generate the synthetic VOC-layout benchmark, run the whole pipeline on CPU
# (runners/pipeline.sh: CAMs, saliency, random walk, DeepLabV3+), print one table of mIoU per stage and draw a picture
# of image, GT, CAM, pseudo mask and DeepLabV3+ prediction side by side. Rerunning resumes (finished outputs are kept
# and skipped).
#   make demo              # creates .venv first
#   bash runners/demo.sh   # inside an environment that already has requirements.txt installed
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export DATASET=synthetic NGPU=${NGPU:-1} PY=${PY:-python}
export WORKERS_TRAIN=${WORKERS_TRAIN:-2} WORKERS_INFER=${WORKERS_INFER:-2}
export DATA_DIR=${DATA_DIR:-experiments/data/synthetic/VOC2012}
# The fast path: bf16 autocast + channels_last on a CPU with bf16 instructions (logged; fp32 on other CPUs).
# MIXED_PRECISION=false make demo gives the fp32 run, under its own run names so neither resumes the other.
export MIXED_PRECISION=${MIXED_PRECISION:-true}
default_eid=demo; [[ "$MIXED_PRECISION" == true ]] || default_eid=demo-fp32
export EID=${EID:-$default_eid}
export LAUNCH=${LAUNCH:-$PY}  # one CPU process: no torchrun needed (the runners use torchrun by default)
source "$REPO/runners/config/env.sh"  # after the demo's defaults, which it would otherwise replace
source "$REPO/runners/config/pipeline.sh"

if [[ ! -f "$DATA_DIR/synthetic.json" ]]; then
  $PY "$REPO/tools/make_synthetic_voc.py" --out "$DATA_DIR" --train "${SYN_TRAIN:-200}" --val "${SYN_VAL:-100}" \
    --aug "${SYN_AUG:-300}" --size "${SYN_SIZE:-96}" --classes "${SYN_CLASSES:-8}" --seed 0
fi

start=$(date +%s)
bash "$REPO/runners/pipeline.sh"
picture=experiments/images/pipeline-$EID.png
$PY "$REPO/tools/visualize.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN_VALID_SEG" --num 6 \
  --cam_dir "$(cams_of "$TAG_PNOC" "$DOMAIN_VALID_SEG")" --mask_dir "experiments/predictions/$PSEUDO_MASKS" \
  --mask_title "RW pseudo mask" --mask_dir "$(seg_pred "$DOMAIN_VALID_SEG")" --mask_title "DeepLabV3+" \
  --cell_size 128 --out "$picture"
echo "demo done in $(( $(date +%s) - start )) s; outputs under $WORK_DIR/experiments/, picture: $WORK_DIR/$picture"
