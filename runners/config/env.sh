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
# One process per GPU (one process on CPU); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK for the scripts. Inside a SLURM
# allocation of several nodes, srun starts one torchrun per node and they meet at the first node (c10d rendezvous).
slurm_launch() {
  local head port=${MASTER_PORT:-29500}
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  echo "srun --nodes=$SLURM_NNODES --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=$NGPU" \
    "--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$head:$port"
}
if [[ -z "${LAUNCH:-}" && -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then LAUNCH=$(slurm_launch); fi
LAUNCH=${LAUNCH:-"torchrun --standalone --nproc_per_node=$NGPU"}
# seed_suffix SEED: how a run name marks its seed. Seed 0 keeps the unsuffixed name, so a later multi-seed run reuses
# (and extends) an earlier single-seed one.
seed_suffix() { [[ "$1" == 0 ]] || echo "-s$1"; }
