"""lhotse manifests in and out: a ``CutSet`` (or recordings + supervisions) → one manifest, and
a manifest → a ``CutSet`` that lhotse loads.

In (``prepare_lhotse``): one record per cut (or per supervision): ``id`` (the cut's, or the
supervision's), ``audio`` (the recording's file), ``duration``, ``text`` (the texts of the
cut's supervisions in time order, joined by spaces), and from its first supervision ``lang``,
``speaker``, ``target`` and ``target_lang`` (``custom["target"]``, ``custom["target_lang"]``,
as ``to_lhotse`` writes them). A cut that does not cover its whole recording keeps its place as
``offset`` (seconds): extract then reads only that span of the file. Problems, each named by the
manifest's line: a cut that is not of one recording (mixed or padded), a recording that is not
one audio file (URL, command, in-memory, one file per channel), transforms other than resampling
(lalmtool would not apply them), a cut of some channels of a multi-channel recording (lalmtool
reads the channels down-mixed), a missing or unreadable file, a span that starts before the
recording (a negative start) or ends beyond the file's end, no text.

A file that is not a lhotse manifest of the kind asked for (empty, not JSON, a lalmtool
manifest, a RecordingSet given as cuts, ...) is one error naming the file and what it is.

Options for a corpus recipe whose manifests must equal those of the raw corpus: ``ids=
"supervision"`` names each record by its cut's one supervision (lhotse's ``CutSet.from_manifests``
names cuts ``<recording>-<n>``, its supervisions keep the corpus ids such as
``1272-128104-0000``; a cut with other than one supervision is then a problem); ``lang`` and
``target_lang`` are written into every record (``lang`` in place of the supervision's, which
lhotse's recipes write as a name such as ``English``); ``text_case="lower"`` lower-cases the
text; ``target_key`` names the supervision's ``custom`` key that holds the translation, and a
cut without one is then a problem.

Out (``to_lhotse``): one recording per audio file (``Recording.from_file``; its id the file's
stem, made unique), one cut per utterance over its span (the whole file without ``offset``)
with one supervision holding ``text``, ``lang`` (``language``), ``speaker``, and ``target`` and
``target_lang`` in its ``custom``: ``prepare lhotse`` gives the same records back.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import soundfile as sf

from . import Problem, audio_duration, finish_set, id_problem, reuse_set, PREPARE_VERSION
from ..audio import span_problem
from ..extras import require

WHAT_IN, WHAT_OUT = "prepare lhotse", "manifest to-lhotse"
KEPT_TRANSFORMS = ("Resample",)  # extract resamples to the encoder's rate anyway
IDS = ("cut", "supervision")
TEXT_CASES = ("keep", "lower")
# a lhotse manifest kind: (the class of its items, the option that takes it)
KINDS = {"CutSet": ("Cut", "--cuts"), "RecordingSet": ("Recording", "--recordings"),
         "SupervisionSet": ("SupervisionSegment", "--supervisions")}
LHOTSE_KEYS = {"type", "sources", "recording", "recording_id", "supervisions"}
CUSTOM_FIELDS = ("target", "target_lang")  # manifest fields to_lhotse keeps in custom


def _lhotse(what: str):
    return require("lhotse", what)


def iter_cuts(cuts: str):
    """The cuts of a CutSet file, lazily for JSON Lines."""
    return read_set(cuts, "CutSet")


def read_set(path: str, kind: str):
    """The items of the lhotse ``kind`` file ``path`` (``CutSet``, ``RecordingSet`` or
    ``SupervisionSet``), lazily for JSON Lines. A file that is not one (empty, not JSON, a
    lalmtool manifest, a set of another kind) is a ValueError of one line naming the file."""
    lhotse = _lhotse(WHAT_IN)
    why = _not_a_set(path, kind)
    if why:
        raise ValueError(f"{path}: {why}")
    from lhotse.cut import Cut

    classes = {"Cut": Cut, "Recording": lhotse.Recording,
               "SupervisionSegment": lhotse.SupervisionSegment}
    want = KINDS[kind][0]
    try:
        items = iter(getattr(lhotse, kind).from_file(path) or ())
    except Exception as e:  # lhotse raises what its parsers raise
        raise ValueError(f"{path}: not a lhotse {kind} ({_one_line(e)})") from e
    n = 0
    while True:
        n += 1
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as e:
            raise ValueError(f"{path}: not a lhotse {kind}: entry {n} cannot be read "
                             f"({_one_line(e)})") from e
        if not isinstance(item, classes[want]):
            got = next((k for k, (c, _) in KINDS.items() if isinstance(item, classes[c])), None)
            if n == 1 and got:
                raise ValueError(f"{path}: a lhotse {got}, not a {kind}: give it as "
                                 f"{KINDS[got][1]}")
            raise ValueError(f"{path}: not a lhotse {kind}: entry {n} is a "
                             f"{type(item).__name__}, not a {want}")
        yield item


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _not_a_set(path: str, kind: str) -> str | None:
    """Why ``path`` is plainly not a lhotse ``kind`` file (read up to its first entry), or
    None."""
    what = f"a lhotse {kind} (JSON Lines, .jsonl or .jsonl.gz)"
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    first, lineno = None, 0
    try:
        with (gzip.open if gzipped else open)(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    first = raw
                    break
    except (OSError, EOFError, zlib.error) as e:
        return f"not {what}: a damaged gzip file ({_one_line(e)})"
    if first is None:
        return f"an empty file, not {what}"
    suffixes = Path(path).suffixes
    if gzipped and suffixes[-1:] != [".gz"]:
        return ("gzip-compressed, but not named .gz: lhotse picks the format from the name "
                "(name it .jsonl.gz)")
    if ".jsonl" in suffixes or not ({".json", ".yaml"} & set(suffixes)):
        try:
            rec = json.loads(first)
        except ValueError as e:  # UnicodeDecodeError included
            return f"not {what}: line {lineno} is not JSON ({_one_line(e)})"
        if not isinstance(rec, dict):
            return f"not {what}: line {lineno} is a JSON {type(rec).__name__}, not an object"
        if "audio" in rec and not LHOTSE_KEYS & set(rec):
            return f"a lalmtool manifest, not a lhotse {kind}: use it directly as --manifest"
    if not ({".jsonl", ".json", ".yaml"} & set(suffixes)):
        return (f"not named as {what}: lhotse picks the format from the name (.jsonl, "
                ".jsonl.gz, .json or .yaml)")
    return None


def audio_file(recording) -> tuple[str | None, str | None]:
    """(the recording's one audio file, None) or (None, why it is not one file)."""
    sources = recording.sources
    if len(sources) != 1:
        return None, (f"recording {recording.id} has {len(sources)} sources (one file per "
                      "channel); give recordings of one file each")
    src = sources[0]
    if src.type != "file":
        return None, (f"recording {recording.id} is not a file (source type {src.type!r}); "
                      "save its audio to files first")
    bad = [t for t in _transform_names(recording) if t not in KEPT_TRANSFORMS]
    if bad:
        return None, (f"recording {recording.id} has transforms lalmtool does not apply "
                      f"({', '.join(bad)}); save the transformed audio to files first")
    return src.source, None


def _transform_names(recording) -> list[str]:
    return [t.get("name") if isinstance(t, dict) else type(t).__name__
            for t in (recording.transforms or [])]


def record(utt: str, recording, start: float, duration: float, channel,
           supervisions: list, opts: dict | None = None) -> tuple[dict | None, str | None]:
    """The manifest record of the span ``start`` + ``duration`` of ``recording`` (the channels
    ``channel``) with ``supervisions``, or (None, why it cannot be one). ``opts``: ``text_case``,
    ``lang``, ``target_lang``, ``target_key`` (see the module's docstring)."""
    opts = opts or {}
    if recording is None:
        return None, "no recording"
    path, why = audio_file(recording)
    if why:
        return None, why
    taken = sorted(channel if isinstance(channel, (list, tuple)) else [channel])
    have = recording.sources[0].channels
    if taken != sorted(have):
        return None, (f"takes channel(s) {taken} of recording {recording.id} (channels {have}); "
                      "lalmtool reads all channels down-mixed: give cuts over all of them")
    if not (math.isfinite(start) and start >= 0):
        return None, (f"starts at {start:g} s, before the start of recording {recording.id} "
                      "(a span's start must be >= 0 s)")
    if not (math.isfinite(duration) and duration > 0):
        return None, f"duration {duration:g} s (must be > 0 s)"
    file_seconds, why = audio_duration(path)
    if why:
        return None, why
    info = sf.info(path)
    whole = start == 0 and abs(duration - info.frames / info.samplerate) <= 1 / info.samplerate
    if not whole:
        why = span_problem(path, info.frames, info.samplerate, start, duration)
        if why:
            return None, why
    sups = sorted(supervisions, key=lambda s: s.start)
    text = " ".join(" ".join(s.text.split()) for s in sups if s.text and s.text.strip())
    if not text:
        return None, "no supervision with text"
    first = sups[0]
    custom = first.custom or {}
    target_key = opts.get("target_key")
    target = custom.get(target_key or "target")
    if target_key:
        if not (isinstance(target, str) and target.strip()):
            return None, f"no translation (the supervision's custom {target_key!r})"
        target = " ".join(target.split())
    rec = {"id": utt, "audio": os.path.abspath(path),
           "duration": file_seconds if whole else duration,
           "text": text.lower() if opts.get("text_case") == "lower" else text}
    if not whole:
        rec["offset"] = start
    target_lang = opts.get("target_lang") or custom.get("target_lang")
    for key, value in (("target", target), ("lang", opts.get("lang") or first.language),
                       ("target_lang", target_lang), ("speaker", first.speaker)):
        if value and isinstance(value, str):
            rec[key] = value
    return rec, None


def scan_cuts(cuts: str, ids: str = "cut", opts: dict | None = None
              ) -> tuple[list[dict], list[Problem]]:
    """Records and problems of every cut of ``cuts`` (line numbers count cuts); each record is
    named by its cut's id, or with ``ids="supervision"`` by its cut's one supervision's."""
    records, problems, seen = [], [], set()
    for line, cut in enumerate(iter_cuts(cuts), 1):
        utt, why = cut.id, None
        if ids == "supervision":
            sups = list(cut.supervisions)
            if len(sups) == 1:
                utt = sups[0].id
            else:
                why = (f"has {len(sups)} supervisions; naming utterances by their supervision "
                       "needs one per cut")
        why = why or id_problem(utt) or ("duplicate utterance id" if utt in seen else None)
        if not why and not hasattr(cut, "recording"):
            why = (f"is a {type(cut).__name__} (not of one recording); give cuts of one "
                   "recording each")
        rec = None
        if not why:
            rec, why = record(utt, cut.recording, cut.start, cut.duration, cut.channel,
                              cut.supervisions, opts)
        if why:
            problems.append(Problem(cuts, line, f"cut {cut.id}: {why}",
                                    utt if utt not in seen else None))
        else:
            records.append(rec)
        seen.add(utt)
    return records, problems


def scan_supervisions(recordings: str, supervisions: str, opts: dict | None = None
                      ) -> tuple[list[dict], list[Problem]]:
    """One record per supervision of ``supervisions``, over its span of its recording."""
    recs = {r.id: r for r in read_set(recordings, "RecordingSet")}
    records, problems, seen = [], [], set()
    for line, sup in enumerate(read_set(supervisions, "SupervisionSet"), 1):
        why = id_problem(sup.id) or ("duplicate supervision id" if sup.id in seen else None)
        rec = None
        if not why and sup.recording_id not in recs:
            why = f"recording {sup.recording_id} is not in {recordings}"
        if not why:
            rec, why = record(sup.id, recs[sup.recording_id], sup.start, sup.duration,
                              sup.channel, [sup], opts)
        if why:
            problems.append(Problem(supervisions, line, f"supervision {sup.id}: {why}",
                                    sup.id if sup.id not in seen else None))
        else:
            records.append(rec)
        seen.add(sup.id)
    return records, problems


def prepare_lhotse(out: str, cuts: str | None = None, recordings: str | None = None,
                   supervisions: str | None = None, on_error: str = "fail",
                   force: bool = False, ids: str = "cut", text_case: str = "keep",
                   lang: str | None = None, target_lang: str | None = None,
                   target_key: str | None = None) -> dict:
    """Writes ``out/manifest.jsonl`` (+ ``skipped.jsonl``, ``prepare.json``) from a CutSet, or
    from a RecordingSet and a SupervisionSet; returns the set's summary."""
    if bool(cuts) == bool(recordings or supervisions) or bool(recordings) != bool(supervisions):
        raise ValueError("give --cuts, or --recordings and --supervisions")
    if ids not in IDS:
        raise ValueError(f"ids must be one of {', '.join(IDS)}, not {ids!r}")
    if text_case not in TEXT_CASES:
        raise ValueError(f"text_case must be one of {', '.join(TEXT_CASES)}, not {text_case!r}")
    inputs = [os.path.abspath(p) for p in (cuts, recordings, supervisions) if p]
    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"lhotse manifest not found: {p}")
    _lhotse(WHAT_IN)
    params = {"corpus": "lhotse", "inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns]
                                             for p in inputs],
              "on_error": on_error, "version": PREPARE_VERSION}
    opts = {k: v for k, v in (("text_case", text_case), ("lang", lang),
                              ("target_lang", target_lang), ("target_key", target_key))
            if v and v != "keep"}
    if cuts and ids != "cut":
        opts["ids"] = ids
    params.update(opts)  # only what is not the default: sets prepared before stay reusable
    done = None if force else reuse_set(out, params)
    if done:
        return done
    if cuts:
        records, problems = scan_cuts(inputs[0], ids, opts)
    else:
        records, problems = scan_supervisions(inputs[0], inputs[1], opts)
    return finish_set(out, records, problems, on_error, params,
                      f"lhotse {' + '.join(inputs)}")


def recording_ids(paths: list[str]) -> dict[str, str]:
    """A unique recording id per audio path: its file stem, or stem + a hash of the path when
    two files share a stem."""
    stems: dict[str, list[str]] = {}
    for p in dict.fromkeys(paths):
        stems.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    out = {}
    for stem, ps in stems.items():
        for p in ps:
            out[p] = stem if len(ps) == 1 else (
                f"{stem}-{hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]}")
    return out


def to_lhotse(manifest: str, out: str) -> int:
    """Writes the utterances of ``manifest`` as a CutSet to ``out`` (``.jsonl.gz``, ``.jsonl``
    or ``.json``); returns the number of cuts."""
    from ..fileio import atomic_path, iter_jsonl
    from ..manifest import load_manifest

    lhotse = _lhotse(WHAT_OUT)
    from lhotse.cut import MultiCut

    utts, _ = load_manifest(manifest, need_text=False)
    # what Utterance does not hold (speaker, target_lang): from the lines themselves
    lines = {n: rec for n, rec, _ in iter_jsonl(manifest) if rec}
    ids = recording_ids([u.audio for u in utts])
    recordings, cuts = {}, []
    for u in utts:
        if u.audio not in recordings:
            recordings[u.audio] = lhotse.Recording.from_file(u.audio, recording_id=ids[u.audio])
        rec = recordings[u.audio]
        start = u.offset or 0.0
        duration = u.duration if u.offset is not None else rec.duration
        channel = 0 if rec.num_channels == 1 else list(range(rec.num_channels))
        line = lines.get(u.line, {})
        speaker = line.get("speaker")
        custom = {k: line[k] for k in CUSTOM_FIELDS if line.get(k) not in (None, "")}
        sup = lhotse.SupervisionSegment(
            id=u.id, recording_id=rec.id, start=0.0, duration=duration, channel=channel,
            text=u.text or None, language=u.lang,
            speaker=str(speaker) if speaker not in (None, "") else None,
            custom=custom or None)
        cls = lhotse.MonoCut if rec.num_channels == 1 else MultiCut
        cuts.append(cls(id=u.id, start=start, duration=duration, channel=channel,
                        recording=rec, supervisions=[sup]))
    suffix = "".join(s for s in (".jsonl", ".json", ".gz") if s in os.path.basename(out))
    with atomic_path(out) as tmp:  # lhotse picks the format from the name: keep its suffixes
        lhotse.CutSet.from_cuts(cuts).to_file(tmp + suffix)
        os.replace(tmp + suffix, tmp)
    return len(cuts)
