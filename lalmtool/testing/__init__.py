"""Randomly initialised checkpoints in the real layouts, for mechanics tests and cost benchmarks
(never for accuracy claims): they let the test suite and ``benchmarks/`` exercise a backend end to
end without downloading a model.
"""
from __future__ import annotations

import torch
from transformers import Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

from ..models.qwen2_audio import AUDIO_TOKEN

#: The special tokens of Qwen2-Audio's tokenizer (``<|endoftext|>`` first: eos and padding).
QWEN2_AUDIO_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_TOKEN,
                              "<|audio_bos|>", "<|audio_eos|>"]


def write_random_qwen2_audio(path: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                             kv_heads: int = 2, intermediate: int = 64, audio_dim: int = 16,
                             max_positions: int = 4096, seed: int = 0) -> str:
    """Writes a randomly initialised Qwen2-Audio checkpoint (model, tokenizer, processor) to
    ``path``: for mechanics tests and cost benchmarks, never for accuracy.

    The tokenizer is byte-level BPE (the 256 byte symbols and a few merges) with Qwen2-Audio's
    special tokens; the audio tower has one layer of width ``audio_dim`` over 80 mel bins; the
    Qwen2 decoder has the given sizes. The projector's weights are drawn with unit variance so
    that a random decoder's output depends on the audio.
    """
    from transformers import Qwen2AudioConfig, Qwen2AudioProcessor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    special = QWEN2_AUDIO_SPECIAL_TOKENS
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=special[1:])
    ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                        tokenizer=tok).save_pretrained(path)
    eos = ids["<|endoftext|>"]
    cfg = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=audio_dim, encoder_layers=1,
                          encoder_attention_heads=2, encoder_ffn_dim=2 * audio_dim,
                          num_mel_bins=80, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, eos_token_id=eos,
                         pad_token_id=eos, bos_token_id=None),
        audio_token_index=ids[AUDIO_TOKEN])
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.multi_modal_projector.linear.weight.normal_(0, 1.0)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    model.save_pretrained(path)
    return path


#: A random checkpoint writer per audio LLM family of ``lalmtool.models.audio_llm`` (its module
#: in this package and the function there): ``write_random_audio_llm`` calls them.
AUDIO_LLM_WRITERS = {
    "qwen2-audio-chat": "lalmtool.testing:write_random_qwen2_audio",
    "voxtral": "lalmtool.testing.voxtral:write_random",
    "granite-speech": "lalmtool.testing.granite_speech:write_random",
    "qwen2.5-omni": "lalmtool.testing.qwen2_5_omni:write_random",
    "audioflamingo3": "lalmtool.testing.audioflamingo3:write_random",
    "glm-asr": "lalmtool.testing.glmasr:write_random",
    "qwen3-asr": "lalmtool.testing.qwen3_asr:write_random",
}


def write_random_audio_llm(family: str, path: str, seed: int = 0) -> str:
    """Writes a tiny random checkpoint of audio LLM ``family`` (model, processor, tokenizer
    with the family's special tokens and chat template) to ``path``; for mechanics tests."""
    import importlib

    module, function = AUDIO_LLM_WRITERS[family].split(":")
    return getattr(importlib.import_module(module), function)(path, seed=seed)
