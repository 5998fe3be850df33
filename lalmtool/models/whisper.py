"""Whisper encoder–decoder (transformers ``WhisperForConditionalGeneration``).

The encoder runs on 30 s windows (transformers insists on 3000 mel frames); ``encode`` keeps
the frames that cover real audio (50 per second) unless ``trim=False``, and encodes audio longer
than 30 s window by window. The decoder cross-attends to any number of (compressed) frames;
batches of unequal length are padded and the padding is masked out of cross-attention.

Generation runs the plain encoder–decoder ``GenerationMixin.generate`` on the stored frames,
with Whisper's own prompt (``tokenizer.prefix_tokens``, as in training) and suppression lists.
``WhisperForConditionalGeneration.generate`` is not used: it takes more than 1,500 encoder
positions (3,000 mel frames) for long-form audio to be cut into 30 s windows with timestamps,
and refuses them without timestamps, whereas here the whole (compressed) memory is attended to
at once. For ≤ 1,500 positions both give the same tokens (tests/test_longform.py). The decoder
still holds at most ``max_target_positions`` (448) tokens, prompt included.

Whisper learnt to transcribe one 30 s window: given a longer memory, tiny.en transcribes about
its first 30 s and stops, unless its LoRA was trained on long inputs (``finetune
--concat_seconds``). ``decode --chunk N`` cuts each utterance into pieces of N positions and
joins their texts: 1500 is one encoder window of frames, 1500/k of a uniform pooling by k (e.g.
500 for k=3); each piece gets its own cap.

The encoder adds positions 0..1499 inside each 30 s window, so the frames of a longer memory
(several windows, or utterances joined by ``--concat_seconds``) repeat them, and cross-attention
itself is blind to order: the decoder cannot tell which window comes first. ``positions=
"global"`` adds Whisper's own sinusoidal encoding of each memory row's index (0, 1, 2, ... over
the whole memory, at the scale of the encoder's positions) to the memory, in training and
decoding alike (an adapter records it with its options), so a long-form adapter can learn the
order. The default ``"window"`` leaves the memory as the encoder wrote it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import typing
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (GenerationMixin, LogitsProcessorList, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration, WhisperTokenizer)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import sinusoids

from ..options import Options, option
from .base import (DTYPES, Backend, encode_in_windows, pad_features,
                   resolve_dtype, unwrap)

WINDOW_SECONDS = 30
HOP = 160  # mel hop at 16 kHz; the encoder's second convolution halves the frame rate


@dataclass
class WhisperOptions(Options):
    """The whisper backend's options (``--backend-opt key=value``)."""

    WHAT = "whisper backend option"

    dtype: typing.Any = option("float32", "weights' dtype", ("auto", *DTYPES))
    trim: bool = option(True, "keep only the frames that cover the audio of each 30 s window "
                              "(false: all 1500, as Whisper itself decodes)")
    language: str | None = option("en", "language token of a multilingual Whisper")
    task: str = option("transcribe", "task token of a multilingual Whisper",
                       ("transcribe", "translate"))
    positions: str = option("window", "window: the encoder's positions 0..1499 in each 30 s "
                                      "window, as Whisper; global: Whisper's sinusoids added "
                                      "over the whole memory (long inputs, joined utterances)",
                            ("window", "global"))


class WhisperBackend(Backend):
    name = "whisper"
    Options = WhisperOptions
    window_seconds = float(WINDOW_SECONDS)
    default_lora_targets = (r".*decoder\.layers\.\d+\."
                            r"((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)")

    def __init__(self, model_path: str, device: str = "cpu", **options):
        o = self.options = WhisperOptions(**options)
        super().__init__(model_path, device, resolve_dtype(o.dtype, torch.float32))
        self.positions, self.trim = o.positions, o.trim
        self.model = WhisperForConditionalGeneration.from_pretrained(
            model_path, dtype=self.dtype).to(self.device).eval()
        self.features = WhisperFeatureExtractor.from_pretrained(model_path)
        multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        self.language = o.language if multilingual else None
        self.task = o.task if multilingual else None

    @functools.cached_property
    def tokenizer(self) -> WhisperTokenizer:
        """Loaded on first use: extracting features needs no tokenizer."""
        tok = WhisperTokenizer.from_pretrained(self.model_path)
        tok.set_prefix_tokens(language=self.language, task=self.task, predict_timestamps=False)
        return tok

    @property
    def frame_rate(self) -> float:
        return self.features.sampling_rate / HOP / 2

    def identity(self) -> dict:
        return {**super().identity(), "tap": "encoder.last_hidden_state", "trim": self.trim}

    # -- encoder -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        return encode_in_windows(waves, WINDOW_SECONDS * self.sample_rate, batch_size,
                                 self._encode_windows)

    def _encode_windows(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """Frames of ≤30 s pieces: those covering the audio (50 Hz), or all 1500 untrimmed."""
        mel = self.features(pieces, sampling_rate=self.sample_rate,
                            return_tensors="pt").input_features
        hidden = self._encoder(mel)
        return [h[: math.ceil(len(p) / (2 * HOP))] if self.trim else h
                for p, h in zip(pieces, hidden)]

    def _encoder(self, mel: torch.Tensor) -> torch.Tensor:
        """The encoder's output ``[B, 1500, D]`` (float32, on the CPU) for 30 s log-mel windows."""
        return self.model.model.encoder(
            mel.to(self.device, self.dtype)).last_hidden_state.float().cpu()

    # -- decoder -------------------------------------------------------------------------
    def _memory(self, feats: list[torch.Tensor]) -> tuple[BaseModelOutput, torch.Tensor]:
        padded, mask = pad_features([f.to(self.device, self.dtype) for f in feats])
        if self.positions == "global":
            padded = padded + sinusoids(*padded.shape[1:]).to(padded)
        return BaseModelOutput(last_hidden_state=padded), mask.to(self.device)

    def _token_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder inputs (prefix + text) and labels (text + end-of-text, prefix masked)."""
        prefix, eot = self.tokenizer.prefix_tokens, self.tokenizer.eos_token_id
        seqs = [prefix + self.tokenizer.encode(" " + t.strip(), add_special_tokens=False)
                + [eot] for t in texts]
        n = max(len(s) for s in seqs) - 1
        inputs = torch.full((len(seqs), n), eot, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
            labels[i, len(prefix) - 1 : len(s) - 1] = torch.tensor(s[len(prefix):])
        return inputs.to(self.device), labels.to(self.device)

    def token_logits(self, feats: list[torch.Tensor],
                     texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's logits ``[B, L, V]`` for ``texts`` given ``feats`` (teacher-forced),
        and the labels ``[B, L]`` they predict (-100 where nothing is learnt)."""
        memory, mask = self._memory(feats)
        inputs, labels = self._token_batch(texts)
        with cross_attention_mask(self.model, mask):
            return self.model(encoder_outputs=memory, decoder_input_ids=inputs).logits, labels

    def loss(self, feats: list[torch.Tensor], texts: list[str]) -> tuple[torch.Tensor, int]:
        logits, labels = self.token_logits(feats, texts)
        n = int((labels != -100).sum())
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=-100, reduction="sum") / max(n, 1)
        return loss, n

    def max_new_tokens_limit(self) -> int:
        """The most tokens the decoder can generate after the prompt."""
        return unwrap(self.model).config.max_target_positions - len(self.tokenizer.prefix_tokens)

    def check_new_tokens(self, max_new_tokens: int) -> None:
        """Refuses a cap of more new tokens than the decoder holds after its prompt."""
        limit = self.max_new_tokens_limit()
        if max_new_tokens > limit:
            raise ValueError(f"max_new_tokens {max_new_tokens} is more than Whisper's decoder "
                             f"holds after its prompt ({limit}); lower --max-new-tokens")

    def new_token_room(self, frames: int) -> int:
        return self.max_new_tokens_limit()  # the memory's length does not take positions

    def text_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(" " + text.strip(), add_special_tokens=False))

    def stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def new_token_ids(self, feats: list[torch.Tensor], beam: int, max_new_tokens: int,
                      processors: list | None = None) -> torch.Tensor:
        ids = self.generate_ids(feats, beam, max_new_tokens, processors)
        return ids[:, len(self.tokenizer.prefix_tokens):]

    def generate_ids(self, feats: list[torch.Tensor], beam: int = 1, max_new_tokens: int = 200,
                     processors: list | None = None) -> torch.Tensor:
        """Token ids (prompt included) for any number of encoder positions; see the module doc."""
        self.check_new_tokens(max_new_tokens)
        model = unwrap(self.model)
        memory, mask = self._memory(feats)
        config = copy.deepcopy(model.generation_config)
        prompt = torch.tensor([self.tokenizer.prefix_tokens] * len(feats), device=self.device)
        config.update(num_beams=beam, do_sample=False, max_new_tokens=max_new_tokens,
                      max_length=prompt.shape[1] + max_new_tokens, forced_decoder_ids=None,
                      return_timestamps=False)
        with torch.inference_mode(), cross_attention_mask(model, mask):
            return GenerationMixin.generate(model, encoder_outputs=memory,
                                            decoder_input_ids=prompt, generation_config=config,
                                            logits_processor=LogitsProcessorList(processors or []))


@contextlib.contextmanager
def cross_attention_mask(model: torch.nn.Module, mask: torch.Tensor):
    """Masks padded encoder frames out of every decoder cross-attention inside the block.

    transformers' Whisper decoder passes no encoder mask to cross-attention, so padded frames
    would be attended to; this adds an additive mask ``[B, 1, 1, S]`` (repeated for beams).
    """
    if bool(mask.all()):
        yield
        return
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    bias = bias.masked_fill(~mask, torch.finfo(torch.float32).min)[:, None, None, :]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        b = bias.to(hidden.dtype)
        if hidden.shape[0] != b.shape[0]:  # beam search expands each item num_beams times
            b = b.repeat_interleave(hidden.shape[0] // b.shape[0], dim=0)
        kwargs["attention_mask"] = b
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for name, m in model.named_modules() if name.endswith("encoder_attn")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
