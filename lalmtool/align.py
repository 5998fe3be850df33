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

    OUT/run.json, OUT/config.yaml        the options and the inputs by content
    OUT/log.jsonl                        step, loss, lr (and valid_wer at validations)
    OUT/checkpoints/step-N/              resumable (projector, blank, optimizer, RNG, position)
    OUT/projector.safetensors            the projector (best on validation WER, else last)
    OUT/ctc.safetensors                  blank vector, class token ids (``vocab``), scale
    OUT/summary.json                     steps, best/initial validation WER, skipped utterances

The run is the training core's (``lalmtool.trainer``, shared with ``lalmtool finetune``): a
rerun resumes from the last checkpoint and ends with the same weights as an uninterrupted run,
a finished run is reused, a rerun with other inputs or options refuses, naming what differs
(``--force`` starts over), ``patience`` stops early.

Whisper (``--backend whisper``): the same CTC head on Whisper's own encoder frames, through a
learnt linear map onto the decoder's token embeddings (no stacking: one position per frame).
It needs no LLM and trains in minutes on a CPU; ``ctc-segment`` then cuts Whisper's frames
where its best class changes, for ``pool`` and a Whisper LoRA like any other compressor::

    lalmtool align --backend whisper --feats exp/feats/frames/train \
        --manifest data/train/manifest.jsonl --model whisper-tiny.en --out exp/align/whisper
    lalmtool ctc-segment --align exp/align/whisper --feats exp/feats/frames/test \
        --model whisper-tiny.en --out exp/seg/ctc/test

CTC-based compression, ``lalmtool ctc-segment``: the aligned projector's best class per stacked
position cuts the encoder frames into runs; each run of one token (``blank=join``: blank runs
join the token before them, so there is one segment per token the CTC head emits, a rate near
the text's) or each run of anything (``blank=keep``: blank runs are segments too, about twice
that) becomes one segment of a boundary store that ``lalmtool pool`` reduces like any other.
It needs a transcribed training set to align the projector first: a supervised, content-
adaptive rate, against the unsupervised ``peaks`` and uniform pooling at the same rate.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from . import record, trainer
from .fileio import file_sha256, write_atomic
from .finetune import Examples
from .lock import output_lock
from .models import check_backend_options, load_backend
from .models.speechllm import PROJECTOR_FILE, Projector, load_projector_weights, stack_frames
from .options import option
from .parallel import add_utterance, check_out, new_stats
from .store import ShardResult, Store, StoreError, fingerprint
from .trainer import TrainingOptions

log = logging.getLogger("lalmtool")

CTC_FILE = "ctc.safetensors"
VOCABS = ("train", "full")
BACKENDS = ("speechllm", "whisper")  # what align trains: a projector, or an encoder-side head
BLANK_RUNS = ("join", "keep")  # ctc-segment: blank runs join the token before them, or not
CTC_SEGMENT_VERSION = 1


@dataclass
class AlignConfig(TrainingOptions):
    """The options of ``lalmtool align`` (``--help`` lists them with this help text)."""

    WHAT = "align option"
    COMMAND = "align"

    max_steps: int = option(300, "optimizer steps to train")
    batch_size: int = option(16, "utterances per step")
    backend: str = option("speechllm", "speechllm: align its projector onto the LLM's input "
                                       "embeddings; whisper: a CTC head mapping the encoder "
                                       "frames onto the decoder's token embeddings", BACKENDS)
    scale: float = option(16.0, "logit = scale * cosine")
    vocab: str = option("train", "train: the token ids of the training texts; full: every "
                                 "embedding row", VOCABS)
    head_hidden: int = option(0, "whisper: the head is linear (0) or an MLP with one hidden "
                                 "layer of this many units")

    def check(self) -> None:
        super().check()
        self.need(self.scale > 0, "scale", "> 0")
        self.need(self.head_hidden >= 0, "head_hidden", ">= 0")


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
    """A CTC head onto frozen token-embedding rows and its label vocabulary: for speechllm the
    backend's projector (stacked encoder frames → the LLM's input embeddings), for whisper a
    linear map (or, with ``hidden``, an MLP) of each encoder frame onto the decoder's token
    embeddings."""

    def __init__(self, be, backend: str, vocab: list[int], scale: float, hidden: int = 0):
        self.be, self.backend = be, backend
        if backend == "speechllm":
            self.stack, self.projector = be.stack, be.model.projector.float()
            rows = be.model.llm.get_input_embeddings().weight
        else:
            self.stack = 1
            rows = be.model.get_decoder().get_input_embeddings().weight
            self.projector = Projector(be.model.config.d_model, rows.shape[1],
                                       "mlp" if hidden else "linear", hidden)
        self.vocab = list(vocab)
        self.index = {t: i + 1 for i, t in enumerate(self.vocab)}  # 0 is the blank
        self.head = CosineCTCHead(rows[torch.tensor(self.vocab)], scale)

    @staticmethod
    def embedding_rows(be, backend: str) -> int:
        """How many token-embedding rows the model has (``vocab=full``)."""
        module = be.model.llm if backend == "speechllm" else be.model.get_decoder()
        return module.get_input_embeddings().weight.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) + [self.head.blank]

    def train(self, mode: bool = True) -> None:
        self.projector.train(mode)

    def weights(self) -> dict:
        """What a checkpoint holds of it: the projector (or head) and the blank vector."""
        return {"projector": self.projector.state_dict(), "blank": self.head.blank.detach()}

    def restore(self, ck: dict) -> None:
        self.projector.load_state_dict(ck["projector"])
        with torch.no_grad():
            self.head.blank.copy_(ck["blank"])

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
#: What a run writes into OUT (removed when it starts over).
RUN_OUTPUTS = ("checkpoints", "best", "last", "log.jsonl", "summary.json", PROJECTOR_FILE,
               CTC_FILE, "inputs.json")


def _backend(cfg: AlignConfig, model: str):
    be = load_backend(cfg.backend, model, **cfg.extra)
    be.model.requires_grad_(False)
    return be


def align(feats: str, manifest: str, model: str, out: str, cfg: AlignConfig,
          valid_feats: str | None = None, valid_manifest: str | None = None,
          init: str | None = None, force: bool = False) -> dict:
    """Trains the projector (or whisper's head) and the blank with CTC, on the training core
    (``lalmtool.trainer``); returns the run's summary. A finished run is reused."""
    if bool(valid_feats) != bool(valid_manifest):
        raise ValueError("valid_feats and valid_manifest go together")
    check_out(out, feats, *filter(None, [valid_feats]))
    check_backend_options(cfg.backend, cfg.extra, "from --backend-opt")
    train = Examples(feats, manifest, cfg.text_field)
    valid = Examples(valid_feats, valid_manifest, cfg.text_field) if valid_feats else None

    def inputs() -> dict:
        return _inputs(train, manifest, model, cfg, valid, valid_manifest, init)

    with output_lock(out):
        done = None if force else trainer.finished(out, cfg, inputs, CTC_FILE)
        if done is not None:
            log.info("%s: finished with these inputs and settings, nothing to do", out)
            return done
        recorded = inputs()
        trainer.seed_all(cfg.seed)
        be = _backend(cfg, model)
        if cfg.vocab == "full":
            vocab = list(range(Aligner.embedding_rows(be, cfg.backend)))
        else:
            vocab = train_vocab(be.tokenizer, [train.text[u] for u in train.ids])
        al = Aligner(be, cfg.backend, vocab, cfg.scale, cfg.head_hidden)
        if init:
            _load_init(al, init)
        for p in al.parameters():
            p.requires_grad_(True)
        usable, skipped = _feasible(al, train)
        if skipped:
            log.warning("align: %d of %d training utterance(s) skipped (labels longer than "
                        "their audio positions after stacking by %d), e.g. %s", len(skipped),
                        len(train.ids), al.stack, ", ".join(s["id"] for s in skipped[:5]))
        if not usable:
            raise ValueError(f"align: none of the {len(train.ids)} utterances of {feats} has "
                             f"fewer CTC labels than audio positions (stack {al.stack}); use a "
                             "smaller stack or less compression")
        trainer.prepare_out(out, cfg, recorded, force, "an align run", RUN_OUTPUTS)
        ids = [u for u in train.ids if u in usable]
        run = trainer.Run(out, cfg, trainer.Dist(), al, al.parameters(), cfg.max_steps, al)
        run.state["initial_wer"] = None
        if not trainer.resume(run, al.restore) and valid:
            run.state["initial_wer"] = _validate(run, valid)
            _save_checkpoint(run)
        stream = trainer.data_stream(
            lambda epoch: trainer.batches(trainer.shuffled(ids, cfg.seed, epoch), cfg.batch_size),
            tuple(run.state["position"]), f"no training utterances in {feats}")

        def loss_of(batch: list[str]):
            return al.loss(train.batch(batch)[0], [usable[u] for u in batch]), len(batch)

        trainer.fit(run, lambda: trainer.train_step(run, loss_of, stream),
                    (lambda: _validate(run, valid)) if valid else None,
                    lambda: _save_checkpoint(run), "align", "utt_per_s")
        return _export(run, feats, init, skipped, len(ids))


def _export(run: trainer.Run, feats: str, init: str | None, skipped: list[dict],
            used: int) -> dict:
    """OUT/last; the best (by validation WER, else the last) weights copied to OUT; summary."""
    out, al, state = run.out, run.job, run.state
    _save_weights(al, os.path.join(out, "last"))
    final = os.path.join(out, "best" if state["best_step"] is not None else "last")
    for name in (PROJECTOR_FILE, CTC_FILE):
        tmp = os.path.join(out, name + ".tmp")
        shutil.copyfile(os.path.join(final, name), tmp)
        os.replace(tmp, os.path.join(out, name))
    summary = {"out": out, "steps": state["step"], "stopped_early": run.stopped,
               "best_valid_wer": state["best"], "best_step": state["best_step"],
               "initial_valid_wer": state["initial_wer"], "vocab_size": len(al.vocab),
               "utterances": used,
               "skipped": len(skipped), "skipped_ids": [s["id"] for s in skipped],
               "skipped_why": skipped, "projector": os.path.join(out, PROJECTOR_FILE),
               "init": init, "feats": os.path.abspath(feats), "backend": run.cfg.backend}
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _validate(run: trainer.Run, valid: Examples) -> float:
    return trainer.validation(run, lambda: _valid_wer(run.job, valid),
                              lambda path: _save_weights(run.job, path), "valid_wer")


def _valid_wer(al: Aligner, ex: Examples, batch_size: int = 32) -> float:
    refs, hyps = [], []
    for i in range(0, len(ex.ids), batch_size):
        fb, texts = ex.batch(ex.ids[i : i + batch_size])
        refs += texts
        hyps += al.transcribe(fb)
    return wer(refs, hyps)


def _save_checkpoint(run: trainer.Run) -> None:
    trainer.save_checkpoint(run, run.job.weights)


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
        config = yaml.safe_load(fh) or {}
    extra = dict(config.get("extra") or {})
    extra.pop("init_projector", None)
    backend = config.get("backend", "speechllm")
    be = load_backend(backend, model, **extra)
    ctc = load_file(path)
    al = Aligner(be, backend, ctc["vocab"].tolist(), float(ctc["scale"]),
                 int(config.get("head_hidden") or 0))
    _load_init(al, align_dir)
    return al


@torch.no_grad()
def ctc_decode(align_dir: str, feats: str, model: str, out: str, manifest: str | None = None,
               set_name: str | None = None, batch_size: int = 32) -> dict:
    """CTC-greedy transcripts of a feature store by an aligned projector alone (no LLM), in
    ``lalmtool decode``'s format (``OUT/hyp.jsonl``, ``OUT/decode.json``) for score/report."""
    from .decode import write_decode
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
    info = {"set": set_name or os.path.basename(os.path.normpath(out)), "method": method,
            "params": params, "condition": f"{label} (CTC greedy)", "decoder": "ctc-greedy",
            "feats": os.path.abspath(feats), "model": model, "align": os.path.abspath(align_dir),
            "adapter": None, "lora": False, "backend": al.backend}
    return write_decode(out, store, rows, info)


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
    if cfg.backend == "speechllm":
        from .models.speechllm import read_spec

        spec = read_spec(model, **{k: v for k, v in cfg.extra.items()
                                   if k in ("encoder", "projector", "stack", "hidden", "norm")})
        identity = {k: str(spec[k]) for k in ("llm", "encoder", "weights")}
    else:
        from .assets import resolve_model

        identity = record.identity(resolve_model(model))
    out = {"feats": train.store.fingerprint, "texts": fingerprint(train.text),
           "model": identity,
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
