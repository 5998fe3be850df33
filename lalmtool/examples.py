"""The training examples of ``lalmtool finetune`` and ``lalmtool align``: the utterances of a
feature store with their manifest texts (``Examples``), long inputs made of consecutive
utterances joined (``concat_seconds``, ``joined_examples``), and the seeded micro-batches of each
epoch (``epoch_batches``, ``data_stream``). The helpers read the training options they need
(``seed``, ``batch_size``, ``batch_seconds``, ``concat_seconds``) from finetune's
``TrainConfig``.
"""
from __future__ import annotations

import random
import typing

import numpy as np
import torch

from . import trainer
from .manifest import field_values, load_manifest
from .pool import boundaries_of
from .store import Store, fingerprint
from .trainer import shuffled

if typing.TYPE_CHECKING:
    from .finetune import TrainConfig


class Examples:
    """Utterances present both in a feature store and in a manifest with text.

    A training example (an *item*) is one utterance id, or a tuple of consecutive ids whose
    features are concatenated in time and whose texts are joined with a space (long inputs,
    ``concat_seconds``)."""

    def __init__(self, feats: str, manifest: str, text_field: str = "text",
                 group_field: str | None = None, segments: str | None = None):
        self.store = Store(feats)
        self.segments = segments_of(self.store, segments) if segments else None
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
        self.group = self._windows(feats) if group_field == "pack" else \
            field_values(manifest, group_field, self.order, "concat_group") if group_field else {}

    @property
    def text_fingerprint(self) -> str:
        """What identifies the texts by content (with ``store.fingerprint``, the examples)."""
        return fingerprint(self.text)

    def _windows(self, feats: str) -> dict[str, str]:
        """Utterance → the encoder window a packed store (``extract --pack``) encoded it in
        (named by its first utterance; an utterance alone in its window names its own)."""
        if not self.store.meta.extracted.get("pack"):
            raise ValueError(f"concat_group pack joins the utterances of one encoder window, "
                             f"and {feats} was not extracted with --pack: extract the training "
                             "set with --pack SECONDS")
        return {u: self.store.attrs(u).get("pack", u) for u in self.order}

    def batch(self, items: list) -> tuple[list[torch.Tensor], list[str]]:
        feats, texts = [], []
        for item in items:
            ids = parts(item)
            feats.append(torch.from_numpy(
                np.concatenate([self.store[u] for u in ids]).astype(np.float32)))
            texts.append(" ".join(self.text[u].strip() for u in ids))
        return feats, texts

    def starts(self, items: list) -> list[torch.Tensor]:
        """Each example's segment starts (joined utterances: shifted by the frames before)."""
        out = []
        for item in items:
            offset, starts = 0, []
            for u in parts(item):
                starts.append(self.segments[u].astype(np.int64) + offset)
                offset += int(self.store.dataset(u).shape[0])
            out.append(torch.from_numpy(np.concatenate(starts)))
        return out

    def seconds(self, item) -> float:
        return sum(self.duration[u] for u in parts(item))


def segments_of(store: Store, segments: str) -> Store:
    """The boundary store ``segments`` of ``store``'s frames, checked: a ``segment`` store of
    these very features covering every utterance."""
    seg = boundaries_of(store, segments)
    missing = [u for u in store.ids if u not in seg]
    if missing:
        raise ValueError(f"--segments {segments} has no boundaries for {len(missing)} "
                         f"utterance(s) of {store.path} (e.g. {missing[:3]})")
    return seg


def parts(item) -> tuple[str, ...]:
    """The utterance ids of a training example."""
    return (item,) if isinstance(item, str) else tuple(item)


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
    items = shuffled(joined_examples(ex, cfg, epoch, fits), cfg.seed, epoch)
    if not cfg.batch_seconds:
        return trainer.batches(items, cfg.batch_size)
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
    return trainer.data_stream(lambda epoch: epoch_batches(ex, cfg, epoch, fits), start,
                               f"no training utterances in {ex.store.path}")


def concat_range(cfg: TrainConfig) -> list[float]:
    """``concat_seconds`` as [MIN, MAX] (a single number S is [S, S])."""
    value = cfg.concat_seconds
    return [value, value] if isinstance(value, float) else list(value)
