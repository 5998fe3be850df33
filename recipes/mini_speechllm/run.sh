#!/usr/bin/env bash
# recipes/mini_speechllm: audio-token compression for a composed decoder-only LALM, offline, on CPU.
#
# Model (backend speechllm, conf/speechllm.yaml): the real Whisper tiny.en encoder (frozen,
# 50 frames/s) → stacking of 4 consecutive tokens → a 2-layer MLP projector whose output rows are
# rescaled to the mean norm of the LLM's input embeddings (norm: embedding) → the real
# SmolLM2-135M-Instruct with LoRA (r=8) on q/k/v/o, prompted with its chat template.
#
# Training, in two steps per condition (a projector learnt through the LM loss alone carries no
# words in a CPU budget: the LLM answers with sentences of its own):
#   align     `lalmtool align` (conf/align.yaml): the projector alone, with CTC whose logits are
#             cosines to SmolLM2's frozen input-embedding rows (+ a learnt blank), over the token
#             ids of the training texts; minutes, no LLM forward pass. CTC-greedy WER on dev in
#             exp/align/<condition>/log.jsonl. Each compressed condition is aligned again,
#             starting from the frame-level projector: the first validation of that run (step 0,
#             `initial_valid_wer` in its summary.json) says how well the frame-level alignment
#             carries over, its best says what a condition-specific alignment reaches.
#   finetune  projector + LoRA through the LM loss. Frame level starts from the aligned
#             projector (--init-projector); each compressed condition (by default peaks and
#             uniform-mean-k3; --conditions adds e.g. uniform-pick-k3) continues from
#             the frame-level adapter (--init-adapter: LoRA and projector both keep training).
#             The adapter kept is the one with the best dev loss.
# The stack factor stays 4 for every condition, so the projector keeps its shape and the
# compression multiplies: the LLM reads 12.5 positions/s at frame level, 6.25 at k=2, 4.2 at
# k=3, ~3.9 for peaks (tokens/s in RESULTS.md counts these LLM positions).
#
# Measured 2026-11-27 with the defaults, `time bash run.sh` on 2 idle CPU cores: 27 min 24 s
# (stage seconds: prepare 32, extract 545, segment 19, pool 31, align 154, finetune 652,
# decode 181, report 30). WER % test / LibriVox, LLM positions/s:
#   CTC greedy, projector alone: frames 57.9 / 56.3 (12.7/s); uniform-mean-k3 61.3 / 64.8
#     (4.3/s); peaks 63.8 / 62.0 (3.9/s)
#   LLM + LoRA: frames 68.9 / 78.9; uniform-mean-k3 118.1 / 78.9; peaks 110.4 / 87.3
# Dev CTC WER of the frame-level projector on compressed features: 79.4 (k3), 86.7 (peaks);
# after 50-100 steps of its own alignment 61.2 and 63.5 (frames: 58.3): the alignment carries
# over only in part, each condition needs (a cheap) one of its own.
# What binds is the number of distinct training sentences: best dev CTC WER 61.7 / 58.3 / 51.7 %
# with 500 / 1000 / 3000 (--n_train); Whisper base instead of tiny.en gains ~1 point (README).
#
# Data: the mini recipe's own preparation (../mini/local/prepare_data.py): WordNet sentences
# spoken by espeak-ng/flite voices, and the 5 real LibriVox clips. With the same seed and
# --n_test the test sentences are exactly those of recipes/mini. dev (disjoint sentences) drives
# validation in both training steps. Extraction (one 30 s Whisper window per clip) is the cost
# of more training sentences.
#
# Stages (each can be rerun; finished work is skipped by the tools themselves):
#   0  data/{train,dev,test,librivox}/manifest.jsonl; fetches whisper-tiny.en and SmolLM2
#   1  extract   → $exp/feats/frames/<set>          Whisper tiny.en frames (HDF5, fp16)
#   2  segment   → $exp/seg/<method>/<set>          segment boundaries
#   3  pool      → $exp/pooled/<condition>/<set>    compressed features
#   4  align     → $exp/align/frames                CTC alignment of the projector, from scratch
#                → $exp/align/<condition>           re-aligned from the frame-level projector
#                → $exp/decode/<condition>-ctc/<set>  CTC-greedy transcripts of the aligned
#                                                   projector alone (no LLM), scored in stage 7
#   5  finetune  → $exp/lora/frames/adapter         projector (from align) + LoRA, frame level
#                → $exp/lora/<condition>/adapter    re-aligned from the frame-level adapter
#                → $exp/speechllm/<condition>/      each trained model as one directory
#   6  decode    → $exp/decode/<condition>-lora/<set>       with the condition's own adapter
#                → $exp/decode/<condition>-frameslora/<set> compressed input, frame-level adapter
#                                     (what compression costs unaligned; --unaligned_decodes true)
#   7  score, report → $exp/RESULTS.md, $exp/results.json, $exp/results.png
#   8  (opt-in: --stop_stage 8) CTC-based compression, in $ctc_exp (default ${exp}_ctc):
#      `lalmtool ctc segment` cuts the frames where stage 4's frame-level projector changes its
#      best CTC class (blank runs their own segments: --blank keep), against uniform mean
#      pooling and `prominence` peaks at the same rate (k and threshold from the training set);
#      each condition gets its own projector over single pooled tokens (stack 1), aligned by CTC
#      from scratch, and is scored CTC-greedy → $ctc_exp/RESULTS.md. Measured 2026-11-27 (1000
#      train utterances; CTC-greedy WER % test / LibriVox, tokens/s on test): ctc-keep 58.8 /
#      52.1 (4.9/s), uniform-mean-k9 58.9 / 60.6 (5.7/s), prominence 62.6 / 59.2 (5.4/s);
#      frames at stack 4 (12.7 positions/s) 57.9 / 56.3
#
# Usage: bash recipes/mini_speechllm/run.sh [--stage N] [--stop_stage M] [--exp DIR] [--nj N]
#          [--n_train N] [--n_dev N] [--n_test N] [--align_steps N] [--frame_steps N]
#          [--realign_steps N] [--batch_size N] [--conditions "frames peaks ..."]
#          [--max_new_tokens N] [--unaligned_decodes true|false]
#          (every variable set at the top of this script is an option: --name value)
# Defaults take ~27 min on 2 otherwise idle CPU cores (measured above); a smoke run:
#   bash run.sh --exp exp_smoke --data data_smoke --n_train 16 --n_dev 2 --n_test 4 \
#     --align_steps 3 --frame_steps 3 --realign_steps 2 --batch_size 4 --max_new_tokens 12 \
#     --conditions "frames peaks uniform-pick-k3"
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=7
exp=exp
data=data
nj=2
n_train=1000
n_dev=100
n_test=100
align_steps=300
realign_ctc_steps=100
frame_steps=100
realign_steps=20
batch_size=8
max_new_tokens=60
unaligned_decodes=false  # also decode each compressed condition with the frame-level adapter
llm=smollm2-135m-instruct
encoder=whisper-tiny.en   # must match extra.encoder in conf/speechllm.yaml and conf/align.yaml
config=conf/speechllm.yaml
align_config=conf/align.yaml
conditions="frames uniform-mean-k3 peaks"
test_sets="test librivox"
ctc_exp=                  # stage 8's directory (default: ${exp}_ctc)

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
  "$python" ../mini/local/prepare_data.py --out "$data" --n-train "$n_train" --n-dev "$n_dev" \
    --n-test "$n_test" --nj "$nj"
  "$python" -m lalmtool assets fetch "$encoder" | tail -n 1
  "$python" -m lalmtool assets fetch "$llm" | tail -n 1
  end_stage 0 prepare
fi

if run_stage 1 "extract encoder frames"; then
  extract_opts=("${speechllm_opts[@]}" --backend-opt encoder="$encoder" --nj "$nj" --batch-size 4)
  extract_sets train dev $test_sets
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

if run_stage 4 "align the projector with CTC: frame level, then each condition from it"; then
  "$python" -m lalmtool align --feats "$exp/feats/frames/train" \
    --manifest "$data/train/manifest.jsonl" \
    --valid-feats "$exp/feats/frames/dev" --valid-manifest "$data/dev/manifest.jsonl" \
    --model "$llm" --config "$align_config" --out "$exp/align/frames" \
    --max_steps="$align_steps" > /dev/null
  for cond in $conditions; do
    [ "$cond" = frames ] && continue
    "$python" -m lalmtool align --feats "$exp/pooled/$cond/train" \
      --manifest "$data/train/manifest.jsonl" \
      --valid-feats "$exp/pooled/$cond/dev" --valid-manifest "$data/dev/manifest.jsonl" \
      --model "$llm" --config "$align_config" --out "$exp/align/$cond" \
      --init "$exp/align/frames" --max_steps="$realign_ctc_steps" --warmup_steps=0 > /dev/null
  done
  for set in $test_sets; do  # the aligned projector alone (CTC greedy, no LLM): <cond>-ctc
    for cond in $conditions; do
      "$python" -m lalmtool ctc decode --align "$exp/align/$cond" \
        --feats "$(feats_of "$cond" "$set")" \
        --model "$llm" --manifest "$data/$set/manifest.jsonl" --set "$set" \
        --out "$exp/decode/$cond-ctc/$set" > /dev/null
    done
  done
  "$python" local/align_summary.py "$exp" $conditions > "$exp/align/summary.md"
  cat "$exp/align/summary.md"
  end_stage 4 align
fi

if run_stage 5 "finetune: frame level from the aligned projector, then each condition"; then
  "$python" -m lalmtool finetune --feats "$exp/feats/frames/train" \
    --manifest "$data/train/manifest.jsonl" \
    --valid-feats "$exp/feats/frames/dev" --valid-manifest "$data/dev/manifest.jsonl" \
    --model "$llm" --out "$exp/lora/frames" --config "$config" \
    --init-projector "$exp/align/frames" --max_steps="$frame_steps" \
    --batch_size="$batch_size" > /dev/null
  for cond in $conditions; do
    [ "$cond" = frames ] && continue
    "$python" -m lalmtool finetune --feats "$exp/pooled/$cond/train" \
      --manifest "$data/train/manifest.jsonl" \
      --valid-feats "$exp/pooled/$cond/dev" --valid-manifest "$data/dev/manifest.jsonl" \
      --model "$llm" --out "$exp/lora/$cond" --config "$config" \
      --init-adapter "$exp/lora/frames/adapter" --max_steps="$realign_steps" \
      --valid_every="$realign_steps" --batch_size="$batch_size" --warmup_steps=5 > /dev/null
  done
  for cond in $conditions; do  # speechllm.json + projector.safetensors + lora/: --model DIR
    "$python" -m lalmtool export-speechllm --adapter "$exp/lora/$cond/adapter" \
      --out "$exp/speechllm/$cond" --model "$llm"
  done
  end_stage 5 finetune
fi

if run_stage 6 "decode"; then
  for set in $test_sets; do
    for cond in $conditions; do
      feats=$(feats_of "$cond" "$set")
      "$python" -m lalmtool decode --feats "$feats" --model "$llm" --backend speechllm \
        --set "$set" --adapter "$exp/lora/$cond/adapter" --max-new-tokens "$max_new_tokens" \
        --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$cond-lora/$set"
      [ "$cond" = frames ] || [ "$unaligned_decodes" != true ] && continue
      "$python" -m lalmtool decode --feats "$feats" --model "$llm" --backend speechllm \
        --set "$set" --adapter "$exp/lora/frames/adapter" --max-new-tokens "$max_new_tokens" \
        --manifest "$data/$set/manifest.jsonl" --out "$exp/decode/$cond-frameslora/$set"
    done
  done
  end_stage 6 decode
fi

if run_stage 7 "score and report"; then
  score_decodes
  "$python" -m lalmtool report "$exp"
  cat >> "$exp/RESULTS.md" <<EOF

## Reading this table (mini_speechllm)

- Model: Whisper tiny.en encoder → stack 4 → MLP projector (rows rescaled to the mean
  embedding norm) → SmolLM2-135M-Instruct + LoRA (conf/speechllm.yaml); $n_train synthetic
  training utterances. The projector is first aligned with CTC to SmolLM2's input embeddings
  (up to $align_steps steps, conf/align.yaml), then projector + LoRA train $frame_steps steps
  through the LM loss at frame level; each compressed condition continues $realign_steps steps
  from the frame-level adapter; batch $batch_size; the adapter with the best dev loss is kept.
- Rows named \`... (CTC greedy)\` (LoRA \`no\`) are the condition's CTC-aligned projector alone,
  decoded greedily over its CTC classes: no LLM. Every other row ran the LLM with an adapter.
  LoRA \`yes\`: the condition's own adapter (re-aligned to its features); LoRA \`frames
  adapter\`: the frame-level model reading compressed features as they are (decode dirs
  \`<condition>-frameslora\`), i.e. what compression costs without re-alignment.
- tokens/s and the ratio count the positions the LLM reads: ceil(stored tokens / 4) per
  utterance (stack 4), so frame level is ~12.5 tokens/s, a ratio of 4 to the 50 Hz encoder.

$(cat "$exp/align/summary.md")
EOF
  end_stage 7 report
fi
if run_stage 8 "CTC-based compression vs uniform and prominence at the same rate"; then
  ce=${ctc_exp:-${exp}_ctc}
  for blank in join keep; do  # join: one token per emitted CTC token; keep: blank runs too
    for set in train dev $test_sets; do
      "$python" -m lalmtool ctc segment --align "$exp/align/frames" \
        --feats "$exp/feats/frames/$set" \
        --model "$llm" --blank "$blank" --out "$ce/seg/ctc-$blank/$set" > /dev/null
      "$python" -m lalmtool pool --feats "$exp/feats/frames/$set" \
        --segments "$ce/seg/ctc-$blank/$set" --out "$ce/pooled/ctc-$blank/$set" > /dev/null
    done
  done
  meta() { "$python" -c 'import json, sys; m = json.load(open(sys.argv[1]))["meta"]
print(eval(sys.argv[2], {}, m))' "$1/store.json" "$2"; }
  rate=$(meta "$ce/pooled/ctc-keep/train" "round(frame_rate, 3)")
  k=$(meta "$exp/feats/frames/train" "max(1, round(frame_rate / $rate))")
  "$python" -m lalmtool segment --feats "$exp/feats/frames/train" --method prominence \
    --target-rate "$rate" --out "$ce/seg/prominence/train" > /dev/null
  threshold=$(meta "$ce/seg/prominence/train" 'params["threshold"]')
  log "ctc-keep: $rate tokens/s on train; uniform k=$k; prominence threshold $threshold"
  for set in train dev $test_sets; do
    [ "$set" = train ] || "$python" -m lalmtool segment --feats "$exp/feats/frames/$set" \
      --method prominence --threshold "$threshold" --out "$ce/seg/prominence/$set" > /dev/null
    "$python" -m lalmtool segment --feats "$exp/feats/frames/$set" --method uniform --k "$k" \
      --out "$ce/seg/uniform-k$k/$set" > /dev/null
    for cond in prominence "uniform-mean-k$k"; do
      "$python" -m lalmtool pool --feats "$exp/feats/frames/$set" \
        --segments "$ce/seg/${cond/-mean/}/$set" --out "$ce/pooled/$cond/$set" > /dev/null
    done
  done
  for cond in ctc-keep "uniform-mean-k$k" prominence; do
    "$python" -m lalmtool align --feats "$ce/pooled/$cond/train" \
      --manifest "$data/train/manifest.jsonl" \
      --valid-feats "$ce/pooled/$cond/dev" --valid-manifest "$data/dev/manifest.jsonl" \
      --model "$llm" --config "$align_config" --backend-opt stack=1 --out "$ce/align/$cond" \
      --max_steps="$align_steps" > /dev/null
    for set in $test_sets; do
      "$python" -m lalmtool ctc decode --align "$ce/align/$cond" --feats "$ce/pooled/$cond/$set" \
        --model "$llm" --manifest "$data/$set/manifest.jsonl" --set "$set" \
        --out "$ce/decode/$cond-ctc/$set" > /dev/null
      "$python" -m lalmtool score --hyp "$ce/decode/$cond-ctc/$set/hyp.jsonl" \
        --ref "$data/$set/manifest.jsonl" > /dev/null
    done
  done
  "$python" -m lalmtool report "$ce" > /dev/null
  cat "$ce/RESULTS.md"
  end_stage 8 ctc-compression
fi

[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
