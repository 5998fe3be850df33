"""A composed decoder-only LALM: Whisper encoder → frame stacking → projector → any causal LM.

The SLAM-ASR / SpeechBrain "SpeechLLM" recipe: a frozen Whisper encoder gives 50 frames/s,
``stack`` consecutive frames are concatenated (``[T, D]`` → ``[ceil(T/s), D*s]``; a last,
incomplete group is zero-padded, so every frame is seen and a 1-row input still gives one
token), a projector (``linear`` or a 2-layer ``mlp``: Linear → GELU → Linear) maps each
stacked vector to one LLM input embedding, and the embeddings are spliced into the LLM's
prompt. LoRA goes on the LLM's attention (q/k/v/o); the projector is trained in full and saved
with the adapter (peft ``modules_to_save``).

What ``--model`` means (every stage)
------------------------------------
* **the LLM** — a checkpoint directory, an asset name (``smollm2-135m-instruct``) or a hub id —
  with the encoder given as an option: ``--backend-opt encoder=whisper-tiny.en`` (``extra:
  {encoder: whisper-tiny.en}`` in a finetune config). This is the fresh start: the projector is
  created randomly initialised (seeded by ``seed``) and learnt by ``lalmtool finetune``.
* **a speechllm directory** holding ``speechllm.json`` (or the path of such a JSON file):
  ``{"encoder": ..., "llm": ..., "projector": "mlp", "stack": 4, "hidden": 1024,
  "prompt": ...}``. A *trained* directory (written by ``export_speechllm``) also holds
  ``projector.safetensors`` (the trained projector) and ``lora/`` (the LoRA adapter of the LLM,
  merged into its weights when loaded): one directory is then the whole model, usable by
  ``decode`` without ``--adapter`` and as the start of a further ``finetune``. Relative paths in
  the JSON are read from its folder; asset names stay names.

Options (``--backend-opt KEY=VALUE``, finetune's ``extra``): ``encoder`` (Whisper checkpoint
directory, asset name or hub id; required unless ``--model`` is a speechllm directory),
``projector`` (``mlp`` | ``linear``, default ``mlp``), ``stack`` (default 4), ``hidden`` (MLP
width, default 1024), ``prompt`` (the user's instruction, default "Transcribe the audio."),
``seed`` (projector initialisation, default 0), ``init_projector`` (start the projector from
these weights instead: ``lalmtool align``'s output directory, see ``lalmtool.align``),
``norm`` (``none`` | ``embedding``: rescale each projected row to the mean norm of the LLM's
input embeddings), ``train_projector`` (default true: the projector is a ``modules_to_save``
module), ``trim`` (extract: keep the frames that cover the audio), ``dtype``, ``compile``
(decode: static KV cache + compiled decode step, see ``DecoderOnlyBackend``; default false). With a speechllm directory, ``encoder``/``projector``/``stack``/``hidden``
may only repeat what its JSON says (they fix the projector's shape); ``prompt`` may change.
There is deliberately no ``llm`` option: the LLM is ``--model``.

Stages
------
* ``extract`` runs exactly the ``whisper`` backend's ``encode`` (30 s windows, trimmed 50 Hz
  frames, long audio window by window); the LLM is not even loaded. A store written by
  ``--backend whisper --model <the same encoder>`` holds the same features and serves as well.
* ``finetune``/``decode`` read any (compressed) store: compression happens before stacking, so
  the LLM reads ``ceil(tokens / stack)`` audio positions per utterance (``num_audio_tokens``).
* Prompt: with a chat template (SmolLM2-Instruct has one), a user turn holding the instruction
  and then the audio, followed by the generation prompt; the target is the transcript followed
  by the token that closes an assistant turn (``<|im_end|>`` for SmolLM2). Without a template:
  ``[bos] instruction "\\n" <audio> "\\n"`` and the target ends with the tokenizer's eos.
  The loss covers the transcript tokens and that end token only. Batches are right-padded for
  the loss and left-padded for generation; positions count real tokens only.

The whole trained model as one directory::

    from lalmtool.models.speechllm import export_speechllm
    export_speechllm("exp/lora/frames/adapter", "exp/speechllm/frames")   # LLM from the adapter
    lalmtool decode --backend speechllm --model exp/speechllm/frames --feats ... --out ...

Equally, ``lalmtool decode --backend speechllm --model <LLM> --adapter OUT/adapter`` works
without exporting: the adapter holds the LoRA weights and the projector, and its record
(``OUT/adapter/lalmtool.json``, ``lalmtool.trained``) the options (encoder, projector, stack,
prompt) that decode reuses.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import typing
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..fileio import model_identity
from . import training_options
from ..options import Options, option
from .base import (DTYPES, DecoderOnlyBackend, check_choice, resolve_dtype)

log = logging.getLogger("lalmtool")

SPEC_FILE = "speechllm.json"
PROJECTOR_FILE = "projector.safetensors"
LORA_DIR = "lora"
PROJECTORS = ("mlp", "linear")
#: ``none``: the projector's output as it is; ``embedding``: each output row rescaled to the
#: mean norm of the LLM's input-embedding rows (a projector aligned by cosine to those rows,
#: ``lalmtool align``, then hands the LLM vectors of the size it was trained on).
NORMS = ("none", "embedding")
DEFAULT_PROMPT = "Transcribe the audio."
DEFAULTS = {"projector": "mlp", "stack": 4, "hidden": 1024, "norm": "none",
            "prompt": DEFAULT_PROMPT}
#: Options that fix the projector (its shape and output): a speechllm directory's JSON decides.
STRUCTURAL = ("encoder", "projector", "stack", "hidden", "norm")
_AUDIO = "\x00AUDIO\x00"  # stands for the audio inside the rendered prompt text
_REPLY = "\x00REPLY\x00"  # stands for the assistant's answer when finding the turn-end token


# -- the trainable module ------------------------------------------------------------------
def stack_frames(x: torch.Tensor, stack: int) -> torch.Tensor:
    """``[T, D]`` → ``[ceil(T / stack), D * stack]``: ``stack`` consecutive frames per row.

    The last group is completed with zero frames, so no frame is dropped and any input with at
    least one row gives at least one stacked row.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [T, D] tensor; got {tuple(x.shape)}")
    short = -x.shape[0] % stack
    if short:
        x = torch.cat([x, x.new_zeros(short, x.shape[1])])
    return x.reshape(x.shape[0] // stack, stack * x.shape[1])


class Projector(nn.Module):
    """Stacked encoder frames ``[N, D*s]`` → LLM input embeddings ``[N, H]``.

    ``out_norm`` (a number, not a parameter): every output row is rescaled to this L2 norm.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden: int = 1024,
                 out_norm: float | None = None):
        super().__init__()
        check_choice("projector", kind, PROJECTORS)
        self.out_norm = out_norm
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.out_norm:
            y = nn.functional.normalize(y, dim=-1) * self.out_norm
        return y


def load_projector_weights(path: str) -> dict[str, torch.Tensor]:
    """A projector's state dict from ``projector.safetensors``, or a directory holding one
    (``lalmtool align``'s output, or a speechllm directory)."""
    from safetensors.torch import load_file

    file = os.path.join(path, PROJECTOR_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"init_projector: {file} not found (give the output directory "
                                "of `lalmtool align` or a projector.safetensors file)")
    return load_file(file)


class SpeechLLM(nn.Module):
    """Projector + causal LM: the module that peft wraps (LoRA in ``llm``, ``projector`` saved).

    ``forward`` does the whole decoder side (project, splice, run the LLM), so that DDP and
    peft wrappers see every trainable parameter used inside one forward call.
    """

    is_gradient_checkpointing = False  # tells peft not to hook the input embeddings

    def __init__(self, projector: Projector, llm: nn.Module, name_or_path: str):
        super().__init__()
        self.projector, self.llm = projector, llm
        self.name_or_path = name_or_path  # peft records it as the adapter's base model

    def embed(self, input_ids: torch.Tensor, audio_mask: torch.Tensor,
              audio: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the projected audio rows written where ``audio_mask`` is set.

        ``audio`` holds the stacked frames of all utterances, concatenated in batch order.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        weight = next(self.projector.parameters())
        projected = self.projector(audio.to(weight.device, weight.dtype)).to(embeds.dtype)
        return embeds.masked_scatter(audio_mask[..., None], projected)

    def forward(self, input_ids, audio_mask, audio, attention_mask, position_ids,
                logits_to_keep: torch.Tensor | None = None, **kwargs):
        """The LLM's output; ``logits_to_keep`` (bool ``[B, L]``) limits the logits to those
        positions (flattened to ``[N, V]``) when the LLM supports it, else all come back."""
        embeds = self.embed(input_ids, audio_mask, audio)
        if logits_to_keep is not None and self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                        position_ids=position_ids, **kwargs)

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.llm.forward).parameters


@dataclass
class SpeechBatch:
    """LLM inputs for a batch: text ids with audio slots, the audio to put there, labels."""

    input_ids: torch.Tensor  # [B, L] (pad id at audio slots and padding)
    audio_mask: torch.Tensor  # [B, L] True where a projected audio row goes
    audio: torch.Tensor  # [sum N_i, D*s] stacked frames, utterances concatenated
    attention_mask: torch.Tensor  # [B, L] 1 = real position
    position_ids: torch.Tensor  # [B, L] counted over real positions only
    labels: torch.Tensor | None  # [B, L] token to learn at each position, -100 elsewhere

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "audio_mask": self.audio_mask, "audio": self.audio,
                "attention_mask": self.attention_mask, "position_ids": self.position_ids}


# -- the spec: what --model and the options name -------------------------------------------
def read_spec(model_path: str, **options) -> dict:
    """The model's description: encoder, llm, projector, stack, hidden, prompt, weights.

    ``weights`` is the speechllm directory holding trained weights, or None for a fresh start.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if "llm" in options:
        raise ValueError("speechllm: the LLM is --model (a directory, asset name or hub id); "
                         "there is no 'llm' option")
    spec_file = _spec_file(model_path)
    if spec_file is None:  # --model is the LLM itself
        if "encoder" not in options:
            raise ValueError(f"speechllm: --model {model_path} is taken as the LLM (it holds no "
                             f"{SPEC_FILE}); name the Whisper encoder too, e.g. "
                             "--backend-opt encoder=whisper-tiny.en")
        spec = {**DEFAULTS, "llm": model_path, **options}
        spec["weights"] = None
    else:
        with open(spec_file, encoding="utf-8") as fh:
            stored = json.load(fh)
        missing = [k for k in ("encoder", "llm") if not stored.get(k)]
        if missing:
            raise ValueError(f"{spec_file}: missing {missing}")
        folder = os.path.dirname(os.path.abspath(spec_file))
        for key in ("encoder", "llm"):
            stored[key] = _from_spec_path(stored[key], folder)
        for key in STRUCTURAL:
            fixed = stored.get(key, DEFAULTS.get(key))
            if key in options and options[key] != fixed:
                raise ValueError(f"speechllm: option {key}={options[key]!r} contradicts "
                                 f"{spec_file} ({key}={fixed!r}), which fixes the model")
        spec = {**DEFAULTS, **{k: stored[k] for k in (*STRUCTURAL, "llm", "prompt")
                               if k in stored}}
        if "prompt" in options:
            spec["prompt"] = options["prompt"]
        has_weights = os.path.exists(os.path.join(folder, PROJECTOR_FILE))
        spec["weights"] = folder if has_weights else None
    check_choice("projector", spec["projector"], PROJECTORS)
    check_choice("norm", spec["norm"], NORMS)
    if not isinstance(spec["stack"], int) or spec["stack"] < 1:
        raise ValueError(f"speechllm: stack must be a positive integer, not {spec['stack']!r}")
    if not isinstance(spec["hidden"], int) or spec["hidden"] < 1:
        raise ValueError(f"speechllm: hidden must be a positive integer, not {spec['hidden']!r}")
    return spec


def _spec_file(model_path: str) -> str | None:
    """``model_path/speechllm.json``, or ``model_path`` itself if it is a JSON file; else None."""
    if os.path.isdir(model_path):
        path = os.path.join(model_path, SPEC_FILE)
        return path if os.path.exists(path) else None
    if model_path.endswith(".json"):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"speechllm spec {model_path} not found")
        return model_path
    return None


def _from_spec_path(value: str, folder: str) -> str:
    """A path in speechllm.json is relative to its folder; names and hub ids stay as they are."""
    candidate = os.path.join(folder, value)
    return candidate if not os.path.isabs(value) and os.path.exists(candidate) else value


def portable_name(path: str) -> str:
    """An asset's cache directory → the asset name (portable); other paths made absolute."""
    from ..assets import list_assets

    for asset in list_assets():
        if os.path.abspath(path) == os.path.abspath(asset["path"]):
            return asset["name"]
    return os.path.abspath(path) if os.path.exists(path) else path


# -- the backend ---------------------------------------------------------------------------
@dataclass
class SpeechLLMOptions(Options):
    """The speechllm backend's options (``--backend-opt key=value``); those left null come
    from a speechllm directory's JSON, else from the defaults (``DEFAULTS``)."""

    WHAT = "speechllm backend option"

    dtype: typing.Any = option(None, "weights' dtype (null: float32)", ("auto", *DTYPES))
    encoder: str | None = option(None, "the speech encoder (a Whisper checkpoint, asset name "
                                       "or hub id) when --model is the LLM itself")
    projector: str | None = option(None, f"projector kind (default {DEFAULTS['projector']})",
                                   PROJECTORS)
    stack: int | None = option(None, f"encoder frames stacked per LLM position (default "
                                     f"{DEFAULTS['stack']})")
    hidden: int | None = option(None, f"the mlp projector's width (default "
                                      f"{DEFAULTS['hidden']})")
    prompt: str | None = option(None, "the instruction after the audio (default "
                                      f"{DEFAULTS['prompt']!r})")
    seed: int = option(0, "seed of a fresh projector's initialisation")
    train_projector: bool = option(True, "finetune trains the projector in full")
    trim: bool = option(True, "keep only the frames that cover the audio of each 30 s window")
    llm: str | None = option(None, "not an option: the LLM is --model")
    norm: str | None = option(None, "projector output: none, or embedding (rescaled to the "
                                    "LLM's mean embedding norm; after align)", NORMS)
    init_projector: str | None = option(None, "start the projector from `lalmtool align`'s "
                                              "output directory")
    compile: bool = option(False, "torch.compile the decoder step (GPU generation)")

    def check(self) -> None:
        super().check()
        for key in ("stack", "hidden"):
            self.need(getattr(self, key) is None or getattr(self, key) >= 1, key, ">= 1")


class SpeechLLMBackend(DecoderOnlyBackend):
    name = "speechllm"
    #: q/k/v/o of every attention layer inside the LLM (the projector never matches).
    default_lora_targets = r"llm\..*\.(q_proj|k_proj|v_proj|o_proj)"

    Options = SpeechLLMOptions

    def __init__(self, model_path: str, device: str = "cpu", **options):
        o = self.options = SpeechLLMOptions(**options)
        super().__init__(model_path, device, resolve_dtype(o.dtype, torch.float32))
        self._set_compile(o.compile)
        self.spec = read_spec(model_path, encoder=o.encoder, projector=o.projector,
                              stack=o.stack, hidden=o.hidden, prompt=o.prompt, llm=o.llm,
                              norm=o.norm)
        if o.init_projector and self.spec["weights"]:
            raise ValueError(f"speechllm: init_projector starts a fresh model's projector, but "
                             f"--model {model_path} already holds a trained one")
        self.init_projector = o.init_projector
        self.stack, self.prompt = self.spec["stack"], self.spec["prompt"]
        self.seed, self.trim = o.seed, o.trim
        self.modules_to_save = ["projector"] if o.train_projector else []
        self._model: nn.Module | None = None

    # -- loading (lazy: extract needs no LLM, finetune/decode no encoder weights) ----------
    @functools.cached_property
    def encoder_path(self) -> str:
        from ..assets import resolve_model

        return resolve_model(self.spec["encoder"])

    @functools.cached_property
    def llm_path(self) -> str:
        from ..assets import resolve_model

        return resolve_model(self.spec["llm"])

    @functools.cached_property
    def encoder(self):
        """The ``whisper`` backend on the encoder checkpoint: its ``encode`` is ours."""
        from .whisper import WhisperBackend

        return WhisperBackend(self.encoder_path, device=str(self.device), dtype=self.dtype,
                              trim=self.trim)

    @functools.cached_property
    def feature_dim(self) -> int:
        """Width D of the encoder's frames, read from its config (no weights loaded)."""
        config = AutoConfig.from_pretrained(self.encoder_path)
        return int(getattr(config, "d_model", None) or config.hidden_size)

    @functools.cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.llm_path)

    @property
    def model(self) -> nn.Module:
        """The ``SpeechLLM`` (built on first use), or whatever peft/DDP made of it."""
        if self._model is None:
            self._model = self._build_model()
        return self._model

    @model.setter
    def model(self, value: nn.Module) -> None:
        self._model = value

    def _build_model(self) -> SpeechLLM:
        """The LLM, a seeded projector, and the trained weights of a speechllm directory."""
        llm = AutoModelForCausalLM.from_pretrained(self.llm_path, dtype=self.dtype)
        out_norm = None
        if self.spec["norm"] == "embedding":
            rows = llm.get_input_embeddings().weight.detach().float()
            out_norm = float(rows.norm(dim=-1).mean())
        with torch.random.fork_rng(devices=[]):  # seeded, leaves the global RNG untouched
            torch.manual_seed(self.seed)
            projector = Projector(self.feature_dim * self.stack, llm.config.hidden_size,
                                  self.spec["projector"], self.spec["hidden"], out_norm)
        if self.init_projector:
            state = load_projector_weights(self.init_projector)
            try:
                projector.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"init_projector {self.init_projector} does not fit this "
                                 f"model's projector ({self.spec['projector']}, stack "
                                 f"{self.stack}, hidden {self.spec['hidden']}): "
                                 f"{str(e).splitlines()[0]}") from None
        model = SpeechLLM(projector.to(self.dtype), llm, self.model_path)
        weights = self.spec["weights"]
        if weights:
            from safetensors.torch import load_file

            model.projector.load_state_dict(load_file(os.path.join(weights, PROJECTOR_FILE)))
            lora = os.path.join(weights, LORA_DIR)
            if os.path.isdir(lora):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        return model.to(self.device).eval()

    @property
    def frame_rate(self) -> float:
        return self.encoder.frame_rate

    def identity(self) -> dict:
        """The encoder's identity: the LLM does not change the stored features."""
        return {"backend": self.name, "encoder": model_identity(self.encoder_path),
                "tap": "encoder.last_hidden_state", "trim": self.trim}

    # -- encoder -------------------------------------------------------------------------
    @property
    def window_seconds(self) -> float | None:
        return self.encoder.window_seconds

    def encode(self, waves: list[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
        return self.encoder.encode(waves, batch_size=batch_size)

    def audio_positions(self, frames: int) -> int:
        """How many LLM positions ``frames`` feature rows become: ``ceil(frames / stack)``."""
        return math.ceil(frames / self.stack)

    # -- prompt --------------------------------------------------------------------------
    @functools.cached_property
    def _prompt_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after the audio."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": f"{self.prompt}\n{_AUDIO}"}],
                tokenize=False, add_generation_prompt=True)
            bos = []
        else:
            text = f"{self.prompt}\n{_AUDIO}\n"
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        before, found, after = text.partition(_AUDIO)
        if not found:
            raise ValueError(f"{self.llm_path}: the chat template dropped the user's message")
        return (bos + tok.encode(before, add_special_tokens=False),
                tok.encode(after, add_special_tokens=False))

    @functools.cached_property
    def end_token_id(self) -> int:
        """The token that ends a target: the one closing an assistant turn, else eos.

        Found by rendering an assistant turn: the first token after its content, when that is
        a special token (``<|im_end|>``, ``<|eot_id|>``, ...).
        """
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": _REPLY}],
                                           tokenize=False)
            after = text.partition(_REPLY)[2]
            ids = tok.encode(after, add_special_tokens=False) if after else []
            if ids and ids[0] in set(tok.all_special_ids):
                return ids[0]
        if tok.eos_token_id is None:
            raise ValueError(f"{self.llm_path}: the tokenizer has no end-of-sequence token")
        return tok.eos_token_id

    # -- splice --------------------------------------------------------------------------
    def _llm(self) -> nn.Module:
        return self._core().llm

    def build_inputs(self, feats: list[torch.Tensor], texts: list[str] | None = None,
                     padding_side: str = "right") -> SpeechBatch:
        """Prompt, stacked audio slots (and target text + end token) per utterance, padded."""
        if not feats:
            raise ValueError("empty batch")
        if any(f.ndim != 2 or f.shape[0] == 0 or f.shape[1] != self.feature_dim for f in feats):
            shapes = [tuple(f.shape) for f in feats]
            raise ValueError(f"features must be non-empty [T, {self.feature_dim}] tensors (the "
                             f"encoder's width); got {shapes}")
        audio = [stack_frames(f.float(), self.stack) for f in feats]
        lay = self._layout([a.shape[0] for a in audio], texts, self._pad_id(), padding_side)
        return SpeechBatch(lay.ids, lay.slots, torch.cat(audio).to(self.device), lay.mask,
                           lay.positions, lay.labels)

    # -- decoder -------------------------------------------------------------------------
    def _target_logits(self, batch: SpeechBatch, predicts: torch.Tensor) -> torch.Tensor:
        logits = self.model(**batch.model_inputs(), use_cache=False,
                            logits_to_keep=predicts).logits
        # an LLM without logits_to_keep returned every position
        return logits[predicts] if logits.ndim == 3 else logits

    def _generate(self, batch: SpeechBatch, config, **kwargs) -> torch.Tensor:
        core = self._core()
        embeds = core.embed(batch.input_ids, batch.audio_mask, batch.audio)
        return self._run_generate(core.llm, config, inputs_embeds=embeds,
                                  attention_mask=batch.attention_mask, **kwargs)


# -- one directory for the trained model ---------------------------------------------------
def export_speechllm(adapter: str, out: str, model: str | None = None,
                     options: dict | None = None) -> str:
    """Writes a finetune run's result as one speechllm directory ``out``; returns ``out``.

    ``adapter`` is ``OUT/adapter`` of ``lalmtool finetune --backend speechllm``: its LoRA
    weights and projector (``modules_to_save``). The options come from the adapter's record
    (``lalmtool.json``; overridable by ``options``), the LLM from ``model`` or, by default, the base
    model the adapter records. ``out`` receives ``speechllm.json``, ``projector.safetensors``
    and ``lora/`` (the adapter without the projector); ``--model out`` then loads it all.
    """
    from safetensors.torch import load_file, save_file

    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fh:
        adapter_config = json.load(fh)
    model = model or adapter_config.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"{adapter} does not record its base model; pass model=")
    opts = {**training_options(adapter, "speechllm"), **(options or {})}
    for key in ("dtype", "trim", "seed", "train_projector", "init_projector"):
        opts.pop(key, None)
    from ..assets import resolve_model

    spec = read_spec(resolve_model(model), **opts)
    if spec["weights"]:
        raise ValueError(f"{model} is already a trained speechllm directory; exporting an "
                         "adapter trained on top of it is not supported")
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    prefix = "base_model.model.projector."
    projector = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not projector:
        raise ValueError(f"{adapter} holds no projector (trained with train_projector=false?); "
                         "nothing to export")
    from ..fileio import atomic_dir

    with atomic_dir(out) as tmp:
        os.makedirs(os.path.join(tmp, LORA_DIR))
        save_file({k: v.contiguous() for k, v in projector.items()},
                  os.path.join(tmp, PROJECTOR_FILE))
        lora = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        save_file(lora, os.path.join(tmp, LORA_DIR, "adapter_model.safetensors"))
        adapter_config["modules_to_save"] = None
        with open(os.path.join(tmp, LORA_DIR, "adapter_config.json"), "w",
                  encoding="utf-8") as fh:
            json.dump(adapter_config, fh, indent=1)
        stored = {"encoder": portable_name(spec["encoder"]), "llm": portable_name(spec["llm"]),
                  **{k: spec[k] for k in ("projector", "stack", "hidden", "norm", "prompt")}}
        with open(os.path.join(tmp, SPEC_FILE), "w", encoding="utf-8") as fh:
            json.dump(stored, fh, indent=1)
    return out


