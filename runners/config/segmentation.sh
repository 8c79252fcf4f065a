# Segmentation-stage recipes (SPEC §12.6): DeepLabV3+ on a label folder, multi-scale + flip inference with the
# DeepLab-v2 softmax CRF, evaluation of the PNGs. Source after env.sh and dataset.sh, before tags.sh; every ${VAR:-default} can be
# overridden from the environment.
# SEG_DOMAINS: where inference runs (train and val are scored against GT; VOC's test is exported for the server).
case "$DATASET" in
  voc12|coco14)
    ARCH_SEG=${ARCH_SEG:-resnest269}; SEG_WEIGHTS=${SEG_WEIGHTS:-imagenet}; USE_GN=${USE_GN:-true}
    EPOCHS_SEG=${EPOCHS_SEG:-15}; BATCH_SEG=${BATCH_SEG:-32}; WD_SEG=${WD_SEG:-4e-5}
    OPTIMIZER_SEG=${OPTIMIZER_SEG:-momentum}; AUGMENT_SEG=${AUGMENT_SEG:-colorjitter}
    IMAGE_SIZE_SEG=${IMAGE_SIZE_SEG:-$IMAGE_SIZE}; MIN_SIZE_SEG=${MIN_SIZE_SEG:-$MIN_IMAGE_SIZE}
    MAX_SIZE_SEG=${MAX_SIZE_SEG:-$MAX_IMAGE_SIZE}
    SEG_SCALES=${SEG_SCALES:-0.5,1.0,1.5,2.0}; SEG_CRF_T=${SEG_CRF_T:-10}; SEG_CRF_GT=${SEG_CRF_GT:-1}
    if [[ "$DATASET" == voc12 ]]; then
      LR_SEG=${LR_SEG:-0.007}; DOMAIN_TRAIN_SEG=${DOMAIN_TRAIN_SEG:-train_aug}
      SEG_DOMAINS=${SEG_DOMAINS:-"train val test"}
    else
      LR_SEG=${LR_SEG:-0.004}; DOMAIN_TRAIN_SEG=${DOMAIN_TRAIN_SEG:-train2014}
      SEG_DOMAINS=${SEG_DOMAINS:-"val2014"}
    fi ;;
  synthetic)
    # CPU-sized: ResNet-18 starting from the priors' ordinary classifier (the stand-in for ImageNet weights, as in
    # 2-saliency.sh), BatchNorm head, 96 px crops, AdamW; single scale + flip and no CRF at inference. 12 epochs: on
    # the RW pseudo masks val mIoU was still rising at 4 (17.3) and 8 (23.9); lr 0.003 was worse (13.5 after 4).
    # Output stride 8: at 16 a 96 px crop is a 6x6 map, smaller than the ASPP rates (README: 41.5 -> 59.6 val mIoU).
    DILATED_SEG=${DILATED_SEG:-true}
    ARCH_SEG=${ARCH_SEG:-resnet18}; SEG_WEIGHTS=${SEG_WEIGHTS:-}  # empty: the ordinary classifier (tags.sh)
    USE_GN=${USE_GN:-false}; EPOCHS_SEG=${EPOCHS_SEG:-12}; BATCH_SEG=${BATCH_SEG:-16}; WD_SEG=${WD_SEG:-1e-4}
    OPTIMIZER_SEG=${OPTIMIZER_SEG:-adamw}; LR_SEG=${LR_SEG:-0.001}; AUGMENT_SEG=${AUGMENT_SEG:-none}
    IMAGE_SIZE_SEG=${IMAGE_SIZE_SEG:-96}; MIN_SIZE_SEG=${MIN_SIZE_SEG:-80}; MAX_SIZE_SEG=${MAX_SIZE_SEG:-112}
    DOMAIN_TRAIN_SEG=${DOMAIN_TRAIN_SEG:-train}
    SEG_SCALES=${SEG_SCALES:-1.0}; SEG_CRF_T=${SEG_CRF_T:-0}; SEG_CRF_GT=${SEG_CRF_GT:-1}
    SEG_DOMAINS=${SEG_DOMAINS:-"val"} ;;
esac
# DILATED_SEG=true: output stride 8 (ASPP rates 12/24/36) instead of 16 (the reference's); SEED_SEG: the seed.
DILATED_SEG=${DILATED_SEG:-false}; SEED_SEG=${SEED_SEG:-0}
