"""A randomly initialised Qwen3-ASR checkpoint in the real layout of ``Qwen/Qwen3-ASR-1.7B-hf``
(the transformers conversion of ``Qwen/Qwen3-ASR-1.7B``), for mechanics tests; never for
accuracy claims.

The real model (``Qwen3ASRForConditionalGeneration``) cuts the log-mel (128 bins) of the whole
utterance into 1 s chunks (``2 * n_window`` = 100 frames), downsamples each chunk by three
stride-2 convolutions to 13 rows (13 rows/s; sinusoidal positions restart in every chunk), runs
a transformer whose attention spans windows of ``n_window_infer`` = 800 frames (8 chunks, 104
rows), a layer norm, then a two-layer MLP ``multi_modal_projector`` applied row by row, and a
Qwen3 decoder that reads the projected rows in place of ``<|audio_pad|>`` placeholders.
``Qwen3ASRFeatureExtractor`` pads a batch to its longest utterance (no 30 s windows, no
truncation; clips under 0.5 s are zero-padded to 0.5 s).

The prompt carries no instruction: the system turn holds optional context text, the user turn
only ``<|audio_start|><|audio_pad|><|audio_end|>``, and the model answers
``language <Name><asr_text><transcript>`` (``apply_transcription_request(language=...)``
prefills ``language <Name><asr_text>``).
"""
from __future__ import annotations

import torch

from .audioflamingo3 import byte_level_tokenizer, save_random

#: The special tokens of Qwen3-ASR's tokenizer that its prompts use, in the real vocabulary's
#: order (``<|endoftext|>`` first: padding); ``<|im_end|>`` is the tokenizer's eos.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>",
                  "<|audio_end|>", "<|audio_pad|>"]

#: Added tokens that are not special: the transcript marker (``decode(...,
#: skip_special_tokens=True)`` keeps it, which the processor's output parsing needs) and the
#: forced aligner's word-boundary marker (``config.timestamp_token_id``).
PLAIN_TOKENS = ("<asr_text>", "<timestamp>")

#: The named multimodal tokens the processor reads off the tokenizer.
NAMED_TOKENS = {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                "audio_eos_token": "<|audio_end|>"}

#: Generation's end tokens (the real (151643, 151645)) and padding (the real 151645).
END_TOKENS, PAD_TOKEN = ["<|endoftext|>", "<|im_end|>"], "<|im_end|>"

#: The real checkpoint's chat template, from transformers' ``convert_qwen3_asr_to_hf.py``: the
#: system turn is the concatenated text of the system messages (empty without one), the user
#: turn one audio marker per audio item (**the user's text is dropped**), then the assistant
#: turns (in ``{% generation %}``) and the generation prompt.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_text='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if m.content is string -%}"
    "{%- set ns.system_text = ns.system_text + m.content -%}"
    "{%- else -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'text' and (c.text is defined) -%}"
    "{%- set ns.system_text = ns.system_text + c.text -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns2 = namespace(audio_tokens='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.content is not string -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'audio' or ('audio' in c) or ('audio_url' in c) -%}"
    "{%- set ns2.audio_tokens = ns2.audio_tokens + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\n' + ns.system_text + '<|im_end|>\n' -}}"
    "{{- '<|im_start|>user\n' + ns2.audio_tokens + '<|im_end|>\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set ns3 = namespace(assistant_text='') -%}"
    "{%- if m.content is string -%}"
    "{%- set ns3.assistant_text = m.content -%}"
    "{%- else -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'text' and (c.text is defined) -%}"
    "{%- set ns3.assistant_text = ns3.assistant_text + c.text -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}"
    "{{- ns3.assistant_text + '<|im_end|>\n' -}}"
    "{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}")

#: Sizes: audio encoder width, its convolutions' channels, LLM width.
AUDIO_DIM, CONV_DIM, HIDDEN = 16, 8, 32


def write_random(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised Qwen3-ASR checkpoint (model, tokenizer, processor) to
    ``path`` and returns ``path``: for mechanics tests, never for accuracy.

    The audio encoder has one layer of width 16 over 128 mel bins (1 s chunks, 13 positions, as
    the real one), the Qwen3 decoder two layers of width 32 (tied embeddings, as the real one)
    with 4096 positions; the processor is the real one (``Qwen3ASRFeatureExtractor``, the real
    chat template). Generation stops on ``<|endoftext|>`` or ``<|im_end|>`` and pads with
    ``<|im_end|>``, as the real generation config. The same ``seed`` gives the same weights.
    """
    from transformers import (Qwen3ASRConfig, Qwen3ASRFeatureExtractor,
                              Qwen3ASRForConditionalGeneration, Qwen3ASRProcessor)

    tok = byte_level_tokenizer(SPECIAL_TOKENS, PLAIN_TOKENS, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", **NAMED_TOKENS)
    names = SPECIAL_TOKENS + list(PLAIN_TOKENS)
    ids = dict(zip(names, tok.convert_tokens_to_ids(names)))
    eos, pad = [ids[t] for t in END_TOKENS], ids[PAD_TOKEN]
    processor = Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tok,
                                  chat_template=CHAT_TEMPLATE)
    config = Qwen3ASRConfig(
        audio_config=dict(d_model=AUDIO_DIM, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=2 * AUDIO_DIM, num_mel_bins=128,
                          downsample_hidden_size=CONV_DIM, output_dim=HIDDEN),
        text_config=dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False),
        audio_token_id=ids["<|audio_pad|>"], timestamp_token_id=ids["<timestamp>"],
        eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)  # untied: a random
    # decoder with tied embeddings repeats the last prompt token whatever the audio
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config)
    tower = model.model.audio_tower
    with torch.no_grad():  # at std 0.02 the convolutions pass ~1e-5 of the audio on, and the
        # sinusoidal positions (unit scale) would make the encoder's output the same for any audio
        for layer in (tower.conv2d1, tower.conv2d2, tower.conv2d3, tower.conv_out):
            torch.nn.init.kaiming_normal_(layer.weight)
    return save_random(model, processor, path, eos, pad)
