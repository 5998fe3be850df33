# Shared by the corpus recipes (source it after stages.sh): what a recipe needs to know of its
# --backend beyond the name, read from lalmtool's registry of backends (what `lalmtool backends`
# lists), so that every audio LLM family registered there is taken without naming it here.
#
#   backend_info       sets, once per run (it imports torch and transformers: seconds, so the
#                      recipes call it only where a stage needs it):
#     backend_audio_llm   yes for the audio LLM backends (every family, and audio-llm), else empty
#     backend_checkpoint  the family's main public checkpoint (`lalmtool backends`' table), else
#                         empty
#     backend_rate        the family's native audio tokens per second, else empty
#     backend_options     the options the backend takes (--backend-opt), space separated
#     backend_tasks       the tasks its prompt can ask for (the choices of its task option, less
#                         translate for a family whose prompt is a bare transcription request,
#                         e.g. qwen3-asr); empty when it has no task option
#   default_model      sets $model, when empty, to the backend's default checkpoint
#   backend_takes OPT  true when the backend takes option OPT (backend_info first)
#   backend_can TASK   true when the backend's prompt can ask for TASK (backend_info first)
backend_info() {
  [ -n "${_backend_info_done:-}" ] && return 0
  local out
  out=$("$python" - "$backend" <<'EOF'
import shlex
import sys

from lalmtool.models import BACKENDS, backend_class, backend_options

name = sys.argv[1]
if name not in BACKENDS:
    sys.exit(f"--backend {name}: not a lalmtool backend; `lalmtool backends` lists them: "
             f"{', '.join(sorted(BACKENDS))}")
from lalmtool.models.audio_llm import FAMILIES, AudioLLMBackend  # noqa: E402

options = {row["option"]: row for row in backend_options(name).describe()}
family = FAMILIES.get(name)
tasks = [t.strip() for t in str(options.get("task", {}).get("choices") or "").split(",")
         if t.strip()]
if "task" in options and not tasks:
    tasks = ["transcribe"]
if family is not None and getattr(family, "transcription_request", False):
    tasks = [t for t in tasks if t == "transcribe"]  # its prompt takes no instruction
values = {"backend_audio_llm": "yes" if issubclass(backend_class(name), AudioLLMBackend) else "",
          "backend_checkpoint": family.checkpoint if family else "",
          "backend_rate": f"{family.rate:g}" if family else "",
          "backend_options": " ".join(options), "backend_tasks": " ".join(tasks)}
for key, value in values.items():
    print(f"{key}={shlex.quote(value)}")
EOF
  ) || { echo "[$recipe] cannot read backend $backend from lalmtool's registry (above)" >&2
         return 1; }
  eval "$out"
  _backend_info_done=1
}
backend_takes() { [[ " ${backend_options:-} " == *" $1 "* ]]; }
backend_can() { [[ " ${backend_tasks:-} " == *" $1 "* ]]; }

# default_model: qwen2-audio → Qwen/Qwen2-Audio-7B-Instruct, whisper → whisper-tiny.en (an
# asset: fetched once, then offline), an audio LLM family → its main checkpoint (`lalmtool
# backends`); any other backend needs --model
default_model() {
  [ -n "$model" ] && return 0
  case "$backend" in
    qwen2-audio) model=Qwen/Qwen2-Audio-7B-Instruct ;;
    whisper) model=whisper-tiny.en ;;
    *) backend_info || return 1
       model=$backend_checkpoint
       [ -n "$model" ] || { echo "[$recipe] backend $backend has no default checkpoint: give" \
         "--model (a local checkpoint directory or a hub id)" >&2; return 1; } ;;
  esac
}
