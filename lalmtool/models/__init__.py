"""Model backends, registered by name. Each backend lives in one file of this package."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
