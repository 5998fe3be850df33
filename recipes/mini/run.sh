#!/usr/bin/env bash
# recipes/mini: the paper's effect, offline, on this CPU, with real Whisper tiny.en weights.
#
# Audio tokens are compressed after the encoder (segmentation, uniform average pooling,
# uniform downsampling); the decoder is re-aligned with LoRA; everything is decoded and scored.
#
# Stages (each can be rerun; finished work is skipped by the tools themselves):
#   0  data/{train,dev,test,librivox}/manifest.jsonl: synthetic TTS speech (espeak-ng, flite)
#      and the 5 real LibriVox clips of pocketsphinx-testdata; fetches whisper-tiny.en
#   1  extract   → $exp/feats/{frames,native}/<set>     encoder frames (HDF5, fp16)
#   2  segment   → $exp/seg/<method>/<set>              segment boundaries
#   3  pool      → $exp/pooled/<condition>/<set>        compressed features
#   4  finetune  → $exp/lora/<condition>/adapter        LoRA on the decoder, one per condition
#   5  decode    → $exp/decode/<condition>[-lora]/<set>/hyp.jsonl
#   6  score, report → $exp/RESULTS.md, $exp/results.json, $exp/results.png
#   7  (opt-in: --stage 7 --stop_stage 7) the equal-rate study: for each rate R of $rates
#      tokens/s, uniform-mean-k{50/R}, uniform-learnt-k{50/R}-kd (a pooling learnt with the
#      LoRA, distilled from the frames adapter), prominence-mean-rR and scpc-mean-rR (the threshold
#      that `lalmtool segment --target-rate R` picks on train, used on every set), and where
#      they reach R (R <= 5) peaks+prominence-mean-rR (prominence over the peaks tokens: at
#      most ~1/3 of them) and peaks+uniform-mean-kK (peaks' ~15 tokens/s pooled by K); each +
#      LoRA (conf/lora.yaml, $steps steps), decoded with it on $study_sets next to native
#      Whisper and the adapters of $conditions (stage 4) → $exp/RESULTS.md,
#      $exp/results_methods.png, $exp/rates.md (the study's table). Measured (2 CPU cores,
#      --nj 1, 17-30 min; WER % test / LibriVox / unseen voices, tokens/s on test): native
#      30.15 / 4.23 / 29.78; uniform-mean-k5 18.93 / 8.45 / 22.57 (10.2); prominence-mean-r10
#      21.04 / 8.45 / 25.39 (10.0); uniform-mean-k10 24.40 / 8.45 / 36.05 (5.2);
#      prominence-mean-r5 29.17 / 36.62 / 32.29 (5.0; 5.5 on unseen); scpc-mean-r5 38.01 /
#      40.85 / 50.16 (5.1); uniform-learnt-k10-kd 21.88 / 9.86 / 27.90 (5.2), -k5-kd 17.25 /
#      7.04 / 19.44 (10.2): at 5 tokens/s only the learnt pooling is within 1.1x native on
#      unseen voices (0.94x)
#
# Condition names (--conditions, --rate_conditions): frames, peaks, uniform-mean-k3,
# uniform-pick-k2, prominence-mean-r5 (5 tokens/s on train), scpc-mean-t0.1 (threshold),
# uniform-learnt-k10-kd (a pooler trained with the LoRA, distilled from frames' adapter),
# peaks+uniform-mean-k3 (a step over another condition's tokens); recipes/utils/stages.sh
# describes them all.
# Test sets: test (held-out synthetic sentences), librivox (5 real clips), unseen (--n_unseen
# held-out sentences of 7-20 words, voices no training utterance uses; add it to --test_sets,
# or run stage 7, which makes it).
#
# Usage: bash recipes/mini/run.sh [--stage N] [--stop_stage M] [--exp DIR] [--nj N]
#                                 [--n_train N] [--steps N] [--conditions "frames peaks ..."]
#                                 [--test_sets "test librivox unseen"] [--rates "5 10"] [--pack 30]
# (every variable set at the top of this script is an option: --name value or --name=value;
#  --config FILE reads such options from a file, one "name=value" per line; --help works from
#  any directory)
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
exp=exp
data=data
nj=2
n_train=1000
n_test=100
steps=300
model_name=whisper-tiny.en
conditions="frames peaks uniform-mean-k2 uniform-mean-k3 uniform-pick-k2 uniform-pick-k3 uniform-mean-k10 uniform-learnt-k10-kd"
test_sets="test librivox"
n_unseen=36              # utterances of the unseen-voices set (when a set named unseen is used)
rates="5 10"             # stage 7: whole tokens/s
rate_conditions=         # stage 7: default derived from $rates (see rate_conditions_for)
study_sets="test librivox unseen"
pack=0                   # stage 1: seconds of consecutive training utterances per encoder window
                         # (extract --pack; 0: one window per utterance); test sets: one each

source ../utils/parse_options.sh
mkdir -p "$exp"
recipe=mini
source ../utils/stages.sh
train_set=train dev_set=dev

# prepare_sets SET...: local/prepare_data.py, with the unseen-voices set when one is named
prepare_sets() {
  local opts=()
  case " $* " in *" unseen "*) opts=(--n-unseen "$n_unseen") ;; esac
  "$python" local/prepare_data.py --out "$data" --n-train "$n_train" --n-test "$n_test" \
    --nj "$nj" "${opts[@]}"
}
# rate_conditions_for R...: the equal-rate study's conditions for each whole rate R (tokens/s)
rate_conditions_for() {
  local r k kp
  for r in "$@"; do
    k=$(( (50 + r / 2) / r ))   # Whisper's 50 frames/s, pooled by k
    kp=$(( (15 + r / 2) / r ))  # peaks: ~15 tokens/s (3.3 frames per token), pooled by kp
    echo "uniform-mean-k$k uniform-learnt-k$k-kd prominence-mean-r$r scpc-mean-r$r"
    # prominence keeps at most every local maximum of the peaks tokens' dissimilarity: ~1/3
    [ $(( 3 * r )) -le 16 ] && echo "peaks+prominence-mean-r$r"
    if [ "$kp" -ge 2 ] && [ $(( 150 / kp )) -ge $(( 9 * r )) ]; then
      echo "peaks+uniform-mean-k$kp"
    fi
  done | tr '\n' ' ' | sed 's/ $//'
}

if run_stage 0 "data preparation and model"; then
  prepare_sets $test_sets
  "$python" -m lalmtool assets fetch "$model_name" | tail -n 1 > "$exp/model_path"
  end_stage 0 prepare
fi
model=$(cat "$exp/model_path" 2>/dev/null \
  || "$python" -m lalmtool assets fetch "$model_name" | tail -n 1)

if run_stage 1 "extract encoder frames"; then
  extract_opts=(--model "$model" --nj "$nj" --batch-size 4)
  [ "$pack" = 0 ] || extract_opts+=(--pack "$pack")
  extract_sets train dev
  extract_opts=(--model "$model" --nj "$nj" --batch-size 4)
  extract_sets $test_sets
  # the native Whisper baseline: all 1500 frames of each padded 30 s window
  for set in $test_sets; do
    "$python" -m lalmtool extract --manifest "$data/$set/manifest.jsonl" --model "$model" \
      --out "$exp/feats/native/$set" --no-trim --batch-size 4
  done
  end_stage 1 extract
fi

if run_stage 2 "segment"; then
  segment_sets train dev $test_sets
  end_stage 2 segment
fi

if run_stage 3 "pool"; then
  pool_sets train dev $test_sets
  end_stage 3 pool
fi

if run_stage 4 "LoRA fine-tuning"; then
  for cond in $conditions; do
    finetune_condition "$cond" "$cond" --model "$model" --config conf/lora.yaml --max_steps="$steps"
  done
  end_stage 4 finetune
fi

if run_stage 5 "decode"; then
  for set in $test_sets; do
    "$python" -m lalmtool decode --feats "$exp/feats/native/$set" --model "$model" --set "$set" \
      --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/native/$set"
    for cond in $conditions; do  # as it is, and with the condition's own adapter
      decode_condition "$cond" "$set" "$cond" --model "$model" \
        --condition "$cond"
      decode_condition "$cond" "$set" "$cond-lora" --model "$model" \
        --adapter "$exp/lora/$cond/adapter" --condition "$cond"
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score and report"; then
  score_decodes
  "$python" -m lalmtool report "$exp"
  end_stage 6 report
fi

if run_stage 7 "equal-rate study at $rates tokens/s"; then
  rate_conditions=${rate_conditions:-$(rate_conditions_for $rates)}
  log "conditions: $rate_conditions; sets: $study_sets"
  prepare_sets $study_sets
  extract_opts=(--model "$model" --nj "$nj" --batch-size 4)
  for set in train dev $study_sets; do  # frames (and native) of the sets stage 1 did not make
    [ -f "$exp/feats/frames/$set/store.json" ] || extract_sets "$set"
    [ "$set" = train ] || [ "$set" = dev ] || [ -f "$exp/feats/native/$set/store.json" ] \
      || "$python" -m lalmtool extract --manifest "$data/$set/manifest.jsonl" --model "$model" \
        --out "$exp/feats/native/$set" --no-trim --batch-size 4
  done
  (conditions=$rate_conditions; segment_sets train dev $study_sets; pool_sets train dev $study_sets)
  (segment_sets $study_sets; pool_sets $study_sets)  # stage 4's conditions on the study sets
  for cond in $rate_conditions; do
    finetune_condition "$cond" "$cond" --model "$model" --config conf/lora.yaml --max_steps="$steps"
  done
  for set in $study_sets; do
    "$python" -m lalmtool decode --feats "$exp/feats/native/$set" --model "$model" --set "$set" \
      --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/native/$set"
    for cond in $conditions $rate_conditions; do
      if [ ! -f "$exp/lora/$cond/adapter/adapter_config.json" ]; then
        log "no adapter $exp/lora/$cond (stage 4 with --conditions $cond makes it): not decoded"
        continue
      fi
      decode_condition "$cond" "$set" "$cond-lora" --model "$model" \
        --adapter "$exp/lora/$cond/adapter" --condition "$cond"
    done
  done
  score_decodes
  "$python" -m lalmtool report "$exp"
  "$python" local/rates_table.py --exp "$exp" --sets $study_sets \
    --conditions frames $conditions $rate_conditions --out "$exp/rates.md"
  cat "$exp/rates.md"
  end_stage 7 rates
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
