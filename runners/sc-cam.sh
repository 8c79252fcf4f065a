#!/usr/bin/env bash
# SC-CAM (METHODS §10): ROUNDS rounds (default 3) of features -> k-means sub-categories -> a two-head classifier
# trained from the initial weights again. Round r clusters the features of round r-1's model; round 0 is the vanilla
# classifier $TAG_R0 (trained here unless it exists). Then CAM inference and the threshold sweep of every round.
# Sub-category Teaching (METHODS §11, METHOD=sct): the features come from a ViT teacher ($TEACHER, trained here with
# train_vanilla.py), clustered with FINCH, λ 2, one round by default; KD=true adds the teacher's soft targets.
# Each round keeps its model, features, sub-labels and CAMs under its own tag; rerunning skips finished outputs.
#
#   DATASET=synthetic bash runners/sc-cam.sh
#   DATASET=voc12 NGPU=4 DATASETS_DIR=/data bash runners/sc-cam.sh
#   DATASET=synthetic METHOD=sct TEACHER=test_vit bash runners/sc-cam.sh
#   DATASET=synthetic SEED=1 TAG_R0=vanilla/synthetic-resnet18-e6-cmp-s1 bash runners/sc-cam.sh  # a second seed
#   DATASET=voc12 METHOD=sct TEACHER_INIT=/models/vit_base_patch16_224.pth bash runners/sc-cam.sh   # timm weights
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/runners/config/env.sh"
source "$REPO/runners/config/dataset.sh"
source "$REPO/runners/config/cam.sh"

EID=${EID:-sc}
METHOD=${METHOD:-sc}
case "$METHOD" in
  sc)  ROUNDS=${ROUNDS:-3}; CLUSTERING=${CLUSTERING:-kmeans}; SC_WEIGHT=${SC_WEIGHT:-5} ;;
  sct) ROUNDS=${ROUNDS:-1}; CLUSTERING=${CLUSTERING:-finch}; SC_WEIGHT=${SC_WEIGHT:-2} ;;
  *) echo "error: unknown METHOD=$METHOD (choose sc or sct)" >&2; exit 2 ;;
esac
N_CLUSTERS=${N_CLUSTERS:-10}
# SEED seeds every training run and k-means; seed 0 keeps the unsuffixed tags (as compare-cams.sh does).
SEED=${SEED:-0}
[[ "$SEED" =~ ^[0-9]+$ ]] || { echo "error: SEED=$SEED must be a non-negative integer" >&2; exit 2; }
SUFFIX=$(seed_suffix "$SEED")
KD=${KD:-false}
TEACHER=${TEACHER:-vit_base_patch16_224}
TEACHER_INIT=${TEACHER_INIT:-none}       # a ViT's ImageNet weights are never downloaded: pass a timm .pth
TEACHER_IMAGE_SIZE=${TEACHER_IMAGE_SIZE:-224}
STAGES=${STAGES:-"vanilla teacher features cluster train inference evaluate"}
TAG_R0=${TAG_R0:-vanilla/$DATASET-$ARCH-e$EPOCHS-$EID$SUFFIX}
TAG_TEACHER=${TAG_TEACHER:-vanilla/$DATASET-$TEACHER-e$EPOCHS-$EID$SUFFIX}
tag_of() { echo "$METHOD/$DATASET-$ARCH-e$EPOCHS-$EID$SUFFIX-round$1"; }
cluster_name() { if [[ "$CLUSTERING" == kmeans ]]; then echo "kmeans=$N_CLUSTERS"; else echo "finch=coarsest"; fi; }

train_common=("${cam_common[@]}" --batch_size "$BATCH_OC" --backbone_weights "${CG_WEIGHTS:-$BACKBONE_WEIGHTS}"
              --max_epoch "$EPOCHS" --label_smoothing 0.1 --seed "$SEED")

if has_stage vanilla && ! done_already "$TAG_R0"; then
  $LAUNCH "$REPO/scripts/cam/train_vanilla.py" "${train_common[@]}" --tag "$TAG_R0" --augment "$AUGMENT_OC"
fi
if [[ "$METHOD" == sct ]] && has_stage teacher && ! done_already "$TAG_TEACHER"; then
  $LAUNCH "$REPO/scripts/cam/train_vanilla.py" "${cam_common[@]}" --architecture "$TEACHER" --tag "$TAG_TEACHER" \
    --batch_size "$BATCH_OC" --backbone_weights "$TEACHER_INIT" --max_epoch "$EPOCHS" --label_smoothing 0.1 \
    --seed "$SEED"
fi

results=()
for (( ROUND = 1; ROUND <= ROUNDS; ROUND++ )); do
  # The model whose features are clustered: the previous round's (SC-CAM) or the teacher (Sub-category Teaching).
  if [[ "$METHOD" == sct ]]; then
    FEATURE_TAG=$TAG_TEACHER; FEATURE_FLAGS=(--architecture "$TEACHER" --image_size "$TEACHER_IMAGE_SIZE")
  else
    FEATURE_TAG=$( (( ROUND == 1 )) && echo "$TAG_R0" || tag_of $(( ROUND - 1 )) ); FEATURE_FLAGS=(--architecture "$ARCH")
  fi
  FEATURES=experiments/predictions/$FEATURE_TAG@$DOMAIN_TRAIN@features
  SUBCATEGORIES=experiments/predictions/$FEATURE_TAG@$DOMAIN_TRAIN@$(cluster_name)
  TAG=$(tag_of "$ROUND")
  if has_stage features && [[ ! -f "$FEATURES/features.npz" ]]; then
    $PY "$REPO/scripts/cam/extract_features.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$DOMAIN_TRAIN" \
      --tag "$FEATURE_TAG" "${FEATURE_FLAGS[@]}" --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER"
  fi
  if has_stage cluster && [[ ! -f "$SUBCATEGORIES/subcategories.npz" ]]; then
    $PY "$REPO/scripts/cam/cluster_subcategories.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" \
      --domain "$DOMAIN_TRAIN" --tag "$FEATURE_TAG" --features "$FEATURES" --clustering "$CLUSTERING" \
      --n_clusters "$N_CLUSTERS" --seed "$SEED"
  fi
  if has_stage train && ! done_already "$TAG"; then
    kd_flags=(--knowledge_distillation "$KD")
    if [[ "$KD" == true ]]; then
      kd_flags+=(--teacher_weights "experiments/models/$TAG_TEACHER.pth" --teacher_architecture "$TEACHER")
    fi
    $LAUNCH "$REPO/scripts/cam/train_subcategory.py" "${train_common[@]}" --tag "$TAG" \
      --subcategories "$SUBCATEGORIES" --subcategory_weight "$SC_WEIGHT" "${kd_flags[@]}"
  fi
  cam_infer_and_evaluate "$TAG" "$DOMAIN_VALID"
  results+=("$(result_json "$TAG" "$DOMAIN_VALID")")
done

if has_stage evaluate; then
  cam_infer_and_evaluate "$TAG_R0" "$DOMAIN_VALID"
  echo
  echo "CAM mIoU on $DATASET/$DOMAIN_VALID ($ARCH, $EPOCHS epochs; round 0 = $TAG_R0, then $METHOD rounds 1-$ROUNDS):"
  $PY "$REPO/tools/summarize_results.py" "$(result_json "$TAG_R0" "$DOMAIN_VALID")" "${results[@]}"
fi
