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
    OUT/lalmtool.json                    its record (kind ctc-aligner: backend, options, base
                                         model, the head's width, the training data;
                                         ``lalmtool.trained``), what ``lalmtool ctc`` reads
    OUT/summary.json                     steps, best/initial validation WER, skipped utterances

The run is the training core's (``lalmtool.trainer``, shared with ``lalmtool finetune``): a
rerun resumes from the last checkpoint and ends with the same weights as an uninterrupted run,
a finished run is reused, a rerun with other inputs or options refuses, naming what differs
(``--force`` starts over), ``patience`` stops early.

Whisper (``--backend whisper``): the same CTC head on Whisper's own encoder frames, through a
learnt linear map onto the decoder's token embeddings (no stacking: one position per frame).
It needs no LLM and trains in minutes on a CPU; ``lalmtool ctc segment`` then cuts Whisper's
frames where its best class changes, for ``pool`` and a Whisper LoRA like any other
compressor::

    lalmtool align --backend whisper --feats exp/feats/frames/train \\
        --manifest data/train/manifest.jsonl --model whisper-tiny.en --out exp/align/whisper
    lalmtool ctc segment --align exp/align/whisper --feats exp/feats/frames/test \\
        --model whisper-tiny.en --out exp/seg/ctc/test

The CTC head itself (``Aligner``) and the stages that read an alignment (``lalmtool ctc
segment``, CTC-based compression, and ``lalmtool ctc decode``) are in ``lalmtool.ctc``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from . import trained, trainer
from .ctc import CTC_FILE, PROJECTOR_FILE, Aligner, ctc_positions_needed, load_init
from .examples import Examples
from .fileio import atomic_dir, file_sha256, write_atomic
from .models import check_backend_options, load_backend, model_identity
from .options import option
from .parallel import check_out
from .trainer import TrainingOptions

log = logging.getLogger("lalmtool")

VOCABS = ("train", "full")
BACKENDS = ("speechllm", "whisper")  # what align trains: a projector, or an encoder-side head


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
               CTC_FILE, "inputs.json", trained.RECORD_FILE)


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

    with trainer.claimed(out, cfg, inputs, CTC_FILE, force) as done:
        if done is not None:
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
            load_init(al, init)
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
        _save_record(run, feats, manifest, model)
        return _export(run, feats, init, skipped, len(ids))


def _save_record(run: trainer.Run, feats: str, manifest: str, model: str) -> None:
    """OUT/lalmtool.json (``lalmtool.trained``): what ``lalmtool ctc`` loads the head with."""
    cfg = run.cfg
    compression = trained.compression(feats)
    trained.write(run.out, "ctc-aligner", backend=cfg.backend, backend_options=cfg.extra,
                  **trained.base(model), compression=compression,
                  trained_on={"condition": compression["condition"],
                              "feats": trained.store_ref(feats),
                              "manifest": trained.manifest_ref(manifest)},
                  ctc_head={"hidden": cfg.head_hidden})


def _export(run: trainer.Run, feats: str, init: str | None, skipped: list[dict],
            used: int) -> dict:
    """OUT/last; the best (by validation WER, else the last) weights copied to OUT; summary
    (written last: a run is finished when it is there)."""
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
    return trainer.validation(run, lambda: run.job.wer(valid),
                              lambda path: _save_weights(run.job, path), "valid_wer")


def _save_checkpoint(run: trainer.Run) -> None:
    trainer.save_checkpoint(run, run.job.weights)


# -- fingerprint, checkpoints, outputs ------------------------------------------------------
def _inputs(train: Examples, manifest: str, model: str, cfg: AlignConfig,
            valid: Examples | None, valid_manifest: str | None, init: str | None) -> dict:
    """What determines the result besides the options: stores, texts, model, init weights."""
    out = {"feats": train.store.fingerprint, "texts": train.text_fingerprint,
           "model": model_identity(cfg.backend, model, cfg.extra),
           "valid_feats": valid.store.fingerprint if valid else None,
           "valid_texts": valid.text_fingerprint if valid else None,
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
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in al.projector.state_dict().items()},
                  os.path.join(tmp, PROJECTOR_FILE))
        save_file(_ctc_state(al), os.path.join(tmp, CTC_FILE))
