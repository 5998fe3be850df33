# Shared by the recipes (source it after setting $recipe, $stage, $stop_stage, $exp, $data and
# $conditions): stage gating and timing, the interpreter that runs lalmtool ($python), the names
# of compression conditions, and the segment, pool and score loops. Commands run through
# ${cpu_cmd:-} (segment, pool, score) and ${gpu_cmd:-} (extract, finetune, decode) when the
# recipe sets them (see cmd.sh): empty runs them here, a launcher such as "srun --gres=gpu:1"
# runs the same command on a cluster.

log() { echo "$(date '+%H:%M:%S') [$recipe] $*"; }
run_stage() {  # run_stage N NAME: true when stage N is within --stage..--stop_stage
  [ "$1" -ge "$stage" ] && [ "$1" -le "$stop_stage" ] || return 1
  log "stage $1: $2"; stage_start=$(date +%s)
}
end_stage() { echo -e "$1\t$2\t$(( $(date +%s) - stage_start ))" >> "$exp/timings.tsv"; }

# The interpreter that has lalmtool, resolved once into $python: $PYTHON (e.g. a venv's
# bin/python while the venv is not activated; a relative path is taken from the directory the
# recipe was started in), else the project's .venv that install.sh makes on an externally
# managed system Python, else python3 from PATH. Recipes run everything through it, launchers
# included: "$python" local/script.py, ${gpu_cmd:-} "$python" -m lalmtool extract ...
resolve_python() {
  local venv found want
  venv=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv/bin/python
  want=${PYTHON:-python3}
  if [ -z "${PYTHON:-}" ] && [ -x "$venv" ] && ! python3 -c 'import lalmtool' 2> /dev/null; then
    want=$venv
  fi
  case "$want" in
    /*) ;;
    */*) want=${OLDPWD:-$PWD}/$want ;;  # run.sh's cd into its folder left the caller's in OLDPWD
  esac
  found=$(command -v "$want") || {
    echo "[$recipe] PYTHON=$want: no such interpreter; set PYTHON to the python of the" \
      "environment lalmtool is installed in" >&2; return 1; }
  "$found" -c 'import lalmtool' 2> /dev/null || {
    echo "[$recipe] $found cannot import lalmtool; set PYTHON to the python of the environment" \
      "lalmtool is installed in (e.g. PYTHON=/path/to/venv/bin/python), or activate it" >&2
    return 1; }
  echo "$found"
}
python=$(resolve_python) || exit 1

# condition name (frames, peaks, uniform-mean-k3, uniform-pick-k2, ...) → segmentation,
# its lalmtool segment options, the pooling reducer, and the feature store of a set
seg_of() { case "$1" in peaks) echo "peaks";; *-k*) echo "uniform-k${1##*-k}";; esac; }
seg_args() { case "$1" in peaks) echo "--method peaks";; uniform-k*) echo "--method uniform --k ${1#uniform-k}";; esac; }
reduce_of() { case "$1" in *-pick-*) echo pick;; *) echo mean;; esac; }
feats_of() { [ "$1" = frames ] && echo "$exp/feats/frames/$2" || echo "$exp/pooled/$1/$2"; }

# stage 1: encoder frames of every set given, with the recipe's ${extract_opts[@]}
extract_sets() {
  local set
  for set in "$@"; do
    ${gpu_cmd:-} "$python" -m lalmtool extract \
      --manifest "$data/$set/manifest.jsonl" "${extract_opts[@]}" --out "$exp/feats/frames/$set"
  done
}

# stage 2: each distinct segmentation of $conditions on the frames of every set given
segment_sets() {
  local seg set
  for seg in $(for c in $conditions; do [ "$c" = frames ] || seg_of "$c"; done | sort -u); do
    for set in "$@"; do
      ${cpu_cmd:-} "$python" -m lalmtool segment \
        --feats "$exp/feats/frames/$set" $(seg_args "$seg") --out "$exp/seg/$seg/$set"
    done
  done
}

# stage 3: every condition of $conditions but frames, pooled for every set given
pool_sets() {
  local cond set
  for cond in $conditions; do
    [ "$cond" = frames ] && continue
    for set in "$@"; do
      ${cpu_cmd:-} "$python" -m lalmtool pool --feats "$exp/feats/frames/$set" \
        --segments "$exp/seg/$(seg_of "$cond")/$set" \
        --reduce "$(reduce_of "$cond")" --out "$exp/pooled/$cond/$set"
    done
  done
}

# stage 4: finetune_condition COND NAME [OPTIONS...]: LoRA on COND's features of $train_set,
# validated on $dev_set's, written to $exp/lora/NAME
finetune_condition() {
  local cond=$1 name=$2
  shift 2
  ${gpu_cmd:-} "$python" -m lalmtool finetune --feats "$(feats_of "$cond" "$train_set")" \
    --manifest "$data/$train_set/manifest.jsonl" \
    --valid-feats "$(feats_of "$cond" "$dev_set")" --valid-manifest "$data/$dev_set/manifest.jsonl" \
    --out "$exp/lora/$name" "$@"
}

# stage 5: decode_condition COND SET NAME [OPTIONS...]: COND's features of SET, decoded into
# $exp/decode/NAME/SET with the references of $data/SET
decode_condition() {
  local cond=$1 set=$2 name=$3
  shift 3
  ${gpu_cmd:-} "$python" -m lalmtool decode --feats "$(feats_of "$cond" "$set")" --set "$set" \
    --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$name/$set" "$@"
}

# stage 6: score every decode under $exp/decode/<name>/<set> against $data/<set>'s manifest:
# score_decodes [METRIC [SCORE OPTIONS...]] (default wer; bleu scores BLEU and chrF)
score_decodes() {
  local metric=${1:-wer} hyp set
  [ $# -gt 0 ] && shift
  for hyp in "$exp"/decode/*/*/hyp.jsonl; do
    set=$(basename "$(dirname "$hyp")")
    ${cpu_cmd:-} "$python" -m lalmtool score --hyp "$hyp" --ref "$data/$set/manifest.jsonl" \
      --metric "$metric" "$@" > /dev/null
  done
}
