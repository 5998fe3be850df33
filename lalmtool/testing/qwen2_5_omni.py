"""A randomly initialised Qwen2.5-Omni checkpoint in the real layout, for mechanics tests of the
*thinker* (audio encoder + LLM, text out); never for accuracy claims.

The full layout is that of ``Qwen/Qwen2.5-Omni-7B``: ``config.json`` of model type ``qwen2_5_omni``
with the thinker's weights under ``thinker.`` (next to a tiny talker and token2wav, and
``spk_dict.pt``, which ``Qwen2_5OmniForConditionalGeneration.from_pretrained`` requires). Load
just the thinker from it (transformers strips the ``thinker.`` prefix and takes the
``thinker_config`` sub-config) with::

    Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path)

or the whole model without talker and token2wav with
``Qwen2_5OmniForConditionalGeneration.from_pretrained(path, enable_audio_output=False).thinker``
(``AutoModelForMultimodalLM`` gives that whole model too). ``thinker_only=True`` writes a
thinker-only checkpoint (model type ``qwen2_5_omni_thinker``), which the same thinker call, or
``AutoModelForImageTextToText``, loads.
"""
from __future__ import annotations

import torch

#: Qwen2.5-Omni's special tokens, in the real vocabulary's order (``<|endoftext|>`` first: padding).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                  "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
                  "<|IMAGE|>", "<|VIDEO|>"]

#: The named multimodal tokens the processor reads off the tokenizer (as in the real
#: ``tokenizer_config.json``).
NAMED_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                "audio_eos_token": "<|audio_eos|>", "image_token": "<|IMAGE|>",
                "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                "vision_eos_token": "<|vision_eos|>"}

#: The real checkpoint's chat template (its default system turn is "You are a helpful assistant.").
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

#: Sizes: audio encoder width, thinker (text) width, talker width.
AUDIO_DIM, HIDDEN, TALKER_HIDDEN = 16, 32, 16


def _processor():
    """Byte-level BPE tokenizer (the 256 byte symbols, a few merges, the special tokens), Whisper
    feature extractor over 128 mel bins, Qwen2-VL image and video processors, real chat template."""
    from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n"), ("i", "n")]
    for token in [a + b for a, b in merges] + SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None,
                         additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768,
                         **NAMED_TOKENS)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(),
                                video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                tokenizer=tok, chat_template=CHAT_TEMPLATE)


def _config(ids: dict, vocab_size: int):
    """A ``Qwen2_5OmniConfig`` at tiny sizes, its token ids those of the tiny tokenizer."""
    from transformers import Qwen2_5OmniConfig

    text = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, max_window_layers=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [2, 1, 1]})
    thinker = dict(
        audio_config=dict(num_mel_bins=128, d_model=AUDIO_DIM, encoder_layers=1,
                          encoder_attention_heads=2, encoder_ffn_dim=2 * AUDIO_DIM,
                          output_dim=HIDDEN, n_window=100, max_source_positions=1500),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=HIDDEN, fullatt_block_indexes=[0]),
        text_config=text,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"], vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    # The talker's codec vocabulary (its special codes the last ones), as large as the thinker's,
    # which its tts_text_* ids index.
    codec = vocab_size + 4
    talker = dict(
        vocab_size=codec, embedding_size=HIDDEN, hidden_size=TALKER_HIDDEN,
        intermediate_size=2 * TALKER_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=4096, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
        tts_codec_pad_token_id=codec - 4, tts_codec_start_token_id=codec - 3,
        tts_codec_end_token_id=codec - 2, tts_codec_mask_token_id=codec - 1,
        tts_text_start_token_id=ids["<|im_start|>"], tts_text_end_token_id=ids["<|im_end|>"],
        tts_text_pad_token_id=ids["<|endoftext|>"],
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"])
    token2wav = dict(
        dit_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
                        emb_dim=8, num_embeds=codec, mel_dim=8, enc_emb_dim=8, enc_dim=8,
                        enc_channels=[8, 8, 8, 8, 24], enc_attention_channels=8,
                        enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2],
                            upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]]))
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                             token2wav_config=token2wav, enable_audio_output=True)


def write_random(path: str, seed: int = 0, thinker_only: bool = False) -> str:
    """Writes a randomly initialised Qwen2.5-Omni checkpoint (model, tokenizer, processor) to
    ``path`` and returns ``path``: for mechanics tests, never for accuracy.

    The thinker's audio tower has one layer of width 16 over 128 mel bins (as the real one), its
    text decoder two layers of width 32 with 4096 positions. So that the random decoder's output
    depends on the audio, the audio tower's output projection (``proj``) is drawn with unit
    variance and its two convolutions with 16x the variance that keeps a signal's (the default
    init's std 0.02 leaves the fixed sinusoidal position embedding, added after them, to swamp
    the content). The default writes the full layout (model type ``qwen2_5_omni``: ``thinker.``,
    ``talker.`` and ``token2wav.`` weights, ``spk_dict.pt``); ``thinker_only=True`` writes the
    thinker alone (model type ``qwen2_5_omni_thinker``). The same ``seed`` gives the same weights.
    """
    from transformers import (Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    processor = _processor()
    tok = processor.tokenizer
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
    config = _config(ids, len(tok))
    torch.manual_seed(seed)
    model = thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
    tower = thinker.model.audio_tower
    with torch.no_grad():  # see the docstring: make the audio matter
        for conv in (tower.conv1, tower.conv2):
            conv.weight.normal_(0, 4 / conv.weight[0].numel() ** 0.5)
        tower.proj.weight.normal_(0, 1.0)
    if not thinker_only:  # the same thinker as thinker_only=True writes, talker and token2wav after
        model = Qwen2_5OmniForConditionalGeneration(config)
        model.thinker.load_state_dict(thinker.state_dict())
    gen = model.generation_config  # the thinker loaded from either layout reads this one
    gen.eos_token_id, gen.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    gen.bos_token_id = None
    processor.save_pretrained(path)
    model.save_pretrained(path)
    if not thinker_only:  # speaker conditioning the full model's from_pretrained insists on
        dit, rng = config.token2wav_config.dit_config, torch.Generator().manual_seed(seed)
        torch.save({name: {"bos_token": config.talker_config.tts_text_start_token_id,
                           "cond": torch.randn(1, dit.enc_emb_dim, generator=rng),
                           "ref_mel": torch.randn(1, 30, dit.mel_dim, generator=rng)}
                    for name in ("Chelsie", "Ethan")}, f"{path}/spk_dict.pt")
    return path
