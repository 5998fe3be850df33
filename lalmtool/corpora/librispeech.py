"""LibriSpeech in its distributed layout → one manifest per subset.

Layout (as unpacked from openslr.org/12)::

    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   # "<utt-id> WORDS ..." per line

Records: ``id`` (the file name's stem, e.g. ``1089-134686-0000``), ``audio`` (absolute path),
``duration`` (seconds, from the FLAC header: nothing is decoded), ``text``, ``lang`` ("en"),
``speaker``. LibriSpeech transcripts are upper case without punctuation; ``text_case`` decides
what the manifest (the training target and the reference) holds: ``lower`` (default: closer to
what Whisper and LLM decoders write, so LoRA does not spend steps learning capitals) or ``keep``.
Either way ``lalmtool score`` compares with Whisper's English normaliser on both sides
(``lang`` "en"), so case and punctuation never count as errors.

Problems, each named by file and line: a transcript line whose audio is missing, audio with no
transcript line, an empty transcript, an unreadable or empty audio file, an utterance id that
does not belong to its chapter's transcript, a duplicate id.
"""
from __future__ import annotations

import os

from . import Problem, audio_duration, finish_set, id_problem, reuse_set, PREPARE_VERSION

TEXT_CASES = ("lower", "keep")
AUDIO_EXT = ".flac"


def scan_subset(subset_dir: str, text_case: str = "lower") -> tuple[list[dict], list[Problem]]:
    """Records and problems of one subset directory (every chapter read, all problems listed)."""
    if text_case not in TEXT_CASES:
        raise ValueError(f"text_case must be one of {', '.join(TEXT_CASES)}, not {text_case!r}")
    records, problems, seen = [], [], set()
    for chapter_dir in _chapter_dirs(subset_dir):
        texts, trans = {}, None
        names = sorted(os.listdir(chapter_dir))
        for name in names:
            if name.endswith(".trans.txt"):
                trans = os.path.join(chapter_dir, name)
                texts.update(_read_transcript(trans, problems))
        audio = {n[: -len(AUDIO_EXT)]: os.path.join(chapter_dir, n)
                 for n in names if n.endswith(AUDIO_EXT)}
        for utt, (text, lineno) in texts.items():
            if utt not in audio:
                problems.append(Problem(trans, lineno, f"transcript of {utt} but no audio "
                                        f"{utt}{AUDIO_EXT} in {chapter_dir}", utt))
        for utt, path in sorted(audio.items()):
            if utt not in texts:
                where = f"in {trans}" if trans else f"(no *.trans.txt in {chapter_dir})"
                problems.append(Problem(path, None, f"audio without a transcript line {where}",
                                        utt))
                continue
            text, lineno = texts[utt]
            why = id_problem(utt) or ("duplicate utterance id" if utt in seen else None)
            if why:
                problems.append(Problem(trans, lineno, why, utt))
                continue
            seen.add(utt)
            duration, why = audio_duration(path)
            if why:
                problems.append(Problem(path, None, why, utt))
                continue
            records.append({"id": utt, "audio": os.path.abspath(path), "duration": duration,
                            "text": text.lower() if text_case == "lower" else text,
                            "lang": "en", "speaker": utt.split("-")[0]})
    return records, problems


def _chapter_dirs(subset_dir: str) -> list[str]:
    if not os.path.isdir(subset_dir):
        raise FileNotFoundError(f"LibriSpeech subset not found: {subset_dir} (expected "
                                "ROOT/<subset>/<speaker>/<chapter>/, e.g. ROOT/dev-clean)")
    out = []
    for spk in sorted(os.listdir(subset_dir)):
        spk_dir = os.path.join(subset_dir, spk)
        if os.path.isdir(spk_dir):
            out += [os.path.join(spk_dir, ch) for ch in sorted(os.listdir(spk_dir))
                    if os.path.isdir(os.path.join(spk_dir, ch))]
    return out


def _read_transcript(path: str, problems: list[Problem]) -> dict[str, tuple[str, int]]:
    """``{utt: (text, line number)}``; bad lines go to ``problems``."""
    chapter = os.path.basename(path)[: -len(".trans.txt")]
    out = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                problems.append(Problem(path, lineno, f"not valid UTF-8 ({e.reason})"))
                continue
            if not line:
                continue
            utt, _, text = line.partition(" ")
            text = " ".join(text.split())
            if not utt.startswith(chapter + "-"):
                problems.append(Problem(path, lineno, f"utterance {utt!r} does not belong to "
                                        f"chapter {chapter}", utt))
            elif not text:
                problems.append(Problem(path, lineno, f"empty transcript for {utt}", utt))
            elif utt in out:
                problems.append(Problem(path, lineno, f"{utt} is listed twice (first on line "
                                        f"{out[utt][1]})", utt))
            else:
                out[utt] = (text, lineno)
    return out


def prepare_librispeech(root: str, subsets: list[str], out: str, text_case: str = "lower",
                        on_error: str = "fail", force: bool = False) -> list[dict]:
    """Writes ``out/<subset>/manifest.jsonl`` for each subset; returns one summary per subset."""
    if not subsets:
        raise ValueError("no LibriSpeech subsets given (e.g. dev-clean test-clean)")
    root = os.path.abspath(root)
    _check_subsets(root, subsets)
    summaries = []
    for subset in subsets:
        out_dir = os.path.join(out, subset)
        params = {"corpus": "librispeech", "root": root, "subset": subset,
                  "text_case": text_case, "on_error": on_error, "version": PREPARE_VERSION}
        done = None if force else reuse_set(out_dir, params)
        if done:
            summaries.append(done)
            continue
        records, problems = scan_subset(os.path.join(root, subset), text_case)
        summaries.append(finish_set(out_dir, records, problems, on_error, params,
                                    f"LibriSpeech {os.path.join(root, subset)}"))
    return summaries


def _check_subsets(root: str, subsets: list[str]) -> None:
    """FileNotFoundError naming every subset missing from ``root`` (and those it holds), before
    anything is written."""
    missing = [s for s in subsets if not os.path.isdir(os.path.join(root, s))]
    if missing:
        there = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
            if os.path.isdir(root) else []
        raise FileNotFoundError(
            f"LibriSpeech subset(s) {', '.join(missing)} not found in {root} (it holds: "
            f"{', '.join(there) or 'no subset'}); give --subsets only subsets that are there")
