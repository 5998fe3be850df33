"""Stage 4a, ``lalmtool align``: CTC pre-alignment of a speechllm projector onto the LLM's
frozen input embeddings, before the LM-loss stage (``lalmtool finetune``).

A projector learnt from scratch through the LLM's loss needs tens of thousands of steps before
the LLM reads words in it. Here it is trained alone, with CTC: each projected (stacked) audio
position gets logits ``scale · cos(p_t, e_v)`` against the LLM's own input-embedding rows
``e_v`` (frozen) plus one learnt blank vector, and the targets are the LLM tokenizer's pieces
of the transcript. No LLM forward pass is needed (a step costs the projector and one matrix
product), and the projector's outputs land next to the embeddings of the tokens spoken, which
the LLM can read. Its output initialises finetune's projector::

    lalmtool align --feats exp/feats/frames/train --manifest data/train/manifest.jsonl \\
        --model smollm2-135m-instruct --backend-opt encoder=whisper-tiny.en \\
        --valid-feats exp/feats/frames/dev --valid-manifest data/dev/manifest.jsonl \\
        --out exp/align/frames --max_steps=300
    lalmtool finetune ... --init-projector exp/align/frames      # = extra.init_projector

Any feature store works (frames or pooled: compression acts on the encoder frames before
stacking). ``--init DIR`` starts from an earlier alignment (projector and blank), e.g. to
re-align the frame-level projector to a compressed condition; the first validation (step 0)
then measures how well the frame-level alignment carries over.

Vocabulary: the classes are the token ids that occur in the training texts' tokenisation (plus
the blank), not the LLM's whole vocabulary. That keeps the softmax small (a few thousand rows
instead of 49k: faster, and no probability mass on tokens that never occur) and the projector
can still only aim at real embedding rows; the price is that a token absent from the training
texts can never be emitted by the CTC head (the LLM that reads the projected vectors is not so
limited). ``vocab=full`` uses every row instead.

Utterances whose label sequence cannot fit their stacked positions (CTC needs one position per
token plus one between repeated tokens) are skipped and reported: count and ids in the log and
in ``summary.json``.

Output directory::

    OUT/config.yaml, OUT/inputs.json     the options and the inputs' fingerprint
    OUT/log.jsonl                        step, loss, lr (and valid_wer at validations)
    OUT/checkpoints/step-N/state.pt      resumable (projector, blank, optimizer, RNG, position)
    OUT/projector.safetensors            the projector (best on validation WER, else last)
    OUT/ctc.safetensors                  blank vector, class token ids (``vocab``), scale
    OUT/summary.json                     steps, best/initial validation WER, skipped utterances

A rerun resumes from the last checkpoint and ends with the same weights as an uninterrupted
run; a rerun with other inputs or options refuses, naming what differs (``--force`` starts
over).

CTC-based compression, ``lalmtool ctc-segment``: the aligned projector's best class per stacked
position cuts the encoder frames into runs; each run of one token (``blank=join``: blank runs
join the token before them, so there is one segment per token the CTC head emits, a rate near
the text's) or each run of anything (``blank=keep``: blank runs are segments too, about twice
that) becomes one segment of a boundary store that ``lalmtool pool`` reduces like any other.
It needs a transcribed training set to align the projector first: a supervised, content-
adaptive rate, against the unsupervised ``peaks`` and uniform pooling at the same rate.
"""
from __future__ import annotations

import dataclasses
import functools
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
from safetensors.torch import load_file, save_file
from torch import nn

from .finetune import Examples, latest_checkpoint, truncate_log
from .models import load_backend
from .models.speechllm import PROJECTOR_FILE, load_projector_weights, stack_frames
from .fileio import file_sha256, write_atomic
from .parallel import add_utterance, new_stats, progress
from .store import ShardResult, Store, StoreError, fingerprint

log = logging.getLogger("lalmtool")

CTC_FILE = "ctc.safetensors"
VOCABS = ("train", "full")
BLANK_RUNS = ("join", "keep")  # ctc-segment: blank runs join the token before them, or not
CTC_SEGMENT_VERSION = 1


@dataclass
class AlignConfig:
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up, then linear decay"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "utterances per step"})
    clip: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    scale: float = field(default=16.0, metadata={"help": "logit = scale * cosine"})
    vocab: str = field(default="train", metadata={
        "help": "train: the token ids of the training texts; full: every embedding row"})
    seed: int = field(default=0, metadata={"help": "shuffling and blank initialisation"})
    valid_every: int = field(default=50, metadata={"help": "steps between validations"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many validations without a better WER (0: never)"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    log_every: int = field(default=10, metadata={"help": "steps between log records"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    text_field: str = field(default="text", metadata={"help": "manifest field to align to"})
    extra: dict = field(default_factory=dict, metadata={
        "help": "speechllm options: encoder, projector, stack, hidden (see models/speechllm)"})

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None) -> "AlignConfig":
        """From a YAML file (optional) plus ``key=value`` overrides, names and types checked
        (``backend: speechllm`` may stand in the file: it is the only backend aligned)."""
        hints = typing.get_type_hints(cls)
        values = {}
        if path:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        values.update(overrides or {})
        if values.pop("backend", "speechllm") != "speechllm":
            raise ValueError("align trains the projector of the speechllm backend only")
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"unknown align option(s) {unknown}; known: {sorted(hints)}")
        for key, value in values.items():
            kind = hints[key]
            if kind in (int, float) and not isinstance(value, (int, float)):
                try:
                    values[key] = kind(value)
                except (TypeError, ValueError):
                    raise ValueError(f"align option {key} must be a number, not {value!r}")
        for key, low in (("max_steps", 1), ("batch_size", 1), ("valid_every", 1),
                         ("save_every", 1), ("log_every", 1), ("keep_checkpoints", 1),
                         ("warmup_steps", 0), ("patience", 0), ("clip", 0)):
            if key in values and values[key] < low:
                raise ValueError(f"align option {key} must be >= {low}, not {values[key]!r}")
        for key in ("lr", "scale"):
            if key in values and not values[key] > 0:
                raise ValueError(f"align option {key} must be > 0, not {values[key]!r}")
        if values.get("vocab", "train") not in VOCABS:
            raise ValueError(f"align option vocab must be one of {VOCABS}, not "
                             f"{values['vocab']!r}")
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# -- the CTC head --------------------------------------------------------------------------
class CosineCTCHead(nn.Module):
    """Log-probabilities over ``[blank, vocab...]`` from cosine similarities to frozen rows."""

    def __init__(self, rows: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("rows", rows.detach().float().clone(), persistent=False)
        mean_norm = float(rows.detach().norm(dim=-1).mean())
        self.blank = nn.Parameter(torch.randn(rows.shape[1]) * mean_norm / rows.shape[1] ** 0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = torch.cat([self.blank[None], self.rows])
        cos = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(classes, dim=-1).T
        return (self.scale * cos).log_softmax(-1)


def ctc_greedy(log_probs: torch.Tensor, blank: int = 0) -> list[int]:
    """Best path of ``[T, C]``: argmax per position, repeats collapsed, blanks dropped."""
    best = torch.unique_consecutive(log_probs.argmax(-1))
    return [int(c) for c in best if int(c) != blank]


def ctc_boundaries(log_probs: torch.Tensor, stack: int, blank: str = "join") -> np.ndarray:
    """Segment starts, in encoder frames, from one utterance's CTC log-probabilities ``[P, C]``
    over positions of ``stack`` frames: one segment per run of the same best class.

    ``blank="join"``: a blank run belongs to the token run before it (leading blanks to the
    first), so there are as many segments as tokens before blanks are dropped (at least one);
    ``"keep"``: blank runs are segments of their own.
    """
    if blank not in BLANK_RUNS:
        raise ValueError(f"blank must be one of {BLANK_RUNS}, got {blank!r}")
    best = log_probs.argmax(-1).cpu().numpy()
    runs = np.flatnonzero(np.r_[True, best[1:] != best[:-1]])
    if blank == "join":
        runs = runs[best[runs] != 0]
        runs = np.r_[0, runs[1:]] if len(runs) else np.zeros(1, dtype=np.int64)
    return (runs * stack).astype(np.int32)


def ctc_positions_needed(labels: list[int]) -> int:
    """Positions CTC needs for ``labels``: one per label plus a blank between repeats."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


class Aligner:
    """The projector of a speechllm backend, its CTC head and the label vocabulary."""

    def __init__(self, be, vocab: list[int], scale: float):
        self.be, self.stack = be, be.stack
        self.projector = be.model.projector.float()
        rows = be.model.llm.get_input_embeddings().weight
        self.vocab = list(vocab)
        self.index = {t: i + 1 for i, t in enumerate(self.vocab)}  # 0 is the blank
        self.head = CosineCTCHead(rows[torch.tensor(self.vocab)], scale)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) + [self.head.blank]

    def train(self, mode: bool = True) -> None:
        self.projector.train(mode)

    def labels(self, text: str) -> list[int] | None:
        """Class indices of ``text``'s tokens, or None if one is outside the vocabulary."""
        ids = self.be.tokenizer.encode(text.strip(), add_special_tokens=False)
        out = [self.index.get(t) for t in ids]
        return None if any(c is None for c in out) else out

    def log_probs(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = [stack_frames(f.float(), self.stack) for f in feats]
        out = self.head(self.projector(torch.cat(stacked)))
        return list(out.split([s.shape[0] for s in stacked]))

    def loss(self, feats: list[torch.Tensor], labels: list[list[int]]) -> torch.Tensor:
        """CTC loss, mean over utterances of the per-token loss (torch's ``mean`` reduction)."""
        lps = self.log_probs(feats)
        padded = nn.utils.rnn.pad_sequence(lps)  # [T, B, C]
        return nn.functional.ctc_loss(
            padded, torch.tensor([c for lab in labels for c in lab]),
            torch.tensor([lp.shape[0] for lp in lps]), torch.tensor([len(l) for l in labels]),
            blank=0, reduction="mean", zero_infinity=False)

    @torch.no_grad()
    def transcribe(self, feats: list[torch.Tensor]) -> list[str]:
        """CTC-greedy transcripts (the tokens decoded by the LLM's tokenizer)."""
        was = self.projector.training
        self.projector.eval()
        texts = [self.be.tokenizer.decode([self.vocab[c - 1] for c in ctc_greedy(lp)])
                 for lp in self.log_probs(feats)]
        self.projector.train(was)
        return texts


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER after Whisper's English normaliser (as ``lalmtool score``)."""
    from .score import get_normalizer, wer_counts

    norm = get_normalizer("whisper_english")
    return wer_counts([norm(r) for r in refs], [norm(h) for h in hyps])[0]["wer"]


def train_vocab(tokenizer, texts: list[str]) -> list[int]:
    """Sorted token ids occurring in the tokenisation of ``texts``."""
    ids = set()
    for t in texts:
        ids.update(tokenizer.encode(t.strip(), add_special_tokens=False))
    return sorted(ids)


def _feasible(al: Aligner, ex: Examples) -> tuple[dict[str, list[int]], list[dict]]:
    """Labels of the utterances CTC can align, and why each other one is skipped."""
    usable, skipped = {}, []
    for u in ex.ids:
        labels = al.labels(ex.text[u])
        positions = math.ceil(ex.store.dataset(u).shape[0] / al.stack)
        if labels is None:
            skipped.append({"id": u, "why": "a token outside the vocabulary"})
        elif not labels:
            skipped.append({"id": u, "why": "empty transcript"})
        elif ctc_positions_needed(labels) > positions:
            skipped.append({"id": u, "why": f"{ctc_positions_needed(labels)} label positions "
                                            f"needed, {positions} audio positions"})
        else:
            usable[u] = labels
    return usable, skipped


# -- the run -------------------------------------------------------------------------------
def align(feats: str, manifest: str, model: str, out: str, cfg: AlignConfig,
          valid_feats: str | None = None, valid_manifest: str | None = None,
          init: str | None = None, force: bool = False) -> dict:
    """Trains the projector (and the blank) with CTC; returns the run's summary."""
    if bool(valid_feats) != bool(valid_manifest):
        raise ValueError("valid_feats and valid_manifest go together")
    train = Examples(feats, manifest, cfg.text_field)
    valid = Examples(valid_feats, valid_manifest, cfg.text_field) if valid_feats else None
    inputs = _inputs(train, manifest, model, cfg, valid, valid_manifest, init)
    _prepare_out(out, cfg, inputs, force)

    _seed_all(cfg.seed)
    be = load_backend("speechllm", model, **cfg.extra)
    be.model.requires_grad_(False)
    texts = [train.text[u] for u in train.ids]
    if cfg.vocab == "full":
        vocab = list(range(be.model.llm.get_input_embeddings().weight.shape[0]))
    else:
        vocab = train_vocab(be.tokenizer, texts)
    al = Aligner(be, vocab, cfg.scale)
    if init:
        _load_init(al, init)
    for p in al.parameters():
        p.requires_grad_(True)
    usable, skipped = _feasible(al, train)
    if skipped:
        log.warning("align: %d of %d training utterance(s) skipped (labels longer than their "
                    "audio positions after stacking by %d), e.g. %s", len(skipped),
                    len(train.ids), al.stack, ", ".join(s["id"] for s in skipped[:5]))
    if not usable:
        raise ValueError(f"align: none of the {len(train.ids)} utterances of {feats} has "
                         f"fewer CTC labels than audio positions (stack {al.stack}); use a "
                         "smaller stack or less compression")
    ids = [u for u in train.ids if u in usable]

    params = al.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    state = {"step": 0, "position": [0, 0], "best": None, "best_step": None, "bad": 0,
             "initial_wer": None}
    ckpt = latest_checkpoint(out)
    if ckpt:
        state = _load_checkpoint(ckpt, al, opt, sched)
        log.info("align: resuming from %s (step %d of %d)", ckpt, state["step"], cfg.max_steps)
        truncate_log(out, state["step"])
    elif valid:
        state["initial_wer"] = _validate(al, valid)
        state["best"], state["best_step"] = state["initial_wer"], 0
        _save_weights(al, os.path.join(out, "best"))
        _log(out, {"step": 0, "valid_wer": state["initial_wer"]})
        _save_checkpoint(out, al, opt, sched, state, cfg)

    stream = _batches(ids, cfg, tuple(state["position"]))
    bar = progress(total=cfg.max_steps, initial=state["step"], desc="align", unit="step")
    al.train()
    t0, seen = time.perf_counter(), 0
    while state["step"] < cfg.max_steps and not _stopped(state, cfg):
        position, batch = next(stream)
        fb, _ = train.batch(batch)
        loss = al.loss(fb, [usable[u] for u in batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        state["step"] += 1
        state["position"] = list(position)
        seen += len(batch)
        step = state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            el = time.perf_counter() - t0
            _log(out, {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                       "utt_per_s": seen / el if el else None})
        if valid and (step % cfg.valid_every == 0 or step == cfg.max_steps):
            vwer = _validate(al, valid)
            _log(out, {"step": step, "valid_wer": vwer})
            if vwer < state["best"]:
                state["best"], state["best_step"], state["bad"] = vwer, step, 0
                _save_weights(al, os.path.join(out, "best"))
            else:
                state["bad"] += 1
        if step % cfg.save_every == 0 or step == cfg.max_steps or _stopped(state, cfg):
            _save_checkpoint(out, al, opt, sched, state, cfg)
    bar.close()
    _save_weights(al, os.path.join(out, "last"))
    final = os.path.join(out, "best" if valid else "last")
    for name in (PROJECTOR_FILE, CTC_FILE):
        tmp = os.path.join(out, name + ".tmp")
        shutil.copyfile(os.path.join(final, name), tmp)
        os.replace(tmp, os.path.join(out, name))
    summary = {"out": out, "steps": state["step"], "stopped_early": _stopped(state, cfg),
               "best_valid_wer": state["best"], "best_step": state["best_step"],
               "initial_valid_wer": state["initial_wer"], "vocab_size": len(al.vocab),
               "utterances": len(ids), "skipped": len(skipped),
               "skipped_ids": [s["id"] for s in skipped], "skipped_why": skipped,
               "projector": os.path.join(out, PROJECTOR_FILE), "init": init,
               "feats": os.path.abspath(feats)}
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _stopped(state: dict, cfg: AlignConfig) -> bool:
    return bool(cfg.patience) and state["bad"] >= cfg.patience


def _validate(al: Aligner, ex: Examples, batch_size: int = 32) -> float:
    refs, hyps = [], []
    for i in range(0, len(ex.ids), batch_size):
        fb, texts = ex.batch(ex.ids[i : i + batch_size])
        refs += texts
        hyps += al.transcribe(fb)
    return wer(refs, hyps)


def _batches(ids: list[str], cfg: AlignConfig, start: tuple[int, int]):
    """((epoch, index of the next batch), batch) forever: a seeded shuffle per epoch."""
    epoch, index = start
    while True:
        order = list(ids)
        random.Random(cfg.seed * 100003 + epoch).shuffle(order)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for i in range(index, len(batches)):
            yield (epoch, i + 1), batches[i]
        epoch, index = epoch + 1, 0


def _lr_lambda(cfg: AlignConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, 1 - (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return f


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- CTC-greedy transcripts from an alignment ----------------------------------------------
def check_alignment(align_dir: str) -> None:
    """FileNotFoundError unless ``align_dir`` holds a finished ``lalmtool align`` output."""
    if not all(os.path.exists(os.path.join(align_dir, f)) for f in (CTC_FILE, PROJECTOR_FILE)):
        raise FileNotFoundError(f"{align_dir} holds no finished alignment ({PROJECTOR_FILE} and "
                                f"{CTC_FILE}); run `lalmtool align --out {align_dir}` first")


def load_aligner(align_dir: str, model: str) -> Aligner:
    """The aligned projector and CTC head of ``lalmtool align``'s output ``align_dir``."""
    check_alignment(align_dir)
    path = os.path.join(align_dir, CTC_FILE)
    with open(os.path.join(align_dir, "config.yaml"), encoding="utf-8") as fh:
        extra = dict((yaml.safe_load(fh) or {}).get("extra") or {})
    extra.pop("init_projector", None)
    be = load_backend("speechllm", model, **extra)
    ctc = load_file(path)
    al = Aligner(be, ctc["vocab"].tolist(), float(ctc["scale"]))
    _load_init(al, align_dir)
    return al


@torch.no_grad()
def ctc_decode(align_dir: str, feats: str, model: str, out: str, manifest: str | None = None,
               set_name: str | None = None, batch_size: int = 32) -> dict:
    """CTC-greedy transcripts of a feature store by an aligned projector alone (no LLM), in
    ``lalmtool decode``'s format (``OUT/hyp.jsonl``, ``OUT/decode.json``) for score/report."""
    from .manifest import read_manifest
    from .pool import condition_of

    al = load_aligner(align_dir, model)
    store = Store(feats)
    refs = {}
    if manifest:
        refs = {u.id: u.text for u in read_manifest(manifest)[0] if u.text is not None}
    method, params, label = condition_of(store)
    rows = []
    for i in range(0, len(store.ids), batch_size):
        ids = store.ids[i : i + batch_size]
        fb = [torch.from_numpy(store[u].astype(np.float32)) for u in ids]
        t0 = time.perf_counter()
        hyps = al.transcribe(fb)
        per_utt = (time.perf_counter() - t0) / len(ids)
        for u, f, h in zip(ids, fb, hyps):
            rec = {"id": u, "hyp": h.strip(), "tokens": math.ceil(f.shape[0] / al.stack),
                   "duration": float(store.attrs(u).get("duration", 0.0)), "seconds": per_utt}
            if u in refs:
                rec["ref"] = refs[u]
            rows.append(rec)
    audio_s, tokens = sum(r["duration"] for r in rows), sum(r["tokens"] for r in rows)
    secs = sum(r["seconds"] for r in rows)
    src_rate = float(store.meta.get("source_frame_rate", store.meta.get("frame_rate", 0.0)))
    info = {"set": set_name or os.path.basename(os.path.normpath(out)), "method": method,
            "params": params, "condition": f"{label} (CTC greedy)", "decoder": "ctc-greedy",
            "feats": os.path.abspath(feats), "model": model, "align": os.path.abspath(align_dir),
            "adapter": None, "lora": False, "backend": "speechllm", "utterances": len(rows),
            "audio_seconds": audio_s, "audio_tokens": tokens,
            "tokens_per_s": tokens / audio_s if audio_s else None,
            "source_frame_rate": src_rate,
            "compression_ratio": src_rate * audio_s / tokens if tokens else None,
            "decode_seconds": secs, "utt_per_s": len(rows) / secs if secs else None}
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "hyp.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(os.path.join(out, "decode.json"), json.dumps(info, indent=1))
    return info


def ctc_segment(align_dir: str, feats: str, model: str, out: str, blank: str = "join",
                force: bool = False, batch_size: int = 32) -> dict:
    """Writes a boundary store (``lalmtool segment``'s format: ``pool`` reads it) of the
    feature store ``feats`` cut by the aligned projector's CTC runs (``ctc_boundaries``)."""
    from .lock import output_lock
    from .parallel import check_out, run_sharded, summarize
    from .segment import STAGE_VERSION

    if blank not in BLANK_RUNS:
        raise ValueError(f"--blank must be one of {BLANK_RUNS}, got {blank!r}")
    check_out(out, feats)
    src = Store(feats)
    if src.kind == "seg":
        raise StoreError(f"{feats} is a boundary store; give --feats a feature store")
    if src.kind == "pooled":
        raise StoreError(f"{feats} is already compressed; give --feats the frame-level store "
                         "the alignment reads (from `lalmtool extract`)")
    check_alignment(align_dir)
    weights = {f: file_sha256(os.path.join(align_dir, f)) for f in (PROJECTOR_FILE, CTC_FILE)}
    rate, params = float(src.meta["frame_rate"]), {"blank": blank}
    fp = fingerprint({"stage": "ctc-segment", "version": CTC_SEGMENT_VERSION,
                      "segment_version": STAGE_VERSION, "source": src.fingerprint,
                      "align": weights, "params": params})
    meta = {"stage": "segment", "method": "ctc", "params": params, "frame_rate": rate,
            "source": os.path.abspath(feats), "source_fingerprint": src.fingerprint,
            "source_meta": src.meta, "align": os.path.abspath(align_dir), "align_weights": weights}
    shards = {name.replace("feats.", "seg.", 1): [u for u in ids if u in src]
              for name, ids in src.shards.items()}
    factory = functools.partial(_ctc_worker, align_dir, model, feats, blank, batch_size)
    with output_lock(out):
        stats, skipped = run_sharded(out, "seg", fp, meta, shards, factory, force=force,
                                     desc="ctc-segment")
    return summarize(stats, rate, out, skipped)


def _ctc_worker(align_dir: str, model: str, feats: str, blank: str, batch_size: int):
    from .segment import _duration

    al, src = load_aligner(align_dir, model), Store(feats)
    al.train(False)

    @torch.no_grad()
    def run(name: str, ids: list[str], tick) -> tuple[ShardResult, dict]:
        result = ShardResult()
        stats = new_stats()
        for i in range(0, len(ids), batch_size):
            batch = ids[i : i + batch_size]
            frames = [src[u] for u in batch]
            lps = al.log_probs([torch.from_numpy(z.astype(np.float32)) for z in frames])
            for utt, z, lp in zip(batch, frames, lps):
                add_utterance(result, stats, utt, ctc_boundaries(lp, al.stack, blank), len(z),
                              _duration(src, src.attrs(utt), z))
            tick(len(batch))
        return result, stats

    return run


# -- fingerprint, checkpoints, outputs ------------------------------------------------------
def _inputs(train: Examples, manifest: str, model: str, cfg: AlignConfig,
            valid: Examples | None, valid_manifest: str | None, init: str | None) -> dict:
    """What determines the result besides the options: stores, texts, model, init weights."""
    from .models.speechllm import read_spec

    spec = read_spec(model, **{k: v for k, v in cfg.extra.items()
                               if k in ("encoder", "projector", "stack", "hidden", "norm")})
    out = {"feats": train.store.fingerprint, "texts": fingerprint(train.text),
           "model": {k: str(spec[k]) for k in ("llm", "encoder", "weights")},
           "valid_feats": valid.store.fingerprint if valid else None,
           "valid_texts": fingerprint(valid.text) if valid else None,
           "init": None}
    if init:
        out["init"] = {f: file_sha256(os.path.join(init, f)) for f in (PROJECTOR_FILE, CTC_FILE)
                       if os.path.exists(os.path.join(init, f))}
        if PROJECTOR_FILE not in out["init"]:
            raise FileNotFoundError(f"--init {init}: no {PROJECTOR_FILE} there (give the "
                                    "output directory of an earlier `lalmtool align`)")
    init_projector = cfg.extra.get("init_projector")
    if init_projector:
        file = init_projector if not os.path.isdir(init_projector) else \
            os.path.join(init_projector, PROJECTOR_FILE)
        out["init_projector"] = file_sha256(file) if os.path.exists(file) else file
    return out


def _prepare_out(out: str, cfg: AlignConfig, inputs: dict, force: bool) -> None:
    """Refuses to resume a run made with other inputs or options (names what differs)."""
    cfg_path, in_path = os.path.join(out, "config.yaml"), os.path.join(out, "inputs.json")
    if force and os.path.isdir(out):
        for name in ("checkpoints", "best", "last", "log.jsonl", "summary.json",
                     PROJECTOR_FILE, CTC_FILE):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else \
                (os.remove(path) if os.path.exists(path) else None)
    if os.path.exists(cfg_path) and os.path.exists(in_path) and \
            (latest_checkpoint(out) or os.path.exists(os.path.join(out, "summary.json"))):
        with open(cfg_path, encoding="utf-8") as fh:
            old_cfg = yaml.safe_load(fh) or {}
        with open(in_path, encoding="utf-8") as fh:
            old_in = json.load(fh)
        new_cfg = dataclasses.asdict(cfg)
        differ = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        differ += sorted(k for k in set(old_in) | set(inputs) if old_in.get(k) != inputs.get(k))
        if differ:
            raise ValueError(f"{out} holds an alignment run with other {', '.join(differ)}; "
                             "use another --out, or --force to start over")
    os.makedirs(out, exist_ok=True)
    write_atomic(cfg_path, cfg.to_yaml())
    write_atomic(in_path, json.dumps(inputs, indent=1, sort_keys=True))


def _ctc_state(al: Aligner) -> dict[str, torch.Tensor]:
    return {"blank": al.head.blank.detach().clone(), "vocab": torch.tensor(al.vocab),
            "scale": torch.tensor(al.head.scale)}


def _save_weights(al: Aligner, path: str) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous() for k, v in al.projector.state_dict().items()},
              os.path.join(tmp, PROJECTOR_FILE))
    save_file(_ctc_state(al), os.path.join(tmp, CTC_FILE))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _load_init(al: Aligner, init: str) -> None:
    """Projector and blank vector of an earlier alignment (the blank does not depend on the
    vocabulary, so an alignment on other texts serves too)."""
    try:
        al.projector.load_state_dict(load_projector_weights(init))
    except RuntimeError as e:
        raise ValueError(f"--init {init}: its projector does not fit this model's "
                         f"({str(e).splitlines()[0]})") from None
    ctc = os.path.join(init, CTC_FILE)
    if os.path.exists(ctc):
        with torch.no_grad():
            al.head.blank.copy_(load_file(ctc)["blank"])


def _save_checkpoint(out, al, opt, sched, state, cfg) -> None:
    final = os.path.join(out, "checkpoints", f"step-{state['step']}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    torch.save({"projector": al.projector.state_dict(), "blank": al.head.blank.detach(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "state": state, "rng": rng}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    steps = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*[0-9]")),
                   key=lambda d: int(d.rsplit("-", 1)[1]))
    for old in steps[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path, al, opt, sched) -> dict:
    ck = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    al.projector.load_state_dict(ck["projector"])
    with torch.no_grad():
        al.head.blank.copy_(ck["blank"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    return ck["state"]


def _log(out: str, rec: dict) -> None:
    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    log.info("align %s", rec)
