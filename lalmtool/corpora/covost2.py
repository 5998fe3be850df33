"""CoVoST 2 (speech translation over Common Voice clips) → one manifest per split.

Inputs, as distributed::

    CV_ROOT/clips/<name>.mp3                        # the Common Voice release of the source language
    COVOST_ROOT/covost_v2.<src>_<tgt>.tsv           # columns: path sentence translation client_id split

The TSV is read as the official CoVoST loader reads it (tab-separated, a header line,
``quoting=csv.QUOTE_NONE`` with ``\\`` as escape character): quotes inside sentences are plain
characters. ``split`` is ``train``, ``dev`` or ``test``; ``train_covost`` rows (CoVoST's
additional training data) count as ``train``.

Records: ``id`` (the clip name without extension), ``audio`` (absolute path), ``duration``
(seconds, from the MP3 header: nothing is decoded), ``text`` (the source transcript, for WER),
``target`` (the translation, for BLEU/chrF and as the training target), ``lang`` (source
language), ``target_lang``, ``speaker`` (Common Voice client id).

Problems, each named by TSV line: a row pointing at a missing or unreadable clip, an empty
translation or transcript, a row with the wrong number of columns, an unknown split, a clip
listed twice.
"""
from __future__ import annotations

import csv
import os

from . import Problem, audio_duration, finish_set, id_problem, reuse_set, PREPARE_VERSION

COLUMNS = ("path", "sentence", "translation", "client_id", "split")
SPLITS = {"train": "train", "train_covost": "train", "dev": "dev", "test": "test"}


def tsv_path(covost_root: str, src_lang: str, tgt_lang: str) -> str:
    path = os.path.join(covost_root, f"covost_v2.{src_lang}_{tgt_lang}.tsv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CoVoST 2 table not found: {path} (unpack "
                                f"covost_v2.{src_lang}_{tgt_lang}.tsv.tar.gz into --covost_root)")
    return path


def read_rows(path: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """``[(line number, row)]`` of the TSV and the malformed lines."""
    rows, problems = [], []
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file (expected a header: {' '.join(COLUMNS)})")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                             f"(has: {' '.join(header)})")
        col = {c: header.index(c) for c in COLUMNS}
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                problems.append(Problem(path, reader.line_num, f"unreadable line ({e})"))
                continue
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                problems.append(Problem(path, reader.line_num, f"{len(fields)} columns, expected "
                                        f"{len(header)} ({' '.join(header)})"))
                continue
            rows.append((reader.line_num, {c: fields[i] for c, i in col.items()}))
    return rows, problems


def scan_tsv(path: str, cv_root: str, src_lang: str, tgt_lang: str,
             splits: list[str]) -> dict[str, tuple[list[dict], list[Problem]]]:
    """Records and problems by split (only the splits asked for are checked)."""
    rows, bad_lines = read_rows(path)
    out = {s: ([], []) for s in splits}
    clips = os.path.join(cv_root, "clips")
    if not os.path.isdir(clips):
        raise FileNotFoundError(f"Common Voice clips not found: {clips} (--cv_root must hold "
                                f"clips/*.mp3 of the {src_lang!r} release)")
    seen: dict[str, int] = {}
    for lineno, row in rows:
        split = SPLITS.get(row["split"])
        if split is None:
            bad_lines.append(Problem(path, lineno, f"unknown split {row['split']!r} (expected "
                                     f"{', '.join(SPLITS)})"))
            continue
        if split not in out:
            continue
        records, problems = out[split]
        utt = os.path.splitext(row["path"])[0]

        def bad(msg: str) -> None:
            problems.append(Problem(path, lineno, msg, utt))

        if not row["path"] or id_problem(utt):
            bad(id_problem(utt) or "empty path")
            continue
        if utt in seen:
            bad(f"clip {row['path']} is listed twice (first on line {seen[utt]})")
            continue
        seen[utt] = lineno
        text, target = " ".join(row["sentence"].split()), " ".join(row["translation"].split())
        if not target:
            bad(f"empty translation for {row['path']}")
            continue
        if not text:
            bad(f"empty transcript (sentence) for {row['path']}")
            continue
        audio = os.path.join(clips, row["path"])
        duration, why = audio_duration(audio)
        if why:
            bad(f"{why} (row for clip {row['path']})")
            continue
        records.append({"id": utt, "audio": os.path.abspath(audio), "duration": duration,
                        "text": text, "target": target, "lang": src_lang,
                        "target_lang": tgt_lang, "speaker": row["client_id"]})
    for split in out:  # malformed lines belong to no split: every split reports them
        out[split][1].extend(bad_lines)
    return out


def prepare_covost2(cv_root: str, covost_root: str, src_lang: str, tgt_lang: str, out: str,
                    splits: list[str] = ("train", "dev", "test"), on_error: str = "fail",
                    force: bool = False) -> list[dict]:
    """Writes ``out/<split>/manifest.jsonl`` for each split; returns one summary per split."""
    unknown = [s for s in splits if s not in ("train", "dev", "test")]
    if unknown or not splits:
        raise ValueError(f"splits must be among train, dev, test (got {' '.join(splits) or 'none'})")
    path = tsv_path(covost_root, src_lang, tgt_lang)
    stat = os.stat(path)
    base = {"corpus": "covost2", "cv_root": os.path.abspath(cv_root), "tsv": os.path.abspath(path),
            "tsv_size": stat.st_size, "tsv_mtime": int(stat.st_mtime), "src_lang": src_lang,
            "tgt_lang": tgt_lang, "on_error": on_error, "version": PREPARE_VERSION}
    todo = {s: {**base, "split": s} for s in splits}
    done = {s: None if force else reuse_set(os.path.join(out, s), p) for s, p in todo.items()}
    scanned = (scan_tsv(path, cv_root, src_lang, tgt_lang, [s for s in splits if not done[s]])
               if not all(done.values()) else {})
    summaries = []
    for s in splits:
        if done[s]:
            summaries.append(done[s])
            continue
        records, problems = scanned[s]
        summaries.append(finish_set(os.path.join(out, s), records, problems, on_error, todo[s],
                                    f"CoVoST 2 {os.path.basename(path)} split {s}"))
    return summaries
