"""Stage 4, ``lalmtool finetune``: LoRA on the decoder, trained from a (compressed) feature store.

Frame-level and pooled stores go through the same code. Killed at any point, a rerun continues
from the last checkpoint (adapter, optimizer, scheduler, gradient scaler, RNG states, data
position) and ends with the same adapter as an uninterrupted run. Under ``torchrun`` every rank
takes its share of each step's micro-batches, with DDP (``shard: ddp``, the default: each rank
holds the whole model) or with FSDP (``shard: fsdp``, ``--shard fsdp``: the frozen weights and
the LoRA sharded across the ranks, layer by layer, for models larger than one GPU, e.g.
Voxtral-Small-24B; ``lalmtool.trainer.shard_model``). Both give the adapter of one process
with ``grad_accum`` x ranks micro-batches per step; under FSDP the adapter, the best one and
the checkpoints are gathered whole from the ranks before rank 0 writes them, and a killed run
resumes under ``torchrun`` with as many ranks. Without ``torchrun``, ``shard: fsdp`` trains in
one process (there is nothing to shard across); fp16 is refused with it (use bf16).

A rerun resumes only the same run: ``OUT/run.json`` records the training configuration and the
inputs by content (the feature stores' fingerprints, the manifests' sha256, the model's and the
initial adapter's identity); a rerun with anything else is refused, naming what differs, and
``force=True`` (``--force``) starts over. One process at a time writes ``OUT`` (``OUT/.lock``).

Output directory::

    OUT/run.json               configuration and inputs of the run (what a rerun must match)
    OUT/config.yaml            the resolved training configuration
    OUT/log.jsonl              step, loss, lr, tokens/s, ... (and valid_loss when validating)
    OUT/checkpoints/step-N/    resumable checkpoints (the newest ``keep_checkpoints`` are kept)
    OUT/adapter/               the final adapter (peft format, with a README.md and
                               lalmtool.json: backend, options, base model, compression, the
                               learnt pooler's shape, the training data; ``lalmtool.trained``)
                               or, with validation, the best one
    OUT/last/                  the adapter after the last step
    OUT/summary.json           steps, losses, condition, paths

With ``segments`` (``--segments``, boundaries of the frames in ``feats``) the reducer is
learnt: a ``lalmtool.pooler.LearntPooler`` turns each segment's frames into its token inside
the training step and is trained with the LoRA (its weights in every checkpoint, and in
OUT/adapter/pooler.safetensors); ``lalmtool pool --reduce learnt --pooler OUT/adapter`` then
writes the pooled stores that ``decode`` reads with this adapter. With ``teacher``
(``--teacher``, an adapter trained on the frames) and ``distill`` > 0, the loss is
``(1 - distill)`` x cross-entropy + ``distill`` x the KL divergence from the teacher's token
distributions on the same frames to the student's on the pooled tokens.

The run, step by step: ``_distributed`` (set-up), ``_data`` (the examples and micro-batches of
``lalmtool.examples``), ``_model``, then the training core (``lalmtool.trainer``, shared with
``lalmtool align``: run record, resume, loop, checkpoints) with finetune's ``_train_step``,
``_validate`` and ``_save_checkpoint``, and at the end ``_export``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import typing
from dataclasses import dataclass

import numpy as np
import torch

from . import record, trained, trainer
from .examples import (Examples, concat_range, data_stream, epoch_batches,
                       joined_examples, segments_of)
from .fileio import atomic_dir, read_json, write_atomic
from .assets import resolve_model
from .models import (BACKENDS, check_adapter_base, check_backend_options, check_tap,
                     concrete_backend, load_adapter, load_backend)
from .options import option
from .parallel import check_out
from .pool import feature_store
from .pooler import LearntPooler, has_pooler
from .pooler import load as load_pooler
from .pooler import save as save_pooler
from .pooler import shape as pooler_shape
from .store import Store
from .trainer import TrainingOptions

log = logging.getLogger("lalmtool")

#: The checkpoint a rerun of ``OUT`` resumes from (None: it starts from the beginning).
latest_checkpoint = trainer.latest_checkpoint
#: What a run writes into OUT (removed when it starts over).
RUN_OUTPUTS = ("checkpoints", "best", "last", "adapter", "log.jsonl", "summary.json")


@dataclass
class TrainConfig(TrainingOptions):
    """Every training option; ``lalmtool finetune --help`` lists them with this help text."""

    max_steps: int = option(200, "optimizer steps to train (unless epochs is set)")
    batch_size: int = option(8, "utterances per micro-batch (unless batch_seconds is set)")
    backend: str = option("whisper", f"model family: {', '.join(BACKENDS)}", tuple(BACKENDS))
    # LoRA
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch's input")
    target_modules: list[str] | str | None = option(
        None, "modules that get LoRA: a list of names or a full-match regex (null: the "
              "backend's default)")
    epochs: float | None = option(None, "passes over the training data; overrides max_steps")
    batch_seconds: float | None = option(None, "or: micro-batches of at most this much audio "
                                               "(s)")
    # long inputs, from the cached features (no re-extraction)
    concat_seconds: list[float] | float | None = option(
        None, "train on long inputs: consecutive utterances of the manifest joined into "
              "examples of up to this many seconds (features concatenated in time, texts "
              "joined with a space); [MIN, MAX] draws each example's length uniformly from "
              "that range, anew every epoch ([0, MAX] keeps single utterances among them); "
              "null: one utterance per example")
    concat_group: str | None = option(
        None, "with concat_seconds: the manifest field that joined utterances share (e.g. "
              "speaker, chapter, recording; pack: the encoder window of a store extracted "
              "with --pack, so a joined example is the window's own frames); null: any "
              "consecutive utterances")
    # a learnt pooler (with --segments) and distillation (with --teacher)
    pooler_heads: int = option(8, "with --segments: heads of the learnt pooler (each weighs "
                                  "the frames of a segment for its slice of the dimensions)")
    pooler_rank: int = option(64, "with --segments: rank of the learnt pooler's stacked-frames "
                                  "term (0: attention pooling alone)")
    pooler_width: int | None = option(
        None, "with --segments: places in a segment with their own pooler weights (later "
              "frames share the last); null: the longest segment of the training boundaries")
    distill: float = option(0.0, "with --teacher: weight of the KL divergence to the teacher's "
                                 "token distributions ((1 - distill) x cross-entropy + distill "
                                 "x KL)")
    device: str = option("auto", "auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, "
                                 "cuda or cuda:N")
    dist_timeout: float = option(600.0, "under torchrun: seconds a rank waits for the others "
                                        "(start, barriers) before it fails")
    shard: str = option("ddp", "how torchrun ranks share the model: ddp (each rank holds it "
                               "whole) or fsdp (weights sharded across ranks, layer by layer; "
                               "for models larger than one GPU)", trainer.SHARDS)

    def check(self) -> None:
        super().check()
        need = self.need
        for key in ("lora_r", "lora_alpha"):
            need(getattr(self, key) >= 1, key, ">= 1")
        need(self.epochs is None or self.epochs > 0, "epochs", "> 0 (or null: use max_steps)")
        need(self.batch_seconds is None or self.batch_seconds > 0, "batch_seconds",
             "> 0 (or null)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(self.dist_timeout > 0, "dist_timeout", "> 0 seconds")
        need(self.shard != "fsdp" or self.amp != "fp16", "amp",
             "auto, bf16 or off with shard=fsdp (fp16's gradient scaler is not sharded)")
        need(self.pooler_heads >= 1, "pooler_heads", ">= 1")
        need(self.pooler_rank >= 0, "pooler_rank", ">= 0")
        need(self.pooler_width is None or self.pooler_width >= 1, "pooler_width",
             ">= 1 (or null)")
        need(0 <= self.distill <= 1, "distill", "in [0, 1]")
        need(not self.distill or self.backend == "whisper", "distill",
             "0 for this backend (distillation is built for whisper)")
        if self.concat_seconds is not None:
            bounds = concat_range(self)
            need(len(bounds) == 2 and 0 <= bounds[0] <= bounds[1] and bounds[1] > 0,
                 "concat_seconds", "a number of seconds > 0 or a pair [MIN, MAX] with "
                 "0 <= MIN <= MAX (or null)")
        need(self.concat_group is None or self.concat_seconds is not None, "concat_group",
             "null unless concat_seconds is set")


def _check_pooler_heads(cfg: TrainConfig, feats: str) -> None:
    """The learnt pooler's heads divide the features' dimension (before OUT is made)."""
    store = Store(feats)
    dim = int(store.dataset(store.ids[0]).shape[1]) if store.ids else cfg.pooler_heads
    if dim % cfg.pooler_heads:
        raise ValueError(f"pooler_heads={cfg.pooler_heads} does not divide the dimension "
                         f"{dim} of {feats}; give a divisor of {dim}")


def _init_pooler_config(cfg: TrainConfig, init_adapter: str | None,
                        feats: str) -> TrainConfig:
    """``cfg`` with the pooler options of the learnt pooler that ``init_adapter`` holds: a run
    continued from it trains that pooler as it is, so config.yaml and run.json record its shape
    (options that said another are named in a warning); its frames' dimension must be the
    features' (before OUT is made)."""

    shape = pooler_shape(init_adapter)
    if shape is None:
        return cfg
    if not isinstance(shape, dict):
        raise ValueError(f"--init-adapter {init_adapter}: "
                         f"{trained.read(init_adapter).source('pooler')} cannot be read as its "
                         "learnt pooler's shape (not a JSON object); copy the adapter again "
                         "whole, or drop --init-adapter")
    given = {"pooler_heads": cfg.pooler_heads, "pooler_rank": cfg.pooler_rank,
             "pooler_width": cfg.pooler_width}
    held = {f"pooler_{k}": shape.get(k) for k in ("heads", "rank", "width")}
    differ = [k for k, v in given.items() if v != held[k]]
    said = [k for k in differ if given[k] is not None]  # (pooler_width null: not said)
    if said:
        log.warning("finetune: --init-adapter %s holds a learnt pooler of %s, the training "
                    "options said %s: a run continued from it trains that pooler as it is, so "
                    "config.yaml and run.json record the adapter's (drop --init-adapter for a "
                    "new pooler of the options' shape)", init_adapter,
                    ", ".join(f"{k}={held[k]}" for k in said),
                    ", ".join(f"{k}={given[k]}" for k in said))
    store = Store(feats)
    dim = int(store.dataset(store.ids[0]).shape[1]) if store.ids else shape.get("dim")
    if shape.get("dim") != dim:
        raise ValueError(f"--init-adapter {init_adapter} holds a learnt pooler of "
                         f"{shape.get('dim')}-dimensional frames, {feats} holds {dim}-"
                         "dimensional ones: give the features it was trained on (the same "
                         "model and tap), or drop --init-adapter")
    return dataclasses.replace(cfg, **{k: held[k] for k in differ})


def _check_teacher_frames(teacher: str) -> None:
    """The teacher of distillation reads the frames the learnt pooler pools: an adapter trained
    on pooled tokens (its record's compression ``steps`` not ``[]``) is refused by name;
    adapters that do not record their compression are taken as they are."""
    held = trained.read(teacher)
    record_, path = held.get("compression"), held.source("compression")
    if record_ is None:
        return
    try:
        steps = record_["steps"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"--teacher {teacher}: {path} cannot be read as the compression it "
                         f"was trained on ({type(e).__name__}: {str(e).splitlines()[0]}); copy "
                         "the adapter again whole") from e
    if steps:
        raise ValueError(f"--teacher {teacher} was trained on pooled tokens "
                         f"({record_.get('condition') or steps}, {path}), not on frames: the "
                         "teacher reads the frames the learnt pooler pools; give the adapter of "
                         "a finetune run on the frames (the frames condition's)")


def check_positions(be, ex: Examples, model: str) -> None:
    """Refuses an example whose prompt, audio and target (with its end token) do not fit the
    decoder's positions, naming it and what would fit, as decode does (before OUT is touched;
    joined examples are built to fit: ``length_check``)."""
    for u in ex.ids:
        rows, target = int(ex.store.dataset(u).shape[0]), be.text_tokens(ex.text[u]) + 1
        room = be.new_token_room(rows)
        if room is None or target <= room:
            continue
        limit = be.position_limit()
        subject = f"utterance {u!r} of {ex.store.path}: its {target} target tokens (the end " \
                  "token included)"
        if limit is None:  # Whisper: the text alone is bounded
            raise ValueError(f"{subject} are more than the {room} that {model}'s decoder holds "
                             "after its prompt (max_target_positions); compression does not "
                             "change that: leave it out of the manifest, or cut it shorter")
        audio = be.audio_positions(rows)
        fit = audio - (target - room)  # audio positions that would fit
        hint = (f"{math.ceil(audio / fit)}x fewer audio tokens would fit" if fit > 0 else
                "the prompt and the target alone exceed it: leave it out of the manifest")
        raise ValueError(f"{subject} and {be.prompt_positions(rows)} positions of prompt and "
                         f"audio need more than the {limit} that {model}'s decoder holds "
                         f"(max_position_embeddings); {hint}")


def length_check(be, ex: Examples):
    """``fits(ids)``: whether the utterances ``ids`` joined fit the decoder's positions (the
    target's tokens after the prompt with their audio); for ``concat_seconds``."""
    tokens = {u: be.text_tokens(ex.text[u]) for u in ex.ids}
    rows = {u: int(ex.store.dataset(u).shape[0]) for u in ex.ids}

    def fits(ids: list[str]) -> bool:
        room = be.text_room(sum(rows[u] for u in ids))
        return room is None or sum(tokens[u] for u in ids) <= room
    return fits


def _data(cfg: TrainConfig, feats: str, manifest: str, valid_feats: str | None,
          valid_manifest: str | None, segments: dict) -> tuple[Examples, Examples | None]:
    """The training (and validation) examples, their stores checked against the backend;
    ``segments`` holds the boundary stores (``train``, ``valid``) of a learnt pooler."""
    if bool(valid_feats) != bool(valid_manifest):
        raise ValueError("valid_feats and valid_manifest go together (--valid-feats, "
                         "--valid-manifest)")
    train = Examples(feats, manifest, cfg.text_field, cfg.concat_group, segments.get("train"))
    valid = Examples(valid_feats, valid_manifest, cfg.text_field, cfg.concat_group,
                     segments.get("valid")) if valid_feats else None
    for ex in filter(None, (train, valid)):
        _check_tap(ex.store, cfg)
    return train, valid


def _check_tap(store: Store, cfg: TrainConfig) -> None:
    """Refuses features tapped elsewhere in the encoder than the training backend reads them."""
    check_tap(store, cfg.backend, {"training": cfg.extra.get("tap")},
              "pass --backend-opt tap=<the store's tap>, or use a store extracted at the tap "
              "you want")


# -- the run's identity --------------------------------------------------------------------
def describe_inputs(feats: str, manifest: str, model: str, valid_feats: str | None = None,
                    valid_manifest: str | None = None, init_adapter: str | None = None,
                    projector: str | None = None, segments: dict | None = None,
                    teacher: str | None = None) -> dict:
    """What a run is trained from, by content: stores by fingerprint, manifests by sha256,
    the model, the initial adapter and projector (speechllm's ``extra.init_projector``), the
    teacher adapter by their identity (not their names or paths); ``segments``: the boundary
    stores (``train``, ``valid``) of a learnt pooler."""
    store, manifest_of = trained.store_ref, trained.manifest_ref
    segments = segments or {}
    return {
        "feats": store(feats), "manifest": manifest_of(manifest),
        "model": {"path": model, "identity": record.identity(resolve_model(model))},
        "init_adapter": {"path": os.path.abspath(init_adapter),
                         "identity": record.identity(init_adapter)} if init_adapter else None,
        "valid_feats": store(valid_feats) if valid_feats else None,
        "valid_manifest": manifest_of(valid_manifest) if valid_manifest else None,
        "init_projector": {"path": os.path.abspath(projector),
                           "identity": record.identity(projector)}
        if projector else None,
        "segments": store(segments["train"]) if segments.get("train") else None,
        "valid_segments": store(segments["valid"]) if segments.get("valid") else None,
        "teacher": {"path": os.path.abspath(teacher), "identity": record.identity(teacher)}
        if teacher else None,
    }


def _distributed(cfg: TrainConfig) -> trainer.Dist:
    """Set-up: rank, world and device; under torchrun the process group (with a timeout)."""
    return trainer.distributed(cfg.device, cfg.dist_timeout)


def _model(cfg: TrainConfig, model: str, device: str, init_adapter: str | None):
    """The backend with a fresh LoRA (or ``init_adapter``) on its decoder; trainable weights
    in float32 (master weights), whatever dtype the frozen model is in."""
    from peft import LoraConfig, get_peft_model  # seconds: imported when needed

    trainer.seed_all(cfg.seed)
    be = load_backend(cfg.backend, model, device=device, **cfg.extra)
    be.model.requires_grad_(False)
    if init_adapter:  # continue from an earlier adapter (e.g. re-align a frame-level LoRA)
        be.model = load_adapter(be.model, init_adapter, trainable=True)
    else:
        be.model = get_peft_model(be.model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules or be.default_lora_targets,
            modules_to_save=be.modules_to_save or None))
    for p in be.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # e.g. a projector trained in full next to bf16 weights
    return be, be.model


def _pooler(cfg: TrainConfig, train: Examples, device: str,
            init_adapter: str | None) -> LearntPooler:
    """A learnt pooler for the training features: the one ``init_adapter`` holds (continued),
    else a new one (seeded: the same weights on every rerun), as wide as the longest training
    segment unless ``pooler_width`` says."""
    if has_pooler(init_adapter):
        return load_pooler(init_adapter).train().to(device)
    dim = int(train.store.dataset(train.ids[0]).shape[1])
    width = cfg.pooler_width or max(
        int(np.diff(train.segments[u], append=train.store.dataset(u).shape[0]).max())
        for u in train.ids)
    torch.manual_seed(cfg.seed)
    return LearntPooler(dim, cfg.pooler_heads, cfg.pooler_rank, width).to(device)


def _teacher(cfg: TrainConfig, model: str, device: str, adapter: str):
    """The frozen teacher of distillation: the backend with the ``--teacher`` adapter."""
    be = load_backend(cfg.backend, model, device=device, **cfg.extra)
    be.model = load_adapter(be.model, adapter).eval().requires_grad_(False)
    return be


@dataclass
class Job:
    """finetune's side of the run: the backend (``be.model`` is the peft model, DDP-wrapped
    under torchrun; with shard=fsdp it stays the peft model, sharded in place), the unwrapped
    peft model, the long-input length check, the validation
    examples, with ``--segments`` the learnt pooler (with ``--teacher`` the teacher), and
    (rank 0) the fields of the adapters' record (``_adapter_record``)."""

    be: typing.Any
    peft_model: torch.nn.Module
    fits: typing.Any = None  # length_check of the training examples (long inputs), or None
    valid_items: list | None = None
    pooler: LearntPooler | None = None
    teacher: typing.Any = None
    record: dict | None = None

    def loss(self, ex: Examples, items: list, distill: float = 0.0) -> tuple[torch.Tensor, int]:
        """The training loss of a micro-batch (mean over its target tokens, and their count):
        the decoder's cross-entropy on the stored (or, with a pooler, learnt-pooled) features,
        mixed with the KL divergence from the teacher's distributions when ``distill`` > 0."""
        feats, texts = ex.batch(items)
        if self.pooler is None:
            return self.be.loss(feats, texts)
        device = next(self.pooler.parameters()).device
        tokens = [self.pooler(f.to(device), s) for f, s in zip(feats, ex.starts(items))]
        if not distill:
            return self.be.loss(tokens, texts)
        logits, labels = self.be.token_logits(tokens, texts)
        with torch.no_grad():
            target, _ = self.teacher.token_logits(feats, texts)
        keep = labels != -100
        student, target = logits[keep].float(), target[keep].float()
        ce = torch.nn.functional.cross_entropy(student, labels[keep])
        kl = torch.nn.functional.kl_div(student.log_softmax(-1), target.log_softmax(-1),
                                        log_target=True, reduction="batchmean")
        return (1 - distill) * ce + distill * kl, int(keep.sum())


def _total_steps(cfg: TrainConfig, train: Examples, world: int, fits=None) -> int:
    total = cfg.max_steps
    if cfg.epochs:
        per_epoch = len(epoch_batches(train, cfg, 0, fits)) / (cfg.grad_accum * world)
        total = max(1, math.ceil(cfg.epochs * per_epoch))
    if cfg.warmup_steps >= total:
        log.warning("finetune: warmup_steps=%d is not shorter than the %d training steps: the "
                    "learning rate never reaches lr=%g and never decays", cfg.warmup_steps,
                    total, cfg.lr)
    return total


def finetune(feats: str, manifest: str, model: str, out: str, cfg: TrainConfig,
             valid_feats: str | None = None, valid_manifest: str | None = None,
             init_adapter: str | None = None, force: bool = False,
             segments: str | None = None, valid_segments: str | None = None,
             teacher: str | None = None) -> dict:
    """Trains LoRA adapters on ``model``'s decoder; returns a summary (steps, losses, paths).

    ``segments`` (and ``valid_segments``): boundaries of the frames in ``feats`` (and
    ``valid_feats``): a learnt pooler is trained with the LoRA; ``teacher``: an adapter on
    the frames to distil from (``cfg.distill``). A rerun into ``out`` resumes the same run
    (same configuration and inputs) or is refused; ``force`` starts over."""
    check_out(out, feats, *filter(None, [valid_feats, segments, valid_segments, teacher]))
    if cfg.backend != concrete_backend(cfg.backend, model):  # audio-llm: the family's name
        cfg = dataclasses.replace(cfg, backend=concrete_backend(cfg.backend, model))
    for flag, store in (("--feats", feats), ("--valid-feats", valid_feats)):
        if store:  # features, not boundaries (before OUT is made)
            feature_store(store, flag)
    check_backend_options(cfg.backend, cfg.extra, "from --backend-opt or --extra")
    if bool(teacher) != bool(cfg.distill):
        raise ValueError("--teacher and distill > 0 go together (distill: the weight of the "
                         "teacher's term in the loss)")
    if teacher and not segments:
        raise ValueError("--teacher needs --segments: the teacher reads the frames the learnt "
                         "pooler pools")
    dist = _distributed(cfg)
    if segments and dist.world > 1:
        raise ValueError("--segments (a learnt pooler) trains in one process; run it without "
                         "torchrun")
    if segments and valid_feats and not valid_segments:
        raise ValueError("--segments with --valid-feats needs --valid-segments (the "
                         "boundaries of the validation frames)")
    if valid_segments and not segments:
        raise ValueError("--valid-segments needs --segments")
    bounds = {"train": segments, "valid": valid_segments}
    for store, seg in ((feats, segments), (valid_feats, valid_segments)):
        if store and seg:  # before OUT is made
            segments_of(Store(store), seg)
    if segments:
        cfg = _init_pooler_config(cfg, init_adapter, feats)
        _check_pooler_heads(cfg, feats)
    for flag, path in (("--init-adapter", init_adapter), ("--teacher", teacher)):
        if path and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{flag} {path}: no adapter_config.json there; pass the adapter/ "
                             "directory of a finetune run")
        if path:
            check_adapter_base(path, model, resolve_model(model), flag)
        if path and force and _inside(path, out):
            raise ValueError(f"{flag} {path} lies inside --out {out}, which --force starts "
                             "over: copy it elsewhere first (e.g. cp -r "
                             f"{path} {out.rstrip('/')}-init) and pass the copy")
    if teacher:
        _check_teacher_frames(teacher)

    def inputs() -> dict:
        return describe_inputs(feats, manifest, model, valid_feats, valid_manifest,
                               init_adapter, cfg.extra.get("init_projector"), bounds, teacher)

    with trainer.claimed(out, cfg, inputs, "adapter", force) as done:
        if done is not None:  # before the data checks, which import the backend: seconds
            return done
        train, valid = _data(cfg, feats, manifest, valid_feats, valid_manifest, bounds)
        # the model and the adapters it starts from load before OUT is touched: a run that
        # cannot start leaves OUT as it was (--force included)
        be, peft_model = _model(cfg, model, dist.device, init_adapter)
        for ex in filter(None, (train, valid)):
            check_positions(be, ex, model)
        if dist.rank == 0:
            trainer.prepare_out(out, cfg, inputs(), force, "a finetune run", RUN_OUTPUTS,
                                stash=True)
        dist.barrier("the start of training")
        try:  # a forced run that fails puts back the run it replaced (OUT/.replaced)
            fits = length_check(be, train) if cfg.concat_seconds is not None else None
            pooler = _pooler(cfg, train, dist.device, init_adapter) if segments else None
            job = Job(be, peft_model, fits, pooler=pooler,
                      teacher=_teacher(cfg, model, dist.device, teacher) if teacher else None,
                      record=_adapter_record(cfg, model, feats, manifest, segments, pooler)
                      if dist.rank == 0 else None)
            if job.pooler is not None:
                log.info("finetune: a learnt pooler (%s, %d parameters) trained with the LoRA on %s"
                         "%s", job.pooler.config, job.pooler.size,
                         segments, f", distilled from {teacher} (distill {cfg.distill:g})"
                         if teacher else "")
            if cfg.shard == "fsdp" and dist.world > 1:  # in place: be.model stays the peft model
                trainer.shard_model(peft_model, dist)
            elif cfg.shard == "fsdp":
                log.info("finetune: shard=fsdp without torchrun: one process holds the whole model")
            params = [p for p in peft_model.parameters() if p.requires_grad]  # (sharded ones)
            run = trainer.Run(out, cfg, dist, peft_model,
                              params + (list(job.pooler.parameters()) if job.pooler else []),
                              _total_steps(cfg, train, dist.world, fits), job)
            trainer.resume(run, lambda ck: _restore(run, ck))
            if dist.world > 1 and cfg.shard == "ddp":
                be.model = run.model = torch.nn.parallel.DistributedDataParallel(peft_model)
            if valid is not None:  # long inputs are validated on long inputs, cut once
                run.job.valid_items = joined_examples(valid, cfg, 0,
                                                      fits and length_check(be, valid))
            _train(run, train, valid)
            summary = _export(run, feats, model, segments)
        except Exception:
            if dist.rank == 0:
                trainer.restore_replaced(out, RUN_OUTPUTS)
            raise
        if dist.rank == 0:
            trainer.drop_replaced(out)
        return summary


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _train(run: trainer.Run, train: Examples, valid: Examples | None) -> None:
    """The training loop (the core's), with finetune's step, validation and checkpoint."""
    stream = data_stream(train, run.cfg, tuple(run.state["position"]), run.job.fits)
    trainer.fit(run, lambda: _train_step(run, train, stream),
                (lambda: _validate(run, valid)) if valid else None,
                lambda: _save_checkpoint(run), "finetune", "tokens_per_s")


def _train_step(run: trainer.Run, train: Examples, stream) -> tuple[float, int, object]:
    """One optimizer step: the decoder's loss over target tokens (loss, tokens, norm)."""
    return trainer.train_step(run, lambda ids: run.job.loss(train, ids, run.cfg.distill),
                              stream)


def _validate(run: trainer.Run, valid: Examples) -> None:
    """Validation loss; the best adapter so far goes to OUT/best."""
    trainer.validation(
        run, lambda: evaluate(run.job, valid, run.cfg, run.dist.device, run.job.valid_items),
        lambda path: _save_best(run, path), "valid_loss")


def _save_best(run: trainer.Run, path: str) -> None:
    """The best adapter so far into ``path`` (rank 0; under FSDP gathered by every rank first)."""
    weights = _gathered(run)
    if run.dist.rank == 0:
        _save_adapter(run.job, path, weights)


def _gathered(run: trainer.Run) -> dict | None:
    """Under FSDP the trainable weights gathered whole, by their names in the peft model: a
    collective (every rank calls it; rank 0 gets them). Else None: each rank holds them."""
    if run.dist.world > 1 and trainer.is_sharded(run.model):
        return trainer.gathered_weights(run.job.peft_model)
    return None


@torch.no_grad()
def evaluate(job: Job, ex: Examples, cfg: TrainConfig, device: str,
             items: list | None = None) -> float:
    """Token-weighted cross-entropy over a validation set's ``items`` (default: every
    utterance alone), dropout off."""
    module = job.be.model.module if hasattr(job.be.model, "module") else job.be.model
    was_training = module.training
    module.eval()
    total, tokens = 0.0, 0
    items = ex.ids if items is None else items
    for i in range(0, len(items), cfg.batch_size):
        with trainer.autocast(cfg, device):
            loss, n = job.loss(ex, items[i : i + cfg.batch_size])
        total += float(loss) * n
        tokens += n
    module.train(was_training)
    return total / max(tokens, 1)


def _save_checkpoint(run: trainer.Run) -> None:
    from peft.utils import get_peft_model_state_dict

    pooler = run.job.pooler

    def weights() -> dict:  # called by every rank
        gathered = _gathered(run)
        if gathered is not None:  # (FSDP) by name in the peft model, put back by _restore
            return {"trainable": gathered}
        return {"adapter": get_peft_model_state_dict(run.job.peft_model),
                **({"pooler": pooler.state_dict()} if pooler else {})}
    trainer.save_checkpoint(run, weights)


def _restore(run: trainer.Run, ck: dict) -> None:
    from peft import set_peft_model_state_dict

    if "trainable" in ck:  # written by an FSDP run (the ranks take their shards of it)
        trainer.load_weights(run.job.peft_model, ck["trainable"])
    else:
        set_peft_model_state_dict(run.job.peft_model, ck["adapter"])
    if run.job.pooler is not None:
        run.job.pooler.load_state_dict(ck["pooler"])


# -- the adapter ---------------------------------------------------------------------------
def _save_adapter(job: Job, path: str, weights: dict | None = None) -> None:
    """The adapter (and the learnt pooler trained with it) into ``path``, whole or not at all;
    ``weights``: the trainable weights gathered from the ranks under FSDP (``_gathered``)."""
    with atomic_dir(path) as tmp:
        job.peft_model.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
        if job.pooler is not None:
            save_pooler(job.pooler, tmp)
        _save_record(job, tmp)


def _adapter_record(cfg: TrainConfig, model: str, feats: str, manifest: str,
                    segments: str | None, pooler: LearntPooler | None) -> dict:
    """The fields of the record (``lalmtool.trained``) of every adapter this run writes: the
    backend and its options, the base model, the compression it is trained on (with the
    longest training input: joined examples, ``concat_seconds``), the learnt pooler's shape
    and the training data."""
    joined = concat_range(cfg)[1] if cfg.concat_seconds is not None else None
    compression = trained.compression(feats, segments, joined)
    data = {"feats": trained.store_ref(feats), "manifest": trained.manifest_ref(manifest),
            **({"segments": trained.store_ref(segments)} if segments else {})}
    return {"backend": cfg.backend, "backend_options": cfg.extra, **trained.base(model),
            "compression": compression, "pooler": pooler.config if pooler else None,
            "trained_on": {"condition": compression["condition"], **data}}


def _save_record(job: Job, directory: str) -> None:
    trained.write(directory, "lora-adapter", **job.record)


def _export(run: trainer.Run, feats: str, model: str, segments: str | None) -> dict:
    """OUT/last, OUT/adapter (the best by validation loss of this run, else the last) with a
    README.md, the base model named as the user gave it and its record; OUT/summary.json."""
    out, state, rank = run.out, run.state, run.dist.rank
    condition = trained.compression(feats, segments)["condition"]
    last = trainer.last_record(out)
    summary = {"out": out, "steps": state["step"], "last": last,
               "best_valid_loss": state["best"], "best_step": state["best_step"],
               "adapter": os.path.join(out, "adapter"), "feats": os.path.abspath(feats),
               "condition": condition}
    if run.job.pooler is not None:  # what the learnt compressor costs, next to the LoRA's
        summary["pooler"] = {**run.job.pooler.config, "parameters": run.job.pooler.size}
    weights = _gathered(run)  # (FSDP: every rank)
    if rank == 0:
        _save_adapter(run.job, os.path.join(out, "last"), weights)
        use_best = state["best_step"] is not None and os.path.isdir(os.path.join(out, "best"))
        final = os.path.join(out, "best" if use_best else "last")
        with atomic_dir(summary["adapter"]) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
            base = run.job.record["base_model"]
            _set_base_model(tmp, base)
            write_atomic(os.path.join(tmp, "README.md"),
                         adapter_readme(run, summary, base, "best" if use_best else "last"))
            _save_record(run.job, tmp)  # (a best/ of an earlier release holds none)
        write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    run.dist.barrier("the end of training")
    return summary


def _set_base_model(adapter: str, base: str) -> None:
    path = os.path.join(adapter, "adapter_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["base_model_name_or_path"] = base
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def adapter_readme(run: trainer.Run, summary: dict, base: str, which: str) -> str:
    """What the adapter is: backend, base model, condition, training data, steps, losses."""
    cfg = run.cfg
    inputs = read_json(os.path.join(run.out, trainer.RUN_FILE),
                       "use --force to start over")["inputs"]
    last = summary["last"] or {}
    loss = f"{last['loss']:.4f}" if isinstance(last.get("loss"), float) else "not logged"
    valid = (f"best validation loss {summary['best_valid_loss']:.4f} at step "
             f"{summary['best_step']} ({inputs['valid_feats']['path']})"
             if summary["best_step"] is not None else "no validation set")
    start = inputs["init_adapter"]["path"] if inputs["init_adapter"] else "a fresh LoRA"
    lines = [
        f"# LoRA adapter: {cfg.backend} on {summary['condition']} features", "",
        "Written by `lalmtool finetune` (peft format). Load it with",
        f"`lalmtool decode --backend {cfg.backend} --model {base} --adapter <this directory> "
        "--feats <a store of the same condition>`.", "",
        f"- backend: {cfg.backend}" + (f" (options {cfg.extra})" if cfg.extra else ""),
        f"- base model: {base}",
        f"- condition: {summary['condition']} (features {inputs['feats']['path']})",
        f"- training data: {len(Store(summary['feats']).ids)} utterances, texts from "
        f"{inputs['manifest']['path']} (field {cfg.text_field})" + (
            f"; long inputs: consecutive utterances joined into examples of "
            f"{'-'.join(f'{s:g}' for s in dict.fromkeys(concat_range(cfg)))} s"
            + (f" (same {cfg.concat_group})" if cfg.concat_group else "")
            if cfg.concat_seconds is not None else ""),
        f"- started from: {start}",
        *([f"- learnt pooler (pooler.safetensors, trained with the LoRA on "
           f"{inputs['segments']['path']}): {summary['pooler']}; write the stores it reads "
           "with `lalmtool pool --reduce learnt --pooler <this directory>`"]
          if summary.get("pooler") else []),
        *([f"- distilled from {inputs['teacher']['path']} (distill {cfg.distill:g})"]
          if inputs.get("teacher") else []),
        f"- LoRA: r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets "
        f"{cfg.target_modules or 'the backend default'}",
        f"- steps: {summary['steps']} (lr {cfg.lr:g}, {cfg.schedule} schedule, batch "
        f"{cfg.batch_seconds and f'{cfg.batch_seconds:g} s' or cfg.batch_size} x "
        f"{cfg.grad_accum} x {run.dist.world} rank(s)); final training loss {loss}",
        f"- validation: {valid}; this adapter is the {which} one",
        "- WER: not measured by finetune; `lalmtool decode` and `lalmtool score` give it", "",
        "The run's configuration is in ../config.yaml, its inputs (by fingerprint) in "
        "../run.json, its log in ../log.jsonl.", ""]
    return "\n".join(lines)
