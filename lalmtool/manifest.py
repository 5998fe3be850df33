"""Manifests: JSON Lines, one utterance per line.

Fields: ``id``, ``audio`` (path; relative paths resolve against the manifest's directory),
``text``, and optionally ``duration`` (seconds; computed from the audio header when missing),
``target`` (translation) and ``lang``.

A record with ``offset`` (seconds, >= 0) is a span of its audio file: the utterance is the
``duration`` seconds (then required) starting at ``offset``, and only that span is read (a cut
inside a long recording, as lhotse writes them). Without ``offset`` the whole file is the
utterance and ``duration`` only describes it, as before.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import soundfile as sf

from .audio import header_problem, span_problem
from .fileio import iter_jsonl, write_atomic
from .store import check_dataset_name


log = logging.getLogger("lalmtool")

#: Seconds by which a stated ``duration`` may differ from its audio file's (no ``offset``: the
#: whole file is the utterance) before ``load_manifest`` names the utterance.
DURATION_TOLERANCE = 0.1

HINT = ("Fix the manifest (`lalmtool extract --on-error skip` leaves such utterances out and "
        "lists them in skipped.jsonl).")


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` lists every one of them as (utterance, message)."""

    def __init__(self, path: str, problems: list[tuple[str, str]], hint: str = HINT):
        self.path, self.problems = path, problems
        lines = [f"  {utt}: {msg}" for utt, msg in problems[:50]]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(lines) + more
                         + (f"\n{hint}" if hint else ""))


@dataclass
class Utterance:
    id: str
    audio: str
    text: str = ""
    duration: float | None = None
    target: str | None = None
    lang: str | None = None
    offset: float | None = None  # seconds: the utterance is audio[offset, offset + duration)
    line: int | None = field(default=None, repr=False, compare=False)  # in its manifest
    #: seconds of audio the utterance is (its file's length, or its span's), as
    #: ``load_manifest`` found them; None when the audio was not checked
    audio_seconds: float | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items()
                           if v is not None and k not in ("line", "audio_seconds")},
                          ensure_ascii=False)


def _kind(v) -> str:
    return "null" if v is None else "a list" if isinstance(v, list) else (
        "an object" if isinstance(v, dict) else repr(v))


def _field_problems(rec: dict) -> list[str]:
    """What is wrong with the fields of one parsed line (its id is known to be usable)."""
    out = []
    if not isinstance(rec["audio"], str) or not rec["audio"].strip():
        out.append(f"'audio' must be a file path, got {_kind(rec['audio'])}")
    for key in ("text", "target", "lang"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            out.append(f"'{key}' must be a string, got {_kind(rec[key])}")
    dur = rec.get("duration")
    if dur is not None:
        try:
            if isinstance(dur, bool) or not isinstance(dur, (int, float, str)):
                raise TypeError
            sec = float(dur)
        except (TypeError, ValueError):
            out.append(f"'duration' must be a number of seconds, got {_kind(dur)}")
        else:
            if not (math.isfinite(sec) and sec > 0):
                out.append(f"'duration' must be a finite number of seconds > 0, got {_kind(dur)}")
    if rec.get("offset") is not None:
        out += _offset_problems(rec["offset"], dur)
    return out


def _offset_problems(offset, duration) -> list[str]:
    """What is wrong with a span's ``offset`` (a number of seconds >= 0, with a duration)."""
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not (
            math.isfinite(offset) and offset >= 0):
        return [f"'offset' must be a finite number of seconds >= 0, got {_kind(offset)}"]
    if duration is None:
        return ["'offset' needs 'duration' (the span's length in seconds)"]
    return []


def read_manifest(path: str) -> tuple[list[Utterance], list[tuple[str, str]]]:
    """Parses a manifest; returns the utterances and the problems found while parsing.

    Every line is read even when earlier lines are bad, so that all problems come at once. A
    problem is keyed by the utterance id when the line has a usable one, else by "line N"; its
    message starts with the line number. A UTF-8 byte order mark and CRLF line ends are fine.
    """
    base = os.path.dirname(os.path.abspath(path))
    utts, problems = [], []
    for lineno, rec, problem in iter_jsonl(path):
        where = f"line {lineno}"
        if problem:
            problems.append((where, problem))
            continue
        missing = [k for k in ("id", "audio") if k not in rec]
        if missing:
            problems.append((where, f"missing {' and '.join(repr(k) for k in missing)}"))
            continue
        uid = rec["id"]
        if isinstance(uid, int) and not isinstance(uid, bool):
            uid = str(uid)
        if not isinstance(uid, str):
            problems.append((where, f"'id' must be a string, got {_kind(uid)}"))
            continue
        bad = _field_problems(rec)
        if bad:
            problems += [(uid, f"{where}: {msg}") for msg in bad]
            continue
        audio = rec["audio"] if os.path.isabs(rec["audio"]) else os.path.join(base, rec["audio"])
        dur, offset = rec.get("duration"), rec.get("offset")
        utts.append(Utterance(
            id=uid, audio=audio, text=rec.get("text") or "",
            duration=float(dur) if dur is not None else None,
            target=rec.get("target"), lang=rec.get("lang"),
            offset=float(offset) if offset is not None else None, line=lineno,
        ))
    return utts, problems


def _indexed_problems(utts: list[Utterance], need_text: bool,
                      check_audio: bool) -> list[tuple[int, str, str]]:
    """(index in ``utts``, id, message) of every problem; a repeated id is a problem of the
    later copies only."""
    problems, first = [], {}
    for i, u in enumerate(utts):
        at = f"line {u.line}: " if u.line else ""
        if u.id in first:
            problems.append((i, u.id, f"{at}duplicate id (first on line {first[u.id]})"))
            continue
        first[u.id] = u.line
        why = check_dataset_name(u.id)
        if why:
            problems.append((i, repr(u.id), f"{at}id unusable as a dataset name: {why}"))
        if need_text and not u.text.strip():
            problems.append((i, u.id, f"{at}empty text"))
        if check_audio:
            why = audio_problem(u.audio, u.offset, u.duration)
            if why:
                problems.append((i, u.id, f"{at}{why}"))
    return problems


def validate(utts: list[Utterance], need_text: bool = True,
             check_audio: bool = True) -> list[tuple[str, str]]:
    """Every problem with a list of utterances, as (utterance id, message)."""
    return [(utt, msg) for _, utt, msg in _indexed_problems(utts, need_text, check_audio)]


def audio_problem(path: str, offset: float | None = None,
                  duration: float | None = None) -> str | None:
    """Why an audio file (or its span ``offset`` + ``duration`` seconds) cannot be used
    (missing, unreadable, empty, truncated, a span beyond its end), or None."""
    if os.path.isdir(path):
        return f"audio path is a directory: {path}"
    if not os.path.exists(path):
        return f"audio file not found: {path}"
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types for corrupt files
        return f"unreadable audio {path}: {e}"
    if info.frames == 0:
        return f"zero-length audio: {path}"
    if offset is not None:
        why = span_problem(path, info.frames, info.samplerate, offset, duration)
        if why:
            return why
    return header_problem(path)


def load_manifest(path: str, on_error: str = "fail", need_text: bool = True,
                  check_audio: bool = True) -> tuple[list[Utterance], list[dict]]:
    """Reads and validates a manifest.

    ``on_error="fail"`` raises ManifestError listing every problem; ``"skip"`` drops the bad
    utterances (of a repeated id, the later copies) and returns them as ``[{"id", "error"}]``,
    the id a plain string ("line N" for a line without a usable one). Durations missing from
    the manifest are read from the audio headers. A manifest without any utterance is an error.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if os.path.isdir(path):
        raise ManifestError(path, [("manifest", "is a directory; give a .jsonl file")], hint="")
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    utts, parse_problems = read_manifest(path)
    found = _indexed_problems(utts, need_text, check_audio)
    problems = parse_problems + [(utt, msg) for _, utt, msg in found]
    if not utts and not problems:
        raise ManifestError(path, [("manifest", "has no utterances (the file is empty)")],
                            hint="Give a manifest with one JSON object per line.")
    if problems and on_error == "fail":
        raise ManifestError(path, problems)
    skipped = [{"id": utt, "error": msg} for utt, msg in parse_problems]
    bad: dict[int, list[str]] = {}
    for i, _, msg in found:
        bad.setdefault(i, []).append(msg)
    keep, differ = [], []
    for i, u in enumerate(utts):
        if i in bad:
            skipped.append({"id": u.id, "error": "; ".join(bad[i])})
            continue
        if check_audio and u.offset is None:  # the whole file is the utterance
            info = sf.info(u.audio)
            u.audio_seconds = info.frames / info.samplerate
            if u.duration is None:
                u.duration = u.audio_seconds
            elif abs(u.duration - u.audio_seconds) > DURATION_TOLERANCE:
                differ.append(u)
        elif check_audio:
            u.audio_seconds = u.duration
        keep.append(u)
    if differ:
        log.warning("%s", duration_warning(path, differ))
    return keep, skipped


def duration_warning(path: str, differ: list[Utterance]) -> str:
    """What ``load_manifest`` says of utterances whose stated duration is not their file's."""
    listed = ", ".join(f"{u.id} (line {u.line}: stated {u.duration:g} s, file "
                       f"{u.audio_seconds:g} s)" for u in differ[:10])
    more = f" ... and {len(differ) - 10} more" if len(differ) > 10 else ""
    return (f"{path}: {len(differ)} utterance(s) state a 'duration' that differs from their "
            f"audio file's by more than {DURATION_TOLERANCE:g} s: {listed}{more}; without "
            "'offset' the whole file is the utterance (read whole, and counted at the file's "
            "length): give 'offset' to use a span of the file, or correct 'duration'")


def audio_hours(utts: list[Utterance]) -> float:
    """Hours of audio the utterances are: from their files (spans: their durations) where
    ``load_manifest`` read them, else from the stated durations."""
    return sum((u.audio_seconds if u.audio_seconds is not None else u.duration) or 0.0
               for u in utts) / 3600


def write_manifest(path: str, utts: list[Utterance]) -> None:
    """Writes ``utts`` to ``path`` atomically (nothing half-written is left on a failure)."""
    write_atomic(path, "".join(u.to_json() + "\n" for u in utts))


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


def field_values(manifest: str, key: str, ids: list[str], option: str) -> dict[str, object]:
    """Utterance id → its manifest field ``key`` (named by ``option`` in messages, e.g.
    ``concat_group``); every id must have one."""
    from .fileio import iter_jsonl

    values = {}
    for _, rec, problem in iter_jsonl(manifest):
        if not problem and isinstance(rec, dict) and "id" in rec:
            values[str(rec["id"])] = rec.get(key)
    missing = [u for u in ids if values.get(u) is None]
    if missing:
        raise ValueError(f"{option} {key!r}: {len(missing)} utterance(s) of {manifest} have "
                         f"no {key!r} field (e.g. {missing[:3]}); add it, or set {option} "
                         "to a field every line has (or leave it out)")
    return {u: values[u] for u in ids}
