"""Corpus preparation: a corpus in its distributed layout → manifests (``lalmtool prepare``).

One module per corpus (``librispeech``, ``covost2``), each turning the files it finds into
manifest records (``id``, ``audio``, ``duration``, ``text``, and for translation ``target``,
``lang``, ``target_lang``) and listing every problem with the file and line it comes from.
What they share lives here: problems, the fail/skip policy, and writing a prepared set.

A prepared set is ``OUT/<set>/manifest.jsonl`` (written atomically, sorted by id), beside it
``skipped.jsonl`` (what ``on_error="skip"`` left out, with file, line and reason) and
``prepare.json`` (the options and source that made it). A rerun with the same options returns
the existing set without reading the corpus again; other options rebuild it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import soundfile as sf

from .. import record
from ..fileio import write_atomic
from ..store import check_dataset_name

PREPARE_VERSION = 2  # bump when a change here changes what a prepared set holds
MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One bad piece of corpus input: where it is (file, line if any) and what is wrong."""

    file: str
    line: int | None
    message: str
    id: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"

    def to_json(self) -> dict:
        return {k: v for k, v in {"id": self.id, "file": self.file, "line": self.line,
                                  "error": self.message}.items() if v is not None}


class CorpusError(ValueError):
    """Corpus input with problems: every problem, one per line, and what to do about it."""

    def __init__(self, problems: list[Problem], what: str):
        self.problems = problems
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = (f"\n  ... and {len(problems) - MAX_LISTED} more"
                if len(problems) > MAX_LISTED else "")
        super().__init__(f"{what}: {len(problems)} problem(s):\n{listed}{more}\nFix the corpus, "
                         "or pass --on-error skip to leave these utterances out (they are "
                         "listed in skipped.jsonl).")


def audio_duration(path: str) -> tuple[float | None, str | None]:
    """(seconds from the file header, None) or (None, why the file is unusable)."""
    if not os.path.isfile(path):
        return None, f"audio file not found: {path}"
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types for corrupt files
        return None, f"unreadable audio {path}: {str(e).strip()}"
    if info.frames <= 0 or info.samplerate <= 0:
        return None, f"zero-length audio: {path}"
    return round(info.frames / info.samplerate, 3), None


def id_problem(utt: str) -> str | None:
    why = check_dataset_name(utt)
    return f"utterance id {utt!r} is unusable ({why})" if why else None


def check_set(records: list[dict], problems: list[Problem], on_error: str, what: str) -> None:
    """Raises CorpusError where ``finish_set`` would write no set (a problem under
    ``on_error="fail"``, or no utterance at all)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if problems and on_error == "fail":
        raise CorpusError(problems, what)
    if not records:
        raise CorpusError(problems or [Problem(what, None, "no utterances found")], what)


def finish_set(out_dir: str, records: list[dict], problems: list[Problem], on_error: str,
               params: dict, what: str) -> dict:
    """Raises CorpusError (``on_error="fail"``) or writes the set with its skipped list.

    Records named by a problem (by ``id``) are left out; returns the set's summary.
    """
    check_set(records, problems, on_error, what)
    bad = {p.id for p in problems if p.id}
    keep = sorted((r for r in records if r["id"] not in bad), key=lambda r: r["id"])
    manifest = os.path.join(out_dir, "manifest.jsonl")
    write_atomic(os.path.join(out_dir, "skipped.jsonl"),
                 "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in problems))
    write_atomic(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    summary = {"set": os.path.basename(os.path.normpath(out_dir)), "manifest": manifest,
               "utterances": len(keep), "hours": round(sum(r["duration"] for r in keep) / 3600, 4),
               "skipped": len(problems), "reused": False}
    write_atomic(os.path.join(out_dir, "prepare.json"),
                 json.dumps({"params": params, "summary": summary}, indent=1) + "\n")
    return summary


def reuse_set(out_dir: str, params: dict) -> dict | None:
    """The summary of a set already prepared with ``params`` (and its manifest intact), or None
    (what differs is logged: the set is prepared again)."""
    try:
        done = record.read(os.path.join(out_dir, "prepare.json"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or not os.path.exists(os.path.join(out_dir, "manifest.jsonl")):
        return None
    diffs = record.differences({"config": done.get("params") or {}}, {"config": params})
    if diffs:
        logging.getLogger("lalmtool").info("%s was prepared with other settings (%s); preparing "
                                           "it again", out_dir, "; ".join(diffs))
        return None
    return {**done["summary"], "reused": True}