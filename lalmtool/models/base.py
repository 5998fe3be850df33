"""The backend interface: what a model must provide for every lalmtool stage.

A backend wraps one LALM family. ``extract`` needs ``encode`` and ``frame_rate``; ``finetune``
and ``decode`` need ``loss``, ``generate`` and ``default_lora_targets``. Features always travel
as a list of float tensors ``[T_i, D]`` (one per utterance; compressed or not).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..fileio import model_identity

log = logging.getLogger("lalmtool")


class Backend(ABC):
    name: str = ""
    sample_rate: int = 16000
    #: seconds of audio the encoder takes at once (longer audio: window by window); None:
    #: any length in one pass
    window_seconds: float | None = None

    def __init__(self, model_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model_path, self.device, self.dtype = model_path, torch.device(device), dtype

    # -- encoder side (extract) ------------------------------------------------------------
    @property
    @abstractmethod
    def frame_rate(self) -> float:
        """Frames per second of audio that ``encode`` returns."""

    @abstractmethod
    def encode(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono float waveforms → encoder frames ``[T_i, D]`` covering each waveform."""

    def identity(self) -> dict:
        """What identifies the encoder's output, for store fingerprints."""
        return {"backend": self.name, "model": model_identity(self.model_path)}

    # -- decoder side (finetune, decode) ---------------------------------------------------
    #: The torch module that ``loss``/``generate`` run and that peft wraps with LoRA adapters.
    model: torch.nn.Module
    #: peft ``target_modules`` (a list of names or a full-match regex) for LoRA by default.
    default_lora_targets: str | list[str] = ""
    #: Modules trained in full next to the adapters (e.g. a projector); saved with the adapter.
    modules_to_save: list[str] = []

    def num_audio_tokens(self, feat: torch.Tensor) -> int:
        """Decoder input positions that ``[T, D]`` features occupy (T unless the backend stacks)."""
        return self.audio_positions(int(feat.shape[0]))

    def audio_positions(self, frames: int) -> int:
        """Decoder input positions that ``frames`` stored feature rows occupy."""
        return frames

    def prompt_positions(self, frames: int) -> int | None:
        """Decoder positions the prompt takes with ``frames`` stored feature rows spliced in,
        for a decoder whose positions are bounded (``position_limit``); None otherwise."""
        return None

    def position_limit(self) -> int | None:
        """The most positions (prompt, audio and generated tokens) the decoder holds, if bounded."""
        return None

    # -- lengths (long inputs) -------------------------------------------------------------
    def text_tokens(self, text: str) -> int:
        """Decoder tokens a target text takes (without the token that ends it)."""
        return len(self.tokenizer.encode(text.strip(), add_special_tokens=False))

    def new_token_room(self, frames: int) -> int | None:
        """The most tokens (the end token included) the decoder can generate after its prompt
        with ``frames`` stored feature rows; None when its positions are unbounded."""
        limit = self.position_limit()
        return None if not limit else limit - self.prompt_positions(frames)

    def text_room(self, frames: int) -> int | None:
        """The most target tokens (the end token excluded) that fit after the prompt with
        ``frames`` feature rows, in training and in decoding; None when unbounded."""
        room = self.new_token_room(frames)
        return None if room is None else room - 1

    @abstractmethod
    def loss(self, feats: list[torch.Tensor], texts: list[str]) -> tuple[torch.Tensor, int]:
        """Mean token cross-entropy of ``texts`` given ``feats``, and the number of tokens."""

    def generate(self, feats: list[torch.Tensor], beam: int = 1,
                 max_new_tokens: int = 200) -> list[str]:
        """Transcripts (or translations) for a batch of feature sequences."""
        return [text for text, _ in self.transcribe(feats, beam, [max_new_tokens] * len(feats))]

    def transcribe(self, feats: list[torch.Tensor], beam: int, caps: list[int],
                   floors: list[int] | None = None) -> list[tuple[str, bool]]:
        """(text, cut) per sequence: generation ends at an end token or after ``caps[i]`` new
        tokens; ``cut`` says it ended at the cap (the text may be incomplete, or a runaway).
        ``floors[i]``: no end token before that many new tokens (``EndNotBefore``). Greedy
        texts are those of decoding each sequence alone with its own cap."""
        processors = [EndNotBefore(floors, self.stop_ids(), beam)] if floors and any(floors) \
            else None
        ids = self.new_token_ids(feats, beam, max(caps), processors).tolist()
        stops = set(self.stop_ids())
        out = []
        for row, cap in zip(ids, caps):
            row = row[:cap]
            end = next((i for i, t in enumerate(row) if t in stops), None)
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            out.append((text, end is None))
        return out

    @abstractmethod
    def new_token_ids(self, feats: list[torch.Tensor], beam: int, max_new_tokens: int,
                      processors: list | None = None) -> torch.Tensor:
        """Generated token ids ``[B, N]`` (the prompt left out; rows that ended early padded);
        ``processors``: logits processors ``generate`` applies as well."""

    @abstractmethod
    def stop_ids(self) -> list[int]:
        """The tokens that end generation."""


class EndNotBefore(LogitsProcessor):
    """Keeps row ``i`` of a batch from ending (its stop tokens' scores at -inf) until it holds
    ``floors[i]`` new tokens: a decoder that stops early on a long input is made to go on (a
    length-aware end; ``decode --min-tokens-per-s``)."""

    def __init__(self, floors: list[int], stop_ids: list[int], beams: int = 1):
        self.floors = torch.tensor(floors).repeat_interleave(beams)
        self.stop_ids = torch.tensor(stop_ids)
        self.start: int | None = None  # the length of the first call's ids: the prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        early = (self.floors.to(scores.device) > input_ids.shape[1] - self.start).nonzero()
        if len(early):
            scores = scores.clone()
            scores[early, self.stop_ids.to(scores.device)] = -float("inf")
        return scores


@dataclass
class BatchLayout:
    """Token ids, audio slots, attention mask, positions and labels (None without texts) of a
    padded decoder-only batch, all ``[B, L]``."""

    ids: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor | None


class DecoderOnlyBackend(Backend):
    """What the decoder-only backends share: the audio goes into a causal LM's prompt, targets
    end with ``end_token_id``, generation stops there or at any of the LM's eos tokens.

    Generation is transformers' ``generate`` on the prompt's embeddings. An eager decode step
    costs the decoder layers' own per-op overhead (on a tiny 32-layer Qwen2 on a CPU ~89 % of a
    step; the causal mask rebuilt every step, the rotary embedding, the model's wrappers and
    the generation loop around them ~6 %: ``benchmarks/bench_generate.py --profile``). The
    ``compile`` option (``--backend-opt compile=true``; default false) removes that overhead in
    greedy search: a static KV cache and the decode step compiled by ``torch.compile``
    (inductor; CUDA graphs on CUDA, transformers' ``reduce-overhead``). The first call per batch
    shape compiles (tens of seconds); the token ids are those of the eager path (tested on tiny
    random models), beam search runs as without it. The static cache keeps the longest length
    generated so far (no recompiling per length), so one long utterance makes later steps attend
    over its length. Where compiling is unavailable or fails: one warning, then eager.
    """

    tokenizer: object  # the LM's tokenizer
    end_token_id: int  # the token that closes a target

    def _core(self) -> torch.nn.Module:
        """The model inside DDP and peft wrappers (LoRA layers stay injected)."""
        return unwrap(self.model)

    def _llm(self) -> torch.nn.Module:
        """The causal LM whose ``generation_config`` names the eos tokens."""
        return self._core()

    def prompt_positions(self, frames: int) -> int:
        before, after = self._prompt_ids
        return len(before) + self.audio_positions(frames) + len(after)

    def position_limit(self) -> int | None:
        config = self._llm().config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "max_position_embeddings", None)

    def new_token_ids(self, feats: list[torch.Tensor], beam: int, max_new_tokens: int,
                      processors: list | None = None) -> torch.Tensor:
        return self.generate_ids(feats, beam, max_new_tokens, processors)

    def stop_ids(self) -> list[int]:
        """Tokens that end generation: the target's end token and the LM's eos tokens."""
        eos = self._llm().generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        ids = [self.end_token_id, self.tokenizer.eos_token_id, *eos]
        return [t for t in dict.fromkeys(ids) if t is not None]

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.end_token_id

    def _layout(self, n_audio: list[int], texts: list[str] | None, fill_id: int,
                padding_side: str) -> BatchLayout:
        """The batch layout both decoder-only backends share: per utterance the prompt's ids
        before the audio, ``n_audio[i]`` audio slots (holding ``fill_id``), the prompt's ids after
        it, then (when ``texts`` are given) the target's tokens and the end token; padded on
        ``padding_side`` with the pad id; labels -100 outside the targets; positions counting
        real tokens only."""
        if texts is not None and len(texts) != len(n_audio):
            raise ValueError(f"{len(n_audio)} feature sequences but {len(texts)} texts")
        check_choice("padding_side", padding_side, ("left", "right"))
        before, after = self._prompt_ids
        rows = []  # (ids, number of audio slots, number of target tokens) per utterance
        for i, n in enumerate(n_audio):
            target = [] if texts is None else self.tokenizer.encode(
                texts[i].strip(), add_special_tokens=False) + [self.end_token_id]
            rows.append((before + [fill_id] * n + after + target, n, len(target)))
        width, b = max(len(r[0]) for r in rows), len(rows)
        ids = torch.full((b, width), self._pad_id(), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        slots = torch.zeros((b, width), dtype=torch.bool)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, (seq, n, t) in enumerate(rows):
            start = width - len(seq) if padding_side == "left" else 0
            ids[i, start:start + len(seq)] = torch.tensor(seq)
            mask[i, start:start + len(seq)] = 1
            slots[i, start + len(before):start + len(before) + n] = True
            if t:
                labels[i, start + len(seq) - t:start + len(seq)] = torch.tensor(seq[-t:])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        dev = self.device
        return BatchLayout(ids.to(dev), slots.to(dev), mask.to(dev), positions.to(dev),
                           labels.to(dev) if texts is not None else None)

    def generation_config(self, beam: int, max_new_tokens: int) -> GenerationConfig:
        """Greedy (``beam`` 1) or beam search, stopping at ``stop_ids``."""
        return GenerationConfig(do_sample=False, num_beams=beam, max_new_tokens=max_new_tokens,
                                eos_token_id=self.stop_ids(), pad_token_id=self._pad_id())

    def loss(self, feats: list[torch.Tensor], texts: list[str]) -> tuple[torch.Tensor, int]:
        """Token-mean cross-entropy of the targets and end tokens (logits computed only where
        a target token is predicted)."""
        batch = self.build_inputs(feats, texts, padding_side="right")
        predicts, targets = next_token_targets(batch.labels)
        return token_mean_loss(self._target_logits(batch, predicts), targets)

    @torch.inference_mode()
    def generate_ids(self, feats: list[torch.Tensor], beam: int = 1, max_new_tokens: int = 200,
                     processors: list | None = None) -> torch.Tensor:
        """New token ids ``[B, N]`` (greedy or beam search on a left-padded batch)."""
        batch = self.build_inputs(feats, padding_side="left")
        return self._generate(batch, self.generation_config(beam, max_new_tokens),
                              logits_processor=LogitsProcessorList(processors or []))

    def _target_logits(self, batch, predicts: torch.Tensor) -> torch.Tensor:
        """The logits ``[T, vocab]`` at the positions ``predicts`` of a right-padded batch."""
        raise NotImplementedError

    def _generate(self, batch, config: GenerationConfig, **kwargs) -> torch.Tensor:
        """``generate``'s new token ids for a left-padded batch (through ``_run_generate``,
        with ``kwargs``)."""
        raise NotImplementedError

    #: ``compile`` option: decode steps with a static KV cache and a compiled forward
    #: (``torch.compile``); False: transformers' dynamic cache, eager. Same token ids either way.
    compile: bool = False

    def _set_compile(self, compile) -> None:
        """The ``compile`` constructor option (a bool; ``--backend-opt compile=true``)."""
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, not {compile!r}")
        self.compile = compile

    def _run_generate(self, lm: torch.nn.Module, config: GenerationConfig,
                      **inputs) -> torch.Tensor:
        """``lm.generate(**inputs)`` with ``config``; with ``compile`` on and greedy search, through
        a static KV cache and a compiled decode step (transformers compiles no beam search: beams
        keep the dynamic cache). Where compiling is unavailable or fails, one warning, and this
        and every later call run eagerly (the same ids; a compile's partial work is dropped)."""
        if self.compile and config.num_beams == 1:
            why = compile_unavailable()
            if why is None:
                try:
                    return lm.generate(**inputs, generation_config=compiled(config))
                except Exception as e:  # noqa: BLE001 - dynamo, inductor and the C++ toolchain
                    why = _reason(e)
            log.warning("compile=true: compiling the decode step failed (%s); generating "
                        "without it (transformers' dynamic KV cache, eager)", why)
            self.compile = False
        return lm.generate(**inputs, generation_config=config)


@dataclass
class SplicedBatch:
    """LLM inputs with the audio frames written in place of the placeholders."""

    ids: torch.Tensor  # [B, L] token ids (placeholders and padding included), for inspection
    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L] 1 = real token
    position_ids: torch.Tensor  # [B, L] positions counted over real tokens only
    labels: torch.Tensor | None  # [B, L] the token to learn at each position, -100 elsewhere

    def model_inputs(self) -> dict:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


@contextlib.contextmanager
def logits_only(lm_head: torch.nn.Module, select):
    """Within the block ``lm_head`` maps ``select(hidden_states)`` only.

    ``Qwen2AudioForConditionalGeneration.forward`` takes no ``logits_to_keep`` and would compute
    logits at every position: [B, L, vocab], 4.7 GB in bf16 for 10 min of audio with the 7B's
    156k-word vocabulary, where the loss needs the target positions and generation the last one.
    """
    handle = lm_head.register_forward_pre_hook(lambda _module, args: (select(args[0]),))
    try:
        yield
    finally:
        handle.remove()


class SplicedBackend(DecoderOnlyBackend):
    """A decoder-only backend whose model reads ``inputs_embeds``: the audio rows are written into
    the prompt's embeddings (``build_inputs`` → ``SplicedBatch``), then the model's own forward
    gives the loss and its own ``generate`` the new tokens (qwen2-audio, the audio LLM families)."""

    def build_inputs(self, feats: list[torch.Tensor], texts: list[str] | None = None,
                     padding_side: str = "right") -> SplicedBatch:
        raise NotImplementedError

    def _target_logits(self, batch: SplicedBatch, predicts: torch.Tensor) -> torch.Tensor:
        with logits_only(self._core().get_output_embeddings(), lambda h: h[predicts]):
            return self.model(**batch.model_inputs(), use_cache=False).logits

    def _generate(self, batch: SplicedBatch, config: GenerationConfig, **kwargs) -> torch.Tensor:
        core = self._core()
        with logits_only(core.get_output_embeddings(), lambda h: h[:, -1:]):
            return self._run_generate(core, config, inputs_embeds=batch.inputs_embeds,
                                      attention_mask=batch.attention_mask, **kwargs)


def _reason(e: BaseException) -> str:
    """An exception in one line: its type, and the first line of what it (or, for a wrapper
    such as dynamo's BackendCompilerFailed, the exception it was raised from) says."""
    root = e
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
        root = inner
    lines = str(root).strip().splitlines()
    said = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return said if root is e else f"{type(e).__name__}, from {said}"


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can)."""
    try:
        import torch._dynamo
    except Exception as e:  # noqa: BLE001
        return f"torch._dynamo cannot be imported ({e})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    return None


def compiled(config: GenerationConfig) -> GenerationConfig:
    """``config`` generating through a static KV cache with the decode step compiled (inductor;
    on every device: transformers compiles by itself on accelerators only)."""
    from transformers import CompileConfig

    config = copy.deepcopy(config)
    config.cache_implementation = "static"
    compile_config = CompileConfig(fullgraph=False)
    compile_config._compile_all_devices = True
    config.compile_config = compile_config
    return config



def encode_in_windows(waves: list[np.ndarray], window: int, batch_size: int,
                      encode_pieces) -> list[torch.Tensor]:
    """Encodes waveforms of any length with an encoder that takes at most ``window`` samples.

    Each waveform is cut into windows; windows of all utterances are batched together
    (``batch_size`` per call of ``encode_pieces``, which maps a list of ≤ window-sample pieces
    to their frames ``[T_j, D]``), and each utterance's frames are joined in order.
    """
    pieces = [(i, w[start : start + window])
              for i, w in enumerate(waves) for start in range(0, max(len(w), 1), window)]
    out: list[list[torch.Tensor]] = [[] for _ in waves]
    for b in range(0, len(pieces), batch_size):
        chunk = pieces[b : b + batch_size]
        for (i, _), frames in zip(chunk, encode_pieces([p for _, p in chunk])):
            out[i].append(frames)
    return [torch.cat(parts) for parts in out]


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads ``[T_i, D]`` tensors to ``[B, T_max, D]``; returns it and a bool mask [B, T_max]."""
    lengths = torch.tensor([f.shape[0] for f in feats])
    out = feats[0].new_zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    return out, mask


# -- shared by the backends ------------------------------------------------------------------
#: ``--dtype`` names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_choice(what: str, value, choices) -> None:
    """Raises ValueError naming ``what`` and the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def resolve_dtype(dtype: torch.dtype | str | None, auto: torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype, a name of ``DTYPES``, or ``None``/``"auto"`` (→ ``auto``)."""
    if dtype is None or dtype == "auto":
        return auto
    if isinstance(dtype, str):
        check_choice("dtype", dtype, ("auto", *DTYPES))
        return DTYPES[dtype]
    return dtype


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and peft wrappers (LoRA layers stay injected)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a causal LM's ``labels`` ``[B, L]`` (-100 = no target): the bool mask of positions
    whose next token is a target, and those target tokens in the mask's order."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    return predicts, labels[:, 1:][predicts[:, :-1]]


def token_mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy of logits ``[N, V]`` against ``targets`` ``[N]``, averaged over the N tokens
    (computed in float32), and N."""
    n = int(targets.numel())
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="sum") / max(n, 1), n
