#!/usr/bin/env bash
# The command line end to end on a GPU with a tiny random Qwen2-Audio (lalmtool.testing), then
# the 7B-architecture cost benchmarks: what to run first on a new GPU machine (no download).
#
#   bash benchmarks/gpu_smoke.sh            # D=cuda by default; D=cpu ARCH="--arch-config F" to try it on a CPU
#   (the families at the end: F_LAYERS=1 FAMILY_ARCHS=glm-asr-nano to try them on a CPU)
#
# Checks: extract --device cuda --dtype bfloat16 (and that its rerun loads no model), segment,
# pool, finetune with --amp bf16 + gradient checkpointing, with --amp fp16 (gradient scaler) and
# under torchrun (one rank), decode in bfloat16 (LoRA unmerged) and float32 (merged), a one-rank
# torchrun decode equal to the single-process one, score; then bench_train_step.py,
# bench_prefill.py and bench_generate.py (eager vs compile=true: ms per decode step next to the
# weights' + KV cache's memory-traffic bound, whether the compiled ids equal the eager ones, and
# where an eager step goes) on --arch qwen2-audio-7b. Every step prints its exit status and seconds.
set -u
cd "$(dirname "$0")/.."
D=${D:-cuda}; ARCH=${ARCH:---arch qwen2-audio-7b}; OUT=${OUT:-/tmp/lalmtool-gpu-smoke}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ "$D" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
W=$OUT/work; L="python3 -m lalmtool.cli"; M=$W/model
step() { echo "=== $*"; /usr/bin/time -f "(%e s)" "$@" 2>&1 | tail -n "${TAILN:-6}"; echo "rc=${PIPESTATUS[0]}"; }
python3 - "$W" <<'PY'
import json, os, sys
import numpy as np, soundfile as sf
from lalmtool.testing import write_random_qwen2_audio
w = sys.argv[1]
os.makedirs(w, exist_ok=True)
write_random_qwen2_audio(os.path.join(w, "model"), hidden=64, layers=2, intermediate=128)
texts = ["the cat sat", "then the end", "in the hen", "the ten men"]
with open(os.path.join(w, "m.jsonl"), "w") as fh:
    for i in range(8):
        t = np.arange(int((0.8 + 0.3 * i) * 16000)) / 16000
        sf.write(os.path.join(w, f"{i}.wav"), (0.3 * np.sin(2 * np.pi * (180 + 60 * i) * t)).astype(np.float32), 16000)
        fh.write(json.dumps({"id": f"q{i}", "audio": f"{i}.wav", "text": texts[i % 4]}) + "\n")
PY
X="extract --manifest $W/m.jsonl --model $M --backend qwen2-audio --out $W/feats --device $D --dtype bfloat16"
step $L $X
step $L $X   # finished: no model loaded
step $L segment --feats $W/feats --method uniform --k 2 --out $W/seg
step $L pool --feats $W/feats --segments $W/seg --reduce mean --out $W/pooled
FT="finetune --feats $W/pooled --manifest $W/m.jsonl --model $M --backend qwen2-audio --max-steps 30 --batch-size 4 --lr 1e-2 --warmup-steps 0 --save-every 10 --log-every 10"
step $L $FT --out $W/lora --amp bf16 --extra '{train_projector: true, gradient_checkpointing: true}'
step $L $FT --out $W/lora16 --amp fp16 --extra '{train_projector: true}'
step torchrun --nproc_per_node 1 -m lalmtool.cli $FT --out $W/lora_ddp --amp bf16
tail -qn 1 $W/lora/log.jsonl $W/lora16/log.jsonl $W/lora_ddp/log.jsonl
DEC="decode --feats $W/pooled --model $M --adapter $W/lora/adapter --backend qwen2-audio --manifest $W/m.jsonl --device $D --max-new-tokens 8"
for dt in bfloat16 float32; do step $L $DEC --dtype $dt --out $W/dec_$dt --batch-size 4; done
step torchrun --nproc_per_node 1 -m lalmtool.cli $DEC --dtype bfloat16 --out $W/dec_ddp
step $L score --hyp $W/dec_bfloat16/hyp.jsonl --ref $W/m.jsonl
python3 - "$W" <<'PY'
import json, sys
h = lambda p: {r["id"]: r["hyp"] for r in map(json.loads, open(p))}
a, b = h(f"{sys.argv[1]}/dec_bfloat16/hyp.jsonl"), h(f"{sys.argv[1]}/dec_ddp/hyp.jsonl")
print("torchrun decode == single decode:", a == b, len(a), "utterances")
PY
TAILN=40 step python3 benchmarks/bench_train_step.py $ARCH --device $D --dtype bfloat16 --batch 8x30 2x120 --conditions frames uniform-k3 --checkpointing off on --json $OUT/train_step.json
TAILN=40 step python3 benchmarks/bench_prefill.py --backends qwen2-audio $ARCH --device $D --dtype bfloat16 --random-frames --seconds 30 120 600 --json $OUT/prefill.json
TAILN=60 step python3 benchmarks/bench_generate.py $ARCH --device $D --dtype bfloat16 --seconds 30 --conditions frames uniform-k3 peaks --batch 1 8 16 --new-tokens 32 --compile off on --repeats 2 --profile --json $OUT/generate.json
TAILN=30 step python3 benchmarks/bench_generate.py $ARCH --device $D --dtype bfloat16 --seconds 600 --conditions frames uniform-k3 --batch 1 --new-tokens 32 --compile off on --repeats 2 --json $OUT/generate_600s.json
# the audio LLM families at their main checkpoints' real sizes (random weights built on the GPU):
# 10 min of audio at the native rate vs 3x and 10x (prefill), and one LoRA step on 1 x 10 min
# (FAMILY_ARCHS="..." to choose; F_D is the device for these, D unless set)
for a in ${FAMILY_ARCHS:-voxtral-mini-3b qwen2.5-omni-7b granite-speech-3.3-8b}; do
  TAILN=12 step python3 benchmarks/bench_prefill.py --arch $a ${F_LAYERS:+--layers $F_LAYERS} --device ${F_D:-$D} --dtype bfloat16 --seconds 600 --conditions frames uniform-k3 --repeats 2 --json $OUT/prefill_$a.json
  TAILN=10 step python3 benchmarks/bench_train_step.py --arch $a ${F_LAYERS:+--layers $F_LAYERS} --device ${F_D:-$D} --dtype bfloat16 --batch 1x600 --conditions frames uniform-k3 --checkpointing on --repeats 2 --json $OUT/train_step_$a.json
done
