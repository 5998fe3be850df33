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
#
# Usage: bash recipes/mini/run.sh [--stage N] [--stop_stage M] [--exp DIR] [--nj N]
#                                 [--n_train N] [--steps N] [--conditions "frames peaks ..."]
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
conditions="frames peaks uniform-mean-k2 uniform-mean-k3 uniform-pick-k2 uniform-pick-k3"
test_sets="test librivox"

source ../utils/parse_options.sh
mkdir -p "$exp"
recipe=mini
source ../utils/stages.sh
train_set=train dev_set=dev

if run_stage 0 "data preparation and model"; then
  "$python" local/prepare_data.py --out "$data" --n-train "$n_train" --n-test "$n_test" --nj "$nj"
  "$python" -m lalmtool assets fetch "$model_name" | tail -n 1 > "$exp/model_path"
  end_stage 0 prepare
fi
model=$(cat "$exp/model_path" 2>/dev/null \
  || "$python" -m lalmtool assets fetch "$model_name" | tail -n 1)

if run_stage 1 "extract encoder frames"; then
  extract_opts=(--model "$model" --nj "$nj" --batch-size 4)
  extract_sets train dev $test_sets
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
      decode_condition "$cond" "$set" "$cond" --model "$model" --max-new-tokens 120
      decode_condition "$cond" "$set" "$cond-lora" --model "$model" --max-new-tokens 120 \
        --adapter "$exp/lora/$cond/adapter"
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score and report"; then
  score_decodes
  "$python" -m lalmtool report "$exp"
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
