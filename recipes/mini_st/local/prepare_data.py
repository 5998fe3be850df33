#!/usr/bin/env python3
"""Data preparation for the mini_st recipe: synthetic Spanish speech, English references.

    python3 recipes/mini_st/local/prepare_data.py --out data [--n-train 160] [--n-dev 16]
        [--n-test 40] [--seed 0] [--nj 2]

The English sentences are human-written WordNet usage examples (recipes/mini/local/corpus.py),
split into disjoint test/dev/train sets before anything else. Each is translated into Spanish by
Apertium (Debian ``apertium-eng-spa``, mode ``eng-spa``, offline; unknown words are passed
through unmarked) and the Spanish text is spoken by espeak-ng's Spanish voices (``es`` and
``es-419`` with varied variants, speed and pitch; 16 kHz). So the *source speech is synthetic*
and the *source text machine-translated*; the references are the English originals.

Writes ``DATA_DIR/<set>/manifest.jsonl`` and ``DATA_DIR/<set>/wav/*.wav`` for train, dev and
test. Manifest lines: {"id", "audio", "duration", "text" (the Spanish that was spoken), "target"
(the English original), "lang": "es", "target_lang": "en", "voice"}. The same arguments give the
same data; a set whose plan did not change is left alone, and wavs are reused by content hash
(the machinery of recipes/mini/local/prepare_data.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "mini", "local"))
import corpus  # noqa: E402
import prepare_data as mini  # noqa: E402
import tts  # noqa: E402

PREP_VERSION = 1  # bump when a change here changes the audio or the manifests
ESPEAK_ACCENTS = ("es", "es-419")  # Spain, Latin America
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f2", "f3", "f5", "rob", "max", "steph")
ESPEAK_SPEED = (135, 165)
ESPEAK_PITCH = (35, 60)
MT_MODE = "eng-spa"


class TranslationError(RuntimeError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="data directory to write (DATA_DIR)")
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--n-dev", type=int, default=16)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    for name in ("n_train", "n_dev", "n_test"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def translate(sentences: list[str], mode: str = MT_MODE) -> list[str]:
    """Apertium translations, one per sentence (one process for all; line breaks kept)."""
    if shutil.which("apertium") is None:
        raise TranslationError("apertium not found: run ./install.sh (Debian packages apertium "
                               "apertium-eng-spa)")
    proc = subprocess.run(["apertium", "-u", mode], input="\n".join(sentences) + "\n",
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise TranslationError(f"apertium {mode} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[:300]}")
    out = [line.strip() for line in proc.stdout.rstrip("\n").split("\n")]
    if len(out) != len(sentences):
        raise TranslationError(f"apertium {mode} returned {len(out)} lines for "
                               f"{len(sentences)} sentences")
    # Apertium marks words it could not generate with # or @: strip the marks, keep the words
    return [" ".join(line.replace("#", "").replace("@", "").split()) for line in out]


def random_voice(rng: random.Random) -> tts.Voice:
    name = f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(ESPEAK_VARIANTS)}"
    return tts.Voice("espeak", name, rng.randint(*ESPEAK_SPEED), rng.randint(*ESPEAK_PITCH))


def plan_sets(args: argparse.Namespace) -> dict[str, list[dict]]:
    """English original, Spanish translation, voice, id and wav name of every utterance."""
    sizes = {"test": args.n_test, "dev": args.n_dev, "train": args.n_train}
    split = corpus.split_sentences(corpus.load_sentences(), sizes, args.seed)
    english = [s for name in sizes for s in split[name]]
    spanish = dict(zip(english, translate(english)))
    plans = {}
    for name, sents in split.items():
        rng = random.Random(f"mini_st-voices-{args.seed}-{name}")
        items = []
        for i, en in enumerate(sents):
            voice, es = random_voice(rng), spanish[en]
            utt = f"mini_st-{name}-{i:05d}"
            digest = hashlib.sha1(f"{PREP_VERSION}|{es}|{voice.tag}".encode()).hexdigest()[:10]
            items.append({"id": utt, "text": es, "target": en, "voice": voice,
                          "audio": f"wav/{utt}_{digest}.wav"})
        plans[name] = items
    return plans


def build_set(out_dir: str, name: str, items: list[dict], args) -> list[dict]:
    set_dir = os.path.join(out_dir, name)
    manifest = os.path.join(set_dir, "manifest.jsonl")
    params_path = os.path.join(set_dir, ".params.json")
    content = hashlib.sha256("\n".join(f"{it['id']}|{it['audio']}|{it['text']}|{it['target']}"
                                       for it in items).encode()).hexdigest()
    params = {"set": name, "n": len(items), "seed": args.seed, "prep_version": PREP_VERSION,
              "content_sha256": content}
    records = mini._read_jsonl(manifest)
    if records is not None and mini._read_json(params_path) == params and all(
            os.path.exists(os.path.join(set_dir, r["audio"])) for r in records):
        print(f"{name}: up to date ({manifest}), skipped")
        return records
    durations = mini.synthesize_all(set_dir, items, args.nj, desc=name)
    records = [{"id": it["id"], "audio": it["audio"],
                "duration": round(durations[os.path.join(set_dir, it["audio"])], 3),
                "text": it["text"], "target": it["target"], "lang": "es", "target_lang": "en",
                "voice": it["voice"].tag} for it in items]
    mini.write_jsonl_atomic(manifest, records)
    mini.write_json_atomic(params_path, params)
    mini.remove_stale_wavs(set_dir, {it["audio"] for it in items})
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        if shutil.which("espeak-ng") is None:
            raise tts.TTSError("espeak-ng not found: run ./install.sh")
        plans = plan_sets(args)
        for name in ("train", "dev", "test"):
            print(mini.summarize(name, build_set(args.out, name, plans[name], args)))
    except (tts.TTSError, corpus.CorpusError, TranslationError, FileNotFoundError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 1
    print(f"data prepared in {args.out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
