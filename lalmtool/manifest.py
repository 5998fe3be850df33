"""Manifests: JSON Lines, one utterance per line.

Fields: ``id``, ``audio`` (path; relative paths resolve against the manifest's directory),
``text``, and optionally ``duration`` (seconds; computed from the audio header when missing),
``target`` (translation) and ``lang``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import soundfile as sf

from .store import check_dataset_name


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` lists every one of them as (utterance, message)."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path, self.problems = path, problems
        lines = [f"  {utt}: {msg}" for utt, msg in problems[:50]]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{path}: {len(problems)} problem(s):\n" + "\n".join(lines) + more
            + "\nFix the manifest, or pass --on-error skip to leave these utterances out "
              "(they are listed in skipped.jsonl)."
        )


@dataclass
class Utterance:
    id: str
    audio: str
    text: str = ""
    duration: float | None = None
    target: str | None = None
    lang: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None},
                          ensure_ascii=False)


def read_manifest(path: str) -> tuple[list[Utterance], list[tuple[str, str]]]:
    """Parses a manifest; returns the utterances and the problems found while parsing.

    Every line is read even when earlier lines are bad, so that all problems come at once.
    """
    base = os.path.dirname(os.path.abspath(path))
    utts, problems = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((where, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((where, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(rec, dict) or "id" not in rec or "audio" not in rec:
                problems.append((where, "needs at least the fields 'id' and 'audio'"))
                continue
            audio = str(rec["audio"])
            if not os.path.isabs(audio):
                audio = os.path.join(base, audio)
            dur = rec.get("duration")
            utts.append(Utterance(
                id=str(rec["id"]), audio=audio, text=rec.get("text", "") or "",
                duration=float(dur) if dur is not None else None,
                target=rec.get("target"), lang=rec.get("lang"),
            ))
    return utts, problems


def validate(utts: list[Utterance], need_text: bool = True,
             check_audio: bool = True) -> list[tuple[str, str]]:
    """Every problem with a list of utterances, as (utterance id, message)."""
    problems, seen = [], set()
    for u in utts:
        if u.id in seen:
            problems.append((u.id, "duplicate id"))
        seen.add(u.id)
        why = check_dataset_name(u.id)
        if why:
            problems.append((repr(u.id), f"id unusable as a dataset name: {why}"))
        if need_text and not u.text.strip():
            problems.append((u.id, "empty text"))
        if check_audio:
            why = audio_problem(u.audio)
            if why:
                problems.append((u.id, why))
    return problems


def audio_problem(path: str) -> str | None:
    """Why an audio file cannot be used (missing, unreadable, empty), or None."""
    if not os.path.exists(path):
        return f"audio file not found: {path}"
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types for corrupt files
        return f"unreadable audio {path}: {e}"
    if info.frames == 0:
        return f"zero-length audio: {path}"
    return None


def load_manifest(path: str, on_error: str = "fail", need_text: bool = True,
                  check_audio: bool = True) -> tuple[list[Utterance], list[dict]]:
    """Reads and validates a manifest.

    ``on_error="fail"`` raises ManifestError listing every problem; ``"skip"`` drops the bad
    utterances and returns them as ``[{"id", "error"}]``. Durations missing from the manifest
    are read from the audio headers.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    utts, problems = read_manifest(path)
    problems += validate(utts, need_text=need_text, check_audio=check_audio)
    if problems and on_error == "fail":
        raise ManifestError(path, problems)
    bad = {p[0] for p in problems}
    skipped = [{"id": utt, "error": msg} for utt, msg in problems]
    keep, kept_ids = [], set()
    for u in utts:
        if u.id in bad or repr(u.id) in bad or u.id in kept_ids:
            continue
        kept_ids.add(u.id)
        if u.duration is None and check_audio:
            info = sf.info(u.audio)
            u.duration = info.frames / info.samplerate
        keep.append(u)
    return keep, skipped


def write_manifest(path: str, utts: list[Utterance]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for u in utts:
            fh.write(u.to_json() + "\n")
    os.replace(tmp, path)


def from_kaldi(data_dir: str) -> list[Utterance]:
    """Reads a Kaldi data directory (``wav.scp`` + ``text``; ``segments`` is not supported).

    ``wav.scp`` entries must be plain file paths (piped commands are refused with a clear error).
    """
    if os.path.exists(os.path.join(data_dir, "segments")):
        raise ManifestError(data_dir, [("segments", "Kaldi 'segments' files are not supported; "
                                        "cut the audio into one file per utterance first")])
    wavs = _read_kaldi_table(os.path.join(data_dir, "wav.scp"))
    texts = _read_kaldi_table(os.path.join(data_dir, "text"))
    problems = []
    for utt, path in wavs.items():
        if path.rstrip().endswith("|"):
            problems.append((utt, f"wav.scp entry is a command, not a file: {path!r}"))
        if utt not in texts:
            problems.append((utt, "in wav.scp but not in text"))
    problems += [(utt, "in text but not in wav.scp") for utt in texts if utt not in wavs]
    if problems:
        raise ManifestError(data_dir, problems)
    # relative paths are relative to the directory the Kaldi scripts run in, as in Kaldi
    return [Utterance(id=u, audio=os.path.abspath(p), text=texts[u]) for u, p in wavs.items()]


def _read_kaldi_table(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Kaldi data directory lacks {os.path.basename(path)}: {path}")
    table = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(maxsplit=1)
            if parts:
                table[parts[0]] = parts[1] if len(parts) > 1 else ""
    return table
