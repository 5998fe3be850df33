#!/usr/bin/env bash
# recipes/mini_speechllm: audio-token compression for a composed decoder-only LALM, offline, on CPU.
#
# Model (backend speechllm, conf/speechllm.yaml): the real Whisper tiny.en encoder (frozen,
# 50 frames/s) → stacking of 4 consecutive tokens → a 2-layer MLP projector learnt from scratch
# → the real SmolLM2-135M-Instruct with LoRA (r=8) on q/k/v/o, prompted with its chat template.
# First the frame-level model is trained (projector + LoRA from nothing); then every compressed
# condition (by default peaks and uniform mean/pick with k=3; --conditions adds e.g.
# uniform-mean-k2) is re-aligned starting from the frame-level adapter (--init-adapter: LoRA and
# projector both continue training).
# The stack factor stays 4 for every condition, so the projector keeps its shape and the
# compression multiplies: the LLM reads 12.5 positions/s at frame level, 6.25 at k=2, 4.2 at
# k=3, ~3.9 for peaks (tokens/s in RESULTS.md counts these LLM positions).
#
# Measured with the defaults on 2 CPU cores: 26 min (data 24 s, extract 347 s, segment 18 s,
# pool 27 s, finetune 919 s at ~3.3 s/step, decode 221 s, report 19 s). In that budget the
# projector does not learn to carry words: the train loss stays ~3.1 nats/token and WER is
# ~100 % (the LLM answers with fluent sentences of its own). The recipe shows the mechanics and
# the cost side; an accurate composed model needs far more steps and data (a GPU).
#
# Data: the mini recipe's own preparation (../mini/local/prepare_data.py): WordNet sentences
# spoken by espeak-ng/flite voices, and the 5 real LibriVox clips. With the same seed and
# --n_test the test sentences are exactly those of recipes/mini. A projector learnt from scratch
# needs many distinct sentences: --n_train sets how many (dev is prepared but not used).
#
# Stages (each can be rerun; finished work is skipped by the tools themselves):
#   0  data/{train,dev,test,librivox}/manifest.jsonl; fetches whisper-tiny.en and SmolLM2
#   1  extract   → $exp/feats/frames/<set>          Whisper tiny.en frames (HDF5, fp16)
#   2  segment   → $exp/seg/<method>/<set>          segment boundaries
#   3  pool      → $exp/pooled/<condition>/<set>    compressed features
#   4  finetune  → $exp/lora/frames/adapter         projector + LoRA from scratch, frame level
#                → $exp/lora/<condition>/adapter    re-aligned from the frame-level adapter
#                → $exp/speechllm/<condition>/      each trained model as one directory
#   5  decode    → $exp/decode/<condition>-lora/<set>       with the condition's own adapter
#                → $exp/decode/<condition>-frameslora/<set> compressed input, frame-level adapter
#                                                           (what compression costs unaligned)
#   6  score, report → $exp/RESULTS.md, $exp/results.json, $exp/results.png
#
# Usage: bash recipes/mini_speechllm/run.sh [--stage N] [--stop_stage M] [--exp DIR] [--nj N]
#          [--n_train N] [--n_dev N] [--n_test N] [--frame_steps N] [--realign_steps N] [--batch_size N]
#          [--conditions "frames peaks ..."] [--max_new_tokens N]
#          (every variable set at the top of this script is an option: --name value)
# Defaults are sized for ~30 min on 2 CPU cores; a smoke run:
#   bash run.sh --exp exp_smoke --data data_smoke --n_train 16 --n_dev 2 --n_test 4 \
#     --frame_steps 3 --realign_steps 2 --batch_size 4 --max_new_tokens 12 \
#     --conditions "frames peaks uniform-pick-k3"
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
exp=exp
data=data
nj=2
n_train=1000
n_dev=100
n_test=100
frame_steps=200
realign_steps=30
batch_size=8
max_new_tokens=60
llm=smollm2-135m-instruct
encoder=whisper-tiny.en   # must match extra.encoder in conf/speechllm.yaml
config=conf/speechllm.yaml
conditions="frames uniform-mean-k3 uniform-pick-k3 peaks"
test_sets="test librivox"

source ../utils/parse_options.sh
case " $conditions " in *" frames "*) ;; *)
  echo "--conditions must include frames: every other condition starts from its adapter" >&2
  exit 1 ;;
esac
mkdir -p "$exp"
recipe=mini_speechllm
source ../utils/stages.sh
speechllm_opts=(--backend speechllm --model "$llm")

if run_stage 0 "data preparation and models"; then
  python3 ../mini/local/prepare_data.py --out "$data" --n-train "$n_train" --n-dev "$n_dev" \
    --n-test "$n_test" --nj "$nj"
  lalmtool assets fetch "$encoder" | tail -n 1
  lalmtool assets fetch "$llm" | tail -n 1
  end_stage 0 prepare
fi

if run_stage 1 "extract encoder frames"; then
  for set in train $test_sets; do
    lalmtool extract --manifest "$data/$set/manifest.jsonl" "${speechllm_opts[@]}" \
      --backend-opt encoder="$encoder" --out "$exp/feats/frames/$set" --nj "$nj" --batch-size 4
  done
  end_stage 1 extract
fi

if run_stage 2 "segment"; then
  segment_sets train $test_sets
  end_stage 2 segment
fi

if run_stage 3 "pool"; then
  pool_sets train $test_sets
  end_stage 3 pool
fi

if run_stage 4 "train: frame level from scratch, then re-align each compressed condition"; then
  lalmtool finetune --feats "$exp/feats/frames/train" --manifest "$data/train/manifest.jsonl" \
    --model "$llm" --out "$exp/lora/frames" --config "$config" \
    --max_steps="$frame_steps" --batch_size="$batch_size"
  for cond in $conditions; do
    [ "$cond" = frames ] && continue
    lalmtool finetune --feats "$exp/pooled/$cond/train" --manifest "$data/train/manifest.jsonl" \
      --model "$llm" --out "$exp/lora/$cond" --config "$config" \
      --init-adapter "$exp/lora/frames/adapter" --max_steps="$realign_steps" \
      --batch_size="$batch_size" --warmup_steps=5
  done
  for cond in $conditions; do  # speechllm.json + projector.safetensors + lora/: --model DIR
    lalmtool export-speechllm --adapter "$exp/lora/$cond/adapter" --out "$exp/speechllm/$cond" \
      --model "$llm"
  done
  end_stage 4 finetune
fi

if run_stage 5 "decode"; then
  for set in $test_sets; do
    for cond in $conditions; do
      feats=$(feats_of "$cond" "$set")
      lalmtool decode --feats "$feats" --model "$llm" --backend speechllm --set "$set" \
        --adapter "$exp/lora/$cond/adapter" --max-new-tokens "$max_new_tokens" \
        --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$cond-lora/$set"
      [ "$cond" = frames ] && continue
      lalmtool decode --feats "$feats" --model "$llm" --backend speechllm --set "$set" \
        --adapter "$exp/lora/frames/adapter" --max-new-tokens "$max_new_tokens" \
        --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$cond-frameslora/$set"
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score and report"; then
  score_decodes
  lalmtool report "$exp"
  cat >> "$exp/RESULTS.md" <<EOF

## Reading this table (mini_speechllm)

- Model: Whisper tiny.en encoder → stack 4 → MLP projector → SmolLM2-135M-Instruct + LoRA
  (conf/speechllm.yaml); trained on $n_train synthetic utterances: frame level $frame_steps steps
  from scratch, each compressed condition re-aligned $realign_steps steps from the frame-level
  adapter; batch $batch_size.
- Every row ran with an adapter. LoRA \`yes\`: the condition's own adapter (re-aligned to its
  features); LoRA \`frames adapter\`: the frame-level model reading compressed features as they
  are (decode dirs \`<condition>-frameslora\`), i.e. what compression costs without re-alignment.
- tokens/s and the ratio count the positions the LLM reads: ceil(stored tokens / 4) per
  utterance (stack 4), so frame level is ~12.5 tokens/s, a ratio of 4 to the 50 Hz encoder.
EOF
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
