#!/usr/bin/env python3
"""Data preparation for the mini recipe: synthetic English speech plus 5 real LibriVox clips.

    python3 recipes/mini/local/prepare_data.py --out data [--n-train 2000] [--n-dev 100]
        [--n-test 100] [--n-unseen 0] [--seed 0] [--nj 2]

Writes, for each of train, dev and test, ``DATA_DIR/<set>/manifest.jsonl`` and
``DATA_DIR/<set>/wav/*.wav`` (16 kHz mono PCM16): WordNet usage examples (see corpus.py)
spoken by espeak-ng and flite voices with varied accent, speed and pitch (see tts.py).
Sentences are split between the sets before synthesis, so no dev or test sentence is ever
in train. ``DATA_DIR/librivox/manifest.jsonl`` points at the 5 LibriVox utterances of
Debian's pocketsphinx-testdata (absolute paths, already 16 kHz).

``--n-unseen N`` (default 0: not made) adds ``DATA_DIR/unseen``: N held-out sentences of 7-20
words (2-10 s) spoken by voices that no training set uses (``UNSEEN_VOICES``: espeak-ng variants
and an accent that tts.py leaves out, and flite's 8 kHz ``kal``), one voice after another. Its
sentences come after room for ``RESERVED_TRAIN`` training sentences and recipes/mini_longform's
recordings in the shuffled pool, so they are in no other set for any ``--n-train`` up to that.

Manifest lines: {"id", "audio" (relative to the manifest's folder), "text", "duration",
"lang": "en", "voice"}. Everything is determined by the seed and the sizes: the same
arguments give the same sentences, voices and audio. Rerunning is cheap: a set whose
manifest exists with the same plan (recorded in ``<set>/.params.json``) is left alone, and a
set that is rebuilt reuses every wav file whose sentence and voice did not change (the file
name carries a hash of both). Manifests are written to a temporary name and renamed, after
all their audio exists, so an interrupted run never leaves a manifest pointing to missing audio.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing as mp
import os
import random
import sys
import time

import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import tts  # noqa: E402

PREP_VERSION = 1  # bump when a change to this code changes the audio or the manifests
LIBRIVOX_DIR = "/usr/share/pocketsphinx/test/data/librivox"
#: the unseen set's sentences follow room for this many training sentences and for
#: recipes/mini_longform's long recordings (up to 6 x 40 sentences) in the shuffled pool
RESERVED_TRAIN = 5000
RESERVED_LONGFORM = 240
UNSEEN_WORDS = (7, 20)  # words per unseen sentence: 2-10 s at these voices' speeds
#: voices that tts.random_voice never draws: espeak-ng variants it leaves out (f4, f1, david,
#: belinda, anika), an accent it leaves out (en-us-nyc) and flite's 8 kHz diphone voice kal
UNSEEN_VOICES = (tts.Voice("espeak", "en-us+f4", 150, 50),
                 tts.Voice("espeak", "en-gb+david", 150, 45),
                 tts.Voice("espeak", "en-us+belinda", 150, 50),
                 tts.Voice("espeak", "en-gb+f1", 150, 50),
                 tts.Voice("espeak", "en-gb-x-rp+anika", 150, 50),
                 tts.Voice("espeak", "en-us-nyc+m3", 150, 50),
                 tts.Voice("flite", "kal", 1.0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="data directory to write (DATA_DIR)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=100)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-unseen", type=int, default=0,
                   help="utterances of the unseen-voices test set (0: not made)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=os.cpu_count() or 1,
                   help="parallel synthesis processes (default: all cores)")
    p.add_argument("--flite-share", type=float, default=tts.FLITE_SHARE,
                   help="fraction of utterances spoken by flite, the rest by espeak-ng")
    args = p.parse_args(argv)
    for name in ("n_train", "n_dev", "n_test", "n_unseen"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0.0 <= args.flite_share <= 1.0:
        p.error("--flite-share must lie in [0, 1]")
    if args.n_unseen and args.n_train > RESERVED_TRAIN:
        p.error(f"--n-unseen needs --n-train <= {RESERVED_TRAIN} (its sentences follow those)")
    return args


# ---------------------------------------------------------------- LibriVox (real speech)

def read_librivox(src_dir: str = LIBRIVOX_DIR) -> list[dict]:
    """Manifest records for the LibriVox clips; transcripts come from ``transcription``.

    Each line there reads ``<s> words </s> (utterance-id)``; the wav is ``<utterance-id>.wav``.
    """
    trans = os.path.join(src_dir, "transcription")
    if not os.path.exists(trans):
        raise FileNotFoundError(f"{trans} not found: install the Debian package "
                                "pocketsphinx-testdata (run ./install.sh)")
    records = []
    with open(trans, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            words, _, utt = line.rpartition("(")
            utt = utt.rstrip(")").strip()
            text = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))
            audio = os.path.join(src_dir, utt + ".wav")
            if not os.path.exists(audio):
                raise FileNotFoundError(f"{audio} (listed in {trans}) not found")
            info = sf.info(audio)
            records.append({"id": utt, "audio": audio, "text": text,
                            "duration": round(info.frames / info.samplerate, 3), "lang": "en"})
    return records


def prepare_librivox(out_dir: str) -> list[dict]:
    """Writes ``out_dir/librivox/manifest.jsonl`` (only when its content would change)."""
    records = read_librivox()
    path = os.path.join(out_dir, "librivox", "manifest.jsonl")
    if _read_jsonl(path) != records:
        write_jsonl_atomic(path, records)
    return records


# ---------------------------------------------------------------- synthetic sets: planning

def plan_sets(args: argparse.Namespace, flite_voices: list[str]) -> dict[str, list[dict]]:
    """Sentence, voice, id and wav name of every utterance, by set (test, dev, train)."""
    sentences = corpus.load_sentences()
    exclude = tuple(r["text"] for r in read_librivox())
    sizes = {"test": args.n_test, "dev": args.n_dev, "train": args.n_train}
    split = corpus.split_sentences(sentences, sizes, args.seed, exclude=exclude)
    plans = {}
    for name, sents in split.items():
        rng = random.Random(f"mini-voices-{args.seed}-{name}")
        items = []
        for i, text in enumerate(sents):
            voice = tts.random_voice(rng, flite_voices, args.flite_share)
            utt = f"mini-{name}-{i:05d}"
            digest = hashlib.sha1(f"{PREP_VERSION}|{text}|{voice.tag}".encode()).hexdigest()[:10]
            items.append({"id": utt, "text": text, "voice": voice,
                          "audio": f"wav/{utt}_{digest}.wav"})
        plans[name] = items
    if getattr(args, "n_unseen", 0):
        plans["unseen"] = plan_unseen(sentences, exclude, args)
    return plans


def plan_unseen(sentences: list[str], exclude: tuple[str, ...],
                args: argparse.Namespace) -> list[dict]:
    """The unseen-voices set: held-out sentences of ``UNSEEN_WORDS`` words, one voice of
    ``UNSEEN_VOICES`` after another."""
    sizes = {"test": args.n_test, "dev": args.n_dev, "train": RESERVED_TRAIN,
             "longform": RESERVED_LONGFORM}
    sizes["unseen"] = len(sentences) - sum(sizes.values()) - len(exclude)
    pool = corpus.split_sentences(sentences, sizes, args.seed, exclude=exclude)["unseen"]
    lo, hi = UNSEEN_WORDS
    chosen = [s for s in pool if lo <= len(s.split()) <= hi][:args.n_unseen]
    if len(chosen) < args.n_unseen:
        raise corpus.CorpusError(f"only {len(chosen)} held-out sentences of {lo}-{hi} words "
                                 f"for --n-unseen {args.n_unseen}")
    items = []
    for i, text in enumerate(chosen):
        voice = UNSEEN_VOICES[i % len(UNSEEN_VOICES)]
        utt = f"mini-unseen-{i:05d}"
        digest = hashlib.sha1(f"{PREP_VERSION}|{text}|{voice.tag}".encode()).hexdigest()[:10]
        items.append({"id": utt, "text": text, "voice": voice, "audio": f"wav/{utt}_{digest}.wav"})
    return items


def plan_params(name: str, items: list[dict], args: argparse.Namespace) -> dict:
    """What determines a set's content; a set is rebuilt when this changes."""
    content = hashlib.sha256("\n".join(f"{it['id']}|{it['audio']}|{it['text']}"
                                       for it in items).encode()).hexdigest()
    return {"set": name, "n": len(items), "seed": args.seed, "flite_share": args.flite_share,
            "prep_version": PREP_VERSION, "sample_rate": tts.SAMPLE_RATE,
            "content_sha256": content}


# ---------------------------------------------------------------- synthetic sets: building

def synth_one(job: tuple[str, str, tts.Voice]) -> tuple[str, float]:
    """Synthesises one utterance into ``path`` (unless it exists); returns (path, seconds)."""
    path, text, voice = job
    if not os.path.exists(path):
        wav = tts.synthesize(text, voice)
        tmp = f"{path}.tmp{os.getpid()}.wav"
        sf.write(tmp, wav, tts.SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, path)
    info = sf.info(path)
    return path, info.frames / info.samplerate


def synthesize_all(set_dir: str, items: list[dict], nj: int, desc: str) -> dict[str, float]:
    """Makes every wav of a set (in ``nj`` processes); returns durations by wav path."""
    from tqdm import tqdm

    os.makedirs(os.path.join(set_dir, "wav"), exist_ok=True)
    jobs = [(os.path.join(set_dir, it["audio"]), it["text"], it["voice"]) for it in items]
    durations = {}
    with tqdm(total=len(jobs), desc=desc, unit="utt", file=sys.stderr, mininterval=1.0) as bar:
        if nj <= 1 or len(jobs) < 2:
            for path, dur in map(synth_one, jobs):
                durations[path] = dur
                bar.update()
        else:
            tts.preload()  # import torch once here: forked workers inherit it
            with mp.get_context("fork").Pool(nj) as pool:
                for path, dur in pool.imap_unordered(synth_one, jobs, chunksize=8):
                    durations[path] = dur
                    bar.update()
    return durations


def remove_stale_wavs(set_dir: str, keep: set[str]) -> None:
    """Deletes wav files (and leftovers of interrupted writes) that the manifest does not use."""
    wav_dir = os.path.join(set_dir, "wav")
    for name in os.listdir(wav_dir):
        if f"wav/{name}" not in keep:
            os.remove(os.path.join(wav_dir, name))


def build_set(out_dir: str, name: str, items: list[dict], args: argparse.Namespace) -> list[dict]:
    """Builds one synthetic set unless it is up to date; returns its manifest records."""
    set_dir = os.path.join(out_dir, name)
    manifest = os.path.join(set_dir, "manifest.jsonl")
    params_path = os.path.join(set_dir, ".params.json")
    params = plan_params(name, items, args)
    records = _read_jsonl(manifest)
    if records is not None and _read_json(params_path) == params and all(
            os.path.exists(os.path.join(set_dir, r["audio"])) for r in records):
        print(f"{name}: up to date ({manifest}), skipped")
        return records
    durations = synthesize_all(set_dir, items, args.nj, desc=name)
    records = [{"id": it["id"], "audio": it["audio"], "text": it["text"],
                "duration": round(durations[os.path.join(set_dir, it["audio"])], 3),
                "lang": "en", "voice": it["voice"].tag} for it in items]
    write_jsonl_atomic(manifest, records)
    write_json_atomic(params_path, params)
    remove_stale_wavs(set_dir, {it["audio"] for it in items})
    return records


# ---------------------------------------------------------------- files and summaries

def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def summarize(name: str, records: list[dict]) -> str:
    """A few lines: utterances, hours, duration range, voices used."""
    durs = [r["duration"] for r in records]
    lines = [f"{name}: {len(records)} utterances, {sum(durs) / 3600:.3f} h"
             + (f" (durations {min(durs):.1f}-{max(durs):.1f} s, mean "
                f"{sum(durs) / len(durs):.1f} s)" if durs else "")]
    voices = [r["voice"].split(":")[:2] for r in records if "voice" in r]
    flite = collections.Counter(v for engine, v in voices if engine == "flite")
    espeak = [v.split("+") for engine, v in voices if engine == "espeak"]
    if flite:
        lines.append(f"  flite: {sum(flite.values())} utterances: "
                     + ", ".join(f"{v} {n}" for v, n in sorted(flite.items())))
    if espeak:
        accents = collections.Counter(a for a, _ in espeak)
        variants = {v for _, v in espeak}
        lines.append(f"  espeak-ng: {len(espeak)} utterances, {len(set(map(tuple, espeak)))} "
                     f"accent+variant voices ({len(variants)} variants); accents: "
                     + ", ".join(f"{a} {n}" for a, n in sorted(accents.items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        flite_voices = tts.check_tools()
        librivox = prepare_librivox(args.out)
        plans = plan_sets(args, flite_voices)
        summaries = [summarize("librivox", librivox)]
        for name in ("train", "dev", "test", "unseen"):
            if name not in plans:
                continue
            records = build_set(args.out, name, plans[name], args)
            summaries.append(summarize(name, records))
    except (tts.TTSError, corpus.CorpusError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summaries))
    print(f"data prepared in {args.out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
