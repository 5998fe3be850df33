"""A randomly initialised Voxtral checkpoint in the real layout (``VoxtralForConditionalGeneration``
plus a ``VoxtralProcessor`` over a mistral-common ``tekken.json``), for mechanics tests and cost
benchmarks, never for accuracy claims. Needs ``mistral-common`` (``[audio]`` extra: soundfile,
soxr) installed; nothing is downloaded.
"""
from __future__ import annotations

import base64
import json
import os

import torch

#: The tekken special tokens Voxtral-Mini-3B-2507 uses, at their real ranks. ``VoxtralProcessor``
#: hard-codes ``[AUDIO]`` = 24; the ranks in between are fillers, as in the real file.
VOXTRAL_SPECIAL_TOKENS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]",
    16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]",
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[TRANSCRIBE]"}
BOS, EOS, PAD, AUDIO = 1, 2, 11, 24
#: Like the real tekken.json: 1000 special ranks, then the byte-level vocabulary.
NUM_SPECIAL = 1000
#: A few BPE merges on top of the 256 bytes (tiktoken ranks; each is a merge of two earlier ones).
MERGES = [b" t", b"he", b" the", b"en", b"in", b"la", b"ng", b"lang"]
#: The real tekken pre-tokenisation pattern (as in mistral_common/data/tekken_240911.json).
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_tekken(path: str) -> int:
    """Writes a tiny ``tekken.json`` (format version v7, like Voxtral-Mini-3B-2507's) with the
    256 byte tokens, ``MERGES`` and the real audio config: 16 kHz, 12.5 audio tokens a second,
    128 mel bins, hop 160, window 400, audio padded to 30 s chunks. Returns the vocabulary size.
    """
    pieces = [bytes([i]) for i in range(256)] + MERGES
    vocab = [{"rank": i, "token_bytes": base64.b64encode(b).decode(),
              "token_str": b.decode("utf-8", errors="replace")} for i, b in enumerate(pieces)]
    special = [{"rank": i, "token_str": VOXTRAL_SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"),
                "is_control": True} for i in range(NUM_SPECIAL)]
    size = NUM_SPECIAL + len(vocab)
    tekken = {
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": size,
                   "default_num_special_tokens": NUM_SPECIAL, "version": "v7"},
        "vocab": vocab, "special_tokens": special,
        "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160,
                                            "window_size": 400}}}
    with open(os.path.join(path, "tekken.json"), "w", encoding="utf-8") as f:
        json.dump(tekken, f, ensure_ascii=False)
    return size


def write_random(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised Voxtral checkpoint (model, ``tekken.json``, processor) to
    ``path`` and returns ``path``: for mechanics tests and cost benchmarks, never for accuracy.

    The layout is Voxtral-Mini-3B-2507's at toy sizes: a Whisper-style audio tower (width 32, one
    layer, 128 mel bins, 1500 source positions: one 30 s window), the projector that stacks 4
    encoder frames into one audio token (12.5 a second), and a 2-layer Llama decoder of width 64
    over the tiny tekken vocabulary (1000 special ranks + 264 byte-level tokens). The projector's
    weights are drawn with unit variance, and the rest with std 0.5 (the text config's
    ``initializer_range``, which Voxtral uses for every module) so that attention is sharp enough
    for a random decoder's greedy output, not only its logits, to depend on the audio. ``</s>``
    ends generation and ``<pad>`` pads, as in the real checkpoint.
    """
    from transformers import (MistralCommonBackend, VoxtralConfig,
                              VoxtralForConditionalGeneration, VoxtralProcessor,
                              WhisperFeatureExtractor)

    os.makedirs(path, exist_ok=True)
    vocab_size = _write_tekken(path)
    tok = MistralCommonBackend(tokenizer_path=os.path.join(path, "tekken.json"))
    VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                     tokenizer=tok).save_pretrained(path)
    audio_dim = 32
    cfg = VoxtralConfig(
        audio_config=dict(model_type="voxtral_encoder", hidden_size=audio_dim,
                          intermediate_size=4 * audio_dim, num_hidden_layers=1,
                          num_attention_heads=2, num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         initializer_range=0.5),
        audio_token_id=AUDIO)
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(cfg)
    with torch.no_grad():
        for linear in (model.model.multi_modal_projector.linear_1,
                       model.model.multi_modal_projector.linear_2):
            linear.weight.normal_(0, 1.0)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS, EOS, PAD
    model.save_pretrained(path)
    return path
