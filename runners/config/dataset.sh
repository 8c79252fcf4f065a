# Per-dataset recipes (SPEC §12.2). Select with DATASET=voc12|coco14|synthetic; every ${VAR:-default} below can be
# overridden from the environment (e.g. BATCH_OC=16 LR=0.05).
# SOURCE is the scripts' --dataset reader: the synthetic benchmark is a VOC tree, read by the VOC reader unchanged.
DATASET=${DATASET:-voc12}
case "$DATASET" in
  voc12)
    SOURCE=voc12
    DATA_DIR=${DATA_DIR:-$DATASETS_DIR/VOCdevkit/VOC2012}
    DOMAIN_TRAIN=train_aug; DOMAIN_VALID=train; DOMAIN_VALID_SEG=val
    IMAGE_SIZE=${IMAGE_SIZE:-512}; MIN_IMAGE_SIZE=${MIN_IMAGE_SIZE:-320}; MAX_IMAGE_SIZE=${MAX_IMAGE_SIZE:-640}
    LR=${LR:-0.1}; WD=${WD:-1e-4}
    ARCH=${ARCH:-resnest269}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-imagenet}
    EPOCHS=${EPOCHS:-15}; BATCH_OC=${BATCH_OC:-32}; BATCH_PNOC=${BATCH_PNOC:-16}; ACCUMULATE_PNOC=${ACCUMULATE_PNOC:-2}
    MIXED_PRECISION=${MIXED_PRECISION:-true}; OPTIMIZER=${OPTIMIZER:-sgd}; AUGMENT_OC=${AUGMENT_OC:-randaugment}; PUZZLE_ALPHA=${PUZZLE_ALPHA:-4.0}
    BATCH_INFER=${BATCH_INFER:-1} ;;
  coco14)
    SOURCE=coco14
    DATA_DIR=${DATA_DIR:-$DATASETS_DIR/coco14}
    DOMAIN_TRAIN=train2014; DOMAIN_VALID=train2014; DOMAIN_VALID_SEG=val2014
    IMAGE_SIZE=${IMAGE_SIZE:-640}; MIN_IMAGE_SIZE=${MIN_IMAGE_SIZE:-400}; MAX_IMAGE_SIZE=${MAX_IMAGE_SIZE:-800}
    LR=${LR:-0.05}; WD=${WD:-1e-4}
    ARCH=${ARCH:-resnest269}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-imagenet}
    EPOCHS=${EPOCHS:-15}; BATCH_OC=${BATCH_OC:-32}; BATCH_PNOC=${BATCH_PNOC:-16}; ACCUMULATE_PNOC=${ACCUMULATE_PNOC:-2}
    MIXED_PRECISION=${MIXED_PRECISION:-true}; OPTIMIZER=${OPTIMIZER:-sgd}; AUGMENT_OC=${AUGMENT_OC:-randaugment}; PUZZLE_ALPHA=${PUZZLE_ALPHA:-4.0}
    BATCH_INFER=${BATCH_INFER:-1} ;;
  synthetic)
    SOURCE=voc12
    # The generated benchmark of tools/make_synthetic_voc.py: small images, a small net, CPU-sized. There are no
    # ImageNet weights here: the ordinary classifier is trained from scratch (AdamW; no RandAugment, whose colour
    # operations destroy the colour cue of the emblems), and P-NOC starts from its backbone, the stand-in for the
    # ImageNet initialisation of the real recipe (CG_WEIGHTS). Puzzle's reconstruction weight is 1 (the reference
    # P-OC script's default) instead of 4: at 96 px a tile's map is 3x3 cells, all of them at a tile border, so the
    # tile maps cannot match the full-image maps, and with weight 4 the generator flattens its maps below zero to
    # make L_re vanish (measured, P-NOC b16x2 for 4 epochs: CAM mIoU 25.6 with 4, 52.7-56.0 with 1 over two
    # data-loading orders; vanilla 53.4). P-NOC then gets the OC's batch and epochs (README's methods table).
    DATA_DIR=${DATA_DIR:-experiments/data/synthetic/VOC2012}
    DOMAIN_TRAIN=train_aug; DOMAIN_VALID=train; DOMAIN_VALID_SEG=val
    IMAGE_SIZE=${IMAGE_SIZE:-96}; MIN_IMAGE_SIZE=${MIN_IMAGE_SIZE:-80}; MAX_IMAGE_SIZE=${MAX_IMAGE_SIZE:-112}
    LR=${LR:-0.001}; WD=${WD:-1e-4}; OPTIMIZER=${OPTIMIZER:-adamw}; AUGMENT_OC=${AUGMENT_OC:-none}
    ARCH=${ARCH:-resnet18}; BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}
    EPOCHS=${EPOCHS:-6}; EPOCHS_PNOC=${EPOCHS_PNOC:-6}
    BATCH_OC=${BATCH_OC:-32}; BATCH_PNOC=${BATCH_PNOC:-32}; ACCUMULATE_PNOC=${ACCUMULATE_PNOC:-1}
    # fp32 here, so the README's synthetic tables (measured in fp32) reproduce; runners/demo.sh passes true (bf16 +
    # channels_last where the CPU has bf16, fp32 elsewhere; 10 seeds show no CAM loss, README "Performance").
    PUZZLE_ALPHA=${PUZZLE_ALPHA:-1.0}; MIXED_PRECISION=${MIXED_PRECISION:-false}
    # CAM inference puts 16 images (all 96x96) into each forward pass: bit-identical CAM files, 1.4x (fp32) and 1.8x
    # (bf16) the images/s of one image per pass on 2 cores (README "Performance"); VOC and COCO keep one per pass.
    BATCH_INFER=${BATCH_INFER:-16} ;;
  *)
    echo "error: unknown DATASET=$DATASET (choose voc12, coco14 or synthetic)" >&2; exit 2 ;;
esac
