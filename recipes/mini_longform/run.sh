#!/usr/bin/env bash
# recipes/mini_longform: whole recordings of 1-2 min in one decoder pass, made possible by
# LoRA trained on long inputs joined from cached short utterances, against transformers' own
# long-form Whisper. Real Whisper tiny.en; voices and sentences no adapter saw.
#
# Whisper learnt to transcribe one 30 s window: given the memory of a whole recording it
# transcribes about the first 30 s and stops. Here its decoder is re-aligned to long memories:
# `lalmtool finetune --concat_seconds '[10, 120]'` joins consecutive training utterances of
# recipes/mini (their cached features, no extraction again) into examples of 10-120 s. Each
# recording is then decoded
#   (a) whole, in one pass, with the long-form adapter of its condition;
#   (b) in 30 s chunks (--chunk N: N positions per 30 s) with an adapter trained
#       on joined utterances of 5-30 s (conf/chunk30.yaml), with the same trained on packed
#       features (recipes/mini --pack 30: each 5-30 s example is the rows of one encoder
#       window that held several utterances, as a recording's windows do), and with
#       recipes/mini's short-utterance adapter;
#   (c) by transformers' long-form generation on the audio (timestamps, sequential seeking):
#       the anchor (local/anchor.py);
#   (d) native Whisper (padded 30 s windows, no LoRA) chunked window by window.
# Whisper's decoder holds 448 target tokens: one pass ends where a transcript needs more (about
# 2.5 min of read speech at ~3 tokens per second); `lalmtool decode` refuses such a recording
# by name (or decodes it in chunks with --too-long chunk).
#
# Stages (each can be rerun; finished work is skipped by the tools themselves):
#   0  data/longform/manifest.jsonl (local/prepare_longform.py); fetches whisper-tiny.en
#   1  extract   → $exp/feats/{frames,native}/longform
#   2  segment   → $exp/seg/<method>/longform
#   3  pool      → $exp/pooled/<condition>/longform
#   4  finetune  → $exp/lora/<condition>-{long,chunk,chunk-packed}/adapter: recipes/mini's
#                  short-utterance adapter trained further on its train stores joined into
#                  inputs of 10-120 s (long) or 5-30 s (chunk; chunk-packed: on its packed
#                  stores, one window per example) (its stages are run first for the
#                  conditions here when they are missing)
#   5  decode    → $exp/decode/<condition>-{whole,chunk30s,chunk30s-packed,chunk30s-short}/
#                  longform, native-chunk30s, native-longform (the anchor)
#   6  score; local/table.py → $exp/longform.md (WER, positions, decode time and its ratio to
#      the anchor's, peak memory) and $exp/longform.png (WER and decode time per recording)
#
# Usage: bash recipes/mini_longform/run.sh [--stage N] [--stop_stage M] [--exp DIR]
#            [--seconds "60 80 100 120"] [--conditions "frames uniform-mean-k3 peaks"]
#            [--steps N] [--mini_exp DIR] [--mini_data DIR] [--mini_packed_exp DIR] [--pack S]
# (every variable set at the top of this script is an option: --name value)
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
exp=exp
data=data
seconds="60 80 100 120"
model_name=whisper-tiny.en
conditions="frames uniform-mean-k3 peaks"
steps=200                  # long-form LoRA steps per condition (batch 2 of 10-120 s)
mini_exp=../mini/exp       # recipes/mini's feature stores (training data) and adapters
mini_data=../mini/data
mini_packed_exp=../mini/exp_packed  # recipes/mini's stores extracted with --pack $pack
pack=30                    # seconds of consecutive training utterances per encoder window
batch_size=1              # recordings per decode call: one, as the anchor decodes them

source ../utils/parse_options.sh
mkdir -p "$exp"
recipe=mini_longform
source ../utils/stages.sh
lalmtool() { "$python" -m lalmtool "$@"; }

if run_stage 0 "data preparation and model"; then
  # shellcheck disable=SC2086
  "$python" local/prepare_longform.py --out "$data" --seconds $seconds
  lalmtool assets fetch "$model_name" | tail -n 1 > "$exp/model_path"
  end_stage 0 prepare
fi
model=$(cat "$exp/model_path" 2>/dev/null || lalmtool assets fetch "$model_name" | tail -n 1)

if run_stage 1 "extract encoder frames"; then
  lalmtool extract --manifest "$data/longform/manifest.jsonl" --model "$model" \
    --out "$exp/feats/frames/longform" --batch-size 4
  lalmtool extract --manifest "$data/longform/manifest.jsonl" --model "$model" \
    --out "$exp/feats/native/longform" --batch-size 4 --no-trim
  end_stage 1 extract
fi

if run_stage 2 "segment"; then
  segment_sets longform
  end_stage 2 segment
fi

if run_stage 3 "pool"; then
  pool_sets longform
  end_stage 3 pool
fi

# a condition's store of recipes/mini (its train and dev sets; $3: its experiment directory)
mini_feats() {
  local root=${3:-$mini_exp}
  [ "$1" = frames ] && echo "$root/feats/frames/$2" || echo "$root/pooled/$1/$2"
}

if run_stage 4 "long-form LoRA on joined training utterances"; then
  for cond in $conditions; do
    short="$mini_exp/lora/$cond/adapter"
    if [ ! -f "$(mini_feats "$cond" train)/store.json" ] || [ ! -f "$short/adapter_config.json" ]; then
      log "recipes/mini has no $cond stores or adapter under $mini_exp: running its stages 0-4 for them"
      bash ../mini/run.sh --stop_stage 4 --conditions "$conditions" --exp "$(realpath "$mini_exp")" \
        --data "$(realpath -m "$mini_data")"
    fi
    lalmtool finetune --feats "$(mini_feats "$cond" train)" --manifest "$mini_data/train/manifest.jsonl" \
      --valid-feats "$(mini_feats "$cond" dev)" --valid-manifest "$mini_data/dev/manifest.jsonl" \
      --model "$model" --config conf/longform.yaml --max_steps="$steps" --init-adapter "$short" \
      --out "$exp/lora/$cond-long"
    lalmtool finetune --feats "$(mini_feats "$cond" train)" --manifest "$mini_data/train/manifest.jsonl" \
      --valid-feats "$(mini_feats "$cond" dev)" --valid-manifest "$mini_data/dev/manifest.jsonl" \
      --model "$model" --config conf/chunk30.yaml --init-adapter "$short" --out "$exp/lora/$cond-chunk"
    if [ ! -f "$(mini_feats "$cond" train "$mini_packed_exp")/store.json" ]; then
      log "no packed $cond stores under $mini_packed_exp: recipes/mini's stages 1-3 with --pack $pack"
      bash ../mini/run.sh --stage 1 --stop_stage 3 --pack "$pack" --conditions "$cond" \
        --exp "$(realpath -m "$mini_packed_exp")" --data "$(realpath -m "$mini_data")"
    fi
    lalmtool finetune --feats "$(mini_feats "$cond" train "$mini_packed_exp")" \
      --manifest "$mini_data/train/manifest.jsonl" \
      --valid-feats "$(mini_feats "$cond" dev "$mini_packed_exp")" \
      --valid-manifest "$mini_data/dev/manifest.jsonl" --model "$model" --config conf/chunk30.yaml \
      --concat_group=pack --init-adapter "$short" --out "$exp/lora/$cond-chunk-packed"
  done
  end_stage 4 finetune
fi

# decoder positions of one 30 s encoder window: 1500 frames, 1500/k pooled by k, ~450 peaks
window_of() { case "$1" in *-k*) echo $(( 1500 / ${1##*-k} ));; peaks) echo 450;; *) echo 1500;; esac; }

if run_stage 5 "decode (whole recordings, 30 s chunks, the anchor)"; then
  for cond in $conditions; do
    long=(--adapter "$exp/lora/$cond-long/adapter")
    decode_condition "$cond" longform "$cond-whole" --model "$model" "${long[@]}" \
      --batch-size "$batch_size" --condition "$cond-whole"
    decode_condition "$cond" longform "$cond-chunk30s" --model "$model" \
      --adapter "$exp/lora/$cond-chunk/adapter" --batch-size "$batch_size" \
      --chunk "$(window_of "$cond")" --condition "$cond-chunk30s"
    decode_condition "$cond" longform "$cond-chunk30s-packed" --model "$model" \
      --adapter "$exp/lora/$cond-chunk-packed/adapter" --batch-size "$batch_size" \
      --chunk "$(window_of "$cond")" --condition "$cond-chunk30s-packed"
    short="$mini_exp/lora/$cond/adapter"
    if [ -f "$short/adapter_config.json" ]; then
      decode_condition "$cond" longform "$cond-chunk30s-short" --model "$model" --adapter "$short" \
        --batch-size "$batch_size" --chunk "$(window_of "$cond")" --condition "$cond-chunk30s-short"
    fi
  done
  lalmtool decode --feats "$exp/feats/native/longform" --model "$model" --set longform \
    --manifest "$data/longform/manifest.jsonl" --batch-size "$batch_size" \
    --chunk 1500 --condition native-chunk30s --out "$exp/decode/native-chunk30s/longform"
  "$python" local/anchor.py --manifest "$data/longform/manifest.jsonl" --model "$model" \
    --out "$exp/decode/native-longform/longform"
  end_stage 5 decode
fi

if run_stage 6 "score and tables"; then
  score_decodes
  "$python" local/table.py "$exp" longform
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
