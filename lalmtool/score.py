"""Scoring: WER (jiwer) and BLEU/chrF (sacrebleu) of a decode stage's hypotheses.

Inputs
  * ``DEC/hyp.jsonl``: one JSON per line with ``id`` and ``hyp`` (plus ``tokens``, ``duration``,
    ``seconds`` written by the decode stage); ``DEC/decode.json`` beside it, if present, describes
    the run (set, method, tokens/s fed to the decoder, compression ratio, decode speed, ...).
  * a reference manifest (JSON Lines): ``id`` and ``text`` (WER) or ``target`` (BLEU/chrF).

Outputs, in ``out_dir`` (default: the hyp file's directory), each written atomically
  * ``results.json``: decode.json's fields + the metric's fields + ``hyp`` and ``ref`` paths;
  * ``result.txt``: the same for a person;
  * ``per_utt.jsonl``: per-utterance counts (WER) or sentence-level BLEU/chrF;
  * ``alignments.txt`` (WER only): sclite-like REF/HYP/Eval alignments.

WER conventions (DESIGN.md, "Scoring conventions"): a *named* normalizer, recorded in the output,
is applied to references and hypotheses before jiwer; ``wer`` is a fraction (``wer_pct`` the same
in percent) equal to (S + D + I) / N over the whole set. A reference that normalizes to nothing
counts its hypothesis' words as insertions.
"""
from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from importlib import resources
from typing import Callable

from .fileio import file_sha256, iter_jsonl, write_atomic

METRICS = ("wer", "bleu")
NORMALIZERS = ("auto", "whisper_english", "basic", "none")
ENGLISH_LANGS = {"en", "eng", "english"}
SPELLING_MAP = "whisper_english_spelling.json"


# --------------------------------------------------------------------------- text written

#: A lone surrogate: how Python holds a byte of a path that is not UTF-8 (``\udcff`` for 0xff),
#: which UTF-8 cannot encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(obj, **kwargs) -> str:
    """``json.dumps(obj, ensure_ascii=False)`` that UTF-8 can always encode: a path with bytes
    that are not UTF-8 (a directory named with byte 0xff) is written with ``\\udcff``-style
    escapes, which ``json.load`` reads back as the same path."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}",
                          json.dumps(obj, ensure_ascii=False, **kwargs))


def readable(text: str) -> str:
    """``text`` for a person, UTF-8 encodable: a path's bytes that are not UTF-8 are shown as
    ``\\xff`` (other lone surrogates as ``\\ud800``)."""
    def show(m):
        code = ord(m.group())
        return f"\\x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"\\u{code:04x}"
    return _SURROGATE.sub(show, text)


# --------------------------------------------------------------------------- reading inputs

def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """Every non-blank line of a JSON Lines file as (line number, record); clear errors otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    records, bad = [], []
    for lineno, rec, problem in iter_jsonl(path):
        if problem or "id" not in rec:
            bad.append(f"line {lineno}: " + (problem or "needs an 'id' field"))
        else:
            records.append((lineno, rec))
    if bad:
        raise ValueError(f"{what} {path} has {len(bad)} bad line(s):\n  " + "\n  ".join(bad[:20]))
    return records


def read_hyps(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Hypotheses by utterance id (file order kept), and the ids whose record carries no
    hypothesis (``hyp`` absent, null or not a string: a missing hypothesis, see ``pair_up``)
    with what is wrong ("line 3: hyp null"). Duplicate ids are refused. An empty string is a
    valid empty hypothesis (all deletions).
    """
    hyps: dict[str, dict] = {}
    no_hyp: dict[str, str] = {}
    dups = []
    for lineno, rec in read_jsonl(path, "hypothesis file"):
        utt = str(rec["id"])
        if utt in hyps:
            dups.append(f"{utt} (line {lineno})")
            continue
        hyps[utt] = rec
        why = _no_hypothesis(rec)
        if why:
            no_hyp[utt] = f"line {lineno}: {why}"
    if dups:
        raise ValueError(f"{path}: duplicate utterance id(s) {_some(dups)}; each utterance must be "
                         "decoded once: remove the duplicates or re-run the decode stage")
    return hyps, no_hyp


def _no_hypothesis(rec: dict) -> str | None:
    """Why the hyp record ``rec`` carries no hypothesis, or None when its ``hyp`` is a string."""
    if "hyp" not in rec:
        return "no 'hyp'"
    if rec["hyp"] is None:
        return "hyp null"
    if not isinstance(rec["hyp"], str):
        return f"hyp {json.dumps(rec['hyp'])[:40]}, not a string"
    return None


def read_refs(path: str, field: str) -> tuple[dict[str, str], dict[str, str | None]]:
    """References (``field`` = ``text`` or ``target``) and languages by id, in manifest order.

    A reference that is missing or null is an error naming the utterances; an empty string is a
    valid (empty) reference.
    """
    refs: dict[str, str] = {}
    langs: dict[str, str | None] = {}
    dups, lacking = [], []
    for lineno, rec in read_jsonl(path, "reference manifest"):
        utt = str(rec["id"])
        if utt in refs:
            dups.append(f"{utt} (line {lineno})")
            continue
        if rec.get(field) is None:
            lacking.append(utt)
        refs[utt] = str(rec.get(field) or "")
        langs[utt] = rec.get("lang")
    if dups:
        raise ValueError(f"{path}: duplicate utterance id(s) {_some(dups)}")
    if lacking:
        hint = (" (BLEU/chrF score against the translation reference 'target'; the transcript "
                "'text' is not used in its place)" if field == "target" else "")
        raise ValueError(f"{path}: {len(lacking)} utterance(s) lack a '{field}' reference"
                         f"{hint}: {_some(lacking)}")
    return refs, langs


def pair_up(hyps: dict[str, dict], no_hyp: dict[str, str], refs: dict[str, str],
            hyp_path: str, ref_path: str, on_missing: str) -> tuple[list[str], list[str]]:
    """Utterance ids to score (manifest order) and those filled in as empty hypotheses.

    Hypotheses for ids not in the manifest are always an error; references without a hypothesis
    (no record, or a record in ``no_hyp``: see ``read_hyps``) are an error unless
    ``on_missing="empty"``.
    """
    if on_missing not in ("fail", "empty"):
        raise ValueError(f"on_missing must be 'fail' or 'empty', not {on_missing!r}")
    unknown = [u for u in hyps if u not in refs]
    if unknown:
        raise ValueError(f"{hyp_path}: {len(unknown)} hypothesis id(s) are not in the reference "
                         f"manifest {ref_path}: {_some(unknown)}; score against the manifest the "
                         "decode stage read")
    empty = ("on_missing='empty' (`lalmtool score --missing empty`) to count them as empty "
             "hypotheses (all deletions)")
    absent = [u for u in refs if u not in hyps]
    if absent and on_missing == "fail":
        raise ValueError(f"{hyp_path}: {len(absent)} utterance(s) of {ref_path} have no "
                         f"hypothesis: {_some(absent)}; finish the decode stage, or pass {empty}")
    if no_hyp and on_missing == "fail":
        raise ValueError(f"{hyp_path}: {len(no_hyp)} record(s) carry no hypothesis: "
                         f"{_some([f'{u} ({why})' for u, why in no_hyp.items()])}; decode these "
                         f"utterances again, or pass {empty}")
    return list(refs), [u for u in refs if u not in hyps or u in no_hyp]


def _some(items: list[str], n: int = 10) -> str:
    """The first ``n`` items, comma-separated, with a count of the rest."""
    head = ", ".join(items[:n])
    return head + (f" ... and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------- normalizers

@lru_cache(maxsize=1)
def english_spelling_map() -> dict[str, str]:
    """Whisper's British→American spelling map, vendored from openai-whisper (MIT; see data/README.md)."""
    text = resources.files("lalmtool").joinpath("data", SPELLING_MAP).read_text(encoding="utf-8")
    return json.loads(text)


def resolve_normalizer(name: str, langs: list[str | None]) -> str:
    """The normalizer a name stands for: ``auto`` → ``whisper_english`` when every reference is
    English (or has no ``lang``), else ``basic``."""
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {', '.join(NORMALIZERS)}")
    if name != "auto":
        return name
    english = all(lang is None or _is_english(lang) for lang in langs)
    return "whisper_english" if english else "basic"


def _is_english(lang: str) -> bool:
    """True for 'en', 'en-US', 'en_GB', 'eng', 'English'."""
    return str(lang).lower().replace("_", "-").split("-")[0] in ENGLISH_LANGS


def get_normalizer(name: str) -> Callable[[str], str]:
    """The text normalizer called ``name`` (``whisper_english``, ``basic`` or ``none``)."""
    from transformers.models.whisper.english_normalizer import (
        BasicTextNormalizer, EnglishTextNormalizer)
    if name == "whisper_english":
        return EnglishTextNormalizer(english_spelling_map())
    if name == "basic":
        return BasicTextNormalizer()
    if name == "none":
        return lambda s: s
    raise ValueError(f"unknown normalizer {name!r}; choose one of whisper_english, basic, none")


# --------------------------------------------------------------------------- WER

def wer_counts(refs: list[str], hyps: list[str]) -> tuple[dict, list[dict]]:
    """Corpus and per-utterance S/D/I/hits for normalized texts, with their alignments.

    jiwer's ``process_words`` runs once over every utterance whose reference has words; an
    utterance whose reference is empty is handled here (all its hypothesis words are insertions),
    since jiwer versions differ on empty references. The corpus WER is checked against jiwer's.
    """
    import jiwer

    per_utt = [None] * len(refs)
    scored = [i for i, r in enumerate(refs) if r.split()]
    if scored:
        out = jiwer.process_words([refs[i] for i in scored], [hyps[i] for i in scored])
        for k, i in enumerate(scored):
            per_utt[i] = _utt_counts(out.references[k], out.hypotheses[k], out.alignments[k])
    for i, entry in enumerate(per_utt):
        if entry is None:  # empty reference: every hypothesis word is an insertion
            words = hyps[i].split()
            per_utt[i] = _utt_counts([], words, [("insert", 0, 0, 0, len(words))] if words else [])
    total = {k: sum(u[k] for u in per_utt) for k in ("sub", "del", "ins", "hits", "ref_words",
                                                     "hyp_words")}
    errors = total["sub"] + total["del"] + total["ins"]
    if total["ref_words"] == 0:
        raise ValueError("every reference is empty after normalization: WER is undefined "
                         "(check the manifest's text field and the normalizer)")
    total["wer"] = errors / total["ref_words"]
    if scored and len(scored) == len(refs):  # no empty reference: jiwer's own corpus numbers
        ours = (total["sub"], total["del"], total["ins"], total["hits"])
        theirs = (out.substitutions, out.deletions, out.insertions, out.hits)
        if ours != theirs or not math.isclose(total["wer"], out.wer):
            raise RuntimeError(f"per-utterance counts {ours} (WER {total['wer']}) disagree with "
                               f"jiwer's corpus counts {theirs} (WER {out.wer}): report this bug")
    total["sentences"] = len(refs)
    total["sentence_errors"] = sum(1 for u in per_utt if u["sub"] + u["del"] + u["ins"] > 0)
    total["ser"] = total["sentence_errors"] / len(refs)
    return total, per_utt


def _utt_counts(ref_words: list[str], hyp_words: list[str], chunks) -> dict:
    """Counts and aligned word columns of one utterance from jiwer alignment chunks.

    ``columns`` is a list of (ref word or None, hyp word or None, op) with op in C/S/D/I.
    """
    columns = []
    for chunk in chunks:
        kind, r0, r1, h0, h1 = (chunk if isinstance(chunk, tuple) else
                                (chunk.type, chunk.ref_start_idx, chunk.ref_end_idx,
                                 chunk.hyp_start_idx, chunk.hyp_end_idx))
        if kind in ("equal", "substitute"):
            op = "C" if kind == "equal" else "S"
            columns += [(ref_words[r], hyp_words[h], op) for r, h in zip(range(r0, r1), range(h0, h1))]
        elif kind == "delete":
            columns += [(ref_words[r], None, "D") for r in range(r0, r1)]
        elif kind == "insert":
            columns += [(None, hyp_words[h], "I") for h in range(h0, h1)]
        else:
            raise ValueError(f"unknown jiwer alignment type {kind!r}")
    ops = [c[2] for c in columns]
    return {"sub": ops.count("S"), "del": ops.count("D"), "ins": ops.count("I"),
            "hits": ops.count("C"), "ref_words": len(ref_words), "hyp_words": len(hyp_words),
            "columns": columns}


def format_alignment(utt: str, counts: dict) -> str:
    """One utterance as sclite prints it: id, scores, REF/HYP aligned column-wise, Eval markers.

    Errors are upper-cased; a gap is ``***``; Eval marks S, D and I under their column.
    """
    refs, hyps, evals = [], [], []
    for ref, hyp, op in counts["columns"]:
        r = "***" if ref is None else (ref if op == "C" else ref.upper())
        h = "***" if hyp is None else (hyp if op == "C" else hyp.upper())
        width = max(len(r), len(h))
        refs.append(r.ljust(width))
        hyps.append(h.ljust(width))
        evals.append(("" if op == "C" else op).ljust(width))
    n = counts["ref_words"]
    errs = counts["sub"] + counts["del"] + counts["ins"]
    rate = f"{100 * errs / n:.1f}%" if n else "n/a (empty reference)"
    return "\n".join([
        f"id: ({utt})",
        f"Scores: (#C #S #D #I) {counts['hits']} {counts['sub']} {counts['del']} {counts['ins']}"
        f"   ref words {n}, WER {rate}",
        "REF:  " + " ".join(refs).rstrip(),
        "HYP:  " + " ".join(hyps).rstrip(),
        ("Eval: " + " ".join(evals)).rstrip(),
        "",
    ])


def score_wer(ids: list[str], refs: dict[str, str], hyps: dict[str, str], normalizer: str,
              out_dir: str, missing: list[str]) -> dict:
    """WER fields for results.json; writes per_utt.jsonl and alignments.txt."""
    norm = get_normalizer(normalizer)
    ref_n = [norm(refs[u]) for u in ids]
    hyp_n = [norm(hyps.get(u, "")) for u in ids]
    total, per_utt = wer_counts(ref_n, hyp_n)
    missing_set = set(missing)

    lines, blocks = [], [
        f"# sclite-style alignments; normalizer: {normalizer}; upper case = error, *** = gap, "
        f"Eval: S substitution, D deletion, I insertion\n"]
    for u, r, h, c in zip(ids, ref_n, hyp_n, per_utt):
        rec = {"id": u, "sub": c["sub"], "del": c["del"], "ins": c["ins"], "hits": c["hits"],
               "ref_words": c["ref_words"], "hyp_words": c["hyp_words"],
               "wer": (c["sub"] + c["del"] + c["ins"]) / c["ref_words"] if c["ref_words"] else None,
               "ref": r, "hyp": h}
        if u in missing_set:
            rec["missing_hyp"] = True
        lines.append(json_text(rec))
        blocks.append(format_alignment(u, c))
    write_atomic(os.path.join(out_dir, "per_utt.jsonl"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(out_dir, "alignments.txt"), readable("\n".join(blocks)))

    return {"metric": "wer", "wer": total["wer"], "wer_pct": 100 * total["wer"],
            "sub": total["sub"], "del": total["del"], "ins": total["ins"], "hits": total["hits"],
            "ref_words": total["ref_words"], "hyp_words": total["hyp_words"],
            "sentences": total["sentences"], "sentence_errors": total["sentence_errors"],
            "ser": total["ser"], "normalizer": normalizer}


# --------------------------------------------------------------------------- BLEU / chrF

def score_bleu(ids: list[str], refs: dict[str, str], hyps: dict[str, str], out_dir: str,
               missing: list[str], tokenize: str | None = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu) with their signatures; writes per_utt.jsonl."""
    from sacrebleu.metrics import BLEU, CHRF

    sys_out = [hyps.get(u, "") for u in ids]
    ref_out = [refs[u] for u in ids]
    bleu_kw = {"tokenize": tokenize} if tokenize else {}
    bleu, chrf = BLEU(**bleu_kw), CHRF()
    b = bleu.corpus_score(sys_out, [ref_out])
    c = chrf.corpus_score(sys_out, [ref_out])

    sent_bleu = BLEU(effective_order=True, **bleu_kw)
    missing_set = set(missing)
    lines = []
    for u, h, r in zip(ids, sys_out, ref_out):
        rec = {"id": u, "bleu": sent_bleu.sentence_score(h, [r]).score,
               "chrf": chrf.sentence_score(h, [r]).score, "ref": r, "hyp": h}
        if u in missing_set:
            rec["missing_hyp"] = True
        lines.append(json_text(rec))
    write_atomic(os.path.join(out_dir, "per_utt.jsonl"), "\n".join(lines) + "\n")

    return {"metric": "bleu", "bleu": b.score, "chrf": c.score,
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()),
            "bleu_detail": str(b), "bleu_bp": b.bp, "bleu_precisions": list(b.precisions),
            "sys_len": b.sys_len, "ref_len": b.ref_len, "sentences": len(ids)}


# --------------------------------------------------------------------------- decode facts

def decode_facts(hyp_path: str, hyps: dict[str, dict]) -> dict:
    """decode.json beside the hyp file (if any), with tokens/s, compression ratio and decode speed
    filled in from the hyp records' ``tokens``/``duration``/``seconds`` where decode.json lacks them."""
    facts: dict = {}
    dec_path = os.path.join(os.path.dirname(os.path.abspath(hyp_path)), "decode.json")
    if os.path.exists(dec_path):
        with open(dec_path, encoding="utf-8") as fh:
            try:
                facts = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{dec_path}: not valid JSON ({e.msg}); re-run the decode stage "
                                 "or remove the file") from e
        if not isinstance(facts, dict):
            raise ValueError(f"{dec_path}: expected a JSON object")
    recs = list(hyps.values())
    tokens = _total(recs, "tokens")
    audio = _total(recs, "duration")
    seconds = _total(recs, "seconds")
    if facts.get("audio_tokens") is None and tokens is not None:
        facts["audio_tokens"] = tokens
    if facts.get("audio_seconds") is None and audio is not None:
        facts["audio_seconds"] = audio
    if facts.get("decode_seconds") is None and seconds is not None:
        facts["decode_seconds"] = seconds
    if facts.get("tokens_per_s") is None and tokens is not None and audio:
        facts["tokens_per_s"] = tokens / audio
    if (facts.get("compression_ratio") is None and facts.get("source_frame_rate")
            and facts.get("tokens_per_s")):
        facts["compression_ratio"] = facts["source_frame_rate"] / facts["tokens_per_s"]
    if facts.get("utt_per_s") is None and facts.get("decode_seconds"):
        facts["utt_per_s"] = len(recs) / facts["decode_seconds"]
    return facts


def _total(recs: list[dict], key: str) -> float | None:
    """Sum of a numeric field over all records, or None when any record lacks it."""
    vals = [r.get(key) for r in recs]
    if not vals or any(not isinstance(v, (int, float)) for v in vals):
        return None
    return sum(vals)


# --------------------------------------------------------------------------- output

def format_result(res: dict) -> str:
    """result.txt: the score and the facts every number carries, for a person."""
    def num(key, fmt, unit=""):
        v = res.get(key)
        return "n/a" if v is None else format(v, fmt) + unit

    lines = [f"hyp:        {res.get('hyp')}", f"ref:        {res.get('ref')}"]
    run = [f"{k} {res[k]}" for k in ("set", "method", "condition", "model", "backend")
           if res.get(k) is not None]
    if run:
        lines.append("run:        " + ", ".join(run))
    if res.get("params"):
        lines.append("params:     " + json.dumps(res["params"], sort_keys=True))
    if "lora" in res or "adapter" in res:
        lines.append(f"lora:       {'yes' if res.get('lora') else 'no'}"
                     + (f" (adapter {res['adapter']})" if res.get("adapter") else ""))
    if res["metric"] == "wer":
        lines += [
            f"WER:        {res['wer_pct']:.2f} %  [ (S {res['sub']} + D {res['del']} + I "
            f"{res['ins']}) / N {res['ref_words']} ]  hits {res['hits']}",
            f"normalizer: {res['normalizer']}",
            f"sentences:  {res['sentences']}, with errors {res['sentence_errors']} "
            f"(SER {100 * res['ser']:.1f} %)",
        ]
    else:
        lines += [f"BLEU:       {res['bleu']:.2f}   ({res['bleu_detail']})",
                  f"            signature {res['bleu_signature']}",
                  f"chrF:       {res['chrf']:.2f}   signature {res['chrf_signature']}",
                  f"sentences:  {res['sentences']}"]
    if res.get("missing_hyps"):
        lines.append(f"missing:    {res['missing_hyps']} reference(s) had no hypothesis and "
                     "were scored as empty")
    lines += [
        f"tokens/s fed to the decoder: {num('tokens_per_s', '.2f')}   "
        f"compression ratio: {num('compression_ratio', '.2f', 'x')}   "
        f"(source {num('source_frame_rate', '.1f', ' frames/s')})",
        f"decode speed: {num('utt_per_s', '.3f', ' utt/s')}   "
        f"decode seconds {num('decode_seconds', '.1f')}   audio seconds {num('audio_seconds', '.1f')}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point

def score(hyp_path: str, ref_manifest: str, metric: str = "wer", out_dir: str | None = None,
          normalizer: str = "auto", on_missing: str = "fail", tokenize: str | None = None) -> dict:
    """Scores ``hyp_path`` against ``ref_manifest`` and writes results.json, result.txt, per_utt.jsonl
    (and alignments.txt for WER) into ``out_dir`` (default: the hyp file's directory).

    ``metric``: ``wer`` (manifest ``text``, jiwer after ``normalizer``) or ``bleu`` (manifest
    ``target``; BLEU and chrF with sacrebleu, ``tokenize`` defaulting to sacrebleu's '13a').
    ``on_missing``: ``fail`` or ``empty`` (score references without a hypothesis as empty ones).
    Returns the dict written to results.json.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {', '.join(NORMALIZERS)}")
    if tokenize and metric != "bleu":
        raise ValueError("tokenize applies to metric 'bleu' only")
    hyp_recs, no_hyp = read_hyps(hyp_path)
    refs, langs = read_refs(ref_manifest, "text" if metric == "wer" else "target")
    if not refs:
        raise ValueError(f"{ref_manifest}: no utterances to score")
    ids, missing = pair_up(hyp_recs, no_hyp, refs, hyp_path, ref_manifest, on_missing)
    hyps = {u: r["hyp"] for u, r in hyp_recs.items() if u not in no_hyp}
    out_dir = out_dir or os.path.dirname(os.path.abspath(hyp_path))
    os.makedirs(out_dir, exist_ok=True)

    if metric == "wer":
        name = resolve_normalizer(normalizer, [langs[u] for u in ids])
        fields = score_wer(ids, refs, hyps, name, out_dir, missing)
        fields["alignments"] = os.path.abspath(os.path.join(out_dir, "alignments.txt"))
    else:
        fields = score_bleu(ids, refs, hyps, out_dir, missing, tokenize)
    fields["per_utt"] = os.path.abspath(os.path.join(out_dir, "per_utt.jsonl"))
    fields["missing_hyps"] = len(missing)

    res = decode_facts(hyp_path, hyp_recs)
    res.update(fields)
    res["hyp"] = os.path.abspath(hyp_path)
    res["hyp_sha256"] = file_sha256(hyp_path)  # report skips a result whose hyps changed since
    res["ref"] = os.path.abspath(ref_manifest)
    # a path that is not UTF-8 (a directory named with byte 0xff): escaped, not an error
    write_atomic(os.path.join(out_dir, "results.json"), json_text(res, indent=2) + "\n")
    write_atomic(os.path.join(out_dir, "result.txt"), readable(format_result(res)))
    return res
