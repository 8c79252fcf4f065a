# The pipeline's run names, in one place: every stage's tag is derived from the tag of the stage whose output it
# reads, so a change upstream (another architecture, another EID) renames everything downstream and nothing silently
# reuses an older run. Source after the stage configs (dataset.sh, cam.sh, saliency.sh, rw.sh, segmentation.sh);
# any TAG_* can be set in the environment to point a stage at another run.
EID=${EID:-r1}
TAG_OC=${TAG_OC:-vanilla/$DATASET-$ARCH-lr$LR-ls-ra-$EID}
TAG_PNOC=${TAG_PNOC:-pnoc/$DATASET-$ARCH-pnoc-b$BATCH_PNOC-a$PUZZLE_ALPHA-lr$LR-ls@$ARCH-lsra-$EID}
TAG_CCAMH=${TAG_CCAMH:-ccamh/$DATASET-${ARCH_SAL:-$ARCH}-fg${FG_T:-0.4}@pnoc-$EID}
TAG_PN=${TAG_PN:-poolnet/$DATASET-${ARCH_PN:-resnet50}@ccamh-$EID}
aff_inputs=pnoc+poolnet; [[ "${AFF_SALIENCY:-true}" == true ]] || aff_inputs=pnoc
[[ "${RW_METHOD:-irn}" == irn ]] || aff_inputs=pnoc-$RW_METHOD  # PSA's AffinityNet on the P-NOC CAMs
TAG_AFF=${TAG_AFF:-affnet/$DATASET-${ARCH_AFF:-$ARCH}@$aff_inputs-$EID}  # AffinityNet; its RW maps carry its name
# DeepLabV3+ trains on LABEL_NAME (a folder under experiments/predictions/, or gt); its tag names that source.
rw_walk=beta=${RW_BETA:-10}@exp_times=${RW_EXP:-8}  # scripts/rw/inference.py's folder naming
[[ "${RW_METHOD:-irn}" == psa ]] && rw_walk=beta=$RW_BETA@logt=$RW_EXP@bg=$RW_BG
PSEUDO_MASKS=$TAG_AFF@$rw_walk@rw@t=${PSEUDO_T:-0.3}@crf=${PSEUDO_CRF_T:-1}
LABEL_NAME=${LABEL_NAME:-$PSEUDO_MASKS}
label_id=${LABEL_NAME//\//_}
seg_os=""; [[ "${DILATED_SEG:-false}" == true ]] && seg_os=-os8
TAG_SEG=${TAG_SEG:-seg/$DATASET-d3p-${ARCH_SEG:-$ARCH}$seg_os@${label_id%%@*}-$EID$(seed_suffix "${SEED_SEG:-0}")}

# Where the stages put what the next one reads (the scripts' own naming rules, core/paths.py).
OC_WEIGHTS=experiments/models/$TAG_OC.pth
cams_of() { echo "experiments/predictions/$1@$2@scale=$SCALES"; }  # cams_of TAG DOMAIN
poolnet_of() { echo "experiments/predictions/$TAG_PN@$1"; }         # poolnet_of DOMAIN
AFF_LABELS=experiments/predictions/$TAG_PNOC@aff_fg=${AFF_FG:-0.40}_bg=${AFF_BG:-0.10}
[[ "${AFF_SALIENCY:-true}" == true ]] || AFF_LABELS=$AFF_LABELS@cams_only
[[ "${RW_METHOD:-irn}" == psa ]] && AFF_LABELS=experiments/predictions/$TAG_PNOC@aff_la=${AFF_ALPHA_LOW}_ha=${AFF_ALPHA_HIGH}
rw_of() { echo "experiments/predictions/$TAG_AFF@$1@$rw_walk@rw"; }  # rw_of DOMAIN
seg_pred() {  # seg_pred DOMAIN: the inference folder of TAG_SEG on DOMAIN (scripts/segmentation/inference.py's name)
  local crf=""; (( SEG_CRF_T > 0 )) && crf="@crf=$SEG_CRF_T"
  [[ "$SEG_CRF_GT" == 1 || "$SEG_CRF_T" == 0 ]] || crf="$crf@gt=$SEG_CRF_GT"
  echo "experiments/predictions/$TAG_SEG@$1@scale=$SEG_SCALES$crf"
}
# On synthetic the ordinary classifier stands in for ImageNet weights (saliency.sh leaves these empty there).
SAL_WEIGHTS=${SAL_WEIGHTS:-$OC_WEIGHTS}
PN_WEIGHTS=${PN_WEIGHTS:-$OC_WEIGHTS}
AFF_WEIGHTS=${AFF_WEIGHTS:-$OC_WEIGHTS}
SEG_WEIGHTS=${SEG_WEIGHTS:-$OC_WEIGHTS}
# The pseudo masks of every PSEUDO_DOMAINS are one folder: experiments/predictions/$PSEUDO_MASKS (above).
