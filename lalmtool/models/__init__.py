"""Model backends, registered by name. Each backend lives in one file of this package."""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # the registry itself imports no torch: the CLI reads it for --backend choices
    from .base import Backend

BACKENDS = {
    "whisper": "lalmtool.models.whisper:WhisperBackend",
    "qwen2-audio": "lalmtool.models.qwen2_audio:Qwen2AudioBackend",
    "speechllm": "lalmtool.models.speechllm:SpeechLLMBackend",
}


def load_backend(name: str, model: str, **kwargs) -> Backend:
    """Instantiates backend ``name`` on ``model`` (a local directory, asset name or hub id)."""
    from ..assets import resolve_model

    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(resolve_model(model), **kwargs)


def training_options(adapter: str | None, backend: str) -> dict:
    """The backend options (``extra``) of the finetune run that wrote ``adapter`` (its
    ``config.yaml`` beside it), if known; refuses an adapter that is missing or was trained for
    another backend."""
    if not adapter:
        return {}
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise ValueError(f"--adapter {adapter} is not a LoRA adapter (no adapter_config.json); "
                         "pass OUT/adapter of `lalmtool finetune`")
    cfg = os.path.join(os.path.dirname(os.path.abspath(adapter)), "config.yaml")
    if not os.path.exists(cfg):
        return {}
    with open(cfg, encoding="utf-8") as fh:
        run = yaml.safe_load(fh) or {}
    trained = run.get("backend", backend)
    if trained != backend:
        raise ValueError(f"--adapter {adapter} was trained with the {trained} backend "
                         f"({cfg}); decode it with --backend {trained}")
    return dict(run.get("extra") or {})
