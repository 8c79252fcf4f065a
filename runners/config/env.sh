# Machine settings shared by the runners. Override any of them in the environment:
#   NGPU=4 DATASETS_DIR=/data bash runners/1-priors.sh
# Outputs go under $WORK_DIR/experiments/ (default: the repository), e.g. WORK_DIR=/scratch/$USER/wsss.
export WORK_DIR=${WORK_DIR:-$REPO}
mkdir -p "$WORK_DIR" && cd "$WORK_DIR"
PY=${PY:-python}
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
  (( NGPU > 0 )) || NGPU=1
fi
WORKERS_TRAIN=${WORKERS_TRAIN:-8}
WORKERS_INFER=${WORKERS_INFER:-8}
DATASETS_DIR=${DATASETS_DIR:-$HOME/datasets}
# One process per GPU (one process on CPU); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK for the scripts.
LAUNCH=${LAUNCH:-"torchrun --standalone --nproc_per_node=$NGPU"}
