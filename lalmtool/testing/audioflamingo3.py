"""A randomly initialised Audio Flamingo 3 checkpoint in the real layout of
``nvidia/audio-flamingo-3-hf``, for mechanics tests; never for accuracy claims.

The real model (``AudioFlamingo3ForConditionalGeneration``) is a Whisper-large-v3-style encoder
(128 mel bins, 30 s windows padded to 3000 frames, 50 frames/s after its convolutions, then an
average pooler to 25 frames/s and a layer norm), a two-layer MLP ``multi_modal_projector`` applied
row by row, and a Qwen2.5-7B decoder that reads the projected rows in place of ``<sound>``
placeholders. ``AudioFlamingo3Processor`` cuts audio into 30 s windows (at most 20: 10 min) and
inserts one ``<sound>`` per pooled frame of all windows, in one run.

The tokenizer and generation helpers here are shared with the GLM-ASR and Qwen3-ASR writers.
"""
from __future__ import annotations

import torch

#: The special tokens of AF3's (Qwen2.5) tokenizer that its prompts use, in the real vocabulary's
#: order (``<|endoftext|>`` first: padding); ``<|im_end|>`` is the tokenizer's eos.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"]

#: The real checkpoint's (processor's) chat template, from transformers'
#: ``convert_audioflamingo3_to_hf.py``: a default system turn, and one ``<sound>`` before the
#: text of a message that holds audio (wherever the audio stands in the message).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}")

#: Sizes: audio encoder width, LLM width.
AUDIO_DIM, HIDDEN = 16, 32


def byte_level_tokenizer(special: list[str], plain: tuple[str, ...] = (), **kwargs):
    """A Qwen2 (byte-level BPE) tokenizer: the 256 byte symbols and a few merges, then the
    ``special`` tokens in that order, then ``plain`` added tokens that are not special (kept by
    ``decode(skip_special_tokens=True)``). ``kwargs`` go to ``Qwen2Tokenizer`` (``eos_token``,
    ``pad_token``, named tokens such as ``audio_token``); there is no unknown token."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n"), ("i", "n")]
    for token in [a + b for a, b in merges] + list(special) + list(plain):
        vocab[token] = len(vocab)  # the ids follow this order, whichever role a token has
    kwargs.setdefault("unk_token", None)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=special[1:],
                         **kwargs)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def save_random(model, processor, path: str, eos, pad: int) -> str:
    """Draws the weights of ``model.model.multi_modal_projector``'s linear layers with unit
    variance (so that a random decoder's output depends on the audio), sets the generation
    config's end tokens ``eos`` (an id or a list) and padding ``pad``, and saves model and
    processor to ``path``."""
    with torch.no_grad():
        for layer in model.model.multi_modal_projector.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 1.0)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = eos, pad, None
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return path


def write_random(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised Audio Flamingo 3 checkpoint (model, tokenizer, processor) to
    ``path`` and returns ``path``: for mechanics tests, never for accuracy.

    The audio encoder has one layer of width 16 over 128 mel bins (1500 positions: 30 s windows,
    as the real one), the Qwen2 decoder two layers of width 32 with 4096 positions; the
    processor is the real one (Whisper features, ``<sound>`` placeholders, the real chat
    template and transcription prompt). Generation stops on ``<|im_end|>`` and pads with
    ``<|endoftext|>``. The same ``seed`` gives the same weights.
    """
    from transformers import (AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration,
                              AudioFlamingo3Processor, WhisperFeatureExtractor)

    tok = byte_level_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)
    config = AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=AUDIO_DIM,
                          num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=2 * AUDIO_DIM, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=HIDDEN,
                         intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        audio_token_id=ids["<sound>"])
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(config)
    return save_random(model, processor, path, ids["<|im_end|>"], ids["<|endoftext|>"])
