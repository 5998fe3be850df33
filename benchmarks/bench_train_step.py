"""What compression saves when re-aligning a LALM: one LoRA training step, time and peak memory.

Usage: python benchmarks/bench_train_step.py (--arch qwen2-audio-7b | --arch-config CONFIG.json)
           [--batch 8x30 2x120 1x300 1x600] [--conditions frames uniform-k3] [--checkpointing off on]
           [--device cuda] [--dtype bfloat16] [--amp bf16|off] [--lora-r 16] [--repeats 3]
           [--json FILE]

On a GPU (the real Qwen2-Audio-7B architecture with random weights, built on the device: no
download, and cost does not depend on the weights' values):

    python benchmarks/bench_train_step.py --arch qwen2-audio-7b --device cuda --dtype bfloat16

For every batch shape (``BxS``: B utterances of S seconds), condition and gradient-checkpointing
setting it runs what ``lalmtool finetune`` runs per step on the ``qwen2-audio`` backend: peft
LoRA (rank ``--lora-r``, alpha 2r, on the backend's default targets, trainable weights in
float32), the backend's ``loss`` under autocast, backward, AdamW. It prints

* audio tokens and LLM tokens per utterance (prompt + audio + target text),
* the step time (the best of ``--repeats`` timed steps after one warm-up step),
* the step's peak memory above what was allocated before it (weights, LoRA and optimizer
  states excluded; ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS growth on CPU),
  or, for an example longer than the LLM's ``max_position_embeddings`` (10 min of frames:
  15,000 audio tokens against Qwen-7B's 8,192), that it cannot be trained on,

each also as a ratio to frame level. Features are Gaussian frames at the tower's 25 Hz with the
projector's input width; ``uniform-kN`` pools every N frames (mean), ``peaks`` cuts at the
strict local maxima of the frames' cosine distances. Targets are ``--text-rate`` tokens per
second of audio (about 2.5 words/s of speech).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from lalmtool.pool import pool
from lalmtool.segment import peaks, uniform

from archs import ARCHS, PeakMemory, arch_config, random_qwen2_audio  # benchmarks/archs.py
from family_archs import ARCHS as ALL_FAMILY_ARCHS, random_audio_llm  # benchmarks/family_archs.py

#: The audio LLM families' real architectures (run through the generic audio LLM backend).
FAMILY_ARCHS = sorted(set(ALL_FAMILY_ARCHS) - set(ARCHS))

FRAME_RATE = 25.0  # the Qwen2-Audio tower's output
CONDITIONS = ("frames", "uniform-k2", "uniform-k3", "peaks")


def compress(frames: np.ndarray, condition: str) -> np.ndarray:
    if condition == "frames":
        return frames
    starts = peaks(frames) if condition == "peaks" else uniform(frames, int(condition[-1]))
    return pool(frames, starts, "mean")


def batch_of(spec: str, width: int, condition: str, text_rate: float, seed: int = 0,
             rate: float = FRAME_RATE):
    """``BxS`` → (B feature tensors of S seconds at ``rate`` rows per second under
    ``condition``, B target texts)."""
    n, seconds = spec.lower().split("x")
    rng = np.random.default_rng(seed)
    frames = [rng.standard_normal((int(round(float(seconds) * rate)), width))
              .astype(np.float32) for _ in range(int(n))]
    words = max(1, int(round(float(seconds) * text_rate)))
    text = "the" + " the" * (words - 1)  # one token per word for the byte-level tokenizer
    return [torch.from_numpy(compress(f, condition)) for f in frames], [text] * int(n)


def with_lora(be, r: int):
    """The backend's model wrapped in a fresh peft LoRA, as finetune does."""
    be.model.requires_grad_(False)
    be.model = get_peft_model(be.model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                   target_modules=be.default_lora_targets))
    params = [p for p in be.model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # float32 master weights
    return params


def step_fn(be, opt, feats, texts, device: torch.device, amp: str):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, _ = be.loss(feats, texts)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def measure(step, device: torch.device, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up: creates the optimizer states, one-time kernels
    with PeakMemory(device) as mem:
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "peak_mib": mem.mib}


def table(rows: list[dict]) -> str:
    head = (f"{'batch':>7} {'condition':<11} {'ckpt':>4} {'audio tok':>9} {'LLM tok':>8} "
            f"{'ideal':>6} {'step s':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = next((x for x in rows if x["batch"] == r["batch"]
                    and x["checkpointing"] == r["checkpointing"]
                    and x["condition"] == "frames"), None)
        ratio = {k: r[k] / ref[k] if ref and r[k] is not None and ref[k] else float("nan")
                 for k in ("audio_tokens", "seconds", "peak_mib")}
        r["ratios"] = ratio
        cost = (f"{r['seconds']:>8.3f} {ratio['seconds']:>6.3f} {r['peak_mib']:>9.1f} "
                f"{ratio['peak_mib']:>6.3f}" if r["seconds"] is not None else
                f"  beyond the LLM's {r['beyond']} positions: not trainable")
        lines.append(f"{r['batch']:>7} {r['condition']:<11} {r['checkpointing']:>4} "
                     f"{r['audio_tokens']:>9} {r['llm_tokens']:>8} {ratio['audio_tokens']:>6.3f} "
                     f"{cost}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS) + FAMILY_ARCHS,
                    help="a real architecture, random weights: qwen2-audio's, or an audio LLM "
                         "family's (benchmarks/family_archs.py)")
    ap.add_argument("--layers", type=int,
                    help="a family --arch at this LLM depth (CPU runs); default: its own")
    ap.add_argument("--arch-config", help="a Qwen2-Audio config.json instead of --arch")
    ap.add_argument("--batch", nargs="+", default=["8x30", "2x120", "1x300", "1x600"],
                    help="BxS: B utterances of S seconds of audio (a whole recording of 5 or "
                         "10 min in one example: 1x300, 1x600)")
    ap.add_argument("--conditions", nargs="+", default=["frames", "uniform-k3"],
                    choices=CONDITIONS)
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="gradient checkpointing (the backend's gradient_checkpointing option)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the frozen model's weights")
    ap.add_argument("--amp", choices=["bf16", "off"],
                    help="autocast (default: bf16 on CUDA, off elsewhere)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--text-rate", type=float, default=3.3, help="target tokens per audio second")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps; the best is kept")
    ap.add_argument("--json", help="also write the rows (with ratios) here")
    args = ap.parse_args(argv)
    args.conditions = ["frames"] + [c for c in args.conditions if c != "frames"]  # the reference
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    family = args.arch in FAMILY_ARCHS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpointing:
            if family:  # audio tokens at the family's rate, the LLM's width
                be = random_audio_llm(args.arch, tmp, args.device, getattr(torch, args.dtype),
                                      args.layers, gradient_checkpointing=ckpt == "on")
                width = be._core().get_input_embeddings().weight.shape[1]
            else:
                be = random_qwen2_audio(arch_config(args.arch, args.arch_config), tmp,
                                        args.device, getattr(torch, args.dtype),
                                        gradient_checkpointing=ckpt == "on")
                width = be._core().model.multi_modal_projector.linear.in_features
            be.model.train()
            params = with_lora(be, args.lora_r)
            opt = torch.optim.AdamW(params, lr=1e-4)
            for spec in args.batch:
                for cond in args.conditions:
                    feats, texts = batch_of(spec, width, cond, args.text_rate,
                                            rate=be.frame_rate)
                    inputs = be.build_inputs(feats, texts)
                    row = {"batch": spec, "condition": cond, "checkpointing": ckpt,
                           "audio_tokens": be.num_audio_tokens(feats[0]),
                           "llm_tokens": int(inputs.attention_mask.sum()) // len(feats)}
                    limit = be.position_limit()
                    if limit and row["llm_tokens"] > limit:  # what finetune would refuse
                        row.update(seconds=None, peak_mib=None, beyond=limit)
                    else:
                        row.update(measure(step_fn(be, opt, feats, texts, device, amp), device,
                                           args.repeats))
                    rows.append(row)
                    print(f"  {spec} {cond} checkpointing {ckpt}: {rows[-1]}", file=sys.stderr)
                    opt.state.clear()  # the next shape starts from the same optimizer memory
            del be, opt, params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    depth = f", {args.layers} LLM layers" if family and args.layers else ""
    print(f"\nLoRA train step, {'audio LLM' if family else 'qwen2-audio'} "
          f"({args.arch or args.arch_config}{depth}), {args.device} "
          f"{args.dtype}, amp {amp}, LoRA r={args.lora_r}; ratios are to frame level "
          "(same batch and checkpointing), ideal = ratio of audio tokens")
    print(table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
