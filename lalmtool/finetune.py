"""Stage 4, ``lalmtool finetune``: LoRA on the decoder, trained from a (compressed) feature store.

Frame-level and pooled stores go through the same code. Killed at any point, a rerun continues
from the last checkpoint (adapter, optimizer, scheduler, gradient scaler, RNG states, data
position) and ends with the same adapter as an uninterrupted run. Under ``torchrun`` it trains
with DDP: every rank takes its share of each step's micro-batches.

A rerun resumes only the same run: ``OUT/run.json`` records the training configuration and the
inputs by content (the feature stores' fingerprints, the manifests' sha256, the model's and the
initial adapter's identity); a rerun with anything else is refused, naming what differs, and
``force=True`` (``--force``) starts over. One process at a time writes ``OUT`` (``OUT/.lock``).

Output directory::

    OUT/run.json               configuration and inputs of the run (what a rerun must match)
    OUT/config.yaml            the resolved training configuration
    OUT/log.jsonl              step, loss, lr, tokens/s, ... (and valid_loss when validating)
    OUT/checkpoints/step-N/    resumable checkpoints (the newest ``keep_checkpoints`` are kept)
    OUT/adapter/               the final adapter (peft format, with a README.md) or, with
                               validation, the best one
    OUT/last/                  the adapter after the last step
    OUT/summary.json           steps, losses, condition, paths

The run, step by step (one function each): ``_distributed`` (set-up), ``_data``, ``_model``,
``_prepare_out`` + ``_resume``, then per step ``_train_step``, ``_validate``,
``_save_checkpoint``, and at the end ``_export``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import types
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from .fileio import iter_jsonl, model_identity, read_json, write_atomic
from .lock import output_lock
from .manifest import load_manifest
from .models import (BACKENDS, backend_default, check_backend_options, load_adapter,
                     load_backend)
from .parallel import check_out, progress, resolve_device
from .pool import condition_of
from .store import Store

log = logging.getLogger("lalmtool")

RUN_FILE = "run.json"
#: Options that may change between a run and its resumption (they do not change the adapter).
RESUMABLE = ("keep_checkpoints", "dist_timeout")
#: What a run writes into OUT (removed when it starts over).
RUN_OUTPUTS = ("checkpoints", "best", "last", "adapter", "log.jsonl", "summary.json",
               "config.yaml", RUN_FILE)


def _opt(default, help: str):
    """A training option: its default and one line of help (``lalmtool finetune --help``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training option; ``lalmtool finetune --help`` lists them with this help text."""

    backend: str = _opt("whisper", f"model family: {', '.join(BACKENDS)}")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA branch's input")
    target_modules: list[str] | str | None = _opt(
        None, "modules that get LoRA: a list of names or a full-match regex (null: the "
              "backend's default)")
    # optimisation
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    schedule: str = _opt("linear", "learning rate after warm-up: linear, cosine or constant")
    warmup_steps: int = _opt(20, "steps of linear warm-up to lr")
    max_steps: int = _opt(200, "optimizer steps to train (unless epochs is set)")
    epochs: float | None = _opt(None, "passes over the training data; overrides max_steps")
    batch_size: int = _opt(8, "utterances per micro-batch (unless batch_seconds is set)")
    batch_seconds: float | None = _opt(None, "or: micro-batches of at most this much audio (s)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (per rank under torchrun)")
    clip: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = _opt(0, "seed of the LoRA initialisation and of the data order")
    text_field: str = _opt("text", "manifest field to learn: text (ASR) or target (translation)")
    # long inputs, from the cached features (no re-extraction)
    concat_seconds: list[float] | float | None = _opt(
        None, "train on long inputs: consecutive utterances of the manifest joined into "
              "examples of up to this many seconds (features concatenated in time, texts "
              "joined with a space); [MIN, MAX] draws each example's length uniformly from "
              "that range, anew every epoch ([0, MAX] keeps single utterances among them); "
              "null: one utterance per example")
    concat_group: str | None = _opt(
        None, "with concat_seconds: the manifest field that joined utterances share (e.g. "
              "speaker, chapter, recording); null: any consecutive utterances")
    # bookkeeping
    valid_every: int = _opt(50, "validate every N steps (with --valid-feats)")
    save_every: int = _opt(50, "write a resumable checkpoint every N steps")
    log_every: int = _opt(10, "write a log.jsonl record every N steps")
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on GPU, off on CPU), bf16 (or "
                            "bfloat16), fp16 (or float16; with a gradient scaler) or off")
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, "
                               "cuda or cuda:N")
    dist_timeout: float = _opt(600.0, "under torchrun: seconds a rank waits for the others "
                                      "(start, barriers) before it fails")
    extra: dict = _opt({}, "backend options, a YAML mapping (e.g. {language: de}, "
                           "{tap: prepool}, {encoder: whisper-tiny.en})")

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        self.amp = AMP_NAMES.get(self.amp, self.amp)  # the --dtype names of extract and decode
        _check_values(self)

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None) -> "TrainConfig":
        """From a YAML file (optional) plus ``key=value`` overrides, with types checked."""
        values = {}
        if path:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: a training configuration is a YAML mapping of "
                                 "option: value")
        values.update(overrides or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"unknown training option {key!r}{hint}; "
                                 f"`lalmtool finetune --help` lists them all")
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


#: ``--dtype`` names (extract, decode) accepted for ``amp``, so one spelling works everywhere.
AMP_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "off"}


def _coerce(key: str, hint, value):
    """``value`` as the option's type (YAML gives ``3e-4`` as a string); else a clear error."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if number.is_integer():
                return int(number)
        elif kind is float and not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                return number
        elif kind is str and isinstance(value, str):
            return value
        elif typing.get_origin(kind) is list and isinstance(value, list):
            item = typing.get_args(kind)[0]
            if item is str and all(isinstance(v, str) for v in value):
                return value
            if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) for v in value):
                return [float(v) for v in value]
        elif kind is dict and isinstance(value, dict):
            return value
    names = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             type(None): "null", list[float]: "a list of numbers"}
    wanted = " or ".join(names.get(k, "a list of names") for k in kinds)
    raise ValueError(f"training option {key} must be {wanted}, not {value!r}")


def _check_values(cfg: TrainConfig) -> None:
    """One clear message per out-of-range option."""
    def need(ok: bool, key: str, rule: str):
        if not ok:
            raise ValueError(f"training option {key} must be {rule}, not {getattr(cfg, key)!r}")

    need(cfg.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}")
    for key in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "valid_every",
                "save_every", "log_every", "keep_checkpoints"):
        need(getattr(cfg, key) >= 1, key, ">= 1")
    need(cfg.max_steps >= 1, "max_steps", ">= 1 (no steps would write an untrained adapter)")
    need(cfg.epochs is None or cfg.epochs > 0, "epochs", "> 0 (or null: use max_steps)")
    need(cfg.batch_seconds is None or cfg.batch_seconds > 0, "batch_seconds", "> 0 (or null)")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "in [0, 1)")
    need(cfg.lr > 0, "lr", "> 0")
    for key in ("weight_decay", "warmup_steps", "clip"):
        need(getattr(cfg, key) >= 0, key, ">= 0")
    need(cfg.dist_timeout > 0, "dist_timeout", "> 0 seconds")
    need(cfg.schedule in ("linear", "cosine", "constant"), "schedule",
         "linear, cosine or constant")
    need(cfg.amp in ("auto", "bf16", "fp16", "off"), "amp", "auto, bf16, fp16 or off")
    need(cfg.text_field in ("text", "target"), "text_field", "text or target")
    if cfg.concat_seconds is not None:
        bounds = concat_range(cfg)
        need(len(bounds) == 2 and 0 <= bounds[0] <= bounds[1] and bounds[1] > 0,
             "concat_seconds", "a number of seconds > 0 or a pair [MIN, MAX] with "
             "0 <= MIN <= MAX (or null)")
    need(cfg.concat_group is None or cfg.concat_seconds is not None, "concat_group",
         "null unless concat_seconds is set")


def concat_range(cfg: TrainConfig) -> list[float]:
    """``concat_seconds`` as [MIN, MAX] (a single number S is [S, S])."""
    value = cfg.concat_seconds
    return [value, value] if isinstance(value, float) else list(value)


# -- data ----------------------------------------------------------------------------------
class Examples:
    """Utterances present both in a feature store and in a manifest with text.

    A training example (an *item*) is one utterance id, or a tuple of consecutive ids whose
    features are concatenated in time and whose texts are joined with a space (long inputs,
    ``concat_seconds``)."""

    def __init__(self, feats: str, manifest: str, text_field: str = "text",
                 group_field: str | None = None):
        self.store = Store(feats)
        utts, _ = load_manifest(manifest, check_audio=False, need_text=text_field == "text")
        text = {u.id: getattr(u, text_field) for u in utts if getattr(u, text_field)}
        missing = [u for u in self.store.ids if u not in text]
        if missing:
            raise ValueError(f"{len(missing)} utterance(s) of {feats} have no {text_field!r} in "
                             f"{manifest} (e.g. {missing[:3]}); pass the matching manifest")
        if not self.store.ids:
            raise ValueError(f"no utterances in {feats} (its manifest was empty or every "
                             "utterance was skipped): nothing to train or validate on")
        self.ids, self.text = list(self.store.ids), text
        self.duration = {u: float(self.store.attrs(u).get("duration", 0.0)) for u in self.ids}
        #: the ids in the manifest's order (what "consecutive" means for long inputs)
        self.order = [u.id for u in utts if u.id in self.store]
        self.group = _group_values(manifest, group_field, self.order) if group_field else {}

    def batch(self, items: list) -> tuple[list[torch.Tensor], list[str]]:
        feats, texts = [], []
        for item in items:
            ids = parts(item)
            feats.append(torch.from_numpy(
                np.concatenate([self.store[u] for u in ids]).astype(np.float32)))
            texts.append(" ".join(self.text[u].strip() for u in ids))
        return feats, texts

    def seconds(self, item) -> float:
        return sum(self.duration[u] for u in parts(item))


def parts(item) -> tuple[str, ...]:
    """The utterance ids of a training example."""
    return (item,) if isinstance(item, str) else tuple(item)


def _group_values(manifest: str, key: str, ids: list[str]) -> dict[str, object]:
    """Utterance id → its manifest field ``key`` (``concat_group``); every id must have one."""
    values = {}
    for _, rec, problem in iter_jsonl(manifest):
        if not problem and isinstance(rec, dict) and "id" in rec:
            values[str(rec["id"])] = rec.get(key)
    missing = [u for u in ids if values.get(u) is None]
    if missing:
        raise ValueError(f"concat_group {key!r}: {len(missing)} utterance(s) of {manifest} have "
                         f"no {key!r} field (e.g. {missing[:3]}); add it, or set concat_group "
                         "to a field every line has (or null)")
    return {u: values[u] for u in ids}


def joined_examples(ex: Examples, cfg: TrainConfig, epoch: int, fits=None) -> list:
    """The examples of one epoch: every utterance alone, or with ``concat_seconds`` runs of
    consecutive utterances (of one ``concat_group``) of up to a length drawn for each run from
    [MIN, MAX] (seeded by the seed and the epoch). ``fits(ids)`` (the decoder's length limits)
    ends a run early; an utterance is never split."""
    if cfg.concat_seconds is None:
        return list(ex.ids)
    low, high = concat_range(cfg)
    rng = random.Random(f"concat {cfg.seed} {epoch}")
    groups: dict[object, list[str]] = {}
    for u in ex.order:
        groups.setdefault(ex.group.get(u), []).append(u)
    items = []
    for ids in groups.values():
        run, seconds, goal = [], 0.0, rng.uniform(low, high)
        for u in ids:
            if run and (seconds + ex.duration[u] > goal or (fits and not fits(run + [u]))):
                items.append(tuple(run) if len(run) > 1 else run[0])
                run, seconds, goal = [], 0.0, rng.uniform(low, high)
            run.append(u)
            seconds += ex.duration[u]
        items.append(tuple(run) if len(run) > 1 else run[0])
    return items


def epoch_batches(ex: Examples, cfg: TrainConfig, epoch: int, fits=None) -> list[list]:
    """The micro-batches of one epoch: a seeded shuffle of the examples, cut by count or by
    total duration."""
    items = joined_examples(ex, cfg, epoch, fits)
    random.Random(cfg.seed * 100003 + epoch).shuffle(items)
    if not cfg.batch_seconds:
        return [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    batches, cur, total = [], [], 0.0
    for item in items:
        seconds = ex.seconds(item)
        if cur and total + seconds > cfg.batch_seconds:
            batches.append(cur)
            cur, total = [], 0.0
        cur.append(item)
        total += seconds
    return batches + ([cur] if cur else [])


def data_stream(ex: Examples, cfg: TrainConfig, start: tuple[int, int], fits=None):
    """Yields ((epoch, index of the next micro-batch), micro-batch) forever, from ``start``."""
    epoch, index = start
    while True:
        batches = epoch_batches(ex, cfg, epoch, fits)
        if not batches:
            raise ValueError(f"no training utterances in {ex.store.path}")
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


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
          valid_manifest: str | None) -> tuple[Examples, Examples | None]:
    """The training (and validation) examples, their stores checked against the backend."""
    if bool(valid_feats) != bool(valid_manifest):
        raise ValueError("valid_feats and valid_manifest go together (--valid-feats, "
                         "--valid-manifest)")
    check_backend_options(cfg.backend, cfg.extra, "from --extra")
    train = Examples(feats, manifest, cfg.text_field, cfg.concat_group)
    valid = Examples(valid_feats, valid_manifest, cfg.text_field, cfg.concat_group) \
        if valid_feats else None
    for ex in filter(None, (train, valid)):
        _check_tap(ex.store, cfg)
    return train, valid


def _check_tap(store: Store, cfg: TrainConfig) -> None:
    """Refuses features tapped elsewhere in the encoder than the training backend reads them.

    The tap is recorded by extract (``meta["tap"]`` or its ``backend_opts``); segment and pool
    keep their source's meta under ``source_meta``."""
    meta = store.meta
    while "source_meta" in meta:
        meta = meta["source_meta"]
    default = backend_default(cfg.backend, "tap")
    stored = meta.get("tap") or (meta.get("backend_opts") or {}).get("tap") or default
    wanted = cfg.extra.get("tap") or default
    if stored != wanted:
        raise ValueError(
            f"{store.path} holds features tapped at {stored!r} (see its store.json), but "
            f"training would read them as tap={wanted!r}: pass --extra '{{tap: {stored}}}' "
            "or use a store extracted with the tap you want")


# -- the run's identity --------------------------------------------------------------------
def describe_inputs(feats: str, manifest: str, model: str, valid_feats: str | None = None,
                    valid_manifest: str | None = None, init_adapter: str | None = None,
                    projector: str | None = None) -> dict:
    """What a run is trained from, by content: stores by fingerprint, manifests by sha256,
    the model, the initial adapter and projector (speechllm's ``extra.init_projector``) by
    their identity (not their names or paths)."""
    from .assets import resolve_model

    def store(path):
        return {"path": os.path.abspath(path), "fingerprint": Store(path).fingerprint}

    def manifest_of(path):
        with open(path, "rb") as fh:
            return {"path": os.path.abspath(path),
                    "sha256": hashlib.sha256(fh.read()).hexdigest()}

    if init_adapter and not os.path.isfile(os.path.join(init_adapter, "adapter_config.json")):
        raise ValueError(f"--init-adapter {init_adapter}: no adapter_config.json there; pass "
                         "the adapter/ directory of a finetune run")
    return {
        "feats": store(feats), "manifest": manifest_of(manifest),
        "model": {"path": model, "identity": _identity(resolve_model(model))},
        "init_adapter": {"path": os.path.abspath(init_adapter),
                         "identity": _identity(init_adapter)} if init_adapter else None,
        "valid_feats": store(valid_feats) if valid_feats else None,
        "valid_manifest": manifest_of(valid_manifest) if valid_manifest else None,
        "init_projector": {"path": os.path.abspath(projector), "identity": _identity(projector)}
        if projector else None,
    }


def _identity(path: str) -> dict:
    """A checkpoint directory's content identity (not its name), or a file's sha256."""
    if os.path.isdir(path) or not os.path.isfile(path):
        return {k: v for k, v in model_identity(path).items() if k != "dir"}
    with open(path, "rb") as fh:
        return {"sha256": hashlib.sha256(fh.read()).hexdigest()}


def _content(entry: dict | None):
    """The part of an input's description that a rerun must match (not its path)."""
    return None if entry is None else {k: v for k, v in entry.items() if k != "path"}


def _input_text(entry: dict | None) -> str:
    if entry is None:
        return "none"
    key = next(k for k in entry if k != "path")
    value = entry[key]
    if isinstance(value, dict):
        value = value.get("sha256") or value.get("hub_id") or value
    return f"{entry['path']} ({key} {str(value)[:12]})"


def run_differences(old: dict, new: dict) -> list[str]:
    """What differs between two ``run.json`` records, one readable item per setting."""
    diffs = []
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in dict.fromkeys([*old_cfg, *new_cfg]):
        if key not in RESUMABLE and old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"{key}: {old_cfg.get(key)!r} there, {new_cfg.get(key)!r} now")
    old_in = old.get("inputs", {})
    for key, entry in new["inputs"].items():
        if _content(old_in.get(key)) != _content(entry):
            diffs.append(f"--{key.replace('_', '-')}: {_input_text(old_in.get(key))} there, "
                         f"{_input_text(entry)} now")
    return diffs


def _prepare_out(out: str, cfg: TrainConfig, inputs: dict, force: bool) -> None:
    """Rank 0, under the lock: refuses to continue another run in ``out``; starts over with
    ``force`` (or when nothing was checkpointed); records the run (run.json, config.yaml)."""
    record = {"config": dataclasses.asdict(cfg), "inputs": inputs}
    old = read_json(os.path.join(out, RUN_FILE), "use --force to start over")
    if not force:
        if old is None and any(os.path.exists(os.path.join(out, p)) for p in RUN_OUTPUTS):
            raise ValueError(f"{out} holds a finetune run that does not record its inputs "
                             "(made by an older lalmtool); use another --out, or --force to "
                             "start over")
        diffs = run_differences(old, record) if old is not None else []
        if diffs:
            raise ValueError(f"{out} holds a run with another configuration or other inputs "
                             f"({'; '.join(diffs)}); use another --out, or --force to start "
                             "over")
    if force or old is None or latest_checkpoint(out) is None:
        for name in RUN_OUTPUTS:
            _remove(os.path.join(out, name))
    for stale in glob.glob(os.path.join(out, "*.tmp")) + \
            glob.glob(os.path.join(out, "checkpoints", "*.tmp")):
        _remove(stale)  # left by a killed writer
    write_atomic(os.path.join(out, RUN_FILE), json.dumps(record, indent=1))
    write_atomic(os.path.join(out, "config.yaml"), cfg.to_yaml())


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


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
        return max(0.0, 1 - progress)
    return f


def _device(cfg: TrainConfig, local_rank: int) -> str:
    if cfg.device != "auto":
        return resolve_device(cfg.device)
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _amp_kind(cfg: TrainConfig, device: str) -> str:
    if cfg.amp == "auto":
        return "bf16" if device.startswith("cuda") else "off"
    return cfg.amp


def _autocast(cfg: TrainConfig, device: str):
    kind = _amp_kind(cfg, device)
    if kind == "off":
        return torch.autocast("cpu", enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return torch.autocast(device.split(":")[0], dtype=dtype)


@dataclass
class Dist:
    """This process's place in the job: rank, world size, device, collective timeout (s)."""

    rank: int
    world: int
    device: str
    timeout: float

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
                f"log ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _distributed(cfg: TrainConfig) -> Dist:
    """Set-up: rank, world and device; under torchrun the process group (with a timeout)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # before NCCL starts: each rank on its own GPU
    if world > 1 and not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(
                "nccl" if device.startswith("cuda") else "gloo",
                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"rank {rank} of {world}: the other ranks did not join within "
                f"{cfg.dist_timeout:g} s (dist_timeout); are all {world} processes running "
                f"with the same MASTER_ADDR/MASTER_PORT? ({_first_line(e)})") from e
    return Dist(rank, world, device, cfg.dist_timeout)


def _model(cfg: TrainConfig, model: str, device: str, init_adapter: str | None):
    """The backend with a fresh LoRA (or ``init_adapter``) on its decoder; trainable weights
    in float32 (master weights), whatever dtype the frozen model is in."""
    from peft import LoraConfig, get_peft_model  # seconds: imported when needed

    _seed_all(cfg.seed)
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


@dataclass
class Run:
    """What the training loop works on."""

    out: str
    cfg: TrainConfig
    dist: Dist
    be: typing.Any  # the backend; be.model is the peft model (DDP-wrapped under torchrun)
    peft_model: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    total: int
    fits: typing.Any = None  # length_check of the training examples (long inputs), or None
    valid_items: list | None = None  # the validation examples
    state: dict = field(default_factory=lambda: {"step": 0, "position": (0, 0), "best": None,
                                                 "best_step": None})


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
             init_adapter: str | None = None, force: bool = False) -> dict:
    """Trains LoRA adapters on ``model``'s decoder; returns a summary (steps, losses, paths).

    A rerun into ``out`` resumes the same run (same configuration and inputs) or is refused;
    ``force`` starts over."""
    check_out(out, feats, *filter(None, [valid_feats]))  # before OUT/.lock is written
    dist = _distributed(cfg)

    def inputs() -> dict:
        return describe_inputs(feats, manifest, model, valid_feats, valid_manifest,
                               init_adapter, cfg.extra.get("init_projector"))

    with output_lock(out):
        done = None if force else _finished(out, cfg, inputs)
        if done is not None:  # before the data checks, which import the backend: seconds
            log.info("%s: finished with these inputs and settings, nothing to do", out)
            return done
        train, valid = _data(cfg, feats, manifest, valid_feats, valid_manifest)
        if dist.rank == 0:
            _prepare_out(out, cfg, inputs(), force)
        dist.barrier("the start of training")
        be, peft_model = _model(cfg, model, dist.device, init_adapter)
        fits = length_check(be, train) if cfg.concat_seconds is not None else None
        total = _total_steps(cfg, train, dist.world, fits)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        run = Run(out, cfg, dist, be, peft_model, params, opt,
                  torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total)),
                  torch.amp.GradScaler(dist.device.split(":")[0],
                                       enabled=_amp_kind(cfg, dist.device) == "fp16"),
                  total, fits)
        _resume(run)
        if dist.world > 1:
            be.model = torch.nn.parallel.DistributedDataParallel(peft_model)
        if valid is not None:  # long inputs are validated on long inputs, cut once
            run.valid_items = joined_examples(valid, cfg, 0, fits and length_check(be, valid))
        _train(run, train, valid)
        return _export(run, feats, model)


def _finished(out: str, cfg: TrainConfig, inputs) -> dict | None:
    """The summary of the run that finished in ``out`` (summary.json is written last, after
    the adapter) with this configuration and ``inputs()``, or None."""
    summary = read_json(os.path.join(out, "summary.json"), "use --force to train again")
    old = read_json(os.path.join(out, RUN_FILE), "use --force to start over")
    if summary is None or old is None or not os.path.isdir(os.path.join(out, "adapter")):
        return None
    same = not run_differences(old, {"config": dataclasses.asdict(cfg), "inputs": inputs()})
    return summary if same else None  # else _prepare_out refuses, naming what differs


def _resume(run: Run) -> None:
    """Continues from the newest checkpoint that can be read; an unreadable one (e.g. cut by
    a full disk or a copy) is renamed ``step-N.broken`` with a warning naming it, and the one
    before it is used."""
    for _, ckpt in reversed(_checkpoints(run.out)):
        try:
            run.state = _load_checkpoint(ckpt, run)
        except CheckpointError as e:
            log.warning("%s; resuming from the checkpoint before it (this one is kept as "
                        "%s.broken)", e, ckpt)
            if run.dist.rank == 0:
                os.replace(ckpt, ckpt + ".broken")
            continue
        log.info("resuming from %s (step %d of %d)", ckpt, run.state["step"], run.total)
        if run.dist.rank == 0:
            truncate_log(run.out, run.state["step"])
        break
    else:
        if run.dist.rank == 0:
            truncate_log(run.out, 0)
    if run.dist.rank == 0 and run.state["best_step"] is None:
        _remove(os.path.join(run.out, "best"))  # written after that checkpoint: redone


def _train(run: Run, train: Examples, valid: Examples | None) -> None:
    """The training loop: step, log, validate, checkpoint."""
    cfg, out, rank = run.cfg, run.out, run.dist.rank
    stream = data_stream(train, cfg, tuple(run.state["position"]), run.fits)
    bar = progress(total=run.total, initial=run.state["step"], desc="finetune", unit="step",
                   disable=rank != 0)
    run.peft_model.train()
    t0, seen_tokens = time.perf_counter(), 0
    while run.state["step"] < run.total:
        loss, tokens, gnorm = _train_step(run, train, stream)
        seen_tokens += tokens
        step = run.state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg.log_every == 0 or step == run.total:
            el = time.perf_counter() - t0
            _log(out, {"step": step, "loss": loss, "lr": run.sched.get_last_lr()[0],
                       "grad_norm": float(gnorm) if gnorm is not None else None,
                       "tokens_per_s": seen_tokens * run.dist.world / el if el else None}, rank)
        if valid and (step % cfg.valid_every == 0 or step == run.total):
            _validate(run, valid)
        if step % cfg.save_every == 0 or step == run.total:
            _save_checkpoint(run)
    bar.close()


def _train_step(run: Run, train: Examples, stream) -> tuple[float, int, torch.Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches per rank; (loss, tokens, norm).

    Under DDP, gradients are all-reduced once per step (``no_sync`` on the other
    micro-batches); with fp16 the loss is scaled and the step skipped on overflow."""
    cfg, dist = run.cfg, run.dist
    run.opt.zero_grad(set_to_none=True)
    step_loss, step_tokens, mine = 0.0, 0, 0
    for micro in range(cfg.grad_accum * dist.world):
        position, ids = next(stream)
        if micro % dist.world != dist.rank:
            continue
        mine += 1
        sync = dist.world == 1 or mine == cfg.grad_accum
        feats_b, texts = train.batch(ids)
        with contextlib.nullcontext() if sync else run.be.model.no_sync():
            with _autocast(cfg, dist.device):
                loss, n = run.be.loss(feats_b, texts)
            run.scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += float(loss.detach()) / cfg.grad_accum
        step_tokens += n
    run.state["position"] = position
    run.scaler.unscale_(run.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip) if cfg.clip else None
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.state["step"] += 1
    return step_loss, step_tokens, gnorm


def _validate(run: Run, valid: Examples) -> None:
    """Validation loss; the best adapter so far goes to OUT/best."""
    step = run.state["step"]
    vloss = evaluate(run.be, valid, run.cfg, run.dist.device, run.valid_items)
    _log(run.out, {"step": step, "valid_loss": vloss}, run.dist.rank)
    if run.state["best"] is None or vloss < run.state["best"]:
        run.state["best"], run.state["best_step"] = vloss, step
        if run.dist.rank == 0:
            _save_adapter(run.peft_model, os.path.join(run.out, "best"))


@torch.no_grad()
def evaluate(be, ex: Examples, cfg: TrainConfig, device: str, items: list | None = None) -> float:
    """Token-weighted mean loss over a validation set's ``items`` (default: every utterance
    alone), dropout off."""
    module = be.model.module if hasattr(be.model, "module") else be.model
    was_training = module.training
    module.eval()
    total, tokens = 0.0, 0
    items = ex.ids if items is None else items
    for i in range(0, len(items), cfg.batch_size):
        feats_b, texts = ex.batch(items[i : i + cfg.batch_size])
        with _autocast(cfg, device):
            loss, n = be.loss(feats_b, texts)
        total += float(loss) * n
        tokens += n
    module.train(was_training)
    return total / max(tokens, 1)


# -- checkpoints ---------------------------------------------------------------------------
_STEP_DIR = re.compile(r"step-(\d+)$")


def _checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, directory) of the whole checkpoints in ``out``, oldest first; ``step-N.tmp``
    (a checkpoint being written when the run was killed) is never one of them."""
    found = []
    for d in glob.glob(os.path.join(out, "checkpoints", "step-*")):
        m = _STEP_DIR.search(os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "state.pt")):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = _checkpoints(out)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_checkpoint(run: Run) -> None:
    """OUT/checkpoints/step-N: written as step-N.tmp (state.pt last) and renamed when whole."""
    dist, out, state = run.dist, run.out, run.state
    final = os.path.join(out, "checkpoints", f"step-{state['step']}")
    tmp = final + ".tmp"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier("a checkpoint")
    _write(tmp, f"rng.{dist.rank}.pt", _rng_state())
    dist.barrier("a checkpoint")
    if dist.rank == 0:
        from peft.utils import get_peft_model_state_dict

        _write(tmp, "state.pt",  # written last: marks the checkpoint whole
               {"adapter": get_peft_model_state_dict(run.peft_model),
                "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                "state": state})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in _checkpoints(out)[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier("a checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


def _read(path: str):
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a cut file fails in torch, zipfile or pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read ({reason})") from e


def _write(tmp: str, name: str, obj) -> None:
    """``torch.save`` into the checkpoint being written (``tmp``); on a failure (a full disk)
    the partial checkpoint is removed and the message names it and the space left."""
    try:
        torch.save(obj, os.path.join(tmp, name))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(tmp)).free
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot write the checkpoint {tmp.removesuffix('.tmp')} ({reason}); "
                      f"{free / 2**20:.1f} MiB are free on its disk: free some space (or "
                      "lower keep_checkpoints) and rerun, training resumes from the last whole "
                      "checkpoint") from e


def _load_checkpoint(path: str, run: Run) -> dict:
    """Restores adapter, optimizer, scheduler, scaler and RNG states from ``path``; both of its
    files are read before anything is restored."""
    from peft import set_peft_model_state_dict

    ck = _read(os.path.join(path, "state.pt"))
    rng_file = os.path.join(path, f"rng.{run.dist.rank}.pt")
    if not os.path.exists(rng_file):
        raise RuntimeError(f"{path} was saved by fewer ranks than now; resume with the same "
                           "number of processes")
    rng = _read(rng_file)
    set_peft_model_state_dict(run.peft_model, ck["adapter"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if run.scaler.is_enabled() and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["state"]


# -- the adapter ---------------------------------------------------------------------------
def _save_adapter(peft_model, path: str) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _export(run: Run, feats: str, model: str) -> dict:
    """OUT/last, OUT/adapter (the best by validation loss of this run, else the last) with a
    README.md and the base model named as the user gave it; OUT/summary.json."""
    out, state, rank = run.out, run.state, run.dist.rank
    condition = condition_of(Store(feats))[2]
    last = _last_record(out)
    summary = {"out": out, "steps": state["step"], "last": last,
               "best_valid_loss": state["best"], "best_step": state["best_step"],
               "adapter": os.path.join(out, "adapter"), "feats": os.path.abspath(feats),
               "condition": condition}
    if rank == 0:
        _save_adapter(run.peft_model, os.path.join(out, "last"))
        use_best = state["best_step"] is not None and os.path.isdir(os.path.join(out, "best"))
        final = os.path.join(out, "best" if use_best else "last")
        tmp = os.path.join(out, "adapter.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        base = _portable_model_name(model)
        _set_base_model(tmp, base)
        write_atomic(os.path.join(tmp, "README.md"),
                     adapter_readme(run, summary, base, "best" if use_best else "last"))
        shutil.rmtree(summary["adapter"], ignore_errors=True)
        os.replace(tmp, summary["adapter"])
        write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    run.dist.barrier("the end of training")
    return summary


def _portable_model_name(model: str) -> str:
    """The model as the user gave it: an asset name (also for its cache directory), a hub id,
    or an absolute path to a local checkpoint."""
    from .models.speechllm import portable_name

    return portable_name(model)


def _set_base_model(adapter: str, base: str) -> None:
    path = os.path.join(adapter, "adapter_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["base_model_name_or_path"] = base
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def adapter_readme(run: Run, summary: dict, base: str, which: str) -> str:
    """What the adapter is: backend, base model, condition, training data, steps, losses."""
    cfg = run.cfg
    inputs = read_json(os.path.join(run.out, RUN_FILE), "use --force to start over")["inputs"]
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


# -- logs ----------------------------------------------------------------------------------
def _log(out: str, rec: dict, rank: int) -> None:
    if rank != 0:
        return
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    log.debug("%s", rec)


def _last_record(out: str) -> dict:
    """The newest training record of log.jsonl (also when a finished run is rerun)."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return next((r for r in reversed(records) if "loss" in r), {})


def truncate_log(out: str, step: int) -> None:
    """Drops log records written after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(keep))
