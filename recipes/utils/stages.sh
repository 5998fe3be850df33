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

# Condition names (what --conditions takes) → segmentation, its lalmtool segment options, the
# pooling reducer, and the feature store of a set:
#   frames | native                  the encoder frames (trimmed | padded 30 s windows), no pooling
#   METHOD[-REDUCE][-PARAM][-kd]     `lalmtool segment --method METHOD` + `pool --reduce REDUCE`
#     METHOD  peaks | uniform | scpc | prominence | ctc
#     REDUCE  mean (default) | pick | learnt: a pooler trained with the condition's LoRA
#             (`finetune --segments` on the source's features), then `pool --reduce learnt
#             --pooler` with its adapter for every set it decodes
#     PARAM   kK   uniform every K frames (--k K)
#             rR   R tokens/s: uniform --target-rate R (k from the frame rate); scpc and
#                  prominence: the threshold that `segment --target-rate R` picks on
#                  $rate_set (default train), then that --threshold on every other set
#             tX   --threshold X (scpc, prominence)
#             blankjoin | blankkeep   ctc: `lalmtool ctc segment --blank join|keep` (the CTC
#                  boundaries come from a CTC head trained by `lalmtool align`: ctc_seg_cmd)
#     -kd     (learnt only) distilled from the adapter of the source condition (frames unless
#             chained; list it first): `finetune --teacher` with --distill ${distill:-0.5}
#     e.g. peaks, uniform-mean-k3, uniform-pick-k2, prominence-mean-r5, scpc-mean-r10, scpc-t0.1,
#          uniform-learnt-k10-kd
#   SOURCE+STEP                      STEP (a name above) applied to the pooled features of the
#                                    condition SOURCE, e.g. peaks+uniform-mean-k3 (peaks tokens
#                                    pooled by 3), peaks+prominence-mean-r10
# The segmentation (seg_of) names $exp/seg/<seg>/<set>: METHOD[-PARAM], prefixed by SOURCE+ for
# a chained step; the pooled store is $exp/pooled/<condition>/<set>.
cond_ok() {  # cond_ok COND: true for a valid name, else an error on stderr naming it
  local c=$1 last=${1##*+} method param
  [ "$c" = frames ] || [ "$c" = native ] && return 0
  if [[ "$c" == *+* ]]; then
    cond_ok "${c%+*}" || return 1
    [[ "$last" == ctc* ]] && { echo "condition $c: ctc cannot follow another condition" >&2; return 1; }
  fi
  if [[ ! "$last" =~ ^(peaks|uniform|scpc|prominence|ctc)(-(mean|pick|learnt))?(-(k[0-9]+|r[0-9]+(\.[0-9]+)?|t[0-9]+(\.[0-9]+)?|blankjoin|blankkeep))?(-kd)?$ ]]; then
    echo "condition $c: not a condition name (frames, native, METHOD[-mean|-pick|-learnt][-kK|-rR|-tX][-kd], SOURCE+STEP; see recipes/utils/stages.sh)" >&2
    return 1
  fi
  method=${BASH_REMATCH[1]} param=${BASH_REMATCH[5]}
  if [ -n "${BASH_REMATCH[8]}" ] && [ "${BASH_REMATCH[3]}" != learnt ]; then
    echo "condition $c: -kd (distillation) is for a learnt pooler: METHOD-learnt-...-kd" >&2
    return 1
  fi
  case "$method:$param" in
    peaks:) ;;
    uniform:k*|uniform:r*) [ "${param#k}" != 0 ] || { echo "condition $c: k must be >= 1" >&2; return 1; } ;;
    scpc:|scpc:r*|scpc:t*|prominence:|prominence:r*|prominence:t*) ;;
    ctc:blank*) ;;
    *) echo "condition $c: $method ${param:+does not take $param}${param:-needs a parameter}" \
         "(uniform: kK or rR; scpc, prominence: rR or tX; peaks: none; ctc: blankjoin or blankkeep)" >&2
       return 1 ;;
  esac
}
cond_src() {  # the condition whose features COND's last step compresses (frames unless chained)
  [[ "$1" == *+* ]] && echo "${1%+*}" || echo frames
}
seg_of() {  # COND → its segmentation's name, e.g. uniform-mean-k3 → uniform-k3
  local c=$1 last=${1##*+} pre=
  [[ "$c" == *+* ]] && pre="${c%+*}+"
  last=${last/-mean/}; last=${last/-pick/}; last=${last/-learnt/}; last=${last%-kd}
  echo "$pre$last"
}
seg_args() {  # segmentation name → `lalmtool segment` options (ctc: none, see seg_cmd)
  local s=${1##*+} method param
  method=${s%%-*} param=
  [ "$method" = "$s" ] || param=${s#*-}
  case "$param" in
    "") echo "--method $method" ;;
    k*) echo "--method $method --k ${param#k}" ;;
    r*) echo "--method $method --target-rate ${param#r}" ;;
    t*) echo "--method $method --threshold ${param#t}" ;;
    blank*) ;;
  esac
}
reduce_of() {
  case "${1##*+}" in *-pick|*-pick-*) echo pick;; *-learnt|*-learnt-*) echo learnt;; *) echo mean;; esac
}
feats_of() {  # feats_of COND SET: the feature store COND's decoder input is read from
  case "$1" in
    frames|native) echo "$exp/feats/$1/$2" ;;
    *) echo "$exp/pooled/$1/$2" ;;
  esac
}
# ctc_seg_cmd SEG SET: a ctc-blankjoin|ctc-blankkeep segmentation of SET's frames, by a CTC
# head that `lalmtool align` trains once on $train_set (validated on $dev_set) into
# $exp/align/$ctc_backend: for whisper (the default) a head on the encoder frames, for
# speechllm its projector; ${align_opts[@]} are align's options (the defaults below if unset).
ctc_seg_cmd() {
  local seg=$1 set=$2 al="$exp/align/${ctc_backend:-whisper}"
  local opts=("${align_opts[@]:---max-steps=400 --lr=3e-3 --valid-every=100 --save-every=100}")
  [ ${#align_opts[@]} -gt 0 ] || read -r -a opts <<< "${opts[0]}"
  ${cpu_cmd:-} "$python" -m lalmtool align --backend "${ctc_backend:-whisper}" \
    --feats "$exp/feats/frames/$train_set" --manifest "$data/$train_set/manifest.jsonl" \
    --valid-feats "$exp/feats/frames/$dev_set" --valid-manifest "$data/$dev_set/manifest.jsonl" \
    --model "$model" --out "$al" "${opts[@]}" > /dev/null || return 1
  ${cpu_cmd:-} "$python" -m lalmtool ctc segment --align "$al" --feats "$exp/feats/frames/$set" \
    --model "$model" --blank "${seg##*-blank}" --out "$exp/seg/$seg/$set"
}
# seg_cmd COND SET: the segmentation of COND's last step over the features of its source.
# A ctc condition is cut by `lalmtool ctc segment --align DIR --blank join|keep` from a
# projector aligned by `lalmtool align` (recipes/mini_speechllm stage 8 does it for the
# speechllm backend); its place is here, not yet wired to the whisper recipes.
seg_cmd() {
  local cond=$1 set=$2 seg args ref thr
  seg=$(seg_of "$cond")
  case "${seg##*+}" in
    ctc-*) ctc_seg_cmd "$seg" "$set"; return ;;
  esac
  args=$(seg_args "$seg")
  case "$args" in
    "--method scpc --target-rate "*|"--method prominence --target-rate "*)
      if [ "$set" != "${rate_set:-train}" ]; then
        ref="$exp/seg/$seg/${rate_set:-train}"
        thr=$(store_threshold "$ref") || {
          echo "condition $cond: segment ${rate_set:-train} first: its threshold for" \
            "${args##* } tokens/s (in $ref) is used for $set" >&2
          return 1; }
        args="${args%% --target-rate*} --threshold $thr"
      fi ;;
  esac
  ${cpu_cmd:-} "$python" -m lalmtool segment --feats "$(feats_of "$(cond_src "$cond")" "$set")" \
    $args --out "$exp/seg/$seg/$set"
}
store_threshold() {  # store_threshold SEGSTORE: the threshold a finished boundary store used
  [ -f "$1/store.json" ] && "$python" -c 'import json, sys
print(repr(float(json.load(open(sys.argv[1]))["meta"]["params"]["threshold"])))' "$1/store.json"
}

# stage 1: encoder frames of every set given, with the recipe's ${extract_opts[@]}
extract_sets() {
  local set
  for set in "$@"; do
    ${gpu_cmd:-} "$python" -m lalmtool extract \
      --manifest "$data/$set/manifest.jsonl" "${extract_opts[@]}" --out "$exp/feats/frames/$set"
  done
}

# stage 2: each distinct segmentation of $conditions on the frames of every set given (a
# chained condition's: that of the condition it starts from; its own step runs in stage 3)
segment_sets() {
  local c root seg set _segmented=
  for c in $conditions; do cond_ok "$c" || return 1; done
  for root in $(for c in $conditions; do echo "${c%%+*}"; done | awk '!seen[$0]++'); do
    case "$root" in frames|native) continue ;; esac
    seg=$(seg_of "$root")
    [[ " $_segmented " == *" $seg "* ]] && continue
    _segmented+=" $seg"
    for set in "$@"; do
      seg_cmd "$root" "$set" || return 1
    done
  done
}

# stage 3: every condition of $conditions but frames, pooled for every set given; a chained
# condition pools its source first, then segments and pools its own step
pool_sets() {
  local cond set _pooled=
  for cond in $conditions; do cond_ok "$cond" || return 1; done
  for cond in $conditions; do
    case "$cond" in frames|native) continue ;; esac
    for set in "$@"; do
      pool_condition "$cond" "$set" || return 1
    done
  done
}
pool_condition() {  # pool_condition COND SET (each condition and set once per pool_sets call)
  local cond=$1 set=$2 src
  src=$(cond_src "$cond")
  case "$cond" in frames|native) return 0 ;; esac
  [[ " ${_pooled:-} " == *" $cond:$set "* ]] && return 0
  local pooler=() adapter="$exp/lora/$cond/adapter"
  if [ "$(reduce_of "$cond")" = learnt ]; then  # pooled by the pooler its finetune trained
    [ -f "$adapter/pooler.safetensors" ] || return 0
    pooler=(--pooler "$adapter")
    # a retrained pooler replaces the stores that the one before it wrote
    pooled_by_another "$(feats_of "$cond" "$set")" "$adapter" && pooler+=(--force)
  fi
  if [ "$src" != frames ]; then
    pool_condition "$src" "$set" || return 1
    seg_cmd "$cond" "$set" || return 1
  fi
  ${cpu_cmd:-} "$python" -m lalmtool pool --feats "$(feats_of "$src" "$set")" \
    --segments "$exp/seg/$(seg_of "$cond")/$set" \
    --reduce "$(reduce_of "$cond")" "${pooler[@]}" --out "$(feats_of "$cond" "$set")" \
    || return 1
  _pooled+=" $cond:$set"
}
pooled_by_another() {  # pooled_by_another STORE ADAPTER: STORE exists, pooled by another pooler
  [ -f "$1/store.json" ] || return 1
  [ "$("$python" -c 'import json, sys
print(json.load(open(sys.argv[1]))["meta"].get("pooler", {}).get("identity", {}).get("sha256"))' \
    "$1/store.json")" != "$(sha256sum "$2/pooler.safetensors" | cut -d" " -f1)" ]
}

# stage 4: finetune_condition COND NAME [OPTIONS...]: LoRA on COND's features of $train_set,
# validated on $dev_set's, written to $exp/lora/NAME; a learnt condition trains its pooler
# with it on its source's features and boundaries (-kd: distilled from the source's adapter)
finetune_condition() {
  local cond=$1 name=$2 src feats=$1 learnt=() s
  shift 2
  if [ "$(reduce_of "$cond")" = learnt ]; then
    src=$(cond_src "$cond") feats=$src
    if [ "$src" != frames ]; then  # a chained step: its boundaries over its source's tokens
      for s in "$train_set" "$dev_set"; do
        { pool_condition "$src" "$s" && seg_cmd "$cond" "$s"; } || return 1
      done
    fi
    learnt=(--segments "$exp/seg/$(seg_of "$cond")/$train_set"
            --valid-segments "$exp/seg/$(seg_of "$cond")/$dev_set")
    if [[ "$cond" == *-kd ]]; then
      [ -f "$exp/lora/$src/adapter/adapter_config.json" ] || {
        echo "condition $cond distils from the adapter of $src: finetune $src first (list it" \
          "before $cond in --conditions)" >&2; return 1; }
      learnt+=(--teacher "$exp/lora/$src/adapter" --distill "${distill:-0.5}")
    fi
  fi
  ${gpu_cmd:-} "$python" -m lalmtool finetune --feats "$(feats_of "$feats" "$train_set")" \
    --manifest "$data/$train_set/manifest.jsonl" \
    --valid-feats "$(feats_of "$feats" "$dev_set")" --valid-manifest "$data/$dev_set/manifest.jsonl" \
    --out "$exp/lora/$name" "${learnt[@]}" "$@"
}

# stage 5: decode_condition COND SET NAME [OPTIONS...]: COND's features of SET, decoded into
# $exp/decode/NAME/SET with the references of $data/SET
decode_condition() {
  local cond=$1 set=$2 name=$3
  shift 3
  if [ "$(reduce_of "$cond")" = learnt ]; then  # its pooler comes with its adapter
    [ -f "$exp/lora/$cond/adapter/pooler.safetensors" ] || {
      echo "condition $cond: finetune it first (stage 4 trains its pooler)" >&2; return 1; }
    pool_condition "$cond" "$set" || return 1
  fi
  ${gpu_cmd:-} "$python" -m lalmtool decode --feats "$(feats_of "$cond" "$set")" --set "$set" \
    --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$name/$set" "$@"
}

# stage 6: score every decode under $exp/decode/<name>/<set> against $data/<set>'s manifest:
# score_decodes [METRIC [SCORE OPTIONS...]] (default wer; bleu scores BLEU and chrF)
score_decodes() {
  local metric=${1:-wer} hyp set hyps=()
  [ $# -gt 0 ] && shift
  for hyp in "$exp"/decode/*/*/hyp.jsonl; do  # an unmatched glob stays as written: not a file
    if [ -f "$hyp" ]; then hyps+=("$hyp"); fi
  done
  if [ ${#hyps[@]} -eq 0 ]; then
    echo "[$recipe] no decodes under $exp/decode: run stage 5 first" >&2
    return 1
  fi
  for hyp in "${hyps[@]}"; do
    set=$(basename "$(dirname "$hyp")")
    ${cpu_cmd:-} "$python" -m lalmtool score --hyp "$hyp" --ref "$data/$set/manifest.jsonl" \
      --metric "$metric" "$@" > /dev/null
  done
}
