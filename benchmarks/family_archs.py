"""Published shapes of the main checkpoint of each transformers audio-LLM family, as the kwargs of
that family's transformers config class: what a random-weight cost benchmark of that family needs
(``build_config`` builds it, optionally at reduced depth for CPU runs), with no download.

Each ``ARCHS`` entry is ``{"family": model_type, "config": kwargs, "source": checkpoint id}``. The
kwargs keep only what sets shapes and cost (widths, depths, heads, vocabulary, context, mel bins,
encoder positions, projector settings, whether embeddings are tied) and the audio token id, nested
as in the checkpoint's config.json (``audio_config``/``text_config``, Granite's
``encoder_config``/``projector_config``). Qwen2.5-Omni is its ``thinker_config`` only (with its
``vision_config``: the thinker model builds the vision tower, and the class default is not the
7B's); Qwen3-ASR is in the flat layout of transformers' ``qwen3_asr`` (the original checkpoint
nests it under ``thinker_config``; transformers' converter flattens it). Qwen2-Audio-7B is
benchmarks/archs.py's ``QWEN2_AUDIO_7B`` (referenced, not copied).

No checkpoint's config.json could be read here (Hugging Face is out of reach), so every number
below names where it was found: a transformers source file whose defaults are documented as that
checkpoint's, a conversion script, a model card, a port that quotes the checkpoint's config, or a
Hugging Face page. A value not found anywhere is the family config's transformers default, marked
"default". Paths ``transformers/...`` are files of huggingface/transformers (src/transformers/...).

``python3 benchmarks/family_archs.py`` builds every config on the meta device and prints the
parameter count at full depth against the published size.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from archs import QWEN2_AUDIO_7B  # noqa: E402  (benchmarks/archs.py)

# --------------------------------------------------------------------------------------------
# Voxtral (model_type "voxtral"): Whisper-large-v3-shaped encoder, 4 encoder frames stacked
# (reshape to audio intermediate_size = 4 x 1280) into a 2-layer MLP, Llama/Mistral decoder.
# --------------------------------------------------------------------------------------------
#: The Whisper-large-v3 encoder both Voxtral checkpoints use.
#: transformers/models/voxtral/configuration_voxtral.py, VoxtralEncoderConfig defaults (documented
#: as mistralai/Voxtral-Mini-3B-2507's); the same numbers (1280 / 32 layers / 20 heads / 5120 /
#: 128 mel / 1500 positions) are in copies of the Mini's shipped config.json quoted by public ports'
#: tests (found with find_string '"audio_token_id": 24,'; the index does not name their repository).
_VOXTRAL_AUDIO = {"model_type": "voxtral_encoder", "hidden_size": 1280, "num_hidden_layers": 32,
                  "num_attention_heads": 20, "intermediate_size": 5120, "num_mel_bins": 128,
                  "max_source_positions": 1500}

VOXTRAL_MINI_3B = {
    "audio_config": _VOXTRAL_AUDIO,
    # transformers/models/voxtral/configuration_voxtral.py, VoxtralConfig's text_config defaults
    # (documented as Voxtral-Mini-3B-2507's): vocab 131072, hidden 3072, intermediate 8192, 30
    # layers, 8 kv heads, head_dim 128, 131072 positions, rope_theta 1e8; 32 heads is LlamaConfig's
    # default there and the value in the shipped config.json copies above. The model card's
    # context is 32k tokens (beingkong/context-engineering-intro, mistralaiVoxtralMini3B2507.md);
    # config.json says 131072.
    "text_config": {"model_type": "llama", "vocab_size": 131072, "hidden_size": 3072,
                    "intermediate_size": 8192, "num_hidden_layers": 30, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                    "rope_theta": 1e8},
    # VoxtralConfig's docstring example (audio_token_id=24) and the config.json of
    # https://huggingface.co/trl-internal-testing/tiny-VoxtralForConditionalGeneration
    "audio_token_id": 24,
    "projector_hidden_act": "gelu",
}

VOXTRAL_SMALL_24B = {
    # The same encoder as the Mini (Voxtral paper, arXiv 2507.13264: both use Whisper large-v3).
    "audio_config": _VOXTRAL_AUDIO,
    # Voxtral Small's decoder is Mistral Small 3.1 24B (transformers docs/source/en/model_doc/
    # voxtral.md; arXiv 2507.13264). Its text_config, from
    # https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Instruct-2503/blob/main/config.json:
    # hidden 5120, intermediate 32768, 40 layers, 32 heads, 8 kv heads, head_dim 128, vocab 131072,
    # 131072 positions. Voxtral-Small-24B-2507's own config.json was not found; its rope_theta is
    # VoxtralConfig's default (1e8) -- it changes no shape.
    "text_config": {"model_type": "llama", "vocab_size": 131072, "hidden_size": 5120,
                    "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072},
    # Not found for the Small: the Mini's (same Tekken tokenizer).
    "audio_token_id": 24,
    "projector_hidden_act": "gelu",
}

# --------------------------------------------------------------------------------------------
# Qwen2.5-Omni thinker (model_type "qwen2_5_omni_thinker"): Qwen2-Audio-style encoder (conv
# stride 2, then 2x average pooling) with its projection to output_dim, Qwen2.5-7B decoder.
# --------------------------------------------------------------------------------------------
QWEN2_5_OMNI_7B_THINKER = {
    # transformers/models/qwen2_5_omni/configuration_qwen2_5_omni.py, Qwen2_5OmniAudioEncoderConfig
    # defaults (documented as Qwen/Qwen2.5-Omni-7B's). The same values are in the thinker
    # audio_config of Qwen2.5-Omni-7B derivatives' config.json, e.g.
    # https://huggingface.co/gijs/aud2seq-model/blob/main/config.json (d_model 1280, 32 layers,
    # 20 heads, ffn 5120, 128 mel, 1500 positions, n_window 100, output_dim 3584).
    "audio_config": {"model_type": "qwen2_5_omni_audio_encoder", "d_model": 1280,
                     "encoder_layers": 32, "encoder_attention_heads": 20,
                     "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500,
                     "n_window": 100, "output_dim": 3584},
    # Qwen2_5OmniTextConfig defaults (same file) and the derivatives' text_config above: hidden
    # 3584, intermediate 18944, 28 layers, 28 heads, 4 kv heads, vocab 152064, 32768 positions.
    # tie_word_embeddings is False in the checkpoint (the thinker has its own lm_head; the text
    # config class defaults to True). The M-RoPE sections (16, 24, 24) change no shape.
    "text_config": {"model_type": "qwen2_5_omni_text", "vocab_size": 152064, "hidden_size": 3584,
                    "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4,
                    "max_position_embeddings": 32768, "rope_theta": 1e6,
                    "tie_word_embeddings": False},
    # Not audio, but the thinker builds its vision tower either way, and
    # Qwen2_5OmniVisionEncoderConfig's default width (hidden_size 3584) is not the checkpoint's:
    # it would count a 3.1B tower. The 7B's tower is Qwen2.5-VL's, 1280 wide (copies of the
    # thinker's vision_config quoted by public ports' tests: depth 32, hidden_size 1280, 16 heads,
    # out_hidden_size 3584; find_string '"output_dim": 3584'), about 675M parameters (Qwen2.5-Omni
    # technical report, arXiv 2503.20215). intermediate_size 3420 is the class default (default).
    "vision_config": {"model_type": "qwen2_5_omni_vision_encoder", "depth": 32,
                      "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584},
    "audio_token_index": 151646,  # Qwen2_5OmniThinkerConfig default; the derivatives' config.json
}

# --------------------------------------------------------------------------------------------
# Granite Speech (model_type "granite_speech"): conformer CTC encoder at 50 frames/s (two 10 ms
# mel frames stacked: input_dim 160), a 2-layer Q-Former over windows of 15 frames with 15/5 = 3
# queries each (10 tokens/s), Granite 3.3 decoder.
# --------------------------------------------------------------------------------------------
#: ibm-granite/granite-speech-models README.md (model card of granite-speech-3.3-8b, revision
#: 3.3.2): 16 conformer blocks, input 160 (80 logmels x 2), hidden 1024, 8 heads of 128, conv
#: kernel 15, output (CTC) dimension 256. The 2b has the same encoder:
#: IMvision12/KerasFormers kerasformers/models/granite_speech/config.py (converted from
#: ibm-granite/granite-speech-3.3-2b): 16 layers, 1024, feedforward_mult 4, 8 heads, dim_head 128,
#: output_dim 256, context_size 200, max_pos_emb 512, conv 15, expansion 2.
_GRANITE_ENCODER = {"model_type": "granite_speech_encoder", "input_dim": 160, "num_layers": 16,
                    "hidden_dim": 1024, "feedforward_mult": 4, "num_heads": 8, "dim_head": 128,
                    "output_dim": 256, "context_size": 200, "max_pos_emb": 512,
                    "conv_kernel_size": 15, "conv_expansion_factor": 2}
#: README above ("2-layer window query transformer ... blocks of 15 ... downsampled by a factor of
#: 5 ... 3 trainable queries"); KerasFormers config.py: hidden 1024, 2 layers, 16 heads,
#: intermediate 4096, cross_attention_frequency 1; encoder_hidden_size is the encoder's 1024.
_GRANITE_PROJECTOR = {"model_type": "blip_2_qformer", "hidden_size": 1024,
                      "encoder_hidden_size": 1024, "num_hidden_layers": 2,
                      "num_attention_heads": 16, "intermediate_size": 4096,
                      "cross_attention_frequency": 1}

GRANITE_SPEECH_3_3_8B = {
    "encoder_config": _GRANITE_ENCODER,
    "projector_config": _GRANITE_PROJECTOR,
    # The decoder is granite-3.3-8b-instruct (README above). Its config.json (hidden 4096,
    # intermediate 12800, 40 layers, 32 heads, 8 kv heads, vocab 49159, 131072 positions,
    # rope_theta 1e7, tie_word_embeddings true) is quoted verbatim in a public model-dump
    # (find_string '"intermediate_size": 12800,'; the index does not name its repository).
    # vocab 49160 = 49159 + <|audio|>: not found for the 8b, taken from the 2b (same tokenizer).
    "text_config": {"model_type": "granite", "vocab_size": 49160, "hidden_size": 4096,
                    "intermediate_size": 12800, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rope_theta": 1e7,
                    "tie_word_embeddings": True},
    "audio_token_index": 49159,  # not found for the 8b: the 2b's (same tokenizer)
    "window_size": 15, "downsample_rate": 5,  # README above (blocks of 15, downsampled 5x)
    "has_lora_adapter": True,  # README above: rank-64 LoRA on q/v (a PEFT adapter, not counted)
    "tie_word_embeddings": True,
}

GRANITE_SPEECH_3_3_2B = {
    "encoder_config": _GRANITE_ENCODER,
    "projector_config": _GRANITE_PROJECTOR,
    # IMvision12/KerasFormers kerasformers/models/granite_speech/config.py (granite_speech_3_3_2b):
    # vocab 49160, embed 2048, mlp 8192, 40 layers, 32 heads, 8 kv heads, rope_theta 1e7, tied
    # embeddings. 131072 positions: 128K context for both Granite 3.3 sizes
    # (IBM/gguf resources/ollama/granite3.3/README.md); RoPE, so it changes no shape.
    "text_config": {"model_type": "granite", "vocab_size": 49160, "hidden_size": 2048,
                    "intermediate_size": 8192, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rope_theta": 1e7,
                    "tie_word_embeddings": True},
    "audio_token_index": 49159,  # KerasFormers config.py (audio_token_id 49159)
    "window_size": 15, "downsample_rate": 5,  # KerasFormers config.py
    "has_lora_adapter": True,  # KerasFormers config.py (lora_rank 64; a PEFT adapter, not counted)
    "tie_word_embeddings": True,
}

# --------------------------------------------------------------------------------------------
# Audio Flamingo 3 (model_type "audioflamingo3"): Whisper-large-v3 encoder with 2x average
# pooling (25 frames/s), a 2-layer MLP projector, Qwen2.5-7B decoder.
# --------------------------------------------------------------------------------------------
AUDIOFLAMINGO3 = {
    # transformers/models/audioflamingo3/configuration_audioflamingo3.py,
    # AudioFlamingo3EncoderConfig defaults (documented as nvidia/audio-flamingo-3-hf's);
    # transformers' convert_audioflamingo3_to_hf.py builds the checkpoint with this default encoder.
    "audio_config": {"model_type": "audioflamingo3_encoder", "hidden_size": 1280,
                     "num_hidden_layers": 32, "num_attention_heads": 20,
                     "intermediate_size": 5120, "num_mel_bins": 128,
                     "max_source_positions": 1500},
    # transformers/models/audioflamingo3/convert_audioflamingo3_to_hf.py, the Qwen2Config the
    # published checkpoint was converted with: hidden 3584, intermediate 18944, 28 heads, 28
    # layers, 4 kv heads, rope_theta 1e6, vocab 151672. max_position_embeddings is not set there:
    # Qwen2Config's default 32768 (default; the script's model_max_length=8192 is a tokenizer
    # setting). tie_word_embeddings: Qwen2Config's default False (default; Qwen2.5-7B is untied).
    "text_config": {"model_type": "qwen2", "vocab_size": 151672, "hidden_size": 3584,
                    "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4,
                    "max_position_embeddings": 32768, "rope_theta": 1e6,
                    "tie_word_embeddings": False},
    "audio_token_id": 151669,  # AudioFlamingo3Config default (the converter keeps it)
    "projector_hidden_act": "gelu", "projector_bias": True,  # AudioFlamingo3Config defaults
}

# --------------------------------------------------------------------------------------------
# GLM-ASR (model_type "glmasr"): Whisper-large-shaped encoder with RoPE on half of each head,
# 4 encoder frames stacked (reshape to intermediate_size = 4 x 1280) into an MLP, Llama decoder.
# --------------------------------------------------------------------------------------------
GLM_ASR_NANO = {
    # The checkpoint's audio_config as embedded in
    # https://huggingface.co/mazesmazes/tiny-audio-embedded-2/blob/main/config.json
    # (_name_or_path zai-org/GLM-ASR-Nano-2512): hidden 1280, intermediate 5120, 32 layers, 20
    # heads, 20 kv heads, 1500 positions, 128 mel, partial_rotary_factor 0.5 -- also
    # GlmAsrEncoderConfig's defaults (transformers/models/glmasr/configuration_glmasr.py).
    "audio_config": {"model_type": "glmasr_encoder", "hidden_size": 1280,
                     "intermediate_size": 5120, "num_hidden_layers": 32,
                     "num_attention_heads": 20, "num_key_value_heads": 20,
                     "max_position_embeddings": 1500, "num_mel_bins": 128},
    # GlmAsrConfig's text_config defaults (same file; its docstring builds "a GLM-ASR-Nano-2512
    # model"): vocab 59264, intermediate 6144, 28 layers, 16 heads, 4 kv heads, 8192 positions;
    # hidden 2048 is also in the embedded config above. The checkpoint's own text_config was not
    # found beyond its hidden size, so the rest are defaults, as is tie_word_embeddings (True).
    "text_config": {"model_type": "llama", "vocab_size": 59264, "hidden_size": 2048,
                    "intermediate_size": 6144, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 4,
                    "max_position_embeddings": 8192},
    "audio_token_id": 59260,  # the embedded config above; GlmAsrConfig default
    "projector_hidden_act": "gelu",
}

# --------------------------------------------------------------------------------------------
# Qwen3-ASR (model_type "qwen3_asr"): three stride-2 Conv2d (8x: 100 mel frames -> 13 tokens per
# 1 s chunk), a transformer over windows of n_window_infer frames, an MLP to output_dim, Qwen3.
# --------------------------------------------------------------------------------------------
QWEN3_ASR_1_7B = {
    # ivan-digital/qwen3-asr-swift docs/asr-model.md (1.7B column): d_model 1024, 24 layers, 16
    # heads, ffn 4096, output_dim 2048, downsample hidden 480, 100-frame chunks. n_window 50 /
    # n_window_infer 800: Qwen3ASREncoderConfig defaults (transformers/models/qwen3_asr/
    # configuration_qwen3_asr.py, documented as Qwen/Qwen3-ASR-1.7B-hf's), also in thinker
    # audio_config copies quoted by public ports. max_position_embeddings 13 is what
    # transformers/models/qwen3_asr/convert_qwen3_asr_to_hf.py writes (13 post-CNN positions per
    # chunk); the original config.json's max_source_positions 1500 is dropped there.
    "audio_config": {"model_type": "qwen3_asr_encoder", "d_model": 1024, "encoder_layers": 24,
                     "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                     "num_mel_bins": 128, "output_dim": 2048, "downsample_hidden_size": 480,
                     "n_window": 50, "n_window_infer": 800, "max_position_embeddings": 13},
    # docs/asr-model.md above: hidden 2048, 28 layers, 16 heads, 8 kv heads, head_dim 128,
    # intermediate 6144, vocab 151936, rope base 1e6 (M-RoPE [24, 20, 20], which the converter
    # strips; no shape changes). 65536 positions and tied embeddings: Qwen3ASRConfig's
    # text_config defaults (same file), not checked against the checkpoint.
    "text_config": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
                    "intermediate_size": 6144, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                    "max_position_embeddings": 65536, "rope_theta": 1e6,
                    "tie_word_embeddings": True},
    "audio_token_id": 151676,  # Qwen3ASRConfig default; thinker_config copies quoted by ports
}

ARCHS: dict[str, dict] = {
    "voxtral-mini-3b": {"family": "voxtral", "config": VOXTRAL_MINI_3B,
                        "source": "mistralai/Voxtral-Mini-3B-2507"},
    "voxtral-small-24b": {"family": "voxtral", "config": VOXTRAL_SMALL_24B,
                          "source": "mistralai/Voxtral-Small-24B-2507"},
    "qwen2.5-omni-7b": {"family": "qwen2_5_omni_thinker", "config": QWEN2_5_OMNI_7B_THINKER,
                        "source": "Qwen/Qwen2.5-Omni-7B"},
    "granite-speech-3.3-8b": {"family": "granite_speech", "config": GRANITE_SPEECH_3_3_8B,
                              "source": "ibm-granite/granite-speech-3.3-8b"},
    "granite-speech-3.3-2b": {"family": "granite_speech", "config": GRANITE_SPEECH_3_3_2B,
                              "source": "ibm-granite/granite-speech-3.3-2b"},
    "audioflamingo3": {"family": "audioflamingo3", "config": AUDIOFLAMINGO3,
                       "source": "nvidia/audio-flamingo-3-hf"},
    "glm-asr-nano": {"family": "glmasr", "config": GLM_ASR_NANO,
                     "source": "zai-org/GLM-ASR-Nano-2512"},
    "qwen3-asr-1.7b": {"family": "qwen3_asr", "config": QWEN3_ASR_1_7B,
                       "source": "Qwen/Qwen3-ASR-1.7B"},
    # benchmarks/archs.py's dict itself (not a copy).
    "qwen2-audio-7b": {"family": "qwen2_audio", "config": QWEN2_AUDIO_7B,
                       "source": "Qwen/Qwen2-Audio-7B-Instruct"},
}

#: family -> (config class, model class) names in transformers.
_CLASSES = {
    "voxtral": ("VoxtralConfig", "VoxtralForConditionalGeneration"),
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerConfig",
                             "Qwen2_5OmniThinkerForConditionalGeneration"),
    "granite_speech": ("GraniteSpeechConfig", "GraniteSpeechForConditionalGeneration"),
    "audioflamingo3": ("AudioFlamingo3Config", "AudioFlamingo3ForConditionalGeneration"),
    "glmasr": ("GlmAsrConfig", "GlmAsrForConditionalGeneration"),
    "qwen3_asr": ("Qwen3ASRConfig", "Qwen3ASRForConditionalGeneration"),
    "qwen2_audio": ("Qwen2AudioConfig", "Qwen2AudioForConditionalGeneration"),
}

#: The size each checkpoint is published as (its name; Voxtral's paper and Hugging Face give more).
PUBLISHED_B = {
    "voxtral-mini-3b": 3.0,  # "Mini 3B"; arXiv 2507.13264 counts about 4.7B with the encoder
    "voxtral-small-24b": 24.0,  # arXiv 2507.13264: about 24.3B
    "qwen2.5-omni-7b": 7.0,  # the LLM (7.6B); the thinker adds 0.64B audio + 0.68B vision
    "granite-speech-3.3-8b": 8.0,
    "granite-speech-3.3-2b": 2.0,
    "audioflamingo3": 7.0,  # its Qwen2.5-7B decoder; no total size was found published
    "glm-asr-nano": 1.5,  # model card: "1.5B parameters" (vLLM's GLM-ASR recipe: "2B model size")
    "qwen3-asr-1.7b": 1.7,
    "qwen2-audio-7b": 7.0,  # benchmarks/archs.py counts about 8.4B
}

_LAYER_KEYS = ("num_hidden_layers", "encoder_layers", "num_layers")


def _audio_key(cfg: dict) -> str:
    return "encoder_config" if "encoder_config" in cfg else "audio_config"


def build_config(name: str, layers: int | None = None):
    """The transformers config of ``ARCHS[name]``. ``layers`` sets the LLM's ``num_hidden_layers``
    and caps the audio encoder's depth (and the Omni thinker's vision depth) at the same number,
    for reduced-depth CPU runs; widths, heads and vocabulary stay the checkpoint's."""
    import transformers

    arch = ARCHS[name]
    cfg = copy.deepcopy(arch["config"])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        cfg["text_config"]["num_hidden_layers"] = layers
        audio = cfg[_audio_key(cfg)]
        key = next(k for k in _LAYER_KEYS if k in audio)
        audio[key] = min(audio[key], layers)
        if arch["family"] == "qwen2_5_omni_thinker":
            cfg["vision_config"]["depth"] = min(cfg["vision_config"]["depth"], layers)
    config_cls = getattr(transformers, _CLASSES[arch["family"]][0])
    return config_cls(**cfg)


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory); tied
    weights count once. Granite's LoRA adapter is a PEFT add-on and is not in the count."""
    import transformers

    family = next(f for f, (c, _) in _CLASSES.items() if type(config).__name__ == c)
    model_cls = getattr(transformers, _CLASSES[family][1])
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def audio_tokens_per_second(name: str) -> float:
    """LLM audio tokens per second of audio, derived from the config (16 kHz, 10 ms mel hop:
    100 mel frames per second)."""
    arch = ARCHS[name]
    family, cfg = arch["family"], arch["config"]
    mel_fps = 100.0
    if family in ("voxtral", "glmasr"):
        # conv stride 2 (50 frames/s), then intermediate_size / hidden_size frames per token
        audio = cfg["audio_config"]
        return mel_fps / 2 / (audio["intermediate_size"] // audio["hidden_size"])
    if family in ("qwen2_5_omni_thinker", "audioflamingo3", "qwen2_audio"):
        return mel_fps / 2 / 2  # conv stride 2, then AvgPool1d(2)
    if family == "granite_speech":
        # two mel frames per encoder frame (input_dim 160 = 2 x 80), then window // downsample
        # queries per window of encoder frames
        return mel_fps / 2 / cfg["window_size"] * (cfg["window_size"] // cfg["downsample_rate"])
    if family == "qwen3_asr":
        # chunks of 2 * n_window mel frames, three stride-2 convs: ceil(ceil(ceil(n / 2) / 2) / 2)
        chunk = 2 * cfg["audio_config"]["n_window"]
        tokens = math.ceil(math.ceil(math.ceil(chunk / 2) / 2) / 2)
        return tokens * mel_fps / chunk
    raise KeyError(family)


def recording_costs(name: str, seconds: float = 600.0, factors=(1, 3, 10)) -> list[dict]:
    """What ``seconds`` of audio cost the LLM of ``ARCHS[name]`` at its native audio token rate
    divided by each of ``factors``, from the config alone (the prompt left out): audio tokens,
    whether they fit the context, the KV cache in bf16 (keys and values of every layer), and
    the prefill's FLOPs counted as ``FlopCounterMode`` counts them (2 per multiply-add of every
    weight of the LLM's layers, the attention as the full square: 4 x positions^2 x heads x
    head_dim per layer), the output layer for the last position only."""
    text = build_config(name).get_text_config()
    layers, hidden = text.num_hidden_layers, text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = text.intermediate_size
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter  # q,o,k,v; MLP
    rows = []
    for k in factors:
        n = math.ceil(seconds * audio_tokens_per_second(name) / k)
        flops = 2 * n * layers * per_layer + 4 * n * n * heads * head_dim * layers \
            + 2 * hidden * text.vocab_size
        rows.append({"factor": k, "tokens": n, "fits": n <= text.max_position_embeddings,
                     "kv_gib": 2 * layers * kv * head_dim * 2 * n / 2**30, "tflop": flops / 1e12})
    return rows


def random_audio_llm(name: str, tmp: str, device: str, dtype: torch.dtype,
                     layers: int | None = None, **opts):
    """lalmtool's audio LLM backend for ``ARCHS[name]``'s family on that architecture (at
    ``layers`` depth if given) with random weights created on ``device`` in ``dtype``: the
    family's tiny random checkpoint gives the tokenizer, processor and special token ids, and
    its model is replaced by the big one (no checkpoint of that size is written or read)."""
    from unittest import mock

    import transformers

    from lalmtool.models import load_backend
    from lalmtool.models.audio_llm import FAMILIES
    from lalmtool.testing import write_random_audio_llm

    arch = ARCHS[name]
    family = next(f for f in FAMILIES.values()
                  if arch["family"] in f.model_types and f.name != "qwen2-audio-chat"
                  or arch["family"] == "qwen2_audio" and f.name == "qwen2-audio-chat")
    path = write_random_audio_llm(family.name, os.path.join(tmp, family.name))
    small = transformers.AutoConfig.from_pretrained(path)
    small = getattr(small, "thinker_config", small)
    config = build_config(name, layers)
    for key in ("audio_token_id", "audio_token_index"):  # the small tokenizer's special ids
        if getattr(small, key, None) is not None:
            setattr(config, key, getattr(small, key))
    text, small_text = config.get_text_config(), small.get_text_config()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(text, key, getattr(small_text, key, None))
    model_cls = getattr(transformers, family.model_class)
    generation = transformers.GenerationConfig.from_pretrained(path)

    def build(model_path, dtype=None, **kwargs):
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls._from_config(config, dtype=dtype)
        model.generation_config = generation
        return model

    with mock.patch.object(model_cls, "from_pretrained", build):
        return load_backend(family.name, path, device=device, dtype=dtype, **opts)


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"{'name':<22} {'params (B)':>10} {'published':>9} {'ratio':>6} {'LLM layers':>10} "
          f"{'hidden':>6} {'context':>7} {'audio tok/s':>11}  source")
    for name, arch in ARCHS.items():
        config = build_config(name)
        params = parameter_count(config) / 1e9
        text = arch["config"]["text_config"]
        published = PUBLISHED_B[name]
        print(f"{name:<22} {params:>10.2f} {published:>9.1f} {params / published:>6.2f} "
              f"{text['num_hidden_layers']:>10} {text['hidden_size']:>6} "
              f"{text['max_position_embeddings']:>7} {audio_tokens_per_second(name):>11.1f}  "
              f"{arch['source']}")
        reduced = build_config(name, layers=2)  # the reduced-depth config builds too
        parameter_count(reduced)
    print("\n10 minutes of audio in the LLM (prompt left out): audio tokens, KV cache (bf16) and "
          "prefill TFLOP at the native rate, 3x and 10x fewer tokens")
    print(f"{'name':<22} {'tok/min':>7} {'tokens 1x / 3x / 10x':>22} {'KV GiB 1x / 3x / 10x':>22} "
          f"{'TFLOP 1x / 3x / 10x':>22}  fits the context at")
    for name in ARCHS:
        rows = recording_costs(name)
        fits = ", ".join(f"{r['factor']}x" for r in rows if r["fits"]) or "none"
        tokens = " / ".join(str(r["tokens"]) for r in rows)
        kv = " / ".join(f"{r['kv_gib']:.2f}" for r in rows)
        tflop = " / ".join(f"{r['tflop']:.1f}" for r in rows)
        print(f"{name:<22} {audio_tokens_per_second(name) * 60:>7.0f} {tokens:>22} {kv:>22} "
              f"{tflop:>22}  {fits}")


if __name__ == "__main__":
    main()
