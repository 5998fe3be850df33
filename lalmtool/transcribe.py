"""A trained, compressed model on one's own audio, in memory: ``lalmtool transcribe`` and
``Transcriber``.

The stages (extract → segment → pool → decode) are the way to run experiments; this is the
short way to use their result. It reads audio files (or arrays), encodes them with the backend,
repeats in memory the compression the adapter was trained on (its record,
``adapter/lalmtool.json``, written by ``lalmtool finetune``: the same boundaries and pooling
functions as ``segment`` and ``pool``, the same float16 rounding as their stores), and decodes
with the adapter exactly as ``decode`` does: the hypotheses are those of the stages on the same
audio (tested).

Long recordings are decoded in pieces of the length the adapter was trained on (its longest
joined training input, ``concat_seconds``), else of 30 s; a recording that fits one piece is
decoded in one pass. Each piece keeps its times (``Piece``), which the srt and vtt outputs use.

    from lalmtool import Transcriber
    t = Transcriber("whisper-tiny.en", adapter="exp/lora/uniform-mean-k3/adapter")
    for r in t.transcribe(["meeting.wav", wave_16k]):
        print(r.name, r.text, [(p.start, p.end) for p in r.pieces])
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from . import trained as records
from .audio import load_audio
from .models import BACKENDS, training_options

log = logging.getLogger("lalmtool")

#: Piece length when the adapter was trained on single utterances (Whisper's window).
PIECE_SECONDS = 30.0
#: Audio files a folder is searched for (what soundfile reads).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")


@dataclass
class Piece:
    """One decoded piece of a recording: its time span (seconds) and text."""

    start: float
    end: float
    text: str


@dataclass
class Result:
    """The transcript of one input: ``name`` (the file, or ``array<i>``), the text (the pieces'
    texts joined), its pieces, the audio's seconds and the audio tokens the decoder read."""

    name: str
    text: str
    duration: float
    tokens: int
    pieces: list[Piece] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def parse_condition(label: str) -> list[dict]:
    """The compression steps of a condition name (``frames``, ``uniform-mean-k3``,
    ``peaks-mean``, ``scpc-pick-threshold0.2``; ``+`` chains them, as the recipes do:
    ``peaks-mean+uniform-mean-k2``)."""
    if label in ("frames", ""):
        return []
    from .methods import METHODS, REDUCERS

    steps = []
    for part in label.split("+"):
        m = re.fullmatch(r"([a-z]+)-([a-z]+)(?:-(k\d+|threshold[0-9.eE+-]+))?", part)
        if not m or m[1] not in METHODS or m[2] not in REDUCERS:
            raise ValueError(
                f"--compress {label!r}: a condition is frames or METHOD-REDUCE[-kN|-thresholdX] "
                f"(methods {', '.join(METHODS)}; reducers {', '.join(REDUCERS)}), e.g. "
                "uniform-mean-k3 or peaks-mean")
        params = {}
        if m[3]:
            params = {"k": int(m[3][1:])} if m[3][0] == "k" else \
                {"threshold": float(m[3][len("threshold"):])}
        steps.append({"method": m[1], "params": params, "reduce": m[2]})
    return steps


def _step_label(steps: list[dict]) -> str:
    def one(s):
        extra = [f"k{s['params']['k']}" if "k" in s["params"] else
                 f"threshold{s['params']['threshold']:g}" if "threshold" in s["params"] else ""]
        return "-".join([s["method"], s["reduce"], *filter(None, extra)])
    return "+".join(one(s) for s in steps) or "frames"


class Transcriber:
    """A model (and adapter) ready to transcribe audio files and arrays.

    ``model``: a checkpoint directory, asset name or hub id; ``adapter``: the ``OUT/adapter`` of
    ``lalmtool finetune`` (its backend, options and compression come with it); ``backend``:
    without an adapter (default ``whisper``); ``compress``: a condition name, for no adapter or
    to say the adapter's own (one that contradicts it is refused); ``device``: ``auto`` (a GPU
    when there is one), ``cpu``, ``cuda``...; ``backend_opts``: as ``--backend-opt``.
    """

    def __init__(self, model: str, adapter: str | None = None, backend: str | None = None,
                 device: str = "auto", compress: str | None = None, beam: int = 1,
                 batch_size: int = 8, max_new_tokens: int | None = None,
                 piece_seconds: float | None = None, **backend_opts):
        from .export import read_export
        from .models import (check_adapter_base, check_backend_options, concrete_backend,
                             load_for_decoding, model_directory)
        from .parallel import resolve_device

        model_dir = model_directory(model)  # resolved once (an asset name: its cache directory)
        exported = read_export(model_dir) if not adapter else None
        if adapter and not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(f"--adapter {adapter} is not a LoRA adapter (no "
                             "adapter_config.json); pass OUT/adapter of `lalmtool finetune`")
        held = records.read(adapter) if adapter else exported  # what the model comes with
        trained = held["backend"] if held else None
        if exported:  # a model written by `lalmtool export`: the adapter is in its weights
            backend_opts = {**exported["backend_options"], **backend_opts}
        if adapter and backend and trained and backend != trained:
            raise ValueError(f"--adapter {adapter} was trained with the {trained} backend "
                             f"({held.source('backend')}); leave --backend out or give "
                             f"{trained}")
        self.backend = concrete_backend(backend or trained or "whisper", model)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {sorted(BACKENDS)}")
        record = held["compression"] if held else None
        if backend and exported and backend != trained:
            raise ValueError(f"--model {model} is an exported {trained} model; leave --backend "
                             f"out or give {trained}")
        if adapter and record is None and compress is None:
            raise ValueError(f"--adapter {adapter} does not record the compression it was "
                             "trained on (an adapter from before compression.json): give it "
                             "with --compress, the condition named in its README.md (e.g. "
                             "--compress uniform-mean-k3)")
        steps = parse_condition(compress) if compress is not None else \
            record["steps"] if record else []
        if record is not None and compress is not None and steps != record["steps"]:
            given = f"--adapter {adapter}" if adapter else f"--model {model}"
            raise ValueError(f"--compress {compress} contradicts {given}, trained on "
                             f"{record['condition']} ({held.source('compression')}); leave "
                             "--compress out")
        self.steps, self.adapter, self.model_name = steps, adapter, model
        self.condition = _step_label(steps)
        self.pooler = None
        if any(s["reduce"] == "learnt" for s in steps):
            from . import pooler as learnt

            if not (adapter or exported):
                raise ValueError("a learnt compression needs the adapter it was trained with "
                                 "(--adapter)")
            self.pooler = learnt.load(adapter or model_dir)
        if any(s["method"] == "ctc" for s in steps):
            raise ValueError("ctc boundaries need the CTC head of `lalmtool ctc segment`: "
                             "transcribe with the stages (extract, ctc segment, pool, decode)")
        if adapter:
            check_adapter_base(adapter, model, model_dir)
        opts = {**training_options(adapter, self.backend), **backend_opts}
        if record is not None and not record.get("trim", True):
            opts.setdefault("trim", False)
        check_backend_options(self.backend, opts, "from the adapter or the options given")
        self.beam, self.batch_size, self.max_new_tokens = beam, batch_size, max_new_tokens
        self.piece_seconds = piece_seconds or (record or {}).get("input_seconds") \
            or PIECE_SECONDS
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if exported and exported.get("format") == "ct2":
            from .models.ct2_whisper import Ct2WhisperBackend

            self.be = Ct2WhisperBackend(model_dir, resolve_device(device), **opts)
        else:
            self.be = load_for_decoding(self.backend, model, model_dir, resolve_device(device),
                                        opts, adapter)
        if self.pooler is not None:
            self.pooler = self.pooler.to(self.be.device).eval()

    # -- one input at a time -----------------------------------------------------------------
    def compress(self, frames: np.ndarray) -> np.ndarray:
        """The adapter's compression of one utterance's encoder frames, as the stores hold it
        (float16 after extract and after every pooling)."""
        from .pool import pool
        from .segment import boundaries

        z = frames.astype(np.float16)
        for s in self.steps:
            starts = boundaries(z, s["method"], s["params"].get("k"),
                                s["params"].get("threshold"))
            z = pool(z, starts, s["reduce"], self.pooler).astype(np.float16)
        return z

    def _pieces(self, rows: int, seconds: float, name: str) -> list[tuple[int, int, int]]:
        from .decode import plan_pieces

        chunk = 0 if seconds <= self.piece_seconds else \
            max(1, round(self.piece_seconds * rows / seconds))
        k = next((s["params"]["k"] for s in self.steps if "k" in s["params"]), 1)
        uniform = all(s["method"] == "uniform" for s in self.steps)
        return plan_pieces(self.be, rows, seconds, chunk,
                           self.max_new_tokens, "fail", self.model_name, name,
                           k if uniform else None)

    # -- many inputs -----------------------------------------------------------------------------
    def transcribe(self, audio: list, on_error: str = "fail", show: bool = False) -> list[Result]:
        """Transcripts of ``audio`` (paths or 16 kHz float arrays), in order (``on_error="skip"``:
        unreadable files are named in the log and left out)."""
        return list(self.iter_transcribe(audio, on_error, show))

    def iter_transcribe(self, audio: list, on_error: str = "fail", show: bool = False):
        """``Result`` per input as each batch finishes (``batch_size`` inputs at a time)."""
        import torch

        from .parallel import progress

        names = [a if isinstance(a, str) else f"array{i}" for i, a in enumerate(audio)]
        self.skipped = []  # (name, why) of the inputs on_error="skip" left out
        said = set()  # resampling and mixing down are said once
        total = sum(_seconds(a, self.be.sample_rate, said) for a in audio)
        with progress(total=round(total, 1), desc="transcribe", unit="s audio",
                      disable=not show) as bar:
            for b in range(0, len(audio), self.batch_size):
                batch = []
                for name, item in zip(names[b:b + self.batch_size],
                                      audio[b:b + self.batch_size]):
                    try:
                        wave = load_audio(item, self.be.sample_rate) if isinstance(item, str) \
                            else _array(item, name)
                    except Exception as e:  # noqa: BLE001 - soundfile and its codecs
                        if on_error != "skip":
                            raise ValueError(f"{name}: {e} (--on-error skip leaves unreadable "
                                             "inputs out)") from e
                        log.warning("skipped %s: %s", name, e)
                        self.skipped.append((name, str(e)))
                        continue
                    batch.append((name, wave))
                if not batch:
                    continue
                frames = self.be.encode([w for _, w in batch], batch_size=self.batch_size)
                feats = [self.compress(f.numpy()) for f in frames]
                plans = [self._pieces(len(z), len(w) / self.be.sample_rate, f"{name}")
                         for (name, w), z in zip(batch, feats)]
                jobs = [(i, s, e, cap) for i, plan in enumerate(plans) for s, e, cap in plan]
                texts = []
                for p in range(0, len(jobs), self.batch_size):
                    group = jobs[p:p + self.batch_size]
                    texts += self.be.transcribe(
                        [torch.from_numpy(feats[i][s:e].astype(np.float32))
                         for i, s, e, _ in group], self.beam, [cap for *_, cap in group])
                    bar.update(sum((e - s) / len(feats[i]) * len(batch[i][1])
                                   for i, s, e, _ in group) / self.be.sample_rate)
                for i, (name, wave) in enumerate(batch):
                    seconds, rows = len(wave) / self.be.sample_rate, len(feats[i])
                    pieces = [Piece(round(s / rows * seconds, 3), round(e / rows * seconds, 3),
                                    text)
                              for (j, s, e, _), (text, _) in zip(jobs, texts) if j == i]
                    yield Result(name, " ".join(p.text for p in pieces if p.text), seconds,
                                 self.be.audio_positions(rows), pieces)


def _seconds(item, sample_rate: int, said: set) -> float:
    """The seconds of audio of a path (its header; 0 if unreadable: named when it is read) or
    an array; says once that files of another rate are resampled and several channels mixed
    down."""
    if not isinstance(item, str):
        return len(item) / sample_rate if hasattr(item, "__len__") else 0.0
    import soundfile as sf

    try:
        info = sf.info(item)
    except Exception:  # noqa: BLE001 - reported when the file is read
        return 0.0
    for kind, odd, what in (("rate", info.samplerate != sample_rate,
                             f"{info.samplerate} Hz audio (e.g. {item}) is resampled to "
                             f"{sample_rate} Hz"),
                            ("channels", info.channels > 1,
                             f"{info.channels}-channel audio (e.g. {item}) is mixed down to "
                             "mono")):
        if odd and kind not in said:
            said.add(kind)
            log.warning("%s", what)
    return info.frames / info.samplerate


def _array(item, name: str) -> np.ndarray:
    """A waveform given as an array: 16 kHz mono float."""
    wave = np.asarray(item, dtype=np.float32)
    if wave.ndim == 2:  # [samples, channels] or [channels, samples]: mixed down
        wave = wave.mean(axis=int(np.argmin(wave.shape)))
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"{name}: a waveform is a non-empty 1-D array of 16 kHz samples, "
                         f"got shape {np.asarray(item).shape}")
    if not np.isfinite(wave).all():
        raise ValueError(f"{name}: the waveform contains NaN or Inf samples")
    return wave


# -- inputs and outputs of the command ---------------------------------------------------------
def find_audio(inputs: list[str]) -> list[str]:
    """The audio files of ``inputs``: files as given, folders searched recursively by
    extension (sorted), manifests (``.jsonl``: their ``audio`` fields), ``-`` a list on stdin."""
    import sys

    from .manifest import read_manifest

    found = []
    for item in inputs:
        if item == "-":
            found += find_audio([line.strip() for line in sys.stdin if line.strip()])
        elif os.path.isdir(item):
            here = sorted(os.path.join(root, f) for root, _, files in os.walk(item)
                          for f in files if f.lower().endswith(AUDIO_EXTENSIONS))
            if not here:
                raise ValueError(f"{item}: a folder with no audio files "
                                 f"({', '.join(AUDIO_EXTENSIONS)})")
            found += here
        elif item.endswith(".jsonl"):
            utts, _ = read_manifest(item)
            found += [u.audio for u in utts]
        elif not os.path.exists(item):
            raise ValueError(f"{item}: no such file or folder")
        else:
            found.append(item)
    if not found:
        raise ValueError("no audio given")
    return found


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(result: Result, fmt: str) -> str:
    """One result as ``txt``, ``jsonl``, ``srt`` or ``vtt`` text."""
    if fmt == "txt":
        return result.text + "\n"
    if fmt == "jsonl":
        return json.dumps(result.to_json(), ensure_ascii=False) + "\n"
    cues = [p for p in result.pieces if p.text]
    if fmt == "srt":
        return "".join(f"{i}\n{_stamp(p.start, ',')} --> {_stamp(p.end, ',')}\n{p.text}\n\n"
                       for i, p in enumerate(cues, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_stamp(p.start, '.')} --> {_stamp(p.end, '.')}\n"
                                      f"{p.text}\n\n" for p in cues)
    raise ValueError(f"unknown format {fmt!r}; choose one of txt, jsonl, srt, vtt")
