"""A randomly initialised GLM-ASR checkpoint in the real layout of ``zai-org/GLM-ASR-Nano-2512``,
for mechanics tests; never for accuracy claims.

The real model (``GlmAsrForConditionalGeneration``) is a Whisper-style encoder with rotary
attention (128 mel bins, 30 s windows padded to 3000 frames, 50 frames/s after its convolutions,
no attention mask: the padding of a window is attended to), whose output rows are stacked four
at a time (a reshape to width ``audio_config.intermediate_size`` = 4 x its width: 12.5 rows/s),
a two-layer MLP ``multi_modal_projector`` applied to each stacked row, and a Llama decoder that
reads the projected rows in place of ``<|pad|>`` placeholders. ``GlmAsrProcessor`` cuts audio
into 30 s windows (at most 21: 655 s) and inserts one ``<|pad|>`` per stacked row of all
windows, in one run between ``<|begin_of_audio|>`` and ``<|end_of_audio|>``.
"""
from __future__ import annotations

import torch

from .audioflamingo3 import byte_level_tokenizer, save_random

#: The special tokens of GLM-ASR's tokenizer that its prompts and end tokens use (in GLM-4's
#: order for the chat tokens). ``<|endoftext|>`` is eos and padding; generation ends on
#: ``<|endoftext|>``, ``<|user|>`` or ``<|observation|>``; the audio placeholder is ``<|pad|>``
#: (not the padding token).
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                  "<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>"]

#: Generation's end tokens (the real ``text_config.eos_token_id`` [59246, 59253, 59255]).
END_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

#: The real checkpoint's chat template, from transformers' ``convert_glmasr_weights_to_hf.py``:
#: no default system turn; an audio item becomes
#: ``<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\n`` (a second ``<|user|>`` tag before the
#: text), e.g. ``<|user|>\n<|begin_of_audio|>…<|end_of_audio|><|user|>\nPlease transcribe this
#: audio into text<|assistant|>\n``.
CHAT_TEMPLATE = """{%- macro to_text(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}
{%- if item is mapping and item.type == 'text' and item.text is defined -%}
{{- item.text -}}
{%- elif item is mapping and (item.type == 'audio' or 'audio' in item) -%}
<|begin_of_audio|><|pad|><|end_of_audio|><|user|>
{% elif item is string -%}
{{- item -}}
{%- endif -%}
{%- endfor -%}
{%- else -%}
{{- content -}}
{%- endif -%}
{%- endmacro -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|system|>
{{ to_text(m.content) | trim }}
{%- elif m.role == 'user' -%}
<|user|>
{{ to_text(m.content) | trim }}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{{ to_text(m.content) | trim }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}"""

#: Sizes: audio encoder width (its MLP width, 4x, is also the stacked rows' width), LLM width.
AUDIO_DIM, HIDDEN = 16, 32


def write_random(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised GLM-ASR checkpoint (model, tokenizer, processor) to ``path``
    and returns ``path``: for mechanics tests, never for accuracy.

    The tokenizer is byte-level BPE with GLM-ASR's special tokens, saved as the real one is (a
    ``TokenizersBackend``); the audio encoder has one layer of width 16 over 128 mel bins
    (MLP width 64 = 4 x 16, which the model's 4-row stacking requires), the Llama decoder two
    layers of width 32 with 4096 positions; the processor is the real one (Whisper features,
    the real chat template and transcription prompt). The same ``seed`` gives the same weights.
    """
    from transformers import (GlmAsrConfig, GlmAsrForConditionalGeneration, GlmAsrProcessor,
                              TokenizersBackend, WhisperFeatureExtractor)

    eot, backend = SPECIAL_TOKENS[0], byte_level_tokenizer(SPECIAL_TOKENS).backend_tokenizer
    tok = TokenizersBackend(tokenizer_object=backend, eos_token=eot, pad_token=eot,
                            additional_special_tokens=SPECIAL_TOKENS[1:])
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
    eos, pad = [ids[t] for t in END_TOKENS], ids[eot]
    processor = GlmAsrProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                tokenizer=tok, chat_template=CHAT_TEMPLATE)
    config = GlmAsrConfig(
        audio_config=dict(hidden_size=AUDIO_DIM, intermediate_size=4 * AUDIO_DIM,
                          num_hidden_layers=1, num_attention_heads=2, num_mel_bins=128),
        text_config=dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=pad, tie_word_embeddings=False),
        audio_token_id=ids["<|pad|>"], tie_word_embeddings=False)  # untied: a random decoder
    # with tied embeddings repeats the last prompt token whatever the audio
    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration(config)
    return save_random(model, processor, path, eos, pad)
