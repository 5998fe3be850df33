"""Model backends, registered by name. Each backend lives in one file of this package."""
from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry itself imports no torch: the CLI reads it for --backend choices
    from .base import Backend

#: The families of ``audio_llm.FAMILIES`` (named here: the registry imports no torch).
AUDIO_LLM_FAMILIES = ("qwen2-audio-chat", "voxtral", "granite-speech",
                      "qwen2.5-omni", "audioflamingo3", "glm-asr", "qwen3-asr")

BACKENDS = {
    "whisper": "lalmtool.models.whisper:WhisperBackend",
    "qwen2-audio": "lalmtool.models.qwen2_audio:Qwen2AudioBackend",
    "speechllm": "lalmtool.models.speechllm:SpeechLLMBackend",
    # transformers' audio LLMs: one generic backend, one registered name per family
    # (``audio-llm`` reads the family from the checkpoint's config.json)
    "audio-llm": "lalmtool.models.audio_llm:AudioLLMBackend",
    **{family: f"lalmtool.models.audio_llm:AudioLLMBackend@{family}"
       for family in AUDIO_LLM_FAMILIES},
}


def backend_class(name: str) -> type:
    """The class registered as backend ``name`` (its module imported now)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    cls, _, family = cls.partition("@")
    found = getattr(importlib.import_module(module), cls)
    return found.for_family(family) if family else found


def concrete_backend(name: str, model: str) -> str:
    """The backend name a run records: ``audio-llm`` becomes the family of ``model``'s
    checkpoint (so that stores and adapters name the family), every other name stays."""
    if name != "audio-llm":
        return name
    from ..assets import resolve_model
    from .audio_llm import family_of

    return family_of(resolve_model(model)).name


def load_backend(name: str, model: str, **kwargs) -> Backend:
    """Instantiates backend ``name`` on ``model`` (a local directory, asset name or hub id)
    with its options ``kwargs`` (and ``device``); the commands check the options first
    (``check_backend_options``), and the backend's options dataclass checks them again."""
    from ..assets import resolve_model

    return backend_class(name)(resolve_model(model), **kwargs)


def backend_options(name: str) -> type:
    """Backend ``name``'s options dataclass (``lalmtool.options.Options``: each field's
    default, help and allowed values)."""
    return backend_class(name).Options


def backend_default(name: str, option: str):
    """The default of backend ``name``'s option ``option`` (None if it has no such option)."""
    return backend_options(name).defaults().get(option)


def check_backend_options(name: str, opts: dict, where: str) -> None:
    """Every key of ``opts`` is an option backend ``name`` takes, with a value it accepts;
    else one message naming the unknown keys (or the bad value), where they came from
    (``where``) and the options there are."""
    cls = backend_options(name)
    known = list(cls.defaults())
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"backend {name!r} has no option {', '.join(unknown)} ({where}); it "
                         f"takes {', '.join(sorted(known))}")
    try:
        cls(**opts)
    except ValueError as e:
        raise ValueError(f"{e} ({where})") from None


def check_tap(store, backend: str, taps: dict[str, str | None], fix: str) -> None:
    """The store was extracted by ``backend`` where that matters (the tokens of an audio LLM
    family are that family's only), and the encoder tap of ``store``'s features agrees with
    each of ``taps`` (where it is set: its value, None for the backend's default); else one
    message naming each, and ``fix``.

    The tap is what extract recorded in the store's ``backend_options`` (segment and pool keep
    their source's meta under ``source_meta``). Checked for backends with a ``tap`` option, on
    stores extracted with that backend."""
    meta = store.meta.extracted
    extracted = meta.get("backend", backend)
    if extracted != backend and {extracted, backend} & set(AUDIO_LLM_FAMILIES):
        raise ValueError(f"{store.path} holds the audio tokens of the {extracted} backend, not "
                         f"of {backend}: use --backend {extracted}, or extract the audio again "
                         f"with --backend {backend}")
    default = backend_default(backend, "tap")
    if default is None or meta.get("backend", backend) != backend:
        return
    recorded = meta.backend_options
    found = {"store": recorded.get("tap") or default,
             **{where: tap or default for where, tap in taps.items()}}
    if len(set(found.values())) > 1:
        raise ValueError(f"tap mismatch: {', '.join(f'{k} {v!r}' for k, v in found.items())} "
                         f"({store.path}); {fix}")


def base_weights(model_dir: str) -> str:
    """The identity of a base model's weights, by content (their files' sizes and sha256,
    whatever the directory is called; a hub id as given where it is not a directory)."""
    import glob
    import hashlib

    from ..fileio import weights_sha256

    if not os.path.isdir(model_dir):
        return f"hub:{model_dir}"
    h = hashlib.sha256()
    for f in sorted(f for ext in ("safetensors", "bin", "pt", "gguf")
                    for f in glob.glob(os.path.join(model_dir, f"*.{ext}"))):
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}:{weights_sha256(f)}".encode())
    return h.hexdigest()


def check_adapter_base(adapter: str, model: str, model_dir: str, flag: str = "--adapter") -> None:
    """Refuses an adapter trained on another base model than ``model`` (whose weights are in
    ``model_dir``): its record (``lalmtool.trained``) holds the weights' identity it was trained
    on (adapters from before that record are taken as they are)."""
    from ..trained import read

    record = read(adapter) or {}
    trained = record.get("base_weights")
    if trained and trained != base_weights(model_dir):
        raise ValueError(f"{flag} {adapter} was trained on another base model than {model} "
                         f"(their weights differ; it names {record.get('base_model')}): give "
                         "the model it was trained on")


def training_options(adapter: str | None, backend: str) -> dict:
    """The backend options the adapter was trained with (its record, ``lalmtool.trained``);
    refuses an adapter that is missing or was trained for another backend."""
    from ..trained import read

    if not adapter:
        return {}
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise ValueError(f"--adapter {adapter} is not a LoRA adapter (no adapter_config.json); "
                         "pass OUT/adapter of `lalmtool finetune`")
    record = read(adapter)
    trained = record.get("backend") or backend
    if trained != backend:
        raise ValueError(f"--adapter {adapter} was trained with the {trained} backend "
                         f"({record.source('backend')}); decode it with --backend {trained}")
    return {k: v for k, v in (record.get("backend_options") or {}).items()
            if k not in MOVED_OPTIONS}


#: Backend options that became options of a stage (an older adapter may record them: ignored).
MOVED_OPTIONS = {"chunk": "decode --chunk"}


def load_adapter(model, adapter: str, trainable: bool = False):
    """``model`` wrapped with the peft adapter in directory ``adapter``; an adapter that is
    damaged or does not fit the model is one message naming it and what differs."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except Exception as e:  # noqa: BLE001 - safetensors, torch and peft raise several kinds
        text = str(e)
        mismatch = [line.strip() for line in text.splitlines() if "size mismatch" in line]
        if mismatch:
            try:
                with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fh:
                    config = json.load(fh)
                said = (f" (its adapter_config.json: r={config.get('r')}, base model "
                        f"{config.get('base_model_name_or_path')})")
            except (OSError, ValueError):
                said = ""
            raise ValueError(f"adapter {adapter} does not fit this model{said}: {mismatch[0]} "
                             f"(and {len(mismatch) - 1} more); it was trained with another "
                             "LoRA rank or on another base model, or its files come from two "
                             "runs") from e
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ValueError(f"adapter {adapter} cannot be loaded ({type(e).__name__}: {first}); its "
                         "files are damaged (e.g. a truncated adapter_model.safetensors): copy "
                         "it again whole, or train it again") from e


def model_directory(model: str) -> str:
    """``--model`` resolved (asset name → its directory); an adapter directory is refused."""
    from ..assets import resolve_model

    path = resolve_model(model)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")) \
            and not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"--model {model} is a LoRA adapter (adapter_config.json), not a model; "
                         "pass it as --adapter and its base model as --model")
    return path


def load_for_decoding(backend: str, model: str, model_dir: str, device: str, opts: dict,
                      adapter: str | None):
    """The backend ``backend`` of ``model`` (resolved: ``model_directory``) on ``device`` in eval
    mode, with the adapter attached (``attach_adapter``)."""
    try:
        be = load_backend(backend, model_dir, device=device, **opts)
    except OSError as e:
        raise ValueError(f"--model {model}: cannot load it as a {backend} checkpoint ({e})") from e
    if adapter:
        attach_adapter(be, adapter)
    be.model.eval()
    return be


def attach_adapter(be, adapter: str) -> None:
    """Puts the LoRA ``adapter`` on ``be.model``: merged into float32 weights; kept unmerged
    (peft's LoRA layers computing in their own dtype) when the model is in bfloat16/float16,
    where a merge would round the small LoRA update into the coarse weights."""
    import torch

    peft_model = load_adapter(be.model, adapter)
    dtypes = {p.dtype for p in be.model.parameters()}
    be.model = peft_model.merge_and_unload() if dtypes == {torch.float32} else peft_model


def model_identity(backend: str, model: str, opts: dict) -> dict:
    """What identifies the base model by content: for speechllm its encoder, LLM and trained
    weights (read from its spec with ``opts``), else the checkpoint directory's content."""
    if backend == "speechllm":
        from .speechllm import read_spec

        spec = read_spec(model, **{k: v for k, v in opts.items()
                                   if k in ("encoder", "projector", "stack", "hidden", "norm")})
        return {k: str(spec[k]) for k in ("llm", "encoder", "weights")}
    from ..assets import resolve_model
    from ..record import identity

    return identity(resolve_model(model))
