"""Every audio LLM in transformers through one backend: the family's own audio path, prompt and
``generate``, with the audio tokens cached, compressed and spliced back where the LLM reads them.

All of these models share one shape: an audio encoder, a projector, and an LLM that reads the
projected rows in place of placeholder tokens (``config.audio_token_id``) that the family's own
processor inserts into its own prompt. This backend relies on that shape only; what differs
between families is one entry of ``FAMILIES`` (which transformers class, the native token rate,
which modules map encoder rows to audio tokens one to one, the published context).

What each stage does with it
----------------------------
* ``extract`` hands each ≤30 s window (``Family.window``) to the family's processor inside the
  prompt of the task (the processor's own feature extractor, padding and masks) and runs the
  model's own ``forward`` until the LLM is about to read its input: the rows the LLM reads at the
  placeholders are the **audio tokens** (``tap="tokens"``, the default; one row per placeholder
  the processor inserts, whatever the family's encoder, pooling, stacking or Q-Former). The LLM
  itself never runs. ``tap="encoder"`` stores instead the rows that enter the family's projector
  (``Family.projector``), for families whose projector maps rows to tokens one by one: a
  compressor then works before the projector, as ``tap=prepool`` does for ``qwen2-audio``.
  Audio longer than a window is encoded window by window and the rows are concatenated.
* ``finetune``/``decode`` build the family's prompt (its chat template, or its own transcription
  request) with the placeholder run expanded to the number of stored rows, write the rows there
  (through the projector for ``tap="encoder"``), and run the model's own ``forward`` (the loss
  on the target text and the token that ends the assistant's turn) and ``generate``. LoRA goes
  on the LLM's attention and MLP projections (found by name under the model's decoder).

Adding a family: one ``Family`` entry (docs/adding-a-family.md says what each field means) and
a random checkpoint writer in ``lalmtool.testing`` for its tests.
"""
from __future__ import annotations

import functools
import json
import os
import re
import typing
from dataclasses import dataclass

import numpy as np
import torch

from ..options import Options, option
from .base import DTYPES, SplicedBackend, SplicedBatch, encode_in_windows, resolve_dtype
from .qwen2_audio import LANGUAGE_NAMES


@dataclass(frozen=True)
class Family:
    """What the generic backend must know of one transformers audio LLM."""

    name: str  #: the backend's name (``--backend``)
    model_types: tuple[str, ...]  #: ``model_type`` values of its checkpoints' config.json
    model_class: str  #: the transformers class that holds the audio path and the LLM
    rate: float  #: native audio tokens per second of audio (published)
    checkpoint: str  #: the main public checkpoint (for docs and ``lalmtool backends``)
    context: int  #: that checkpoint's LLM positions (``max_position_embeddings`` of its config)
    #: module paths (under the model) that map the encoder's rows to audio tokens one by one, in
    #: order; empty: no ``encoder`` tap (e.g. a windowed Q-Former)
    projector: tuple[str, ...] = ()
    #: attribute of a full checkpoint's model that is the text-out model (Qwen2.5-Omni: thinker)
    part: str | None = None
    #: seconds of audio the family's encoder takes at once (longer audio: window by window);
    #: None: any length in one pass
    window: float | None = 30.0
    #: the encoder has no padding mask: each window is encoded alone (a batch would change it)
    alone: bool = False
    #: where the chat template takes text only: the user turn is this marker and the
    #: instruction, and the processor puts the audio in its place (Granite: ``<|audio|>``)
    audio_marker: str | None = None
    #: a system turn (where the template's default one changes, e.g. with today's date)
    system: str | None = None
    #: the prompt is the processor's own ``apply_transcription_request(audio, language=...)``
    #: (a template that keeps no instruction: transcription only, in the language given)
    transcription_request: bool = False
    #: how the chat template's audio item carries an in-memory waveform: ``array`` (the
    #: float32 array itself) or ``base64`` (a float WAV in base64: mistral-common's processors)
    audio_item: str = "array"


FAMILIES = {f.name: f for f in [
    Family("qwen2-audio-chat", ("qwen2_audio",), "Qwen2AudioForConditionalGeneration", 25.0,
           "Qwen/Qwen2-Audio-7B-Instruct", 8192, ("model.multi_modal_projector",)),
    # a Whisper-large-v3-style tower (50 Hz), 4 frames stacked, an MLP; each ≤30 s window is
    # padded to 30 s and gives 375 tokens (the projector reads the stacked rows one by one)
    Family("voxtral", ("voxtral",), "VoxtralForConditionalGeneration", 12.5,
           "mistralai/Voxtral-Mini-3B-2507", 131072, ("model.multi_modal_projector",),
           audio_item="base64"),
    # the thinker (audio in, text out) of an Omni checkpoint: a Whisper-style tower pooled to
    # 25 Hz whose own last layer norm and linear map rows to tokens one by one; the processor
    # cuts audio at 30 s (the thinker loads from the full checkpoint's thinker.* weights)
    Family("qwen2.5-omni", ("qwen2_5_omni", "qwen2_5_omni_thinker"),
           "Qwen2_5OmniThinkerForConditionalGeneration", 25.0, "Qwen/Qwen2.5-Omni-7B", 32768,
           ("model.audio_tower.ln_post", "model.audio_tower.proj")),
    # a Whisper-large-v3-style tower pooled to 25 Hz and a row-wise MLP; longer audio in 30 s
    # windows, one run of placeholders (the processor caps it at 20 windows)
    Family("audioflamingo3", ("audioflamingo3",), "AudioFlamingo3ForConditionalGeneration", 25.0,
           "nvidia/audio-flamingo-3-hf", 32768, ("model.multi_modal_projector",)),
    # a Whisper-style tower (50 Hz), 4 frames concatenated, an MLP on the stacked rows
    Family("glm-asr", ("glmasr",), "GlmAsrForConditionalGeneration", 12.5,
           "zai-org/GLM-ASR-Nano-2512", 8192, ("model.multi_modal_projector",)),
    # an encoder downsampling 8x by convolutions per 1 s chunk (13 tokens/s), a row-wise
    # projector on its packed rows; any length in one pass, each audio alone (a batch is
    # padded to its longest: its rows would change); its template keeps no instruction: the
    # processor's transcription request, which fills in "language English<asr_text>"
    Family("qwen3-asr", ("qwen3_asr",), "Qwen3ASRForConditionalGeneration", 13.0,
           "Qwen/Qwen3-ASR-1.7B", 65536, ("model.multi_modal_projector",), window=None,
           alone=True, transcription_request=True),
    # a conformer (50 Hz) and a windowed Q-Former: 3 queries per 15 frames (10 tokens/s), no
    # frame-wise projector; any length in one pass; the model card's system turn
    Family("granite-speech", ("granite_speech",), "GraniteSpeechForConditionalGeneration", 10.0,
           "ibm-granite/granite-speech-3.3-8b", 131072, window=None, alone=True,
           audio_marker="<|audio|>", system=(
               "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\nYou are "
               "Granite, developed by IBM. You are a helpful AI assistant")),
]}

TAPS = ("tokens", "encoder")
TASKS = ("transcribe", "translate")


def family_of(model_path: str) -> Family:
    """The family of the checkpoint at ``model_path`` (its config.json's ``model_type``)."""
    config = os.path.join(model_path, "config.json")
    if not os.path.exists(config):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_path).model_type
    else:
        with open(config, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise ValueError(
        f"{model_path}: model_type {model_type!r} is not an audio LLM family lalmtool knows; "
        f"supported: {known}. Adding one is one Family entry in lalmtool/models/audio_llm.py "
        "(docs/adding-a-family.md)")


@dataclass
class AudioLLMOptions(Options):
    """The options of every audio LLM family's backend (``--backend-opt key=value``)."""

    WHAT = "audio LLM backend option"

    dtype: typing.Any = option(None, "weights' dtype (null or auto: bfloat16 on CUDA, float32 "
                                     "elsewhere)", ("auto", *DTYPES))
    tap: str = option("tokens", "what extract stores: tokens (the rows the LLM reads at the "
                                "audio placeholders) or encoder (the rows entering the family's "
                                "projector, where it maps them one by one)", TAPS)
    trim: bool = option(True, "true only: the family's processor decides the rows that cover "
                              "the audio (one per placeholder it inserts)")
    task: str = option("transcribe", "the prompt's task", TASKS)
    language: str = option("en", "the language spoken (in the prompt)")
    target_language: str | None = option(None, "translate: the language to translate into")
    instruction: str | None = option(None, "the user's instruction text instead of the task's "
                                           "default")
    train_projector: bool = option(False, "finetune also trains the projector in full "
                                          "(tap=encoder)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass "
                                                 "(long inputs: less memory, ~30 % more time)")
    compile: bool = option(False, "torch.compile the decoder step (GPU generation)")
    device_map: str | None = option(None, "place the model across this node's GPUs "
                                          "(transformers' device_map: auto, balanced, "
                                          "sequential) instead of on --device; for models "
                                          "larger than one GPU")

    def check(self) -> None:
        super().check()
        self.need(self.trim, "trim", "true (the family's processor decides which rows cover "
                                     "the audio)")
        if self.task == "translate" and not self.target_language and self.instruction is None:
            raise ValueError("task 'translate' needs target_language (e.g. 'de') or an "
                             "instruction")


class _Reached(Exception):
    """Raised inside the model's forward once the LLM's input is known: the LLM never runs."""

    def __init__(self, embeds: torch.Tensor):
        super().__init__("LLM input captured")
        self.embeds = embeds


class AudioLLMBackend(SplicedBackend):
    """One transformers audio LLM family (``family``; read from the checkpoint when None)."""

    Options = AudioLLMOptions
    name = "audio-llm"
    family: Family | None = None

    @classmethod
    def for_family(cls, name: str) -> type:
        """The backend class registered under family ``name``."""
        return _family_class(cls, name)

    def __init__(self, model_path: str, device: str = "cpu", **options):
        o = self.options = AudioLLMOptions(**options)
        on_gpu = str(device).startswith("cuda")
        super().__init__(model_path, device,
                         resolve_dtype(o.dtype, torch.bfloat16 if on_gpu else torch.float32))
        found = family_of(model_path)
        if self.family is not None and found is not self.family:
            raise ValueError(f"{model_path} is a {found.name} checkpoint, not {self.family.name}: "
                             f"use --backend {found.name}")
        self.family = found
        if self.name == "audio-llm":
            self.name = found.name
        self._set_compile(o.compile)
        self.tap, self.task = o.tap, o.task
        if found.transcription_request and (o.task != "transcribe" or o.instruction):
            raise ValueError(f"{found.name} takes no instruction (its prompt is the audio and "
                             "the language): task=transcribe only, without instruction")
        if self.tap == "encoder" and not found.projector:
            raise ValueError(f"{found.name} has no projector that maps encoder rows to audio "
                             "tokens one by one: only tap=tokens")
        import transformers
        from transformers import AutoProcessor

        placed = {"device_map": o.device_map} if o.device_map else {}
        model = getattr(transformers, found.model_class).from_pretrained(
            model_path, dtype=self.dtype, **placed)
        model = getattr(model, found.part) if found.part else model
        if o.device_map:  # inputs go where the input embeddings are
            self.device = model.get_input_embeddings().weight.device
        self.model = (model if o.device_map else model.to(self.device)).eval()
        if getattr(self.model, "_hf_peft_config_loaded", False):
            # the checkpoint's own adapter (Granite's), which its generate enables whenever
            # audio is given: every prompt here holds audio
            self.model.enable_adapters()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        self.modules_to_save = [found.projector[-1]] if o.train_projector else []
        if o.gradient_checkpointing:  # the whole model's, else its LLM's (Granite Speech)
            target = self.model if self.model.supports_gradient_checkpointing else \
                self.model.get_decoder()
            target.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    # -- what the family declares ---------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        return self.family.rate

    def identity(self) -> dict:
        return {**super().identity(), "family": self.family.name, "tap": self.tap}

    @functools.cached_property
    def audio_token_id(self) -> int:
        config = self._core().config
        tid = getattr(config, "audio_token_id", None)
        return tid if tid is not None else config.audio_token_index

    @functools.cached_property
    def default_lora_targets(self) -> str:
        """q/k/v/o and gate/up/down of every layer of the LLM (the model's decoder)."""
        core = self._core()
        decoder = core.get_decoder()
        prefix = next(n for n, m in core.named_modules() if m is decoder)
        return (r"(.*\.)?" + re.escape(prefix) + r"\.layers\.\d+\."
                r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")

    # -- the family's prompt ----------------------------------------------------------------
    def instruction(self) -> str:
        if self.options.instruction is not None:
            return self.options.instruction
        source = LANGUAGE_NAMES.get(self.options.language, self.options.language)
        if self.task == "transcribe":
            return f"Transcribe the {source} speech into text. Output only the transcript."
        target = LANGUAGE_NAMES.get(self.options.target_language, self.options.target_language)
        return f"Translate the {source} speech into {target}. Output only the translation."

    def request(self, waves: list[np.ndarray]):
        """The processor's model inputs for ``waves``, each inside the task's prompt: the
        family's chat template with a user turn holding the audio and the instruction."""
        if self.family.transcription_request:
            return self.processor.apply_transcription_request(
                [np.asarray(w, dtype=np.float32) for w in waves], language=self.options.language,
                return_tensors="pt")
        system = [{"role": "system", "content": self.family.system}] if self.family.system else []
        if self.family.audio_marker:
            turn = [*system, {"role": "user", "content": self.family.audio_marker
                              + self.instruction()}]
            text = self.tokenizer.apply_chat_template(turn, tokenize=False,
                                                      add_generation_prompt=True)
            return self.processor([text] * len(waves), [np.asarray(w, dtype=np.float32)
                                                         for w in waves], return_tensors="pt")
        conversations = [[*system, {"role": "user", "content": [
            self._audio_item(w), {"type": "text", "text": self.instruction()}]}] for w in waves]
        return self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"text_kwargs": {"padding": True}})

    def _audio_item(self, wave: np.ndarray) -> dict:
        wave = np.asarray(wave, dtype=np.float32)
        if self.family.audio_item == "array":
            return {"type": "audio", "audio": wave}
        import base64
        import io

        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, wave, self.sample_rate, format="WAV", subtype="FLOAT")
        return {"type": "audio", "base64": base64.b64encode(buf.getvalue()).decode()}

    @functools.cached_property
    def _prompt_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after its run of audio placeholders (rendered by
        the processor for one second of silence)."""
        inputs = self.request([np.zeros(self.sample_rate, dtype=np.float32)])
        ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
        where = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if not where or where[-1] - where[0] + 1 != len(where):
            raise ValueError(f"{self.model_path}: the prompt must hold one run of audio "
                             f"placeholders (id {self.audio_token_id}); found {len(where)} "
                             "in pieces")
        return ids[: where[0]], ids[where[-1] + 1 :]

    @functools.cached_property
    def end_token_id(self) -> int:
        """The token that ends a target: the special token the chat template writes right after
        an assistant's reply (``<|im_end|>``), else the first of the model's end-of-generation
        tokens that the template writes at all, else the first of them."""
        eos = self._core().generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos = eos or [self.tokenizer.eos_token_id]
        if eos[0] is None:
            raise ValueError(f"{self.model_path}: no end-of-generation token (generation_config "
                             "eos_token_id or the tokenizer's eos)")
        after = self._after_reply()
        if after is not None:
            return after
        template = (getattr(self.processor, "chat_template", None)
                    or getattr(self.tokenizer, "chat_template", None) or "")
        template = template if isinstance(template, str) else json.dumps(template)
        written = [t for t in eos if self.tokenizer.convert_ids_to_tokens(t) in template]
        return (written or eos)[0]

    def _after_reply(self) -> int | None:
        """The special token the chat template writes right after an assistant's reply."""
        reply = "\x00REPLY\x00"
        turns = [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        try:
            text = self.processor.apply_chat_template(turns, tokenize=False)
        except Exception:  # noqa: BLE001 - templates that need audio, tokenizing processors
            return None
        if not isinstance(text, str) or reply not in text:
            return None
        ids = self.tokenizer.encode(text.split(reply, 1)[1], add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids)
        return ids[0] if ids and ids[0] in special else None

    # -- encoder side ----------------------------------------------------------------------
    @property
    def window_seconds(self) -> float | None:
        return self.family.window

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        window = self.family.window
        window = int(window * self.sample_rate) if window else max(len(w) for w in waves) + 1
        batch_size = 1 if self.family.alone else batch_size
        return encode_in_windows(waves, window, batch_size, self._encode_windows)

    def _encode_windows(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """The tap's rows per ≤ window piece: the model's own forward on the processor's
        inputs, stopped where its LLM would start (at the LLM's input, or the projector's)."""
        inputs = self.request(pieces).to(self.device)
        core = self._core()
        counts = (inputs["input_ids"] == self.audio_token_id).sum(-1).tolist()
        if self.tap == "encoder":
            module, stop = core.get_submodule(self.family.projector[0]), "input"
        else:
            module, stop = core.get_decoder(), "inputs_embeds"

        def capture(_module, args, kwargs):
            raise _Reached(kwargs[stop] if stop in kwargs else args[0])

        handle = module.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            core(**{k: v.to(self.dtype) if v.is_floating_point() else v
                    for k, v in inputs.items()})
            raise RuntimeError(f"{self.family.name}: the forward ran past the LLM's input")
        except _Reached as reached:
            x = reached.embeds
        finally:
            handle.remove()
        if self.tap == "tokens":
            x = x[inputs["input_ids"] == self.audio_token_id]
        elif x.ndim == 3 and x.shape[0] == len(pieces):  # [B, T, D] padded: the first rows
            return [x[i, :n].float().cpu() for i, n in enumerate(counts)]
        elif x.ndim != 2 or x.shape[0] != sum(counts):
            raise ValueError(f"{self.family.name}: {tuple(x.shape)} rows enter the projector for "
                             f"{sum(counts)} placeholders; tap=encoder cannot split them")
        return [part.float().cpu() for part in torch.split(x, counts)]

    # -- splice --------------------------------------------------------------------------
    def project(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Stored rows of all utterances → the LLM's input rows ``[sum T_i, H]``."""
        x = torch.cat([f.to(self.device) for f in feats])
        if self.tap == "tokens":
            return x
        core = self._core()
        x = x.to(next(core.get_submodule(self.family.projector[0]).parameters()).dtype)
        for path in self.family.projector:
            x = core.get_submodule(path)(x)
        return x

    def build_inputs(self, feats: list[torch.Tensor], texts: list[str] | None = None,
                     padding_side: str = "right") -> SplicedBatch:
        """The prompt (+ target text and end token) per utterance with its rows spliced in."""
        if not feats:
            raise ValueError("empty batch")
        if any(f.ndim != 2 or f.shape[0] == 0 for f in feats):
            raise ValueError(f"features must be non-empty [T, D] tensors; got "
                             f"{[tuple(f.shape) for f in feats]}")
        core = self._core()
        lay = self._layout([f.shape[0] for f in feats], texts, self.audio_token_id, padding_side)
        if int((lay.ids == self.audio_token_id).sum()) != int(lay.slots.sum()):
            raise ValueError(f"{int((lay.ids == self.audio_token_id).sum())} audio placeholders "
                             f"for {int(lay.slots.sum())} audio rows; texts: {texts}")
        embeds = core.get_input_embeddings()(lay.ids)
        embeds = embeds.masked_scatter(lay.slots[..., None], self.project(feats).to(embeds.dtype))
        return SplicedBatch(lay.ids, embeds, lay.mask, lay.positions, lay.labels)



@functools.cache
def _family_class(base: type, name: str) -> type:
    family = FAMILIES[name]
    return type(f"{base.__name__}[{name}]", (base,), {"name": name, "family": family,
                                                       "__module__": base.__module__})
