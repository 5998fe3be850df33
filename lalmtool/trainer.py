"""The training core of ``lalmtool finetune`` (LoRA on the decoder, the decoder's loss) and
``lalmtool align`` (a CTC head onto the LLM's embeddings).

A training job brings its options (a ``TrainingOptions`` subclass), its model and trainable
parameters, a loss on a batch of examples, a validation score (lower is better) and how to
save its weights; the core does the rest, the same way for both:

* the run directory: one process at a time (the caller holds ``OUT/.lock``), ``OUT/run.json``
  recording the options and the inputs by content (``lalmtool.record``: a rerun with anything
  else is refused, naming what differs), ``OUT/config.yaml``, and a finished run reused;
* the order of the data: a seeded shuffle per epoch, resumable at any micro-batch;
* the schedule (warm-up, then linear, cosine or constant), gradient accumulation, clipping,
  mixed precision (with a gradient scaler for fp16) and, under ``torchrun``, DDP (each rank
  holds the whole model) or FSDP (``shard_model``: the weights sharded across the ranks, for
  models larger than one GPU; PyTorch's FSDP2 ``fully_shard``); the loss logged is the step's
  over every rank;
* validation every ``valid_every`` steps, the best weights kept in ``OUT/best``, early
  stopping after ``patience`` validations without improvement;
* checkpoints ``OUT/checkpoints/step-N/`` (written as ``step-N.tmp`` and renamed when whole;
  an unreadable one is set aside as ``step-N.broken`` and the one before it used), holding the
  trainable weights, optimizer, scheduler, scaler, RNG states of every rank and the data
  position (under FSDP the weights and optimizer state gathered whole, by parameter name):
  killed at any point, a rerun ends with the same weights as an uninterrupted run;
* ``OUT/log.jsonl`` (records written after the checkpoint resumed from are dropped) and a
  progress bar.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch

from . import record
from .fileio import read_json, replace_dir, write_atomic
from .lock import output_lock
from .options import Options, option
from .parallel import progress

log = logging.getLogger("lalmtool")

RUN_FILE = "run.json"
#: Options that may change between a run and its resumption (they do not change the weights).
RESUMABLE = ("keep_checkpoints", "dist_timeout")


# -- options -------------------------------------------------------------------------------
#: ``--dtype`` names (extract, decode) accepted for ``amp``, so one spelling works everywhere.
AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "off"}


@dataclass
class TrainingOptions(Options):
    """The options every training job has; a job's own options extend these. Values are
    checked on construction (types coerced from YAML strings, ranges and names checked), so a
    wrong option is one line before anything is written."""

    WHAT: typing.ClassVar[str] = "training option"
    COMMAND: typing.ClassVar[str] = "finetune"

    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    schedule: str = option("linear", "learning rate after warm-up",
                           ("linear", "cosine", "constant"))
    warmup_steps: int = option(20, "steps of linear warm-up to lr")
    max_steps: int = option(200, "optimizer steps to train")
    batch_size: int = option(8, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (per rank under torchrun)")
    clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = option(0, "seed of the initialisation and of the data order")
    text_field: str = option("text", "manifest field to learn: text (ASR) or target "
                                     "(translation)", ("text", "target"))
    valid_every: int = option(50, "validate every N steps (with --valid-feats)")
    patience: int = option(0, "stop after this many validations without improvement "
                              "(0: never)")
    save_every: int = option(50, "write a resumable checkpoint every N steps")
    log_every: int = option(10, "write a log.jsonl record every N steps")
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep")
    amp: str = option("auto", "mixed precision: auto (bf16 on GPU, off on CPU), bf16 (or "
                              "bfloat16), fp16 (or float16; with a gradient scaler) or off",
                      ("auto", "bf16", "fp16", "off"))
    extra: dict = option({}, "backend options, a YAML mapping (the same as --backend-opt "
                             "key=value)")

    def __post_init__(self):
        if isinstance(self.amp, str):
            self.amp = AMP_NAMES.get(self.amp, self.amp)
        super().__post_init__()

    def check(self) -> None:
        """One clear message per out-of-range option (subclasses add their own rules)."""
        super().check()
        for key in ("batch_size", "grad_accum", "valid_every", "save_every", "log_every",
                    "keep_checkpoints"):
            self.need(getattr(self, key) >= 1, key, ">= 1")
        self.need(self.max_steps >= 1, "max_steps", ">= 1 (no steps would write untrained "
                                                    "weights)")
        self.need(self.lr > 0, "lr", "> 0")
        self.need(0 <= self.seed < 2**32, "seed", "a whole number from 0 to 4294967295 "
                                                  "(2**32 - 1)")
        for key in ("weight_decay", "warmup_steps", "clip", "patience"):
            self.need(getattr(self, key) >= 0, key, ">= 0")


# -- processes -----------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the job: rank, world size, device, collective timeout (s)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    timeout: float = 600.0

    def barrier(self, what: str) -> None:
        """Waits for every rank; fails with a message instead of hanging on a failed rank."""
        if self.world == 1:
            return
        try:
            torch.distributed.barrier()
        except Exception as e:  # noqa: BLE001 - torch raises several kinds here
            raise RuntimeError(
                f"rank {self.rank}: the other ranks did not reach {what} within "
                f"{self.timeout:g} s (dist_timeout); one of them probably failed, see its "
                f"log ({first_line(e)})") from e


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def distributed(device: str, timeout: float) -> Dist:
    """Rank, world and ``device`` (``auto``: cuda:LOCAL_RANK when there is a GPU, else cpu);
    under torchrun the process group too (with a timeout)."""
    from .parallel import resolve_device

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    else:
        device = resolve_device(device)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # before NCCL starts: each rank on its own GPU
    if world > 1 and not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(
                "nccl" if device.startswith("cuda") else "gloo",
                timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"rank {rank} of {world}: the other ranks did not join within {timeout:g} s "
                f"(dist_timeout); are all {world} processes running with the same "
                f"MASTER_ADDR/MASTER_PORT? ({first_line(e)})") from e
    return Dist(rank, world, device, timeout)


def amp_kind(cfg: TrainingOptions, device: str) -> str:
    if cfg.amp == "auto":
        return "bf16" if device.startswith("cuda") else "off"
    return cfg.amp


def autocast(cfg: TrainingOptions, device: str):
    kind = amp_kind(cfg, device)
    if kind == "off":
        return torch.autocast("cpu", enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return torch.autocast(device.split(":")[0], dtype=dtype)


# -- sharding (FSDP) -----------------------------------------------------------------------
#: How torchrun ranks share the model: ``ddp`` (each rank holds it whole, gradients
#: all-reduced) or ``fsdp`` (the weights sharded across the ranks: ``shard_model``).
SHARDS = ("ddp", "fsdp")


def shard_model(model: torch.nn.Module, dist: Dist) -> None:
    """Shards ``model``'s weights across the ranks, in place, with FSDP2 (``fully_shard``):

    * one unit per layer: the outermost modules whose class the transformers model names in
      ``_no_split_modules`` (its decoder and encoder layers; without that list, the members
      of its ``ModuleList`` s), and one per module holding trainable weights outside them
      (e.g. a projector trained in full); frozen and trainable weights share a unit;
    * the rest (embeddings, norms, head) in the root's unit: the model under peft's wrapper,
      so that ``model`` stays what the backend calls. A backend may call those modules
      outside the model's forward (the input embeddings that its audio rows are spliced
      into): they gather the root's weights first (a hook).

    A unit's weights are gathered for its forward and backward and freed after; gradients are
    reduce-scattered (averaged over the ranks, as DDP). The parameters are replaced by sharded
    ones (``DTensor``): collect the trainable ones and make the optimizer after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    mesh = init_device_mesh(dist.device.split(":")[0], (dist.world,))
    units = _units(root)
    for unit in reversed(units):  # the innermost first, the root last
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    # Fix the root now (FSDP fixes it at the first forward of a unit; a unit of trainable
    # weights that the backend calls before the model's forward would then take it).
    root._get_fsdp_state()._lazy_init()
    inside = set()
    for unit in units:
        inside.update(id(m) for m in unit.modules())
    forward = [False]

    def gather_root(module, args):
        if not forward[0]:  # called by the backend itself, outside the model's forward
            root.unshard()

    def entered(module, args):
        forward[0] = True

    def left(module, args, output):
        forward[0] = False

    root.register_forward_pre_hook(entered)
    root.register_forward_hook(left, always_call=True)
    for m in root.modules():
        if id(m) not in inside and m is not root and next(m.parameters(recurse=False), None) \
                is not None:
            m.register_forward_pre_hook(gather_root)


def _units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """``shard_model``'s units of ``root`` other than itself, in the order of
    ``named_modules`` (an outer unit before the units inside it)."""
    names = set(getattr(root, "_no_split_modules", None) or ())
    if names:
        layers = {id(m) for m in root.modules() if type(m).__name__ in names}
    else:
        layers = {id(m) for lst in root.modules() if isinstance(lst, torch.nn.ModuleList)
                  for m in lst}
    units, covered = [], set()
    for m in root.modules():  # pre-order: a module's ancestors come before it
        if id(m) in covered or m is root:
            continue
        if id(m) in layers:  # the outermost layers (a layer's inner no-split modules stay)
            units.append(m)
            covered.update(id(sub) for sub in m.modules())
        elif any(p.requires_grad for p in m.parameters(recurse=False)):
            units.append(m)  # trainable weights outside the layers
    return units


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP units (``shard_model``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def gathered_weights(model: torch.nn.Module) -> dict:
    """The trainable weights of sharded ``model``, whole, by their names in it: a collective
    (every rank calls it); rank 0 gets them on the CPU, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def load_weights(model: torch.nn.Module, weights: dict) -> None:
    """Puts whole trainable weights (``gathered_weights``, read by every rank) back into
    sharded ``model`` (each rank keeps its shard) or into a whole one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                  strict=False))


def _optimizer_state(run: "Run") -> dict:
    """The optimizer's state of a sharded model, gathered whole by parameter name (a
    collective; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(run.model, run.opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def _set_optimizer_state(run: "Run", state: dict, sharded: bool) -> None:
    """Restores ``_optimizer_state`` (``sharded``: written from a sharded model)."""
    if not sharded:
        run.opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(run.model, run.opt, state,
                             options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _no_sync(model: torch.nn.Module, sharded: bool):
    """Gradients of this micro-batch kept (accumulated) on each rank, not reduced: DDP's
    ``no_sync``; FSDP's ``set_requires_gradient_sync(False)``."""
    if not sharded:
        with model.no_sync():
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


# -- the run directory ---------------------------------------------------------------------
def run_record(cfg: TrainingOptions, inputs: dict) -> dict:
    return {"config": dataclasses.asdict(cfg), "inputs": inputs}


#: Where a starting-over run keeps the outputs it replaces until it has finished
#: (``stash``): put back if it fails, removed when it succeeds.
REPLACED = ".replaced"


def prepare_out(out: str, cfg: TrainingOptions, inputs: dict, force: bool, what: str,
                outputs: tuple[str, ...], stash: bool = False) -> None:
    """Rank 0, under the lock: refuses to continue another run in ``out``; starts over with
    ``force`` (or when nothing was checkpointed), removing ``outputs``; records the run
    (run.json, config.yaml)."""
    path = os.path.join(out, RUN_FILE)
    new = run_record(cfg, inputs)
    if not force:
        if not os.path.exists(path) and any(os.path.exists(os.path.join(out, p))
                                            for p in outputs):
            raise ValueError(f"{out} holds {what} without {RUN_FILE} (made by an older "
                             "lalmtool): its inputs cannot be compared; use another --out, or "
                             "--force to start over")
        record.check(path, new, what, type(cfg).defaults(), RESUMABLE)
    if force or not os.path.exists(path) or latest_checkpoint(out) is None:
        kept = os.path.join(out, REPLACED)
        # with ``stash``, what is there moves aside (unless an earlier unfinished start
        # already keeps the run it replaced: then what is there now is that start's)
        aside = stash and not os.path.isdir(kept) and force and os.path.exists(path)
        for name in (*outputs, RUN_FILE, "config.yaml"):
            if aside and os.path.lexists(os.path.join(out, name)):
                os.makedirs(kept, exist_ok=True)
                os.replace(os.path.join(out, name), os.path.join(kept, name))
            else:
                remove(os.path.join(out, name))
    for stale in glob.glob(os.path.join(out, "*.tmp")) + \
            glob.glob(os.path.join(out, "checkpoints", "*.tmp")):
        remove(stale)  # left by a killed writer
    os.makedirs(out, exist_ok=True)
    record.write(path, new)
    write_atomic(os.path.join(out, "config.yaml"), cfg.to_yaml())


@contextlib.contextmanager
def claimed(out: str, cfg: TrainingOptions, inputs, product: str, force: bool
            ) -> typing.Iterator[dict | None]:
    """Holds ``out``'s lock (``lalmtool.lock``) for a run; yields the summary of the run that
    finished there with these options and ``inputs()`` (nothing to do), else None."""
    with output_lock(out):
        done = None if force else finished(out, cfg, inputs, product)
        if done is not None:
            log.info("%s: finished with these inputs and settings, nothing to do", out)
        yield done


def finished(out: str, cfg: TrainingOptions, inputs, product: str) -> dict | None:
    """The summary of the run that finished in ``out`` (``summary.json`` is written last,
    after ``product``) with these options and ``inputs()``, or None."""
    summary = read_json(os.path.join(out, "summary.json"), "use --force to train again")
    old = record.read(os.path.join(out, RUN_FILE))
    if summary is None or old is None or not os.path.exists(os.path.join(out, product)):
        return None
    same = not record.differences(old, run_record(cfg, inputs()), type(cfg).defaults(),
                                  RESUMABLE)
    return summary if same else None  # else prepare_out refuses, naming what differs


def restore_replaced(out: str, outputs: tuple[str, ...]) -> None:
    """Puts back the run that a failed start replaced (``prepare_out(stash=True)``)."""
    kept = os.path.join(out, REPLACED)
    if not os.path.isdir(kept):
        return
    for name in (*outputs, RUN_FILE, "config.yaml"):
        remove(os.path.join(out, name))
    for name in os.listdir(kept):
        os.replace(os.path.join(kept, name), os.path.join(out, name))
    os.rmdir(kept)
    log.warning("%s: the run failed; the run it was to replace is back in place", out)


def drop_replaced(out: str) -> None:
    """Removes the run that a finished start replaced."""
    remove(os.path.join(out, REPLACED))


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# -- data order and schedule ---------------------------------------------------------------
def shuffled(items: list, seed: int, epoch: int) -> list:
    """The epoch's order of ``items`` (a copy): the same for the same seed and epoch."""
    items = list(items)
    random.Random(seed * 100003 + epoch).shuffle(items)
    return items


def batches(items: list, size: int) -> list[list]:
    """``items`` cut into micro-batches of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def data_stream(epoch_batches, start: tuple[int, int], empty: str):
    """Yields ((epoch, index of the next micro-batch), micro-batch) forever, from ``start``;
    ``epoch_batches(epoch)`` gives an epoch's micro-batches (``empty``: the error if none)."""
    epoch, index = start
    while True:
        batches = epoch_batches(epoch)
        if not batches:
            raise ValueError(empty)
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


def lr_lambda(cfg: TrainingOptions, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        return max(0.0, 1 - done)
    return f


# -- the run -------------------------------------------------------------------------------
@dataclass
class Run:
    """What the training loop works on. ``model`` is the trainable module (under torchrun
    DDP-wrapped, or sharded in place by ``shard_model``: then ``params`` are its sharded
    parameters); a job keeps its own objects beside (``job``)."""

    out: str
    cfg: TrainingOptions
    dist: Dist
    model: torch.nn.Module
    params: list
    total: int
    job: typing.Any = None
    state: dict = field(default_factory=lambda: {"step": 0, "position": (0, 0), "best": None,
                                                 "best_step": None, "bad": 0})
    # made from the above: AdamW over ``params``, the schedule, the fp16 gradient scaler
    opt: torch.optim.Optimizer = field(init=False)
    sched: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        cfg = self.cfg
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total))
        self.scaler = torch.amp.GradScaler(self.dist.device.split(":")[0],
                                           enabled=amp_kind(cfg, self.dist.device) == "fp16")

    @property
    def stopped(self) -> bool:
        """Early stopping: ``patience`` validations in a row without improvement."""
        return bool(self.cfg.patience) and self.state.get("bad", 0) >= self.cfg.patience


def train_step(run: Run, loss_of, stream) -> tuple[float, int, torch.Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches per rank; (loss, count, norm).
    ``loss_of(batch)`` gives (mean loss, the count its mean is over, e.g. target tokens).

    Under DDP, gradients are all-reduced once per step (``no_sync`` on the other
    micro-batches), under FSDP reduce-scattered once per step (the same with
    ``set_requires_gradient_sync``) and clipped by the norm over every rank's shards; with
    fp16 the loss is scaled and the step skipped on overflow. The loss returned is the mean
    over every rank's micro-batches (the same as one process with ``grad_accum`` x ranks
    micro-batches); the count is this rank's."""
    cfg, dist = run.cfg, run.dist
    sharded = dist.world > 1 and is_sharded(run.model)
    run.opt.zero_grad(set_to_none=True)
    step_loss, step_count, mine = 0.0, 0, 0
    for micro in range(cfg.grad_accum * dist.world):
        position, batch = next(stream)
        if micro % dist.world != dist.rank:
            continue
        mine += 1
        sync = dist.world == 1 or mine == cfg.grad_accum
        with contextlib.nullcontext() if sync else _no_sync(run.model, sharded):
            with autocast(cfg, dist.device):
                loss, n = loss_of(batch)
            run.scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += float(loss.detach()) / cfg.grad_accum
        step_count += n
    run.state["position"] = position
    if dist.world > 1:
        total = torch.tensor([step_loss], dtype=torch.float64, device=dist.device)
        torch.distributed.all_reduce(total)
        step_loss = float(total) / dist.world
    run.scaler.unscale_(run.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip) if cfg.clip else None
    if gnorm is not None and hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP
        gnorm = gnorm.full_tensor()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.state["step"] += 1
    return step_loss, step_count, gnorm


def validation(run: Run, score, save_best, key: str) -> float:
    """Scores the model (``score()``, lower is better), logs it under ``key``; the best so far
    is saved by ``save_best(OUT/best)`` (rank 0; every rank when the model is sharded: its
    weights are gathered by all, then written by rank 0); counts validations without
    improvement."""
    step, value = run.state["step"], score()
    log_record(run.out, {"step": step, key: value}, run.dist.rank)
    if run.state["best"] is None or value < run.state["best"]:
        run.state.update(best=value, best_step=step, bad=0)
        if run.dist.rank == 0 or (run.dist.world > 1 and is_sharded(run.model)):
            save_best(os.path.join(run.out, "best"))
    else:
        run.state["bad"] = run.state.get("bad", 0) + 1
    return value


def fit(run: Run, step, validate, save, desc: str, rate: str) -> None:
    """The loop: ``step()`` (→ loss, count, gradient norm), a log record every ``log_every``
    steps (with ``rate``: counts per second, e.g. tokens_per_s), ``validate()`` every
    ``valid_every`` (None: no validation set), ``save()`` (a checkpoint) every ``save_every``,
    until ``total`` steps or early stopping."""
    cfg, out, rank = run.cfg, run.out, run.dist.rank
    bar = progress(total=run.total, initial=run.state["step"], desc=desc, unit="step",
                   disable=rank != 0)
    run.model.train()
    t0, seen = time.perf_counter(), 0
    while run.state["step"] < run.total and not run.stopped:
        loss, count, gnorm = step()
        seen += count
        s = run.state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if s % cfg.log_every == 0 or s == run.total:
            el = time.perf_counter() - t0
            log_record(out, {"step": s, "loss": loss, "lr": run.sched.get_last_lr()[0],
                             "grad_norm": float(gnorm) if gnorm is not None else None,
                             rate: seen * run.dist.world / el if el else None}, rank)
        if validate is not None and (s % cfg.valid_every == 0 or s == run.total):
            validate()
        if s % cfg.save_every == 0 or s == run.total or run.stopped:
            save()
    bar.close()


# -- checkpoints ---------------------------------------------------------------------------
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, directory) of the whole checkpoints in ``out``, oldest first; ``step-N.tmp``
    (a checkpoint being written when the run was killed) is never one of them."""
    found = []
    for d in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        m = _STEP_DIR.search(os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "state.pt")):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


def _read(path: str):
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a cut file fails in torch, zipfile or pickle
        raise CheckpointError(f"checkpoint file {path} cannot be read ({first_line(e)})") from e


def _write(tmp: str, name: str, obj) -> None:
    """``torch.save`` into the checkpoint being written (``tmp``); on a failure (a full disk)
    the partial checkpoint is removed and the message names it and the space left."""
    try:
        torch.save(obj, os.path.join(tmp, name))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(tmp)).free
        raise OSError(f"cannot write the checkpoint {tmp.removesuffix('.tmp')} ({first_line(e)})"
                      f"; {free / 2**20:.1f} MiB are free on its disk: free some space (or "
                      "lower keep_checkpoints) and rerun, training resumes from the last whole "
                      "checkpoint") from e


def save_checkpoint(run: Run, weights) -> None:
    """OUT/checkpoints/step-N: every rank's RNG states, then (rank 0) ``weights()`` (a dict of
    the trainable weights), optimizer, scheduler, scaler and the run's state in ``state.pt``,
    written last: it marks the checkpoint whole. The oldest beyond ``keep_checkpoints`` go.
    ``weights()`` and the optimizer's state are taken on every rank (under FSDP gathering
    them whole is a collective; rank 0 gets them)."""
    dist, out = run.dist, run.out
    sharded = dist.world > 1 and is_sharded(run.model)
    trained, optimizer = weights(), _optimizer_state(run) if sharded else None
    final = os.path.join(out, "checkpoints", f"step-{run.state['step']}")
    tmp = final + ".tmp"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier("a checkpoint")
    _write(tmp, f"rng.{dist.rank}.pt", rng_state())
    dist.barrier("a checkpoint")
    if dist.rank == 0:
        _write(tmp, "state.pt", {
            **trained, "optimizer": optimizer if sharded else run.opt.state_dict(),
            "sharded": sharded, "scheduler": run.sched.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "state": run.state})
        replace_dir(tmp, final)
        for _, old in checkpoints(out)[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier("a checkpoint")


def _load_checkpoint(path: str, run: Run, restore) -> dict:
    """Both files of the checkpoint read first; then ``restore(state.pt's dict)`` puts the
    weights back, and the optimizer, scheduler, scaler and RNG states are restored."""
    ck = _read(os.path.join(path, "state.pt"))
    rng_file = os.path.join(path, f"rng.{run.dist.rank}.pt")
    if not os.path.exists(rng_file):
        raise RuntimeError(f"{path} was saved by fewer ranks than now; resume with the same "
                           "number of processes")
    rng = _read(rng_file)
    restore(ck)
    _set_optimizer_state(run, ck["optimizer"], bool(ck.get("sharded")))
    run.sched.load_state_dict(ck["scheduler"])
    if run.scaler.is_enabled() and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return {"bad": 0, **ck["state"]}


def resume(run: Run, restore) -> bool:
    """Continues from the newest checkpoint that can be read (True), else from the start; an
    unreadable one (cut by a full disk or a copy) is renamed ``step-N.broken`` with a warning
    naming it, and the one before it is used. Log records after that step are dropped."""
    resumed = False
    for _, ckpt in reversed(checkpoints(run.out)):
        try:
            run.state = _load_checkpoint(ckpt, run, restore)
        except CheckpointError as e:
            log.warning("%s; resuming from the checkpoint before it (this one is kept as "
                        "%s.broken)", e, ckpt)
            if run.dist.rank == 0:
                os.replace(ckpt, ckpt + ".broken")
            continue
        log.info("resuming from %s (step %d of %d)", ckpt, run.state["step"], run.total)
        resumed = True
        break
    if run.dist.rank == 0:
        truncate_log(run.out, run.state["step"])
        if run.state["best_step"] is None:
            remove(os.path.join(run.out, "best"))  # written after that checkpoint: redone
    return resumed


# -- logs ----------------------------------------------------------------------------------
def log_record(out: str, rec: dict, rank: int = 0) -> None:
    if rank != 0:
        return
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    log.debug("%s", rec)


def last_record(out: str) -> dict:
    """The newest training record of log.jsonl (also when a finished run is rerun)."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return next((r for r in reversed(records) if "loss" in r), {})


def truncate_log(out: str, step: int) -> None:
    """Drops log records written after the checkpoint resumed from (they will be redone)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(keep))
