"""Stage 4, ``lalmtool finetune``: LoRA on the decoder, trained from a (compressed) feature store.

Frame-level and pooled stores go through the same code. Killed at any point, a rerun continues
from the last checkpoint (adapter, optimizer, scheduler, RNG states, data position) and ends with
the same adapter as an uninterrupted run. Under ``torchrun`` it trains with DDP: every rank takes
its share of each step's micro-batches.

Output directory::

    OUT/config.yaml            the resolved training configuration
    OUT/log.jsonl              step, loss, lr, tokens/s, ... (and valid_loss when validating)
    OUT/checkpoints/step-N/    resumable checkpoints (the newest two are kept)
    OUT/adapter/               the final adapter (peft format) or, with validation, the best one
    OUT/last/                  the adapter after the last step
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import random
import shutil
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from .manifest import load_manifest
from .models import load_backend
from .parallel import progress
from .store import Store, condition_of, write_atomic

log = logging.getLogger("lalmtool")


@dataclass
class TrainConfig:
    backend: str = "whisper"
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: the backend's default
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    warmup_steps: int = 20
    max_steps: int = 200  # optimizer steps; ``epochs`` overrides when set
    epochs: float | None = None
    batch_size: int = 8  # utterances per micro-batch, unless batch_seconds is set
    batch_seconds: float | None = None  # or: micro-batches of at most this much audio
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    text_field: str = "text"  # manifest field to learn: text (ASR) or target (translation)
    # bookkeeping
    valid_every: int = 50
    save_every: int = 50
    log_every: int = 10
    keep_checkpoints: int = 2
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    tensorboard: bool = False
    device: str = "auto"
    extra: dict = field(default_factory=dict)  # backend options (e.g. language)

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None) -> "TrainConfig":
        """From a YAML file (optional) plus ``key=value`` overrides, with types checked."""
        values = {}
        if path:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        values.update(overrides or {})
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(hints)}")
        for key, value in values.items():  # YAML reads 3e-4 as a string
            if isinstance(value, str) and float in typing.get_args(hints[key]) + (hints[key],):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ValueError(f"training option {key} must be a number, not {value!r}")
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def parse_overrides(items: list[str]) -> dict:
    """``["lr=3e-4", "target_modules=[q_proj,v_proj]"]`` → typed values (YAML parsing)."""
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


# -- data ----------------------------------------------------------------------------------
class Examples:
    """Utterances present both in a feature store and in a manifest with text."""

    def __init__(self, feats: str, manifest: str, text_field: str = "text"):
        self.store = Store(feats)
        utts, _ = load_manifest(manifest, check_audio=False, need_text=text_field == "text")
        text = {u.id: getattr(u, text_field) for u in utts if getattr(u, text_field)}
        missing = [u for u in self.store.ids if u not in text]
        if missing:
            raise ValueError(f"{len(missing)} utterance(s) of {feats} have no {text_field!r} in "
                             f"{manifest} (e.g. {missing[:3]}); pass the matching manifest")
        self.ids, self.text = list(self.store.ids), text
        self.duration = {u: float(self.store.attrs(u).get("duration", 0.0)) for u in self.ids}

    def batch(self, ids: list[str]) -> tuple[list[torch.Tensor], list[str]]:
        return ([torch.from_numpy(self.store[u].astype(np.float32)) for u in ids],
                [self.text[u] for u in ids])


def epoch_batches(ex: Examples, cfg: TrainConfig, epoch: int) -> list[list[str]]:
    """The micro-batches of one epoch: a seeded shuffle, cut by count or by total duration."""
    ids = list(ex.ids)
    random.Random(cfg.seed * 100003 + epoch).shuffle(ids)
    if not cfg.batch_seconds:
        return [ids[i : i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
    batches, cur, total = [], [], 0.0
    for u in ids:
        if cur and total + ex.duration[u] > cfg.batch_seconds:
            batches.append(cur)
            cur, total = [], 0.0
        cur.append(u)
        total += ex.duration[u]
    return batches + ([cur] if cur else [])


def data_stream(ex: Examples, cfg: TrainConfig, start: tuple[int, int]):
    """Yields ((epoch, index of the next micro-batch), micro-batch) forever, from ``start``."""
    epoch, index = start
    while True:
        batches = epoch_batches(ex, cfg, epoch)
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


# -- training ------------------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        raise ValueError(f"unknown schedule {cfg.schedule!r}: linear, cosine or constant")
    return f


def _device(cfg: TrainConfig, local_rank: int) -> str:
    if cfg.device != "auto":
        return cfg.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _autocast(cfg: TrainConfig, device: str):
    kind = cfg.amp
    if kind == "auto":
        kind = "bf16" if device.startswith("cuda") else "off"
    if kind == "off":
        return torch.autocast("cpu", enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return torch.autocast(device.split(":")[0], dtype=dtype)


def finetune(feats: str, manifest: str, model: str, out: str, cfg: TrainConfig,
             valid_feats: str | None = None, valid_manifest: str | None = None,
             init_adapter: str | None = None) -> dict:
    """Trains LoRA adapters on ``model``'s decoder; returns a summary (steps, losses, paths)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(cfg, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    os.makedirs(out, exist_ok=True)
    _check_config(out, cfg)

    train = Examples(feats, manifest, cfg.text_field)
    valid = Examples(valid_feats, valid_manifest, cfg.text_field) if valid_feats else None
    total = cfg.max_steps
    if cfg.epochs:
        per_epoch = len(epoch_batches(train, cfg, 0)) / (cfg.grad_accum * world)
        total = max(1, math.ceil(cfg.epochs * per_epoch))

    _seed_all(cfg.seed)
    be = load_backend(cfg.backend, model, device=device, **cfg.extra)
    be.model.requires_grad_(False)
    if init_adapter:  # continue from an earlier adapter (e.g. re-align a frame-level LoRA)
        be.model = PeftModel.from_pretrained(be.model, init_adapter, is_trainable=True)
    else:
        be.model = get_peft_model(be.model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules or be.default_lora_targets,
            modules_to_save=be.modules_to_save or None))
    peft_model = be.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    state = {"step": 0, "position": (0, 0), "best": None, "best_step": None}
    ckpt = latest_checkpoint(out)
    if ckpt:
        state = _load_checkpoint(ckpt, peft_model, opt, sched, rank)
        log.info("resuming from %s (step %d of %d)", ckpt, state["step"], total)
        if rank == 0:
            _truncate_log(out, state["step"])
    if world > 1:
        be.model = torch.nn.parallel.DistributedDataParallel(peft_model)

    writer = _tensorboard(out) if cfg.tensorboard and rank == 0 else None
    stream = data_stream(train, cfg, tuple(state["position"]))
    bar = progress(total=total, initial=state["step"], desc="finetune", unit="step",
               disable=rank != 0)
    peft_model.train()
    t0, seen_tokens, last = time.perf_counter(), 0, {}
    while state["step"] < total:
        opt.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum * world):
            position, ids = next(stream)
            if micro % world != rank:
                continue
            feats_b, texts = train.batch(ids)
            with _autocast(cfg, device):
                loss, n = be.loss(feats_b, texts)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            step_tokens += n
        state["position"] = position
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip else None
        opt.step()
        sched.step()
        state["step"] += 1
        seen_tokens += step_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        step = state["step"]
        if step % cfg.log_every == 0 or step == total:
            el = time.perf_counter() - t0
            last = {"step": step, "loss": step_loss, "lr": sched.get_last_lr()[0],
                    "grad_norm": float(gnorm) if gnorm is not None else None,
                    "tokens_per_s": seen_tokens * world / el if el else None}
            _log(out, last, writer, rank)
        if valid and (step % cfg.valid_every == 0 or step == total):
            vloss = evaluate(be, valid, cfg, device)
            _log(out, {"step": step, "valid_loss": vloss}, writer, rank)
            if state["best"] is None or vloss < state["best"]:
                state["best"], state["best_step"] = vloss, step
                if rank == 0:
                    _save_adapter(peft_model, os.path.join(out, "best"))
        if step % cfg.save_every == 0 or step == total:
            _save_checkpoint(out, peft_model, opt, sched, state, cfg, rank, world)
    bar.close()
    if rank == 0:
        _save_adapter(peft_model, os.path.join(out, "last"))
        final = os.path.join(out, "best") if os.path.isdir(os.path.join(out, "best")) else \
            os.path.join(out, "last")
        _copy_dir(final, os.path.join(out, "adapter"))
    if world > 1:
        torch.distributed.barrier()
    summary = {"out": out, "steps": state["step"], "last": last, "best_valid_loss": state["best"],
               "best_step": state["best_step"], "adapter": os.path.join(out, "adapter"),
               "feats": os.path.abspath(feats), "condition": condition_of(Store(feats))[2]}
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


@torch.no_grad()
def evaluate(be, ex: Examples, cfg: TrainConfig, device: str) -> float:
    """Token-weighted mean loss over a validation set (dropout off)."""
    module = be.model.module if hasattr(be.model, "module") else be.model
    was_training = module.training
    module.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(ex.ids), cfg.batch_size):
        feats_b, texts = ex.batch(ex.ids[i : i + cfg.batch_size])
        with _autocast(cfg, device):
            loss, n = be.loss(feats_b, texts)
        total += float(loss) * n
        tokens += n
    module.train(was_training)
    return total / max(tokens, 1)


# -- checkpoints ---------------------------------------------------------------------------
def latest_checkpoint(out: str) -> str | None:
    done = [d for d in glob.glob(os.path.join(out, "checkpoints", "step-*"))
            if os.path.exists(os.path.join(d, "state.pt"))]
    return max(done, key=lambda d: int(d.rsplit("-", 1)[1]), default=None)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_checkpoint(out, peft_model, opt, sched, state, cfg, rank, world) -> None:
    final = os.path.join(out, "checkpoints", f"step-{state['step']}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        torch.distributed.barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng.{rank}.pt"))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        torch.save({"adapter": get_peft_model_state_dict(peft_model), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "state": state},
                   os.path.join(tmp, "state.pt"))  # written last: marks the checkpoint whole
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*[0-9]")),
                       key=lambda d: int(d.rsplit("-", 1)[1]))
        for old in steps[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()


def _load_checkpoint(path, peft_model, opt, sched, rank) -> dict:
    ck = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    set_peft_model_state_dict(peft_model, ck["adapter"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    rng_file = os.path.join(path, f"rng.{rank}.pt")
    if not os.path.exists(rng_file):
        raise RuntimeError(f"{path} was saved by fewer ranks than now; resume with the same "
                           "number of processes")
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["state"]


def _save_adapter(peft_model, path: str) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _copy_dir(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _check_config(out: str, cfg: TrainConfig) -> None:
    """Writes OUT/config.yaml; refuses to resume a run made with another configuration."""
    path = os.path.join(out, "config.yaml")
    text = cfg.to_yaml()
    if os.path.exists(path) and latest_checkpoint(out):
        with open(path, encoding="utf-8") as fh:
            if fh.read() != text:
                raise ValueError(f"{out} holds a run with another configuration ({path}); "
                                 "use another --out or remove it")
    if int(os.environ.get("RANK", 0)) == 0:
        write_atomic(path, text)


def _log(out: str, rec: dict, writer, rank: int) -> None:
    if rank != 0:
        return
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, rec["step"])
    log.debug("%s", rec)


def _truncate_log(out: str, step: int) -> None:
    """Drops log records written after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(keep))


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("tensorboard=true needs the tensorboard package: "
                           "pip install tensorboard") from e
    return SummaryWriter(os.path.join(out, "tensorboard"))
