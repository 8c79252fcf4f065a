# Per-dataset recipes (SPEC §12.2). Select with DATASET=voc12|coco14|synthetic.
DATASET=${DATASET:-voc12}
case "$DATASET" in
  voc12)
    DATA_DIR=${DATA_DIR:-$DATASETS_DIR/VOCdevkit/VOC2012}
    DOMAIN_TRAIN=train_aug; DOMAIN_VALID=train; DOMAIN_VALID_SEG=val
    IMAGE_SIZE=512; MIN_IMAGE_SIZE=320; MAX_IMAGE_SIZE=640
    LR=0.1; WD=1e-4
    ARCH=${ARCH:-resnest269}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-imagenet}
    EPOCHS=${EPOCHS:-15}; BATCH_OC=32; BATCH_PNOC=16; ACCUMULATE_PNOC=2
    MIXED_PRECISION=true; OPTIMIZER=sgd; AUGMENT_OC=randaugment ;;
  coco14)
    DATA_DIR=${DATA_DIR:-$DATASETS_DIR/coco14}
    DOMAIN_TRAIN=train2014; DOMAIN_VALID=train2014; DOMAIN_VALID_SEG=val2014
    IMAGE_SIZE=640; MIN_IMAGE_SIZE=400; MAX_IMAGE_SIZE=800
    LR=0.05; WD=1e-4
    ARCH=${ARCH:-resnest269}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-imagenet}
    EPOCHS=${EPOCHS:-15}; BATCH_OC=32; BATCH_PNOC=16; ACCUMULATE_PNOC=2
    MIXED_PRECISION=true; OPTIMIZER=sgd; AUGMENT_OC=randaugment ;;
  synthetic)
    # The generated benchmark of tools/make_synthetic_voc.py: small images, a small net, CPU-sized. There are no
    # ImageNet weights here: the ordinary classifier is trained from scratch (AdamW; no RandAugment, whose colour
    # operations destroy the colour cue of the emblems), and P-NOC starts from its backbone, the stand-in for the
    # ImageNet initialisation of the real recipe (CG_WEIGHTS).
    DATA_DIR=${DATA_DIR:-experiments/data/synthetic/VOC2012}
    DOMAIN_TRAIN=train_aug; DOMAIN_VALID=train; DOMAIN_VALID_SEG=val
    IMAGE_SIZE=${IMAGE_SIZE:-96}; MIN_IMAGE_SIZE=${MIN_IMAGE_SIZE:-80}; MAX_IMAGE_SIZE=${MAX_IMAGE_SIZE:-112}
    LR=${LR:-0.001}; WD=1e-4; OPTIMIZER=adamw; AUGMENT_OC=none
    ARCH=${ARCH:-resnet18}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}
    EPOCHS=${EPOCHS:-6}; EPOCHS_PNOC=${EPOCHS_PNOC:-4}
    BATCH_OC=${BATCH_OC:-32}; BATCH_PNOC=${BATCH_PNOC:-16}; ACCUMULATE_PNOC=${ACCUMULATE_PNOC:-2}
    MIXED_PRECISION=false ;;
  *)
    echo "error: unknown DATASET=$DATASET (choose voc12, coco14 or synthetic)" >&2; exit 2 ;;
esac
