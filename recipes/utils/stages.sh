# Shared by the recipes (source it after setting $recipe, $stage, $stop_stage and $exp):
# stage gating and timing, and the names of compression conditions.

log() { echo "$(date '+%H:%M:%S') [$recipe] $*"; }
run_stage() {  # run_stage N NAME: true when stage N is within --stage..--stop_stage
  [ "$1" -ge "$stage" ] && [ "$1" -le "$stop_stage" ] || return 1
  log "stage $1: $2"; stage_start=$(date +%s)
}
end_stage() { echo -e "$1\t$2\t$(( $(date +%s) - stage_start ))" >> "$exp/timings.tsv"; }

# condition name (frames, peaks, uniform-mean-k3, uniform-pick-k2, ...) → segmentation,
# its lalmtool segment options, the pooling reducer, and the feature store of a set
seg_of() { case "$1" in peaks) echo "peaks";; *-k*) echo "uniform-k${1##*-k}";; esac; }
seg_args() { case "$1" in peaks) echo "--method peaks";; uniform-k*) echo "--method uniform --k ${1#uniform-k}";; esac; }
reduce_of() { case "$1" in *-pick-*) echo pick;; *) echo mean;; esac; }
feats_of() { [ "$1" = frames ] && echo "$exp/feats/frames/$2" || echo "$exp/pooled/$1/$2"; }
