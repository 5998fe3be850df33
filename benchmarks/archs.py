"""Real model architectures with random weights, built directly on the device: what the GPU
benchmarks (``bench_prefill.py --arch``, ``bench_train_step.py``) measure, with no download.

Cost (time, memory, FLOPs) depends on a model's shapes, not on its weights' values, so a randomly
initialised Qwen2-Audio-7B costs what the real checkpoint costs; its accuracy means nothing.
The tokenizer is the small byte-level one of ``write_random_qwen2_audio`` (with Qwen2-Audio's
special tokens), so prompts are a few tokens longer than the real tokenizer's.
"""
from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch

#: Qwen/Qwen2-Audio-7B's config.json (transformers' ``Qwen2AudioConfig()`` defaults differ in the
#: text decoder: intermediate 22016, vocabulary 151936, 32768 positions).
QWEN2_AUDIO_7B = {
    "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32,
                     "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128,
                     "max_source_positions": 1500, "activation_function": "gelu",
                     "scale_embedding": False},
    "text_config": {"model_type": "qwen2", "hidden_size": 4096, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32,
                    "intermediate_size": 11008, "vocab_size": 156032,
                    "max_position_embeddings": 8192, "rope_theta": 10000, "rms_norm_eps": 1e-5,
                    "sliding_window": 32768},
    "audio_token_index": 151646,
}
#: The 7B's 32 decoder layers at width 64 (a one-layer tower of width 16): a decode step costs
#: almost nothing but its per-layer overhead, which it has as often per step as the 7B.
QWEN2_AUDIO_TINY32 = {
    "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 16, "encoder_layers": 1,
                     "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80,
                     "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 32,
                    "num_attention_heads": 4, "num_key_value_heads": 4,
                    "intermediate_size": 172, "vocab_size": 512,
                    "max_position_embeddings": 8192},
}
ARCHS = {"qwen2-audio-7b": QWEN2_AUDIO_7B, "qwen2-audio-tiny32": QWEN2_AUDIO_TINY32}


def arch_config(name: str | None = None, file: str | None = None):
    """The ``Qwen2AudioConfig`` of ``--arch NAME`` or of ``--arch-config FILE`` (a config.json)."""
    from transformers import Qwen2AudioConfig

    if (name is None) == (file is None):
        sys.exit("give exactly one of --arch and --arch-config")
    if file is not None:
        with open(file, encoding="utf-8") as fh:
            spec = json.load(fh)
    else:
        spec = ARCHS[name]
    return Qwen2AudioConfig(**spec)


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes (built on the meta device: no memory)."""
    from transformers import Qwen2AudioForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def random_qwen2_audio(config, tmp: str, device: str, dtype: torch.dtype, **opts):
    """lalmtool's ``qwen2-audio`` backend on ``config`` with random weights created on ``device``
    in ``dtype`` (no checkpoint of that size is written or read); ``opts`` go to the backend."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              WhisperFeatureExtractor)

    from lalmtool.models import load_backend
    from lalmtool.testing import write_random_qwen2_audio

    path = os.path.join(tmp, "qwen2-audio-random")
    write_random_qwen2_audio(path)  # tokenizer and processor (its model is replaced below)
    WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins).save_pretrained(path)
    small = Qwen2AudioConfig.from_pretrained(path)
    config.audio_token_index = small.audio_token_index  # the small tokenizer's special ids
    eos = small.text_config.eos_token_id
    config.text_config.eos_token_id = config.text_config.pad_token_id = eos
    config.text_config.bos_token_id = None

    def build(model_path, dtype=None, **kwargs):
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
        return model

    with mock.patch.object(Qwen2AudioForConditionalGeneration, "from_pretrained", build):
        return load_backend("qwen2-audio", path, device=device, dtype=dtype, **opts)


class PeakMemory:
    """Peak memory (MiB) allocated inside the ``with`` block beyond what was there before it:
    ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the process's peak resident
    set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = _status_mib("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current resident set
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.mib = _status_mib("VmHWM") - self.base


def _status_mib(key: str) -> float:
    import re

    with open("/proc/self/status") as fh:
        return int(re.search(rf"{key}:\s+(\d+)", fh.read()).group(1)) / 1024
