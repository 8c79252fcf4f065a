# Random-walk recipes (SPEC §12.5): affinity labels from the P-NOC CAMs and the PoolNet saliency, AffinityNet on
# them, the random walk of the CAMs, pseudo masks. Source after saliency.sh, before tags.sh (runners/config/pipeline.sh).
# AFF_DOMAIN: the images AffinityNet learns from (the saliency stage's domain: its maps exist there).
# RW_DOMAINS: where the walk runs; PSEUDO_DOMAINS: the pseudo masks the segmentation stage trains on, in one folder.
# RW_METHOD=psa: PSA's AffinityNet as SEAM/PPC run it (METHODS §2): la/ha CRF score maps at alpha 4/24 (PSA: 32),
# the feature AffinityNet trained whole (lr 0.01, batch 8, 8 epochs, crop 448 after a longer side of 448-768), the
# walk with beta 8 and 2^6 steps (PSA: 2^8) and PPC's constant background 0.27; pseudo masks at 0.5, where a class
# beats the walked background (PSA's argmax). Its affinity labels need no saliency stage. Set before the dataset
# recipes below, so these take the place of IRN's defaults and any variable stays overridable.
RW_METHOD=${RW_METHOD:-irn}
if [[ "$RW_METHOD" == psa ]]; then
  AFF_ALPHA_LOW=${AFF_ALPHA_LOW:-4}; AFF_ALPHA_HIGH=${AFF_ALPHA_HIGH:-24}; AFF_PSA_CRF_T=${AFF_PSA_CRF_T:-10}
  RW_BG=${RW_BG:-0.27}; RW_BETA=${RW_BETA:-8}; PSEUDO_T=${PSEUDO_T:-0.5}; AFF_SALIENCY=false
  LR_AFF=${LR_AFF:-0.01}  # the whole network trains (IRN's recipe trains a head on a frozen backbone)
  if [[ "$DATASET" != synthetic ]]; then
    RW_EXP=${RW_EXP:-6}; EPOCHS_AFF=${EPOCHS_AFF:-8}; BATCH_AFF=${BATCH_AFF:-8}
    IMAGE_SIZE_AFF=${IMAGE_SIZE_AFF:-448}; MIN_SIZE_AFF=${MIN_SIZE_AFF:-448}; MAX_SIZE_AFF=${MAX_SIZE_AFF:-768}
  fi
elif [[ "$RW_METHOD" != irn ]]; then
  echo "error: unknown RW_METHOD=$RW_METHOD (choose irn or psa)" >&2; exit 2
fi
AFF_DOMAIN=${AFF_DOMAIN:-$SAL_DOMAIN}
AFF_FG=${AFF_FG:-0.40}; AFF_BG=${AFF_BG:-0.10}; AFF_CRF_T=${AFF_CRF_T:-10}; AFF_CRF_GT=${AFF_CRF_GT:-0.7}
AFF_SALIENCY=${AFF_SALIENCY:-true}  # false: affinity labels from two CAM thresholds only (IRN / Puzzle-CAM)
PSEUDO_CRF_T=${PSEUDO_CRF_T:-1}; PSEUDO_CRF_GT=${PSEUDO_CRF_GT:-0.9}
PSEUDO_MIN_FG=${PSEUDO_MIN_FG:-0.01}  # stop when fewer pixels carry a class (make_pseudo_labels.py --min_foreground)
case "$DATASET" in
  voc12|coco14)
    ARCH_AFF=${ARCH_AFF:-resnest269}; AFF_WEIGHTS=${AFF_WEIGHTS:-imagenet}; OPTIMIZER_AFF=${OPTIMIZER_AFF:-sgd}
    EPOCHS_AFF=${EPOCHS_AFF:-3}; BATCH_AFF=${BATCH_AFF:-32}; LR_AFF=${LR_AFF:-0.1}
    IMAGE_SIZE_AFF=${IMAGE_SIZE_AFF:-512}; MIN_SIZE_AFF=${MIN_SIZE_AFF:-320}; MAX_SIZE_AFF=${MAX_SIZE_AFF:-640}
    if [[ "$DATASET" == voc12 ]]; then RW_DOMAINS=${RW_DOMAINS:-"train_aug val"}; PSEUDO_DOMAINS=${PSEUDO_DOMAINS:-train_aug,val}
    else RW_DOMAINS=${RW_DOMAINS:-"train2014"}; PSEUDO_DOMAINS=${PSEUDO_DOMAINS:-train2014}; fi ;;
  synthetic)
    # CPU-sized: ResNet-18 frozen at the priors' ordinary classifier (the stand-in for ImageNet weights), 96 px.
    # AffinityNet gets 120 momentum steps (VOC's recipe has ~1000 plain SGD steps): with 36 plain steps its boundary
    # maps had not moved from the initial 0.5 (RW mIoU 34.7 from CAMs at 62.8). The walk is short: a 96 px image is
    # a 24x24 grid, ~4.5x narrower than VOC's, and with the boundaries this AffinityNet learns here every further
    # doubling of the walk lost mIoU (the same AffinityNet, RW mIoU on train at exp_times 8 / 4 / 3 / 2 / 1 / 0:
    # 48.9 / 60.2 / 64.8 / 69.8 / 72.0 / 72.0). Pseudo masks at that sweep's best threshold (0.40; the reference
    # chose its 0.3 the same way, on VOC train).
    ARCH_AFF=${ARCH_AFF:-resnet18}; AFF_WEIGHTS=${AFF_WEIGHTS:-}  # empty: the ordinary classifier (tags.sh)
    EPOCHS_AFF=${EPOCHS_AFF:-10}; BATCH_AFF=${BATCH_AFF:-16}; LR_AFF=${LR_AFF:-0.1}; OPTIMIZER_AFF=${OPTIMIZER_AFF:-momentum}
    RW_EXP=${RW_EXP:-1}; PSEUDO_T=${PSEUDO_T:-0.40}
    IMAGE_SIZE_AFF=${IMAGE_SIZE_AFF:-96}; MIN_SIZE_AFF=${MIN_SIZE_AFF:-80}; MAX_SIZE_AFF=${MAX_SIZE_AFF:-112}
    RW_DOMAINS=${RW_DOMAINS:-"train val"}; PSEUDO_DOMAINS=${PSEUDO_DOMAINS:-train,val} ;;
esac
RW_BETA=${RW_BETA:-10}; RW_EXP=${RW_EXP:-8}; PSEUDO_T=${PSEUDO_T:-0.3}
# The reference evaluates the RW maps at thresholds 0.25-0.35 with a label CRF (t 1, gt 0.9); the sweep here is
# wider so the table shows where the best threshold lies.
RW_THRESHOLDS=(--min_th 0.05 --max_th 0.60 --step_th 0.05)
