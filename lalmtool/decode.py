"""Stage 5, ``lalmtool decode``: stored (compressed) features → hypotheses.

Writes ``OUT/hyp.jsonl`` (id, hyp, ref when known, tokens = audio tokens fed to the decoder,
duration = audio seconds, seconds = decode time attributed to the utterance) and
``OUT/decode.json`` (the condition, paths, rates and speed). Batches are sorted by length.
Hypotheses are appended as they come, so an interrupted decode resumes where it stopped; under
``torchrun`` each rank decodes its own shards and rank 0 merges the parts.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time

import numpy as np
import torch

from .manifest import read_manifest
from .models import load_backend
from .models.base import model_identity
from .parallel import barrier, dist_info, progress
from .store import Store, condition_of, fingerprint, write_atomic

log = logging.getLogger("lalmtool")


def decode(feats: str, model: str, out: str, adapter: str | None = None,
           backend: str = "whisper", beam: int = 1, batch_size: int = 16,
           max_new_tokens: int = 200, manifest: str | None = None, set_name: str | None = None,
           device: str = "cpu", force: bool = False, backend_opts: dict | None = None,
           label: str | None = None) -> dict:
    """Decodes every utterance of the store ``feats``; returns decode.json's content.

    ``backend_opts`` (prompt, task, language, ...) default to those the adapter was trained with.
    ``label`` names the condition in reports (default: the store's compression, e.g.
    ``uniform-mean-k3``); it is not part of the fingerprint, so relabelling decodes nothing.
    ``adapter_condition`` records the condition the adapter was trained on when it differs.
    """
    rank, world = dist_info()
    if backend_opts is None:
        backend_opts = _training_opts(adapter)
    store = Store(feats)
    method, params, default_label = condition_of(store)
    label = label or default_label
    fp = fingerprint({"feats": store.fingerprint, "model": model_identity(model),
                      "adapter": model_identity(adapter) if adapter else None, "beam": beam,
                      "max_new_tokens": max_new_tokens, "backend": backend,
                      "backend_opts": backend_opts})
    os.makedirs(out, exist_ok=True)
    info_path, hyp_path = os.path.join(out, "decode.json"), os.path.join(out, "hyp.jsonl")
    if os.path.exists(info_path) and os.path.exists(hyp_path):
        with open(info_path) as fh:
            info = json.load(fh)
        if info.get("fingerprint") == fp and not force:
            log.info("%s: already decoded with these inputs, skipped", out)
            labels = {"condition": label,  # not in the fingerprint: updated in place
                      "adapter_condition": _adapter_condition(adapter, default_label)}
            if rank == 0 and any(info.get(k) != v for k, v in labels.items()):
                info.update(labels)
                write_atomic(info_path, json.dumps(info, indent=1))
            return info
    barrier(world)  # every rank has read the old decode.json before anything is removed
    if rank == 0:
        _clear_stale(out, fp, force)
    barrier(world)

    refs = {}
    if manifest:
        utts, _ = read_manifest(manifest)
        refs = {u.id: (u.target if u.target is not None else u.text) for u in utts}
    mine = [u for i, (name, ids) in enumerate(store.shards.items()) if i % world == rank
            for u in ids if u in store]
    part = os.path.join(out, f"hyp.part{rank}.jsonl")
    done = _read_part(part)
    todo = sorted((u for u in mine if u not in done), key=lambda u: -store.dataset(u).shape[0])
    if todo:
        be = load_backend(backend, model, device=device, **backend_opts)
        if adapter:
            from peft import PeftModel

            be.model = PeftModel.from_pretrained(be.model, adapter).merge_and_unload()
        be.model.eval()
        with open(part, "a", encoding="utf-8") as fh, \
                progress(total=len(todo), desc="decode", unit="utt", disable=rank != 0) as bar:
            for b in range(0, len(todo), batch_size):
                ids = todo[b : b + batch_size]
                feats_b = [torch.from_numpy(store[u].astype(np.float32)) for u in ids]
                t0 = time.perf_counter()
                hyps = be.generate(feats_b, beam=beam, max_new_tokens=max_new_tokens)
                per_utt = (time.perf_counter() - t0) / len(ids)
                for u, f, h in zip(ids, feats_b, hyps):
                    rec = {"id": u, "hyp": h, "tokens": be.num_audio_tokens(f),
                           "duration": float(store.attrs(u).get("duration", 0.0)),
                           "seconds": per_utt}
                    if u in refs:
                        rec["ref"] = refs[u]
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                bar.update(len(ids))
    barrier(world)
    if rank != 0:
        return {}
    records = {}
    for p in sorted(glob.glob(os.path.join(out, "hyp.part*.jsonl"))):
        records.update(_read_part(p))
    rows = [records[u] for u in sorted(records)]
    audio_s = sum(r["duration"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    secs = sum(r["seconds"] for r in rows)
    src_rate = float(store.meta.get("source_frame_rate", store.meta.get("frame_rate", 0.0)))
    info = {
        "set": set_name or os.path.basename(os.path.normpath(out)), "method": method,
        "params": params, "condition": label, "feats": os.path.abspath(feats), "model": model,
        "adapter": os.path.abspath(adapter) if adapter else None, "lora": bool(adapter),
        "adapter_condition": _adapter_condition(adapter, default_label),
        "backend": backend, "backend_opts": backend_opts, "beam": beam, "max_new_tokens": max_new_tokens,
        "utterances": len(rows), "audio_seconds": audio_s, "audio_tokens": tokens,
        "tokens_per_s": tokens / audio_s if audio_s else None, "source_frame_rate": src_rate,
        "compression_ratio": src_rate * audio_s / tokens if tokens else None,
        "decode_seconds": secs, "utt_per_s": len(rows) / secs if secs else None,
        "fingerprint": fp,
    }
    write_atomic(hyp_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(info_path, json.dumps(info, indent=1))
    for p in glob.glob(os.path.join(out, "hyp.part*.jsonl")):
        os.remove(p)
    return info


def _adapter_condition(adapter: str | None, condition: str) -> str | None:
    """The condition the adapter was trained on when it is not ``condition`` (e.g. a frame-level
    adapter decoding compressed features: not re-aligned), from its run's summary.json."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter)), "summary.json") if adapter else ""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        trained_on = json.load(fh).get("condition")
    return trained_on if trained_on != condition else None


def _training_opts(adapter: str | None) -> dict:
    """The backend options (``extra``) of the finetune run that wrote ``adapter``, if known."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(adapter)), "config.yaml") if adapter else ""
    if not os.path.exists(cfg):
        return {}
    import yaml

    with open(cfg, encoding="utf-8") as fh:
        return dict((yaml.safe_load(fh) or {}).get("extra") or {})


def _clear_stale(out: str, fp: str, force: bool) -> None:
    """Removes partial hypotheses made with other inputs (or all, with ``force``)."""
    marker = os.path.join(out, "decode.fingerprint")
    old = open(marker).read() if os.path.exists(marker) else None
    if force or old != fp:
        for p in glob.glob(os.path.join(out, "hyp.part*.jsonl")) + [
                os.path.join(out, "hyp.jsonl"), os.path.join(out, "decode.json")]:
            if os.path.exists(p):
                os.remove(p)
    write_atomic(marker, fp)


def _read_part(path: str) -> dict[str, dict]:
    """Complete lines of a partial hypothesis file (a line cut by a kill is dropped)."""
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    rec = json.loads(line)
                    out[rec["id"]] = rec
        with open(path, "w", encoding="utf-8") as fh:  # drop a cut last line before appending
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out.values())
    return out
