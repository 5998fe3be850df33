"""A local Hugging Face ``datasets`` dataset (one split) → one manifest.

Sources, local only (nothing is downloaded; a path that does not exist is an error):

* a directory written by ``save_to_disk`` (``dataset_dict.json``: ``--split`` picks one of its
  splits; ``state.json``: a single split, taken whole when it is the ``--split`` asked for or
  records no split), opened with ``datasets.load_from_disk``
  (memory-mapped, no copy);
* Parquet or Arrow files: one file, or a directory of them in the Hub's layouts
  (``data/<split>-00000-of-00002.parquet``, ``<config>/<split>/0000.parquet``, ...), read as a
  stream (no cache copy). The split's files are those under ``<path>/<split>/`` when that folder
  exists (so the Hub's per-config folders, e.g. LibriSpeech's ``all/train.clean.100/`` or
  ``clean/validation/``, give exactly the split named), else those ``datasets``' own split
  patterns find.

The audio column is an ``Audio`` feature (or the same ``{bytes, path}`` struct) and is never
decoded by ``datasets`` (that needs torchcodec/FFmpeg): each row's bytes are identified with
soundfile and **written once, byte for byte, to ``OUT/audio/<id>.<ext>``** (``.flac``, ``.wav``,
``.mp3``, ``.ogg`` after their format), so extract reads exactly the audio the dataset holds.
Disk cost: one more copy of the split's audio bytes, at their own compression (no re-encoding:
FLAC stays FLAC, MP3 is not inflated to PCM). A row whose audio is a ``path`` to an existing
file (no bytes) is used in place, at no cost.

Records: ``id`` (``--id-column``, else ``<split>-<row>`` with the row number zero-padded),
``audio`` (absolute path), ``duration`` (seconds, from the audio header), ``text`` (spaces
folded; ``text_case="lower"`` lower-cases it, as ``prepare librispeech`` does by default), and
when asked ``target``, ``lang``, ``target_lang``, ``speaker``: the same fields, in the same
order, as ``prepare librispeech`` and ``prepare covost2`` write. Problems, each named by row: no audio, bytes soundfile
cannot read, a path that is not a file, empty text or target, a null, unusable or repeated id.
"""
from __future__ import annotations

import io
import os
import re
import shutil

from . import (CorpusError, Problem, audio_duration, check_set, finish_set, id_problem, reuse_set,
               PREPARE_VERSION)
from ..audio import header_problem
from ..extras import require
from ..fileio import write_atomic

WHAT = "prepare hf-dataset"
EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "W64": "w64", "FLAC": "flac",
              "OGG": "ogg", "MP3": "mp3", "AIFF": "aiff"}
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
TEXT_CASES = ("keep", "lower")


def open_split(path: str, split: str | None):
    """(the split as a ``datasets`` Dataset or IterableDataset, a record of what was opened).

    The record (kind, files or fingerprint) goes into ``prepare.json``, so a changed dataset is
    prepared again."""
    datasets = require("datasets", WHAT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path} (give a local save_to_disk directory "
                                "or Parquet/Arrow files; nothing is downloaded)")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        dd = datasets.load_from_disk(path)
        if split not in dd:
            raise ValueError(f"{path}: no split {split!r} (it holds: {', '.join(dd)}); give "
                             "--split one of these")
        return dd[split], {"kind": "save_to_disk", "fingerprint": dd[split]._fingerprint}
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        held = str(ds.split) if ds.split is not None else None
        if held is not None and split != held and not held.startswith(f"{split}["):
            raise ValueError(f"{path}: a single split saved with save_to_disk, and that split is "
                             f"{held!r}, not {split!r}; give --split {held}")
        return ds, {"kind": "save_to_disk", "fingerprint": ds._fingerprint}
    files = split_files(path, split)
    builder = FILE_BUILDERS[os.path.splitext(files[0])[1]]
    ds = datasets.load_dataset(builder, data_files={"split": files}, split="split",
                               streaming=True)
    return ds, {"kind": builder, "files": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns]
                                           for f in files]}


def split_files(path: str, split: str | None) -> list[str]:
    """The Parquet/Arrow files of ``split`` under ``path`` (a file is its own split)."""
    if os.path.isfile(path):
        if os.path.splitext(path)[1] not in FILE_BUILDERS:
            raise ValueError(f"{path}: not a .parquet or .arrow file, nor a dataset directory")
        return [os.path.abspath(path)]
    own = _split_folder(path, split)
    if own:
        return own
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    except Exception:  # EmptyDatasetError: no data file at all
        found = {}
    found = {str(s): [f for f in files if os.path.splitext(f)[1] in FILE_BUILDERS]
             for s, files in found.items()}
    found = {s: sorted(files) for s, files in found.items() if files}
    if not found:
        raise ValueError(f"{path}: no Parquet or Arrow files (nor dataset_dict.json/state.json "
                         "of save_to_disk) found")
    if split not in found:
        raise ValueError(f"{path}: no files of split {split!r} (found splits: "
                         f"{', '.join(sorted(found))}); give --split one of these")
    exts = {os.path.splitext(f)[1] for f in found[split]}
    if len(exts) > 1:
        raise ValueError(f"{path}: split {split!r} mixes {' and '.join(sorted(exts))} files")
    return found[split]


def _split_folder(path: str, split: str | None) -> list[str]:
    """The data files under ``path/split/`` (all of one kind), or [] when there is no such
    folder or it holds none."""
    if not split or split in (".", "..") or os.sep in split:
        return []
    folder = os.path.join(os.path.abspath(path), split)
    if not os.path.isdir(folder):
        return []
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if os.path.splitext(f)[1] in FILE_BUILDERS)
    exts = {os.path.splitext(f)[1] for f in files}
    if len(exts) > 1:
        raise ValueError(f"{folder}: split {split!r} mixes {' and '.join(sorted(exts))} files")
    return files


def raw_audio(ds, column: str, columns: list[str]):
    """``ds`` with only ``columns``, its Audio column left undecoded (``{bytes, path}``)."""
    datasets = require("datasets", WHAT)
    if ds.features is not None and column not in ds.features:
        raise ValueError(f"no column {column!r} in the dataset (it has: "
                         f"{', '.join(ds.features)}); give --audio-column one of these")
    missing = [c for c in columns if ds.features is not None and c not in ds.features]
    if missing:
        raise ValueError(f"no column(s) {', '.join(map(repr, missing))} in the dataset (it has: "
                         f"{', '.join(ds.features)})")
    ds = ds.select_columns(columns)
    if ds.features is not None and isinstance(ds.features[column], datasets.Audio):
        ds = ds.cast_column(column, datasets.Audio(decode=False))
    return ds


def audio_of_row(value, base_dir: str) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, None, None), (None, path of an existing file, None) or (None, None, why not)."""
    if isinstance(value, str):
        value = {"bytes": None, "path": value}
    if not isinstance(value, dict):
        return None, None, "no audio" if value is None else (
            f"audio column holds {type(value).__name__}, not an Audio value {{bytes, path}}")
    if value.get("bytes"):
        return bytes(value["bytes"]), None, None
    path = value.get("path")
    if not path:
        return None, None, "no audio (neither bytes nor a path)"
    for candidate in (path, os.path.join(base_dir, path)):
        if os.path.isfile(candidate):
            return None, os.path.abspath(candidate), None
    return None, None, f"no audio bytes, and its path {path!r} is not a file"


def write_audio(data: bytes, out_dir: str, utt: str) -> tuple[str | None, str | None]:
    """Writes ``data`` verbatim as ``out_dir/audio/<utt>.<ext>``: (path, None), or (None, why)
    when soundfile cannot read it (nothing is written then)."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:  # soundfile raises several types for corrupt data
        why = re.sub(r"^Error opening <[^>]*>: ", "", str(e).strip())
        return None, f"audio bytes soundfile cannot read ({why})"
    if info.frames <= 0:
        return None, "zero-length audio"
    path = os.path.join(os.path.abspath(out_dir), "audio",
                        f"{utt}.{EXTENSIONS.get(info.format, info.format.lower())}")
    write_atomic(path, data)
    why = header_problem(path)
    if why:
        os.unlink(path)
        return None, why
    return path, None


def scan(ds, source: str, split: str, out_dir: str, audio_column: str, text_column: str,
         target_column: str | None = None, id_column: str | None = None,
         speaker_column: str | None = None, lang: str | None = None,
         target_lang: str | None = None, text_case: str = "keep"
         ) -> tuple[list[dict], list[Problem]]:
    """Records and problems of every row (audio written under ``out_dir/audio``)."""
    optional = [c for c in (target_column, id_column, speaker_column) if c]
    ds = raw_audio(ds, audio_column, list(dict.fromkeys([audio_column, text_column, *optional])))
    base_dir = source if os.path.isdir(source) else os.path.dirname(source)
    records, problems, seen = [], [], set()
    for row, rec in enumerate(ds):
        where = f"{source} row {row}"
        if id_column and rec[id_column] is None:
            problems.append(Problem(where, None, f"no id (null in {id_column!r})"))
            continue
        utt = str(rec[id_column]) if id_column else f"{split}-{row:07d}"
        why = id_problem(utt) or ("duplicate utterance id" if utt in seen else None)
        if why:
            problems.append(Problem(where, None, why, utt if utt not in seen else None))
            continue
        seen.add(utt)
        why = _text_problem(rec, text_column, target_column)
        data, path, no_audio = audio_of_row(rec[audio_column], base_dir)
        why = why or no_audio
        if not why and data is not None:
            path, why = write_audio(data, out_dir, utt)
        duration = None
        if not why:
            duration, why = audio_duration(path)
        if why:
            problems.append(Problem(where, None, why, utt))
            continue
        text = " ".join(rec[text_column].split())
        record = {"id": utt, "audio": path, "duration": duration,
                  "text": text.lower() if text_case == "lower" else text}
        if target_column:
            record["target"] = " ".join(rec[target_column].split())
        if lang:
            record["lang"] = lang
        if target_lang:
            record["target_lang"] = target_lang
        if speaker_column and rec[speaker_column] is not None:
            record["speaker"] = str(rec[speaker_column])
        records.append(record)
    return records, problems


def _text_problem(rec: dict, text_column: str, target_column: str | None) -> str | None:
    for column in (text_column, target_column):
        if column and (not isinstance(rec[column], str) or not rec[column].strip()):
            return f"empty {column!r}" if isinstance(rec[column], (str, type(None))) else (
                f"{column!r} is {type(rec[column]).__name__}, not text")
    return None


def prepare_hf_dataset(path: str, split: str, out: str, audio_column: str = "audio",
                       text_column: str = "text", target_column: str | None = None,
                       id_column: str | None = None, speaker_column: str | None = None,
                       lang: str | None = None, on_error: str = "fail",
                       force: bool = False, text_case: str = "keep",
                       target_lang: str | None = None) -> dict:
    """Writes ``out/manifest.jsonl`` (+ ``skipped.jsonl``, ``prepare.json``, ``audio/``) for
    one split of a local dataset; returns the set's summary."""
    if text_case not in TEXT_CASES:
        raise ValueError(f"text_case must be one of {', '.join(TEXT_CASES)}, not {text_case!r}")
    source = os.path.abspath(path)
    ds, opened = open_split(source, split)
    params = {"corpus": "hf-dataset", "path": source, "split": split, "opened": opened,
              "audio_column": audio_column, "text_column": text_column,
              "target_column": target_column, "id_column": id_column,
              "speaker_column": speaker_column, "lang": lang, "on_error": on_error,
              "version": PREPARE_VERSION}
    for key, value, default in (("text_case", text_case, "keep"),
                                ("target_lang", target_lang, None)):
        if value != default:  # absent when default: sets prepared before stay reusable
            params[key] = value
    done = None if force else reuse_set(out, params)
    if done:
        return done
    # the audio is written beside the set and replaces its audio/ only once the set is good:
    # a refused run leaves a set prepared before whole
    what = f"dataset {source} (split {split})"
    staging = os.path.join(os.path.abspath(out), ".prepare-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    records, problems = scan(ds, source, split, staging, audio_column, text_column,
                             target_column, id_column, speaker_column, lang, target_lang,
                             text_case)
    try:
        check_set(records, problems, on_error, what)
    except CorpusError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    new_audio, audio = os.path.join(staging, "audio"), os.path.join(os.path.abspath(out), "audio")
    for r in records:
        if r["audio"].startswith(new_audio + os.sep):
            r["audio"] = audio + r["audio"][len(new_audio):]
    shutil.rmtree(audio, ignore_errors=True)
    if os.path.isdir(new_audio):
        os.replace(new_audio, audio)
    shutil.rmtree(staging, ignore_errors=True)
    return finish_set(out, records, problems, on_error, params, what)
