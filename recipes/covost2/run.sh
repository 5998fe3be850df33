#!/usr/bin/env bash
# recipes/covost2: audio-token compression for speech translation (CoVoST 2) and for ASR on the
# same Common Voice clips, as in the paper. X→En and En→X.
#
# Default: Qwen2-Audio-7B-Instruct (backend qwen2-audio, conf/qwen2-audio.yaml, its translation
# prompt "translate the speech into <target language>") on a GPU: bf16, gradient checkpointing,
# batches of at most 240 s of audio. On a CPU with the offline weights:
#   bash run.sh --cv_root CV --covost_root COVOST --src_lang en --tgt_lang de \
#     --backend whisper --model whisper-tiny.en
# (Whisper's own translate task goes into English only; for En→X its LoRA learns the target.)
# Backends (--backend): whisper, qwen2-audio, and every audio LLM family that `lalmtool backends`
# lists (today voxtral, qwen2.5-omni, granite-speech, audioflamingo3, glm-asr, qwen3-asr,
# qwen2-audio-chat; also audio-llm, which reads the family from --model's config.json). A family
# stores its audio tokens (the rows its LLM reads) at its native rate (uniform-mean-k3: 25/3
# tokens/s for qwen2-audio, 12.5/3 for voxtral, 10/3 for granite-speech; uniform-mean-rR: R
# tokens/s whatever the backend), takes its main checkpoint unless --model names another (a hub
# id or a local directory of that family), trains with conf/audio-llm.yaml unless there is a
# conf/<backend>.yaml, and is prompted as qwen2-audio is: st with task=translate,
# language=<src_lang>, target_language=<tgt_lang> (--backend-opt of finetune and decode), asr
# with task=transcribe, language=<src_lang>, e.g.
#   bash run.sh --cv_root CV --covost_root COVOST --src_lang en --tgt_lang de --backend voxtral
# A family whose prompt is a bare transcription request (qwen3-asr: its template keeps no
# instruction) cannot be asked to translate: its st prompt is task=transcribe, language=<src_lang>
# and, as Whisper's for En→X, its LoRA learns the translation (the st decodes without LoRA are
# transcripts).
# Expected layout:
#   $cv_root/clips/*.mp3                              Common Voice release of --src_lang
#   $covost_root/covost_v2.<src>_<tgt>.tsv            path sentence translation client_id split
# Or, in place of them (stage 0 only; the manifests hold the same ids, texts, targets, speakers
# and durations, so results are comparable):
#   --hf_dataset DIR   a local copy of a Hugging Face CoVoST 2 dataset (facebook/covost2 columns:
#                      audio sentence translation client_id id), one language pair: a save_to_disk
#                      directory or Parquet files; nothing is downloaded. Columns:
#                      --hf_audio_column audio, --hf_text_column sentence (text),
#                      --hf_target_column translation (target), --hf_id_column id,
#                      --hf_speaker_column client_id. Set → split: train=train dev=validation
#                      test=test; --hf_splits "set=split ..." overrides entries. The audio bytes
#                      are written once to $data/<set>/audio/<id>.<mp3|...>.
#   --lhotse_cuts X    lhotse CutSets whose supervisions hold the transcript as text and the
#                      translation in custom["target"] (--lhotse_target_key; as `lalmtool
#                      manifest to-lhotse` writes them): a directory holding
#                      covost2_cuts_<set>.jsonl.gz, a pattern "DIR/cuts_{set}.jsonl.gz", or
#                      "set=FILE ..." words. Utterances are named by their supervision
#                      (--lhotse_ids cut: by cut); lang and target_lang are --src_lang/--tgt_lang.
#
# Stages (each can be rerun; finished work is skipped; --stage N resumes there). Disk and GPU
# memory as in recipes/librispeech: stores are fp16, D × 2 bytes × frames/s (Qwen2-Audio
# D=1280 at 25/s: 230 MB per hour of audio; CoVoST 2 es→en train is ~113 h: ~26 GB frames; a
# family: its LLM's width at its rate, voxtral's windows padded to 30 s).
#   0  prepare   → $data/{train,dev,test}/manifest.jsonl (lalmtool prepare covost2, or
#                  hf-dataset / lhotse): text =
#                  transcript, target = translation, lang, target_lang                 CPU
#   1  extract   → $exp/feats/frames/<set>          encoder frames (a family: its audio
#                  tokens); GPU: whole model in bf16, ~17 GB
#   2  segment   → $exp/seg/<method>/<set>          int32 boundaries (MBs); CPU
#   3  pool      → $exp/pooled/<condition>/<set>    frames / k per condition; CPU
#   4  finetune  → $exp/lora/<task>-<condition>/adapter   one LoRA per task (st: translation
#                  targets, asr: transcripts) and condition; GPU ~21 GB (17 GB weights + ~0.6 MB
#                  per LLM token with gradient checkpointing, ../../shared/GPU.md)
#   5  decode    → $exp/decode/<task>-<condition>[-lora]/<set>/hyp.jsonl; GPU ~18-20 GB
#   6  score, report → st: BLEU and chrF (sacrebleu, signatures; tokeniser by target language:
#                  zh, ja-mecab, ko-mecab, else 13a), asr: WER; $exp/RESULTS.md, results.png
#
# Usage: bash recipes/covost2/run.sh --cv_root DIR --covost_root DIR [--src_lang es]
#          (or --hf_dataset DIR [--hf_splits "set=split ..."], or --lhotse_cuts DIR|PATTERN)
#          [--tgt_lang en] [--tasks "st asr"] [--stage N] [--stop_stage M] [--backend B]
#          [--model M] [--conditions "..."] [--nj N] [--exp DIR] [--data DIR]
#          [--cmd local|"srun ..."] [--gpu_cmd "..."] [--config FILE]
# (every variable set at the top of this script is an option: --name value or --name=value)
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=6
cv_root=
covost_root=
hf_dataset=                  # a local HF dataset in place of the clips and TSV (see above)
hf_splits=                   # "set=split ..." over train=train dev=validation test=test
hf_audio_column=audio
hf_text_column=sentence
hf_target_column=translation
hf_id_column=id              # empty: ids <split>-<row>
hf_speaker_column=client_id
lhotse_cuts=                 # lhotse CutSets in place of the clips and TSV (see above)
lhotse_ids=supervision       # supervision | cut: what names an utterance
lhotse_target_key=target     # the supervisions' custom key holding the translation
src_lang=es
tgt_lang=en
tasks="st asr"               # st: translate (BLEU/chrF), asr: transcribe (WER)
train_set=train
dev_set=dev
test_sets=test
backend=qwen2-audio           # whisper, qwen2-audio or an audio LLM family (see above)
model=                       # default: the backend's checkpoint (qwen2-audio: Qwen/Qwen2-Audio-
                             # 7B-Instruct, whisper: whisper-tiny.en, a family: its main one)
train_config=                # default: conf/<backend>.yaml, else conf/audio-llm.yaml (families)
conditions="frames uniform-mean-k2 uniform-mean-k3 peaks"
device=auto                  # auto: cpu for whisper, cuda for every other backend
dtype=auto
extract_batch=8
decode_batch=16
max_new_tokens=200
steps=
on_error=fail
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
recipe=covost2
source ../utils/stages.sh
source ../utils/sources.sh
source ../utils/backends.sh
default_model || exit 1
sets=$(echo "$train_set $dev_set $test_sets" | tr ' ' '\n' | awk 'NF && !seen[$0]++' | xargs)

# backend options of a task: what to do with the audio, in which languages
task_opts() {  # task_opts st|asr → KEY=VALUE words (after backend_info)
  local task=transcribe lang=$src_lang
  [ "$1" = st ] && task=translate
  case "$backend" in
    whisper) [ "$1" = st ] && [ "$tgt_lang" != en ] && task=transcribe  # LoRA learns the target
             echo "task=$task language=$lang" ;;
    *)  # qwen2-audio, the audio LLM families: the prompt options the backend takes
      backend_can "$task" || task=transcribe  # its prompt cannot translate: LoRA learns it
      backend_takes task && echo "task=$task"
      backend_takes language && echo "language=$lang"
      [ "$task" = translate ] && backend_takes target_language &&
        echo "target_language=$tgt_lang" ;;
  esac
  return 0
}
st_prompt_note() {  # after backend_info: says where st cannot be asked for in the prompt
  local opts
  [ "$backend" = whisper ] && return 0  # (whisper: into English only, see task_opts)
  if [[ " $tasks " == *" st "* ]] && ! backend_can translate; then
    opts=$(task_opts st | xargs)
    log "backend $backend's prompt cannot ask for a translation: st is prompted as asr" \
      "(${opts:-its own prompt}) and its LoRA learns the translation"
  fi
}
field_of() { [ "$1" = st ] && echo target || echo text; }

if run_stage 0 "prepare manifests (CoVoST 2 $src_lang→$tgt_lang)"; then
  one_source cv_root+covost_root hf_dataset lhotse_cuts || exit 1
  if [ -n "$hf_dataset" ]; then
    prepare_hf_sets "train=train dev=validation test=test" --audio-column "$hf_audio_column" \
      --text-column "$hf_text_column" --target-column "$hf_target_column" \
      ${hf_id_column:+--id-column "$hf_id_column"} \
      ${hf_speaker_column:+--speaker-column "$hf_speaker_column"} \
      --lang "$src_lang" --target-lang "$tgt_lang" || exit 1
  elif [ -n "$lhotse_cuts" ]; then
    prepare_lhotse_sets covost2 --ids "$lhotse_ids" --lang "$src_lang" \
      --target-lang "$tgt_lang" --target-key "$lhotse_target_key" || exit 1
  else
    [ -n "$cv_root" ] && [ -n "$covost_root" ] || {
      echo "stage 0 needs --cv_root DIR (clips/*.mp3) and --covost_root DIR (covost_v2.*.tsv)," \
        "or --hf_dataset DIR, or --lhotse_cuts DIR|PATTERN" >&2
      exit 1; }
    ${cpu_cmd} "$python" -m lalmtool prepare covost2 --cv-root "$cv_root" \
      --covost-root "$covost_root" \
      --src-lang "$src_lang" --tgt-lang "$tgt_lang" --splits "$sets" --out "$data" \
      --on-error "$on_error"
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

if run_stage 4 "LoRA fine-tuning ($tasks; $train_config)"; then
  backend_info || exit 1
  st_prompt_note
  if [ "$train_config" = conf/audio-llm.yaml ] && [ -z "$backend_audio_llm" ]; then
    echo "stage 4: no conf/$backend.yaml for backend $backend (conf/audio-llm.yaml is for the" \
      "audio LLM families): give --train_config FILE" >&2
    exit 1
  fi
  mkdir -p "$exp/conf"
  for task in $tasks; do  # the backend's config plus the task's target field and options
    "$python" - "$train_config" "$(field_of "$task")" $(task_opts "$task") \
      > "$exp/conf/$task.yaml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
cfg["text_field"] = sys.argv[2]
cfg["extra"] = {**(cfg.get("extra") or {}), **dict(kv.split("=", 1) for kv in sys.argv[3:])}
print(yaml.safe_dump(cfg, sort_keys=False), end="")
EOF
    for cond in $conditions; do
      finetune_condition "$cond" "$task-$cond" --backend "$backend" --model "$model" \
        --config "$exp/conf/$task.yaml" ${steps:+--max_steps=$steps}
    done
  done
  end_stage 4 finetune
fi

if run_stage 5 "decode ($tasks)"; then
  backend_info || exit 1
  st_prompt_note
  for task in $tasks; do
    opts=(); for kv in $(task_opts "$task"); do opts+=(--backend-opt "$kv"); done
    for set in $test_sets; do
      for cond in $conditions; do
        common=(--backend "$backend" --model "$model" --device "$device" --condition "$task-$cond"
                --batch-size "$decode_batch" --max-new-tokens "$max_new_tokens")
        decode_condition "$cond" "$set" "$task-$cond" "${common[@]}" "${opts[@]}"
        decode_condition "$cond" "$set" "$task-$cond-lora" "${common[@]}" \
          --adapter "$exp/lora/$task-$cond/adapter"
      done
    done
  done
  end_stage 5 decode
fi

if run_stage 6 "score (st: BLEU/chrF, asr: WER) and report"; then
  case "$tgt_lang" in zh*) tok=zh ;; ja*) tok=ja-mecab ;; ko*) tok=ko-mecab ;; *) tok=13a ;; esac
  compgen -G "$exp/decode/*/*/hyp.jsonl" > /dev/null || {
    echo "[$recipe] no decodes under $exp/decode: run stage 5 first" >&2; exit 1; }
  for hyp in "$exp"/decode/*/*/hyp.jsonl; do
    name=$(basename "$(dirname "$(dirname "$hyp")")"); set=$(basename "$(dirname "$hyp")")
    case "$name" in
      st-*) ${cpu_cmd} "$python" -m lalmtool score --hyp "$hyp" --ref "$data/$set/manifest.jsonl" \
              --metric bleu --tokenize "$tok" > /dev/null ;;
      asr-*) ${cpu_cmd} "$python" -m lalmtool score --hyp "$hyp" --ref "$data/$set/manifest.jsonl" \
              --metric wer > /dev/null ;;
    esac
  done
  ${cpu_cmd} "$python" -m lalmtool report "$exp"
  end_stage 6 report
fi
[ -f "$exp/timings.tsv" ] && { log "stage timings (seconds):"; cat "$exp/timings.tsv"; }
