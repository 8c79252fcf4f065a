# Saliency-stage recipes (SPEC §12.4): C²AM-H on the P-NOC CAMs, its CRF-cleaned masks, PoolNet on those masks.
# Source after env.sh and dataset.sh, before tags.sh; every ${VAR:-default} can be overridden from the environment.
# SAL_DOMAIN: what C²AM-H and PoolNet train on and what the later stages read (train_aug on VOC/COCO; the
# synthetic demo uses the priors' 200 train images, whose CAMs 1-priors.sh has already made, to stay in minutes).
if [[ "$DATASET" == synthetic ]]; then SAL_DOMAIN=${SAL_DOMAIN:-train}; else SAL_DOMAIN=${SAL_DOMAIN:-$DOMAIN_TRAIN}; fi
SAL_THRESHOLDS=(--min_th 0.05 --max_th 0.80 --step_th 0.05)
case "$DATASET" in
  voc12|coco14)
    ARCH_SAL=${ARCH_SAL:-resnest269}; STAGE4_SAL=${STAGE4_SAL:-1024}; IMAGE_SIZE_SAL=${IMAGE_SIZE_SAL:-448}
    DILATED_SAL=${DILATED_SAL:-false}
    EPOCHS_SAL=${EPOCHS_SAL:-10}; BATCH_SAL=${BATCH_SAL:-64}; ACCUMULATE_SAL=${ACCUMULATE_SAL:-2}
    OPTIMIZER_SAL=${OPTIMIZER_SAL:-sgd}
    if [[ "$DATASET" == voc12 ]]; then LR_SAL=${LR_SAL:-0.001}; FG_T=${FG_T:-0.4}
    else LR_SAL=${LR_SAL:-0.0005}; FG_T=${FG_T:-0.3}; fi
    SAL_WEIGHTS=${SAL_WEIGHTS:-imagenet}
    CRF_THRESHOLD=${CRF_THRESHOLD:-0.2}; CRF_T=${CRF_T:-10}; CRF_GT=${CRF_GT:-0.7}
    ARCH_PN=${ARCH_PN:-resnet50}; PN_WEIGHTS=${PN_WEIGHTS:-imagenet}; EPOCHS_PN=${EPOCHS_PN:-9}
    BATCH_PN=${BATCH_PN:-1}; ACCUMULATE_PN=${ACCUMULATE_PN:-10}; LR_PN=${LR_PN:-5e-5}
    HEAD_SCALE_PN=${HEAD_SCALE_PN:-1}; SMALL_SIDE_PN=${SMALL_SIDE_PN:-100} ;;
  synthetic)
    # CPU-sized: ResNet-18 from the priors' ordinary classifier (the stand-in for ImageNet weights), 96 px.
    # C²AM-H at output stride 8: at 16 its 6x6 map of a 96 px crop matched the CAMs it learns from without beating
    # them (fg IoU 56.2 vs 56.0 on val); at 8, 62.6 after 2 epochs (later epochs drift away from the hints).
    # PoolNet: a quarter-width head (14 M instead of 54 M parameters), no doubling of the small images, lr 5e-4 and
    # 8 epochs: after 2 its maps were still far from its labels (fg/bg mIoU 50.0, MAE 0.35); after 8, 85.6 (MAE 0.11).
    ARCH_SAL=${ARCH_SAL:-resnet18}; STAGE4_SAL=${STAGE4_SAL:-0}; IMAGE_SIZE_SAL=${IMAGE_SIZE_SAL:-96}
    DILATED_SAL=${DILATED_SAL:-true}
    EPOCHS_SAL=${EPOCHS_SAL:-2}; BATCH_SAL=${BATCH_SAL:-32}; ACCUMULATE_SAL=${ACCUMULATE_SAL:-1}
    OPTIMIZER_SAL=${OPTIMIZER_SAL:-sgd}; LR_SAL=${LR_SAL:-0.001}; FG_T=${FG_T:-0.4}
    SAL_WEIGHTS=${SAL_WEIGHTS:-}  # empty: the ordinary classifier's weights (runners/config/tags.sh)
    CRF_THRESHOLD=${CRF_THRESHOLD:-0.2}; CRF_T=${CRF_T:-10}; CRF_GT=${CRF_GT:-0.7}
    ARCH_PN=${ARCH_PN:-resnet18}; PN_WEIGHTS=${PN_WEIGHTS:-}; EPOCHS_PN=${EPOCHS_PN:-8}
    BATCH_PN=${BATCH_PN:-8}; ACCUMULATE_PN=${ACCUMULATE_PN:-1}; LR_PN=${LR_PN:-5e-4}
    HEAD_SCALE_PN=${HEAD_SCALE_PN:-0.25}; SMALL_SIDE_PN=${SMALL_SIDE_PN:-0} ;;
esac
