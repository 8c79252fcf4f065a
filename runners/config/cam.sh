# Pieces shared by the CAM runners (1-priors.sh, compare-cams.sh); source after env.sh and dataset.sh.
SCALES=${SCALES:-0.5,1.0,1.5,2.0}

# Flags every CAM training script takes, from the dataset recipe.
cam_common=(--dataset "$SOURCE" --data_dir "$DATA_DIR" --architecture "$ARCH" --mode normal --dilated false
            --trainable-stem true --image_size "$IMAGE_SIZE" --min_image_size "$MIN_IMAGE_SIZE"
            --max_image_size "$MAX_IMAGE_SIZE" --lr "$LR" --wd "$WD" --optimizer "$OPTIMIZER"
            --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_TRAIN"
            --domain_train "$DOMAIN_TRAIN" --domain_valid "$DOMAIN_VALID" --resume true)

# P-NOC's recipe of the reference runner (SPEC §12.3); PUZZLE_ALPHA comes from the dataset recipe (4 on VOC/COCO).
pnoc_flags=(--alpha "$PUZZLE_ALPHA" --alpha_init 0.0 --alpha_schedule 0.5
            --oc-alpha 1.0 --oc-alpha-init 0.3 --oc-alpha-schedule 1.0 --oc-strategy random
            --ow 1.0 --ow-init 0.0 --ow-schedule 1.0 --oc-train-masks cams --oc_train_mask_t 0.2
            --oc-train-interval-steps 1)

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
done_already() { [[ -f "experiments/models/$1.pth" ]] && echo "[skip] experiments/models/$1.pth exists"; }

# result_json TAG DOMAIN: where cam_infer_and_evaluate writes the scores of TAG on DOMAIN.
result_json() { echo "experiments/results/$DATASET/${1//\//_}@$2.json"; }

# cam_infer_and_evaluate TAG DOMAIN: multi-scale CAMs of TAG on DOMAIN, then the threshold sweep into
# experiments/results/$DATASET/<tag with / as _>@<domain>.json (both resumable / rewritten cheaply).
cam_infer_and_evaluate() {
  local tag=$1 domain=$2
  if has_stage inference; then
    $LAUNCH "$REPO/scripts/cam/inference.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$domain" \
      --architecture "$ARCH" --mode normal --dilated false --tag "$tag" --scales "$SCALES" \
      --mixed_precision "$MIXED_PRECISION" --num_workers "$WORKERS_INFER" --batch_size "$BATCH_INFER"
  fi
  if has_stage evaluate; then
    mkdir -p "experiments/results/$DATASET"
    $PY "$REPO/scripts/evaluate.py" --dataset "$SOURCE" --data_dir "$DATA_DIR" --domain "$domain" --mode npy \
      --experiment_name "$tag@$domain@scale=$SCALES" --min_th 0.05 --max_th 0.80 --step_th 0.05 \
      --num_workers "$WORKERS_INFER" --json "$(result_json "$tag" "$domain")"
  fi
}
