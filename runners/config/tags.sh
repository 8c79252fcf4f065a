# The pipeline's run names, in one place: every stage's tag is derived from the tag of the stage whose output it
# reads, so a change upstream (another architecture, another EID) renames everything downstream and nothing silently
# reuses an older run. Source after the stage configs (dataset.sh, cam.sh, saliency.sh, rw.sh, segmentation.sh);
# any TAG_* can be set in the environment to point a stage at another run.
EID=${EID:-r1}
TAG_OC=${TAG_OC:-vanilla/$DATASET-$ARCH-lr$LR-ls-ra-$EID}
TAG_PNOC=${TAG_PNOC:-pnoc/$DATASET-$ARCH-pnoc-b$BATCH_PNOC-a$PUZZLE_ALPHA-lr$LR-ls@$ARCH-lsra-$EID}
TAG_CCAMH=${TAG_CCAMH:-ccamh/$DATASET-${ARCH_SAL:-$ARCH}-fg${FG_T:-0.4}@pnoc-$EID}
TAG_PN=${TAG_PN:-poolnet/$DATASET-${ARCH_PN:-resnet50}@ccamh-$EID}
TAG_AFF=${TAG_AFF:-affnet/$DATASET-${ARCH_AFF:-$ARCH}@pnoc+poolnet-$EID}
TAG_SEG=${TAG_SEG:-deeplabv3+/$DATASET-${ARCH_SEG:-$ARCH}@rw-$EID}
TAG_SEG_GT=${TAG_SEG_GT:-deeplabv3+/$DATASET-${ARCH_SEG:-$ARCH}@gt-$EID}  # trained on GT: the upper bound

# Where the stages put what the next one reads (the scripts' own naming rules, core/paths.py).
OC_WEIGHTS=experiments/models/$TAG_OC.pth
cams_of() { echo "experiments/predictions/$1@$2@scale=$SCALES"; }  # cams_of TAG DOMAIN
# On synthetic the ordinary classifier stands in for ImageNet weights (saliency.sh leaves these empty there).
SAL_WEIGHTS=${SAL_WEIGHTS:-$OC_WEIGHTS}
PN_WEIGHTS=${PN_WEIGHTS:-$OC_WEIGHTS}
