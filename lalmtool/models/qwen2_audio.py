"""Qwen2-Audio (transformers ``Qwen2AudioForConditionalGeneration``): the paper's LALM.

Checkpoints: ``Qwen/Qwen2-Audio-7B`` (base; plain-text prompt) and ``Qwen/Qwen2-Audio-7B-Instruct``
(chat template). The model is a Whisper-large-v3 audio tower (32 layers, 50 Hz after its
convolutions, then an average pooler to 25 Hz and a layer norm), a linear ``multi_modal_projector``
and a Qwen-7B decoder that reads the projected frames in place of ``<|AUDIO|>`` placeholder tokens.

What each stage does with it
----------------------------
* ``extract`` runs the audio tower on 30 s windows exactly as the model does (log-mel of the
  padded window, padded frames masked out of the tower's self-attention) and caches
  ``tap="pooled"``: the tower's output, 25 frames/s after the average pooler and layer norm, or
  ``tap="prepool"``: the 50 frames/s that enter the pooler. ``trim=True`` keeps the frames that
  cover the real audio (the lengths of ``_get_feat_extract_output_lengths``, i.e. the number of
  placeholders the processor would insert); ``trim=False`` keeps every frame of the padded window
  (750 pooled / 1500 pre-pool). Audio longer than 30 s is encoded window by window and the frames
  are concatenated (the processor itself would truncate at 30 s). Audio shorter than ~30 ms still
  yields one frame (the processor would give none).
* ``finetune``/``decode`` project the (compressed) frames with ``multi_modal_projector`` and write
  them into the LLM's input embeddings where the placeholders stand, one placeholder per frame,
  inside the checkpoint's prompt (see ``prompt_style``). Batches are right-padded for the loss
  and left-padded for generation; position ids follow the attention mask. The loss covers the
  target text tokens and the end token (``<|endoftext|>`` for the base prompt, ``<|im_end|>`` for
  the chat template), nothing else.
* Pre-pool features: the projector was trained on pooled-and-normed frames, so a pre-pool store
  goes through the tower's own ``layer_norm`` before the projector, and the *compressor stands in
  for the average pooler*: uniform mean pooling with k=2 of a pre-pool store reproduces the
  model's native input (exactly, for an even number of 50 Hz frames; an odd one gives one extra,
  half-length last token), and any other compressor replaces the fixed 2x pooler by its own
  segments. The tower's pooler is not applied a second time, so the number of stored tokens is
  exactly the number of audio tokens the LLM reads (what ``decode`` reports as tokens/s).
  Identity compression of a pre-pool store therefore feeds 50 tokens/s, which the decoder has
  never seen: it needs LoRA like any other compression. The backend that reads a pre-pool store
  must be told ``tap="prepool"`` too (features carry no tap of their own).

Constructor options (``TrainConfig.extra`` for finetune): ``tap``, ``trim``, ``task``
(``transcribe`` | ``translate``), ``language`` (source language code, e.g. ``en``),
``target_language`` (for ``translate``; a code such as ``de`` or a name), ``prompt_style``
(``auto``: ``chat`` when the checkpoint name contains "instruct", else ``base``), ``instruction``
(replaces the default instruction text), ``train_projector`` (also train the projector in full:
saved with the adapter via peft's ``modules_to_save``), ``gradient_checkpointing``, ``dtype``
(``auto``: bfloat16 on CUDA, float32 on CPU), ``compile`` (decode: a static KV cache and a
compiled decode step, ``--backend-opt compile=true``; default false, see
``DecoderOnlyBackend``).

Running the real checkpoint on a GPU
------------------------------------
Memory (bf16): Qwen2-Audio-7B has ~8.4 B parameters (audio tower 0.64 B, Qwen-7B decoder with a
156 k vocabulary): ~17 GB of weights in bfloat16, ~34 GB in float32. ``extract`` loads the whole
model (only the tower runs; ``--dtype bfloat16`` keeps it at ~17 GB), ``finetune`` and ``decode``
load it in bfloat16 on CUDA by default. LoRA r=16 on the default targets (q/k/v/o and
gate/up/down of all 32 decoder layers) adds ~40 M trainable parameters, < 1 GB with AdamW states.
Training activations dominate the rest: roughly 6-8 MB per LLM token in bf16 without
checkpointing, i.e. ~5-6 GB per 30 s utterance at 25 tokens/s (about a third of that at 3x
compression), plus the logits (156 k x tokens x 2 bytes). With gradient checkpointing
(``extra: {gradient_checkpointing: true}``: transformers' activation checkpointing, non-reentrant,
KV cache off in the loss) only each layer's input is kept, ~0.3 MB per token, for ~30 % more
compute. Decoding needs the weights plus ~0.5 MB of KV cache per token and beam. The decoder's
context (8192 positions) bounds one utterance to ~5 min at 25 tokens/s, longer when compressed:
``decode`` refuses an utterance whose prompt, audio tokens and ``max_new_tokens`` exceed the
LLM's ``max_position_embeddings``, naming it and the compression that would fit, and reports
the positions each utterance's prompt and audio take (``positions`` in hyp.jsonl, their
maximum ``max_positions`` in decode.json).
Generation is deterministic (``do_sample=False``); the checkpoint's other generation settings
(e.g. a repetition penalty) apply as in its own ``generate``.

    # 1. extract once: the whole model is loaded (≈17 GB in bf16), only the tower runs
    lalmtool extract --backend qwen2-audio --model Qwen/Qwen2-Audio-7B --manifest data/train/manifest.jsonl \
        --out exp/feats/qwen2-audio/train --device cuda --dtype bfloat16 --batch-size 16
    # 2-3. segment + pool as for any backend (the cache is 25 Hz, 1280-dim)
    # 4. LoRA; batch by duration so that long utterances do not blow the memory up
    lalmtool finetune --model Qwen/Qwen2-Audio-7B --feats exp/pooled/... \
        --manifest data/train/manifest.jsonl --out exp/lora/qwen2-audio-k2 --config conf/qwen2_audio.yaml
    # conf/qwen2_audio.yaml:
    #   backend: qwen2-audio
    #   batch_seconds: 120        # ~4 x 30 s per micro-batch: ~25 GB of activations at 25 Hz
    #   grad_accum: 2
    #   lr: 2.0e-4
    #   lora_r: 16
    #   amp: bf16
    #   extra: {dtype: bfloat16, gradient_checkpointing: false, train_projector: false}
    # 5. decode (loads bf16 by default on CUDA)
    lalmtool decode --backend qwen2-audio --model Qwen/Qwen2-Audio-7B --adapter exp/lora/qwen2-audio-k2/adapter \
        --feats exp/pooled/... --out exp/decode/qwen2-audio-k2/test --device cuda --batch-size 16

That fits an 80 GB card (H100) without checkpointing; with ``gradient_checkpointing: true``
``batch_seconds`` can go to ~600 there. A 40-48 GB card trains with checkpointing and
``batch_seconds`` around 240, a 24 GB card with checkpointing and ``batch_seconds`` <= 60.
These figures are estimates from the model's shapes, not measurements. For ``-Instruct``
checkpoints the chat template is used automatically (``prompt_style: chat``).
"""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (AutoProcessor, AutoTokenizer, Qwen2AudioForConditionalGeneration,
                          WhisperFeatureExtractor)
from transformers.masking_utils import create_bidirectional_mask

from ..options import Options, option
from .base import DTYPES, SplicedBackend, SplicedBatch, encode_in_windows, resolve_dtype

WINDOW_SECONDS = 30
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
TAPS = ("pooled", "prepool")
TASKS = ("transcribe", "translate")
PROMPT_STYLES = ("auto", "base", "chat")
#: Names for the instruction text of translation and chat prompts (CoVoST 2 / Common Voice codes).
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
    "ar": "Arabic", "ca": "Catalan", "cy": "Welsh", "et": "Estonian", "fa": "Persian",
    "id": "Indonesian", "lv": "Latvian", "mn": "Mongolian", "sl": "Slovenian", "sv": "Swedish",
    "ta": "Tamil", "tr": "Turkish",
}


@dataclass
class Qwen2AudioOptions(Options):
    """The qwen2-audio backend's options (``--backend-opt key=value``)."""

    WHAT = "qwen2-audio backend option"

    dtype: typing.Any = option(None, "weights' dtype (null or auto: bfloat16 on CUDA, float32 "
                                     "elsewhere)", ("auto", *DTYPES))
    trim: bool = option(True, "keep only the frames that cover the audio of each 30 s window")
    tap: str = option("pooled", "where the audio tower's frames are taken: pooled (its output, "
                                "25/s, what the LLM reads) or prepool (before its pooling, "
                                "50/s)", TAPS)
    task: str = option("transcribe", "the prompt's task", TASKS)
    language: str = option("en", "the language spoken (in the prompt)")
    target_language: str | None = option(None, "translate: the language to translate into")
    prompt_style: str = option("auto", "base (the pretrained model's prompt), chat (the "
                                       "instruct model's) or auto (chat when the model's name "
                                       "says instruct)", PROMPT_STYLES)
    instruction: str | None = option(None, "the prompt's instruction text instead of the "
                                           "task's default")
    train_projector: bool = option(False, "finetune also trains the audio projector in full")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass "
                                                 "(long inputs: less memory, ~30 % more time)")
    compile: bool = option(False, "torch.compile the decoder step (GPU generation)")

    def check(self) -> None:
        super().check()
        if self.task == "translate" and not self.target_language and self.instruction is None:
            raise ValueError("task 'translate' needs target_language (e.g. 'de') or an "
                             "instruction")


class Qwen2AudioBackend(SplicedBackend):
    Options = Qwen2AudioOptions
    name = "qwen2-audio"
    window_seconds = float(WINDOW_SECONDS)
    #: q/k/v/o and gate/up/down of every decoder layer; the audio tower's layers never match.
    default_lora_targets = (r".*language_model\.layers\.\d+\."
                            r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                            r"|mlp\.(gate_proj|up_proj|down_proj))")

    def __init__(self, model_path: str, device: str = "cpu", **options):
        o = self.options = Qwen2AudioOptions(**options)
        on_gpu = str(device).startswith("cuda")  # auto: bfloat16 on CUDA, float32 elsewhere
        super().__init__(model_path, device,
                         resolve_dtype(o.dtype, torch.bfloat16 if on_gpu else torch.float32))
        self._set_compile(o.compile)
        self.trim, self.tap, self.task = o.trim, o.tap, o.task
        self.language, self.target_language = o.language, o.target_language
        self.instruction = o.instruction
        self.prompt_style = o.prompt_style if o.prompt_style != "auto" else (
            "chat" if "instruct" in str(model_path).lower() else "base")
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(
            model_path, dtype=self.dtype).to(self.device).eval()
        self.features = WhisperFeatureExtractor.from_pretrained(model_path)
        self.modules_to_save = ["multi_modal_projector"] if o.train_projector else []
        if o.gradient_checkpointing:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    @functools.cached_property
    def tokenizer(self):
        """Loaded on first use: extracting features needs no tokenizer."""
        return AutoTokenizer.from_pretrained(self.model_path)

    @property
    def frame_rate(self) -> float:
        per_second = self.features.sampling_rate / self.features.hop_length / 2  # after conv2
        return per_second if self.tap == "prepool" else per_second / 2

    def identity(self) -> dict:
        return {**super().identity(), "tap": self.tap, "trim": self.trim}

    # -- encoder -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        return encode_in_windows(waves, WINDOW_SECONDS * self.sample_rate, batch_size,
                                 self._kept_frames)

    def _kept_frames(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """Frames of ≤30 s pieces: those covering the audio (at least one), or all untrimmed."""
        frames, lengths = self._encode_windows(pieces)
        return [h[: max(int(n), 1)] if self.trim else h for h, n in zip(frames, lengths)]

    def _encode_windows(self, pieces: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio tower frames ``[B, T, D]`` of ≤30 s pieces and the number that cover audio.

        Mirrors ``Qwen2AudioModel.forward``: the window is padded to 30 s, and the frames past
        the audio are masked out of the tower's self-attention.
        """
        inputs = self.features(pieces, sampling_rate=self.sample_rate, padding="max_length",
                               return_attention_mask=True, return_tensors="pt")
        mel = inputs.input_features.to(self.device, self.dtype)
        tower = self._core().model.audio_tower
        len50, len25 = tower._get_feat_extract_output_lengths(inputs.attention_mask.sum(-1))
        n50 = (mel.shape[-1] - 2) // 2 + 1
        mask = torch.arange(n50)[None, :] < len50[:, None]
        mask = create_bidirectional_mask(
            config=tower.config, attention_mask=mask.long().to(self.device),
            inputs_embeds=torch.zeros(len(pieces), n50, 1, dtype=self.dtype, device=self.device))
        captured = []
        hook = tower.avg_pooler.register_forward_pre_hook(
            lambda module, args: captured.append(args[0].transpose(1, 2)))
        try:
            pooled = tower(mel, attention_mask=mask).last_hidden_state
        finally:
            hook.remove()
        if self.tap == "prepool":
            return captured[0].float().cpu(), len50
        return pooled.float().cpu(), len25

    # -- prompt --------------------------------------------------------------------------
    @functools.cached_property
    def prompt(self) -> str:
        """The prompt text with one ``<|AUDIO|>`` placeholder (expanded to one per frame)."""
        audio = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS
        text = self.instruction if self.instruction is not None else self._default_instruction()
        if self.prompt_style == "base":
            return audio + text
        processor = AutoProcessor.from_pretrained(self.model_path)
        # the processor's built-in template tests content['type'] == 'audio'; the -Instruct
        # checkpoint's own chat_template.json tests 'audio' in content or 'audio_url' in content
        audio_item = {"type": "audio", "audio_url": "audio.wav"}  # rendered by both, never read
        conversation = [{"role": "user", "content": [audio_item, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)

    def _default_instruction(self) -> str:
        """Qwen2-Audio's pre-training ASR prompt (base) or a plain request (chat)."""
        source = _language_name(self.language)
        target = _language_name(self.target_language) if self.target_language else None
        if self.prompt_style == "base":
            if self.task == "transcribe":
                return f"Detect the language and recognize the speech: <|{self.language}|>"
            return (f"Detect the language and translate the speech into {target}: "
                    f"<|{self.language}|>")
        if self.task == "transcribe":
            return f"Transcribe the {source} speech into text. Output only the transcript."
        return f"Translate the {source} speech into {target}. Output only the translation."

    @functools.cached_property
    def _prompt_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after its audio placeholder."""
        ids = self.tokenizer.encode(self.prompt, add_special_tokens=False)
        audio_id = self._core().config.audio_token_id
        where = [i for i, t in enumerate(ids) if t == audio_id]
        if len(where) != 1:
            raise ValueError(f"the prompt must hold exactly one {AUDIO_TOKEN} token "
                             f"(id {audio_id}), found {len(where)}: {self.prompt!r}")
        return ids[: where[0]], ids[where[0] + 1 :]

    @functools.cached_property
    def end_token_id(self) -> int:
        """The token that ends a target: ``<|im_end|>`` after a chat turn, else end-of-text."""
        if self.prompt_style == "chat":
            tid = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ValueError(f"{self.model_path}: the tokenizer has no <|im_end|> token "
                                 "for the chat prompt; use prompt_style='base'")
            return tid
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{self.model_path}: tokenizer has no end-of-text token")
        return self.tokenizer.eos_token_id

    # -- splice --------------------------------------------------------------------------
    def project(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Frames of all utterances → LLM embeddings ``[sum T_i, H]`` (utterances concatenated).

        Pre-pool frames are first normed by the tower's own layer norm (the compressor has taken
        the average pooler's place).
        """
        inner = self._core().model
        dtype = next(inner.multi_modal_projector.parameters()).dtype
        x = torch.cat([f.to(self.device) for f in feats]).to(dtype)
        if self.tap == "prepool":
            x = inner.audio_tower.layer_norm(x)
        return inner.multi_modal_projector(x)

    def build_inputs(self, feats: list[torch.Tensor], texts: list[str] | None = None,
                     padding_side: str = "right") -> SplicedBatch:
        """Prompt (+ target text and end token) per utterance, audio frames spliced in, padded."""
        if not feats:
            raise ValueError("empty batch")
        if any(f.ndim != 2 or f.shape[0] == 0 for f in feats):
            shapes = [tuple(f.shape) for f in feats]
            raise ValueError(f"features must be non-empty [T, D] tensors; got {shapes}")
        core = self._core()
        audio_id = core.config.audio_token_id
        lay = self._layout([f.shape[0] for f in feats], texts, audio_id, padding_side)
        ids, mask, slots = lay.ids, lay.mask, lay.slots
        if int((ids == audio_id).sum()) != int(slots.sum()):  # e.g. a text holding <|AUDIO|>
            raise ValueError(f"{int((ids == audio_id).sum())} {AUDIO_TOKEN} positions for "
                             f"{sum(f.shape[0] for f in feats)} audio frames; texts: {texts}")
        embeds = core.get_input_embeddings()(ids)
        audio = self.project(feats).to(embeds.dtype)
        embeds = embeds.masked_scatter(slots[..., None], audio)
        return SplicedBatch(ids, embeds, mask, lay.positions, lay.labels)



def _language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code.lower(), code) if code else code
