#!/usr/bin/env bash
# recipes/librispeech: audio-token compression for ASR on LibriSpeech (the paper's setting).
#
# Default: Qwen2-Audio-7B-Instruct (backend qwen2-audio, conf/qwen2-audio.yaml) on a GPU: bf16,
# gradient checkpointing, batches of at most 240 s of audio. On a CPU with the offline weights:
#   bash run.sh --librispeech_root /data/LibriSpeech --backend whisper --model whisper-tiny.en
# Backends (--backend): whisper, qwen2-audio, and every audio LLM family that `lalmtool backends`
# lists (today voxtral, qwen2.5-omni, granite-speech, audioflamingo3, glm-asr, qwen3-asr,
# qwen2-audio-chat; also audio-llm, which reads the family from --model's config.json). A family
# stores its audio tokens (the rows its LLM reads) at its native rate, takes its main checkpoint
# unless --model names another (a hub id or a local directory of that family) and, without a
# conf/<backend>.yaml, trains with conf/audio-llm.yaml (the family's own chat template and a
# transcription request), e.g.
#   bash run.sh --librispeech_root /data/LibriSpeech --backend voxtral   # Voxtral-Mini-3B-2507
# Compression is over the backend's own rate: uniform-mean-k3 is 25/3 tokens/s for qwen2-audio,
# 12.5/3 for voxtral, 10/3 for granite-speech (`lalmtool backends`: tokens/s); uniform-mean-rR
# asks for R tokens/s whatever the backend (k = round(rate / R)). Voxtral's processor pads each
# window to 30 s: 375 tokens per utterance up to 30 s, so its tokens per second of speech are
# above 12.5 (k and R count from 12.5/s all the same). ctc-* conditions are for whisper only.
# Expected layout (as unpacked from openslr.org/12):
#   $librispeech_root/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
#   $librispeech_root/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
# Or, in place of the raw tree (stage 0 only; the manifests hold the same ids, texts, speakers
# and durations, so results are comparable):
#   --hf_dataset DIR   a local copy of the Hugging Face LibriSpeech (openslr/librispeech_asr):
#                      a save_to_disk directory, or the Parquet files of one config (e.g. its
#                      all/ folder); nothing is downloaded. Columns: --hf_audio_column audio,
#                      --hf_text_column text, --hf_id_column id, --hf_speaker_column speaker_id.
#                      Set → split: config "all" names (the default map):
#                        train-clean-100=train.clean.100 train-clean-360=train.clean.360
#                        train-other-500=train.other.500 dev-clean=validation.clean
#                        dev-other=validation.other test-clean=test.clean test-other=test.other
#                      --hf_splits "set=split ..." overrides entries, e.g. for config "clean":
#                        --hf_splits "train-clean-100=train.100 dev-clean=validation test-clean=test"
#                      (a set in neither map is read from the split of its own name). The audio
#                      bytes are written once to $data/<set>/audio/<id>.flac.
#   --lhotse_cuts X    lhotse manifests: a directory holding librispeech_cuts_<set>.jsonl.gz
#                      (icefall's data/fbank) or librispeech_recordings_<set>.jsonl.gz +
#                      librispeech_supervisions_<set>.jsonl.gz (what `lhotse prepare
#                      librispeech` writes), or a pattern "DIR/cuts_{set}.jsonl.gz", or
#                      "set=FILE ..." words. Utterances are named by their supervision (the
#                      corpus id; --lhotse_ids cut names them by cut); lang is "en".
#
# Stages (each can be rerun; finished work is skipped; --stage N resumes there). Disk is for
# train-clean-100 (100.6 h) + the four dev/test sets (21.5 h); stores are fp16: D × 2 bytes ×
# frames/s (Qwen2-Audio tower D=1280 at 25/s: 230 MB per hour; Whisper tiny.en D=384 at 50/s:
# 138 MB per hour; an audio LLM family: D = its LLM's width at its rate, e.g. Voxtral Mini
# D=3072 at 12.5/s: 276 MB per hour of 30 s windows, as its processor pads each window to 30 s).
# GPU memory is for qwen2-audio in bf16 (../../shared/GPU.md, measured on an H200).
#   0  prepare   → $data/<subset>/manifest.jsonl (lalmtool prepare librispeech, or
#                  hf-dataset / lhotse)  ~30 MB; CPU (hf-dataset: + a copy of the FLAC, ~7.6 GB)
#   1  extract   → $exp/feats/frames/<subset>   encoder frames (a family: its audio tokens)
#                  qwen2-audio 28 GB (whisper-tiny.en 17 GB); GPU: the whole model in bf16,
#                  ~17 GB (+ < 1 GB)
#   2  segment   → $exp/seg/<method>/<subset>   boundaries, int32 (< 50 MB); CPU
#   3  pool      → $exp/pooled/<condition>/<subset>   frames / k per condition (k=2: 14 GB,
#                  k=3 or peaks: ~9.5 GB for qwen2-audio); CPU
#   4  finetune  → $exp/lora/<condition>/adapter   LoRA r=16 (~160 MB each with checkpoints);
#                  GPU: 17 GB weights + ~0.6 MB per LLM token with gradient checkpointing
#                  (240 s at 25 tokens/s: ~4 GB; 8 × 30 s: 3.9 GiB measured), ~21 GB in all
#   5  decode    → $exp/decode/<condition>[-lora]/<subset>/hyp.jsonl   (< 10 MB); GPU: weights
#                  + prefill (30 s: < 0.5 GiB) + KV cache, ~18-20 GB at batch 16
#   6  score, report → WER with Whisper's English normaliser on both sides; $exp/RESULTS.md,
#                  results.json, results.png; CPU
# LibriSpeech transcripts are upper case without punctuation: --text_case lower (default) or
# keep decides the training targets; scoring normalises case and punctuation on both sides.
#
# Usage: bash recipes/librispeech/run.sh --librispeech_root DIR [--stage N] [--stop_stage M]
#          (or --hf_dataset DIR [--hf_splits "set=split ..."], or --lhotse_cuts DIR|PATTERN)
#          [--train_set S] [--dev_set S] [--test_sets "S ..."] [--backend B] [--model M]
#          [--conditions "frames peaks uniform-mean-k3 ..."] [--nj N] [--exp DIR] [--data DIR]
#          [--cmd local|"srun ..."] [--gpu_cmd "srun --gres=gpu:1 ..."] [--config FILE]
# (every variable set at the top of this script is an option: --name value or --name=value;
#  --config FILE reads such options from a file, one "name=value" per line)
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
librispeech_root=
hf_dataset=                  # a local HF dataset in place of the raw tree (see above)
hf_splits=                   # "set=split ..." over the default map (see above)
hf_audio_column=audio
hf_text_column=text
hf_id_column=id              # empty: ids <split>-<row>
hf_speaker_column=speaker_id
lhotse_cuts=                 # lhotse manifests in place of the raw tree (see above)
lhotse_ids=supervision       # supervision | cut: what names an utterance
train_set=train-clean-100
dev_set=dev-clean            # validation loss during finetune
test_sets="dev-clean test-clean dev-other test-other"
text_case=lower
backend=qwen2-audio           # whisper, qwen2-audio or an audio LLM family (see above)
model=                       # default: the backend's checkpoint (qwen2-audio: Qwen/Qwen2-Audio-
                             # 7B-Instruct, whisper: whisper-tiny.en, a family: its main one)
train_config=                # default: conf/<backend>.yaml, else conf/audio-llm.yaml (families)
conditions="frames uniform-mean-k2 uniform-mean-k3 peaks"
device=auto                  # auto: cpu for whisper, cuda for every other backend
dtype=auto                   # extract's compute dtype; auto: bfloat16 on cuda, else float32
extract_batch=8              # 30 s windows per encoder forward
decode_batch=16
max_new_tokens=200
steps=                       # overrides max_steps of the training config when set
on_error=fail                # fail | skip (bad corpus input or audio: listed in skipped.jsonl)
nj=1
exp=exp
data=data
cmd=local
gpu_cmd=

source ../utils/parse_options.sh
source ../utils/cmd.sh
[ "$device" = auto ] && { [ "$backend" = whisper ] && device=cpu || device=cuda; }
[ "$dtype" = auto ] && { [[ "$device" == cuda* ]] && dtype=bfloat16 || dtype=float32; }
if [ -z "$train_config" ]; then  # the backend's own, else the one of every audio LLM family
  train_config=conf/$backend.yaml
  [ -f "$train_config" ] || train_config=conf/audio-llm.yaml
fi
mkdir -p "$exp"
recipe=librispeech
source ../utils/stages.sh
source ../utils/sources.sh
source ../utils/backends.sh
default_model || exit 1
sets=$(echo "$train_set $dev_set $test_sets" | tr ' ' '\n' | awk 'NF && !seen[$0]++' | xargs)
# HF LibriSpeech (openslr/librispeech_asr, config "all"): recipe set → dataset split
hf_default_splits="train-clean-100=train.clean.100 train-clean-360=train.clean.360
  train-other-500=train.other.500 dev-clean=validation.clean dev-other=validation.other
  test-clean=test.clean test-other=test.other"

if run_stage 0 "prepare manifests from ${hf_dataset:-${lhotse_cuts:-$librispeech_root}}"; then
  one_source librispeech_root hf_dataset lhotse_cuts || exit 1
  if [ -n "$hf_dataset" ]; then
    prepare_hf_sets "$hf_default_splits" --audio-column "$hf_audio_column" \
      --text-column "$hf_text_column" ${hf_id_column:+--id-column "$hf_id_column"} \
      ${hf_speaker_column:+--speaker-column "$hf_speaker_column"} --lang en \
      --text-case "$text_case" || exit 1
  elif [ -n "$lhotse_cuts" ]; then
    prepare_lhotse_sets librispeech --ids "$lhotse_ids" --lang en --text-case "$text_case" \
      || exit 1
  else
    [ -n "$librispeech_root" ] || { echo "stage 0 needs --librispeech_root DIR (or" \
      "--hf_dataset DIR, or --lhotse_cuts DIR|PATTERN)" >&2; exit 1; }
    for set in $sets; do  # a subset the tree lacks: name the option that lists it
      [ -d "$librispeech_root/$set" ] && continue
      from=--test_sets; [ "$set" = "$dev_set" ] && from=--dev_set
      [ "$set" = "$train_set" ] && from=--train_set
      there=$(cd "$librispeech_root" 2> /dev/null && ls -d -- */ 2> /dev/null | tr -d / | xargs)
      echo "stage 0: LibriSpeech subset $set (from $from) not found in $librispeech_root," \
        "which holds: ${there:-no subset}; give --train_set, --dev_set and --test_sets" \
        "subsets that are there" >&2
      exit 1
    done
    ${cpu_cmd} "$python" -m lalmtool prepare librispeech --root "$librispeech_root" \
      --subsets "$sets" --out "$data" --text-case "$text_case" --on-error "$on_error"
  fi
  end_stage 0 prepare
fi

if run_stage 1 "extract encoder frames or audio tokens ($backend, $model)"; then
  extract_opts=(--backend "$backend" --model "$model" --nj "$nj" --batch-size "$extract_batch"
                --device "$device" --dtype "$dtype" --on-error "$on_error")
  extract_sets $sets
  end_stage 1 extract
fi

if run_stage 2 "segment"; then
  segment_sets $sets
  end_stage 2 segment
fi

if run_stage 3 "pool"; then
  pool_sets $sets
  end_stage 3 pool
fi

if run_stage 4 "LoRA fine-tuning ($train_config)"; then
  backend_info || exit 1
  if [ "$train_config" = conf/audio-llm.yaml ] && [ -z "$backend_audio_llm" ]; then
    echo "stage 4: no conf/$backend.yaml for backend $backend (conf/audio-llm.yaml is for the" \
      "audio LLM families): give --train_config FILE" >&2
    exit 1
  fi
  for cond in $conditions; do  # --backend: the recipe's, whatever backend the config names
    finetune_condition "$cond" "$cond" --backend "$backend" --model "$model" \
      --config "$train_config" ${steps:+--max_steps=$steps}
  done
  end_stage 4 finetune
fi

if run_stage 5 "decode"; then
  for set in $test_sets; do
    for cond in $conditions; do  # as it is, and with the condition's own adapter
      opts=(--backend "$backend" --model "$model" --device "$device" --batch-size "$decode_batch"
            --max-new-tokens "$max_new_tokens")
      decode_condition "$cond" "$set" "$cond" "${opts[@]}"
      decode_condition "$cond" "$set" "$cond-lora" "${opts[@]}" --adapter "$exp/lora/$cond/adapter"
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score (WER, Whisper English normaliser) and report"; then
  score_decodes wer --normalizer whisper_english
  ${cpu_cmd} "$python" -m lalmtool report "$exp"
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
