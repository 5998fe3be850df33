# Shared by the corpus recipes (source it after stages.sh): stage 0 from a local Hugging Face
# dataset (--hf_dataset) or from lhotse manifests (--lhotse_cuts) in place of the raw corpus.
# Both write $data/<set>/manifest.jsonl for every set of $sets, through ${cpu_cmd:-}, with
# --on-error $on_error; the stages after 0 read those manifests as they read the raw corpus's.

# pair_value KEY PAIRS...: the value of KEY in "key=value" words (the last one wins), or nothing
pair_value() {
  local key=$1 pair value=
  shift
  for pair in "$@"; do
    [ "${pair%%=*}" = "$key" ] && value=${pair#*=}
  done
  echo "$value"
}

# one_source SOURCE... : fails when options of more than one SOURCE are set, naming them; a
# SOURCE is an option's variable, or several joined by + (cv_root+covost_root: one source)
one_source() {
  local source name label given=()
  for source in "$@"; do
    label=
    for name in ${source//+/ }; do [ -n "${!name}" ] && label+="${label:+ }--$name"; done
    [ -n "$label" ] && given+=("$label")
  done
  [ ${#given[@]} -le 1 ] && return 0
  label=${given[0]}
  for source in "${given[@]:1}"; do label+=" and $source"; done
  echo "stage 0 reads one corpus source, got $label: give only one of them" >&2
  return 1
}

# prepare_hf_sets "SET=SPLIT ..." [PREPARE OPTIONS...]: every set of $sets from the split the
# default map (first argument) or $hf_splits (which wins) gives it; a set in neither is read from
# the split of its own name. The dataset is local: a save_to_disk directory or Parquet/Arrow files.
prepare_hf_sets() {
  local default_map=$1 set split
  shift
  if [ ! -e "$hf_dataset" ]; then
    echo "stage 0: --hf_dataset $hf_dataset not found (give a local dataset: a save_to_disk" \
      "directory or Parquet/Arrow files; nothing is downloaded)" >&2
    return 1
  fi
  for set in $sets; do
    # shellcheck disable=SC2086  # the maps are space-separated words
    split=$(pair_value "$set" $default_map ${hf_splits:-})
    split=${split:-$set}
    log "stage 0: $set from split $split of $hf_dataset"
    ${cpu_cmd:-} "$python" -m lalmtool prepare hf-dataset --path "$hf_dataset" --split "$split" \
      --out "$data/$set" --on-error "$on_error" "$@" || return 1
  done
}

# lhotse_inputs PREFIX SET: sets lhotse_opts to the prepare lhotse options that read SET from
# $lhotse_cuts, which is one of
#   set=FILE words   "train=cuts/a.jsonl.gz dev=cuts/b.jsonl.gz": SET's CutSet is FILE;
#   a pattern        "data/fbank/librispeech_cuts_{set}.jsonl.gz": {set} replaced by SET;
#   a directory      holding PREFIX_cuts_SET.jsonl.gz (a CutSet, as icefall's data/fbank), or
#                    PREFIX_recordings_SET.jsonl.gz + PREFIX_supervisions_SET.jsonl.gz (what
#                    `lhotse prepare` writes into data/manifests).
lhotse_inputs() {
  local prefix=$1 set=$2 file rec sup
  lhotse_opts=()
  if [[ "$lhotse_cuts" != *"{set}"* && "$lhotse_cuts" == *=* ]]; then
    # shellcheck disable=SC2086
    file=$(pair_value "$set" $lhotse_cuts)
    [ -n "$file" ] || { echo "stage 0: --lhotse_cuts names no CutSet for set $set (give" \
      "$set=FILE among its set=FILE words)" >&2; return 1; }
  elif [[ "$lhotse_cuts" == *"{set}"* ]]; then
    file=${lhotse_cuts//\{set\}/$set}
  elif [ -d "$lhotse_cuts" ]; then
    file=$lhotse_cuts/${prefix}_cuts_$set.jsonl.gz
    rec=$lhotse_cuts/${prefix}_recordings_$set.jsonl.gz
    sup=$lhotse_cuts/${prefix}_supervisions_$set.jsonl.gz
    if [ ! -f "$file" ] && [ -f "$rec" ] && [ -f "$sup" ]; then
      lhotse_opts=(--recordings "$rec" --supervisions "$sup")
      return 0
    fi
    [ -f "$file" ] || { echo "stage 0: no lhotse manifests of set $set in $lhotse_cuts (looked" \
      "for ${prefix}_cuts_$set.jsonl.gz, or ${prefix}_recordings_$set.jsonl.gz and" \
      "${prefix}_supervisions_$set.jsonl.gz)" >&2; return 1; }
  else
    echo "stage 0: --lhotse_cuts $lhotse_cuts is not a directory, nor a pattern with {set}," \
      "nor set=FILE words" >&2
    return 1
  fi
  [ -f "$file" ] || { echo "stage 0: lhotse CutSet of set $set not found: $file" >&2; return 1; }
  lhotse_opts=(--cuts "$file")
}

# prepare_lhotse_sets PREFIX [PREPARE OPTIONS...]: every set of $sets from $lhotse_cuts (every
# set's input found before any is prepared)
prepare_lhotse_sets() {
  local prefix=$1 set
  shift
  for set in $sets; do lhotse_inputs "$prefix" "$set" || return 1; done
  for set in $sets; do
    lhotse_inputs "$prefix" "$set"
    log "stage 0: $set from lhotse ${lhotse_opts[*]}"
    ${cpu_cmd:-} "$python" -m lalmtool prepare lhotse "${lhotse_opts[@]}" --out "$data/$set" \
      --on-error "$on_error" "$@" || return 1
  done
}
