# Every stage's recipe, then the pipeline's run names (tags.sh), in the order they depend on each other. The stage
# runners source env.sh and then this file, so every stage sees the same tags. Every ${VAR:-default} in these files
# can be overridden from the environment.
source "$REPO/runners/config/dataset.sh"
source "$REPO/runners/config/cam.sh"
source "$REPO/runners/config/saliency.sh"
source "$REPO/runners/config/tags.sh"
