"""Converts a GGUF causal language model into a plain transformers checkpoint.

transformers can read a GGUF file (``from_pretrained(dir, gguf_file=...)``, which dequantises
it to float32, ~15-25 s for SmolLM2-135M on 2 cores), but it refuses to ``save_pretrained``
the result because the config still carries a GGUF ``quantization_config``. Building a fresh
model from that config without the quantisation entry, loading the dequantised state dict and
saving it gives ordinary safetensors that reload in well under a second.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def convert(gguf_path: str, out_dir: str) -> str:
    """Writes ``gguf_path`` as a float32 transformers checkpoint into ``out_dir`` and returns ``out_dir``.

    The directory holds safetensors weights, ``config.json`` (no ``quantization_config``),
    ``generation_config.json`` and the tokenizer (with its chat template).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf_file = os.path.split(os.path.abspath(gguf_path))
    logger.info("gguf: loading tokenizer from %s", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    logger.info("gguf: loading and dequantising weights from %s", gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: dequantised weights do not fit {type(model).__name__} "
                           f"(missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    logger.info("gguf: wrote %s (%s, %.1f M parameters)", out_dir, type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir
