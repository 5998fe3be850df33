#!/usr/bin/env bash
# recipes/mini_longform: long recordings (2-5 min) decoded with real Whisper tiny.en, frame
# level and compressed ~3x (uniform average pooling, k=3), WER and decode time side by side.
#
# Whisper learnt to transcribe one 30 s window. Over a whole long memory (one decoder pass
# cross-attending to every frame of the recording) tiny.en transcribes about the first 30 s and
# stops; with --backend-opt chunk=N (N = one 30 s window: 1500 frames, 500 at k=3) each window's
# positions are decoded in turn and the texts joined. Both are decoded here. LoRA adapters of
# recipes/mini are used when they exist under --mini_exp (lora/<condition>/adapter): they were
# trained on short utterances, and are decoded here as they are.
#
# Stages (each can be rerun; finished work is skipped by the tools themselves):
#   0  data/longform/manifest.jsonl: the 5 LibriVox clips of pocketsphinx-testdata joined into
#      recordings of --minutes (random clip order per pass); fetches whisper-tiny.en
#   1  extract   → $exp/feats/frames/longform      encoder frames, 30 s window by window
#   2  segment   → $exp/seg/uniform-k3/longform    boundaries every 3 frames
#   3  pool      → $exp/pooled/<condition>/longform
#   5  decode    → $exp/decode/<condition>[-chunk30s][-lora]/longform/hyp.jsonl
#   6  score, report → $exp/RESULTS.md; local/table.py → $exp/longform.md (WER, decode time)
#
# Usage: bash recipes/mini_longform/run.sh [--stage N] [--stop_stage M] [--exp DIR]
#                                          [--minutes "2 3 4"] [--mini_exp DIR]
# (every variable set at the top of this script is an option: --name value)
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
exp=exp
data=data
minutes="2 3 4"
model_name=whisper-tiny.en
conditions="frames uniform-mean-k3"
mini_exp=../mini/exp      # LoRA adapters of recipes/mini, when it has been run
max_new_tokens=200        # per decoder pass (a whole memory, or one chunk)
batch_size=4

source ../utils/parse_options.sh
mkdir -p "$exp"
recipe=mini_longform
source ../utils/stages.sh

if run_stage 0 "data preparation and model"; then
  # shellcheck disable=SC2086
  python3 local/prepare_longform.py --out "$data" --minutes $minutes
  lalmtool assets fetch "$model_name" | tail -n 1 > "$exp/model_path"
  end_stage 0 prepare
fi
model=$(cat "$exp/model_path" 2>/dev/null || lalmtool assets fetch "$model_name" | tail -n 1)

if run_stage 1 "extract encoder frames"; then
  lalmtool extract --manifest "$data/longform/manifest.jsonl" --model "$model" \
    --out "$exp/feats/frames/longform" --batch-size 4
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

# decoder positions of one 30 s encoder window: 1500 frames, 1500/k pooled by k
window_of() { case "$1" in *-k*) echo $(( 1500 / ${1##*-k} ));; *) echo 1500;; esac; }

if run_stage 5 "decode (whole memory and 30 s chunks)"; then
  for cond in $conditions; do
    feats=$(feats_of "$cond" longform)
    adapter="$mini_exp/lora/$cond/adapter"
    for lora in no yes; do
      opts=(); suffix=""
      if [ "$lora" = yes ]; then
        [ -f "$adapter/adapter_config.json" ] || { log "no LoRA adapter at $adapter: $cond decoded without"; continue; }
        opts=(--adapter "$adapter"); suffix="-lora"
      fi
      lalmtool decode --feats "$feats" --model "$model" --set longform "${opts[@]}" \
        --manifest "$data/longform/manifest.jsonl" --max-new-tokens "$max_new_tokens" \
        --batch-size "$batch_size" --out "$exp/decode/$cond$suffix/longform"
      lalmtool decode --feats "$feats" --model "$model" --set longform "${opts[@]}" \
        --manifest "$data/longform/manifest.jsonl" --max-new-tokens "$max_new_tokens" \
        --batch-size "$batch_size" --backend-opt "chunk=$(window_of "$cond")" \
        --condition "$cond-chunk30s" --out "$exp/decode/$cond-chunk30s$suffix/longform"
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score and report"; then
  score_decodes
  lalmtool report "$exp" > /dev/null
  python3 local/table.py "$exp" longform
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
