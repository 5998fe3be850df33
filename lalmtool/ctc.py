"""The CTC head that ``lalmtool align`` trains, and the stages that read an alignment:
``lalmtool ctc segment`` and ``lalmtool ctc decode``.

``Aligner``: the backend's projector (speechllm: stacked encoder frames onto the LLM's input
embeddings) or a linear map of Whisper's encoder frames onto its decoder's token embeddings,
under a ``CosineCTCHead`` (logits ``scale · cos(p_t, e_v)`` against the frozen embedding rows
``e_v`` of its vocabulary, plus one learnt blank vector). ``load_aligner`` reads it back from
align's output (``OUT/projector.safetensors``, ``OUT/ctc.safetensors`` and its record,
``OUT/lalmtool.json`` of kind ``ctc-aligner``: ``lalmtool.trained``).

CTC-based compression, ``lalmtool ctc segment``: the aligned projector's best class per stacked
position cuts the encoder frames into runs; each run of one token (``blank=join``: blank runs
join the token before them, so there is one segment per token the CTC head emits, a rate near
the text's) or each run of anything (``blank=keep``: blank runs are segments too, about twice
that) becomes one segment of a boundary store that ``lalmtool pool`` reduces like any other.
It needs a transcribed training set to align the projector first: a supervised, content-
adaptive rate, against the unsupervised ``peaks`` and uniform pooling at the same rate::

    lalmtool ctc segment --align exp/align/whisper --feats exp/feats/frames/test \\
        --model whisper-tiny.en --out exp/seg/ctc/test

``lalmtool ctc decode``: CTC-greedy transcripts of a feature store by the aligned projector
alone (no LLM), in ``lalmtool decode``'s format for ``score`` and ``report``.
"""
from __future__ import annotations

import functools
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from . import trained
from .fileio import file_sha256
from .models import load_backend
from .models.speechllm import PROJECTOR_FILE, Projector, load_projector_weights, stack_frames
from .parallel import check_out, each_utterance, write_stage
from .segment import STAGE_VERSION, duration
from .store import Store, StoreError, fingerprint

CTC_FILE = "ctc.safetensors"
BLANK_RUNS = ("join", "keep")  # ctc segment: blank runs join the token before them, or not
CTC_SEGMENT_VERSION = 1


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
    def wer(self, ex, batch_size: int = 32) -> float:
        """Corpus WER of the greedy CTC transcripts of the examples ``ex``
        (``lalmtool.examples.Examples``), after Whisper's English normaliser."""
        from .score import get_normalizer, wer_counts

        refs, hyps = [], []
        for i in range(0, len(ex.ids), batch_size):
            fb, texts = ex.batch(ex.ids[i : i + batch_size])
            refs += texts
            hyps += self.transcribe(fb)
        norm = get_normalizer("whisper_english")
        return wer_counts([norm(r) for r in refs], [norm(h) for h in hyps])[0]["wer"]

    def transcribe(self, feats: list[torch.Tensor]) -> list[str]:
        """CTC-greedy transcripts (the tokens decoded by the LLM's tokenizer)."""
        was = self.projector.training
        self.projector.eval()
        texts = [self.be.tokenizer.decode([self.vocab[c - 1] for c in ctc_greedy(lp)])
                 for lp in self.log_probs(feats)]
        self.projector.train(was)
        return texts


# -- an alignment read back, and its stages ------------------------------------------------
def load_init(al: Aligner, init: str) -> None:
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


def check_alignment(align_dir: str) -> trained.Record:
    """The record of the finished ``lalmtool align`` output ``align_dir`` (its weights there);
    FileNotFoundError when it holds none, ValueError when it holds another kind."""
    if not all(os.path.exists(os.path.join(align_dir, f)) for f in (CTC_FILE, PROJECTOR_FILE)):
        raise FileNotFoundError(f"{align_dir} holds no finished alignment ({PROJECTOR_FILE} and "
                                f"{CTC_FILE}); run `lalmtool align --out {align_dir}` first")
    return trained.read_kind(align_dir, "ctc-aligner", "--align",
                             f"give the OUT of `lalmtool align`, or run `lalmtool align --out "
                             f"{align_dir}` again")


def load_aligner(align_dir: str, model: str) -> Aligner:
    """The aligned projector and CTC head of ``lalmtool align``'s output ``align_dir``."""
    record = check_alignment(align_dir)
    extra = dict(record["backend_options"] or {})
    extra.pop("init_projector", None)
    backend = record["backend"] or "speechllm"
    be = load_backend(backend, model, **extra)
    ctc = load_file(os.path.join(align_dir, CTC_FILE))
    al = Aligner(be, backend, ctc["vocab"].tolist(), float(ctc["scale"]),
                 int((record.get("ctc_head") or {}).get("hidden") or 0))
    load_init(al, align_dir)
    return al


@torch.no_grad()
def ctc_decode(align_dir: str, feats: str, model: str, out: str, manifest: str | None = None,
               set_name: str | None = None, batch_size: int = 32) -> dict:
    """CTC-greedy transcripts of a feature store by an aligned projector alone (no LLM), in
    ``lalmtool decode``'s format (``OUT/hyp.jsonl``, ``OUT/decode.json``) for score/report."""
    from .decode import write_decode
    from .manifest import read_manifest

    al = load_aligner(align_dir, model)
    store = Store(feats)
    refs = {}
    if manifest:
        refs = {u.id: u.text for u in read_manifest(manifest)[0] if u.text is not None}
    method, params, label = store.meta.condition()
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
    rate, params = src.meta.frame_rate, {"blank": blank}
    fp = fingerprint({"stage": "ctc-segment", "version": CTC_SEGMENT_VERSION,
                      "segment_version": STAGE_VERSION, "source": src.fingerprint,
                      "align": weights, "params": params})
    meta = {"stage": "segment", "method": "ctc", "params": params, "frame_rate": rate,
            "source": os.path.abspath(feats), "source_fingerprint": src.fingerprint,
            "source_meta": src.meta, "align": os.path.abspath(align_dir), "align_weights": weights}
    shards = {name.replace("feats.", "seg.", 1): [u for u in ids if u in src]
              for name, ids in src.shards.items()}
    factory = functools.partial(_ctc_worker, align_dir, model, feats, blank, batch_size)
    return write_stage(out, "seg", fp, meta, shards, factory, rate, force=force,
                       desc="ctc-segment")


def _ctc_worker(align_dir: str, model: str, feats: str, blank: str, batch_size: int):
    al, src = load_aligner(align_dir, model), Store(feats)
    al.train(False)

    @torch.no_grad()
    def outputs(batch: list[str]):
        frames = [src[u] for u in batch]
        lps = al.log_probs([torch.from_numpy(z.astype(np.float32)) for z in frames])
        for utt, z, lp in zip(batch, frames, lps):
            yield (utt, ctc_boundaries(lp, al.stack, blank), len(z),
                   duration(src, src.attrs(utt), z), None)

    return each_utterance(outputs, batch_size)
