"""Converts a CTranslate2 Whisper model (``model.bin``) into a transformers checkpoint.

The CTranslate2 ``model.bin`` layout (binary version 6) is::

    u32 binary version, string model name, u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, raw bytes,
    u32 alias count, per alias: string alias, string target name.

A string is a u16 length (counting the terminating NUL), the bytes, then NUL. Everything
is little-endian. The variables map onto ``WhisperForConditionalGeneration`` as described
in ``_state_dict``; the result is written with ``save_pretrained`` (safetensors), together
with a ``WhisperProcessor`` (tokenizer + feature extractor) and a ``GenerationConfig`` built
from the CTranslate2 ``config.json`` so that ``model.generate(input_features)`` transcribes.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# dtype ids of CTranslate2's binary format
_DTYPES = {
    0: np.float32,
    1: np.int8,
    2: np.int16,
    3: np.int32,
    4: np.float16,
    5: "bfloat16",
}
_SUPPORTED_BINARY_VERSIONS = (5, 6)
_MULTILINGUAL_MIN_VOCAB = 51865


class CT2FormatError(ValueError):
    """Raised when a CTranslate2 model file cannot be read or is not a supported Whisper model."""


@dataclass
class CT2Model:
    """The parsed content of a CTranslate2 ``model.bin``."""

    name: str
    revision: int
    variables: dict[str, np.ndarray]


# --------------------------------------------------------------------------- reading


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path}: truncated CTranslate2 model file (wanted {n} bytes at offset {self.pos})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        return bytes(self.take(n))[:-1].decode("utf-8")


def _decode_array(raw: memoryview, dtype_id: int, shape: tuple[int, ...], name: str, path: str) -> np.ndarray:
    if dtype_id not in _DTYPES:
        raise CT2FormatError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
    if _DTYPES[dtype_id] == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        arr = bits.view(np.float32)
    else:
        arr = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
    return arr.reshape(shape)


def read_model_bin(path: str) -> CT2Model:
    """Parses a CTranslate2 ``model.bin`` into named numpy arrays (aliases resolved)."""
    with open(path, "rb") as f:
        r = _Reader(f.read(), path)
    (version,) = r.unpack("I")
    if version not in _SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {_SUPPORTED_BINARY_VERSIONS}); is this a CTranslate2 model.bin?"
        )
    name = r.string()
    (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        var_name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack(f"{rank}I") if rank else ()
        dtype_id, nbytes = r.unpack("BI")
        variables[var_name] = _decode_array(r.take(nbytes), dtype_id, tuple(shape), var_name, path)
    (n_alias,) = r.unpack("I")
    for _ in range(n_alias):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias} points to missing variable {target}")
        variables[alias] = variables[target]
    return CT2Model(name=name, revision=revision, variables=variables)


# --------------------------------------------------------------------------- weights


def _scalar(variables: dict[str, np.ndarray], key: str) -> int:
    if key not in variables:
        raise CT2FormatError(f"model.bin has no {key}")
    return int(variables[key])


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def infer_config(model: CT2Model):
    """Builds a ``WhisperConfig`` from the shapes and scalars stored in the CTranslate2 model."""
    from transformers import WhisperConfig

    v = model.variables
    if model.name != "WhisperSpec":
        raise CT2FormatError(f"model.bin holds a {model.name}, not a WhisperSpec (CTranslate2 Whisper) model")
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    vocab = v["decoder/embeddings/weight"].shape[0]
    eot = 50257 if vocab >= _MULTILINGUAL_MIN_VOCAB else 50256
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_layer_count(v, "encoder"),
        decoder_layers=_layer_count(v, "decoder"),
        encoder_attention_heads=_scalar(v, "encoder/num_heads"),
        decoder_attention_heads=_scalar(v, "decoder/num_heads"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=eot + 1,
        begin_suppress_tokens=[220, eot],
        tie_word_embeddings=_projection_is_tied(v),
    )


def _projection_is_tied(v: dict[str, np.ndarray]) -> bool:
    proj, emb = v.get("decoder/projection/weight"), v["decoder/embeddings/weight"]
    return proj is None or proj is emb or np.array_equal(proj, emb)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _linear(sd: dict, v: dict, src: str, dst: str, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = _t(v[f"{src}/weight"])
    if bias:
        sd[f"{dst}.bias"] = _t(v[f"{src}/bias"])


def _norm(sd: dict, v: dict, src: str, dst: str) -> None:
    sd[f"{dst}.weight"] = _t(v[f"{src}/gamma"])
    sd[f"{dst}.bias"] = _t(v[f"{src}/beta"])


def _split_linear(sd: dict, v: dict, src: str, dsts: list[str]) -> None:
    """Splits a fused [a;b;...] projection; the k projection (named ``*k_proj``) gets no bias."""
    weights = np.split(v[f"{src}/weight"], len(dsts), axis=0)
    biases = np.split(v[f"{src}/bias"], len(dsts), axis=0)
    for dst, w, b in zip(dsts, weights, biases):
        sd[f"{dst}.weight"] = _t(w)
        if dst.endswith("k_proj"):
            if np.abs(b).max() > 0:
                logger.warning("%s: dropping a non-zero key bias (transformers' Whisper has none)", src)
        else:
            sd[f"{dst}.bias"] = _t(b)


def _qkv(prefix: str) -> list[str]:
    return [f"{prefix}.{p}_proj" for p in ("q", "k", "v")]


def _layer(sd: dict, v: dict, s: str, d: str, cross_attention: bool = False) -> None:
    """One Transformer layer ``s`` → ``d``: self-attention, (cross-attention,) feed-forward."""
    _norm(sd, v, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
    _split_linear(sd, v, f"{s}/self_attention/linear_0", _qkv(f"{d}.self_attn"))
    _linear(sd, v, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
    if cross_attention:
        _norm(sd, v, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        _linear(sd, v, f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
        _split_linear(sd, v, f"{s}/attention/linear_1",
                      [f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"])
        _linear(sd, v, f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
    _norm(sd, v, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    _linear(sd, v, f"{s}/ffn/linear_0", f"{d}.fc1")
    _linear(sd, v, f"{s}/ffn/linear_1", f"{d}.fc2")


def _state_dict(v: dict[str, np.ndarray], n_enc: int, n_dec: int) -> dict[str, torch.Tensor]:
    """Maps CTranslate2 variable names onto ``WhisperForConditionalGeneration`` parameter names."""
    for key, arr in v.items():
        if arr.dtype in (np.int8, np.int16) and arr.ndim == 2:
            raise CT2FormatError(
                f"{key} is quantised ({arr.dtype}); convert the model with CTranslate2 quantization "
                "float32 or float16 to use it with transformers"
            )
    sd: dict[str, torch.Tensor] = {}
    _linear(sd, v, "encoder/conv1", "model.encoder.conv1")
    _linear(sd, v, "encoder/conv2", "model.encoder.conv2")
    sd["model.encoder.embed_positions.weight"] = _t(v["encoder/position_encodings/encodings"])
    _norm(sd, v, "encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(n_enc):
        _layer(sd, v, f"encoder/layer_{i}", f"model.encoder.layers.{i}")

    sd["model.decoder.embed_tokens.weight"] = _t(v["decoder/embeddings/weight"])
    sd["model.decoder.embed_positions.weight"] = _t(v["decoder/position_encodings/encodings"])
    _norm(sd, v, "decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(n_dec):
        _layer(sd, v, f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross_attention=True)
    if not _projection_is_tied(v):
        sd["proj_out.weight"] = _t(v["decoder/projection/weight"])
    return sd


# --------------------------------------------------------------------------- tokenizer / generation


def build_tokenizer(tokenizer_json: str, vocab_size: int):
    """A ``WhisperTokenizer`` from a tokenizers ``tokenizer.json``, with Whisper's special and timestamp tokens.

    The special tokens (``<|startoftranscript|>``, languages, tasks, ``<|notimestamps|>``) are
    registered as extra special tokens so that ``skip_special_tokens`` drops them; the timestamp
    tokens ``<|0.00|>`` … ``<|30.00|>`` that fill the rest of the vocabulary are added as plain
    added tokens (as on the Hugging Face hub), so ``len(tokenizer) == vocab_size``.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    with open(tokenizer_json, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens", [])
    specials = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t.get("special")]
    if "<|notimestamps|>" not in specials or "<|endoftext|>" not in specials:
        raise CT2FormatError(f"{tokenizer_json}: not a Whisper tokenizer (no <|notimestamps|> / <|endoftext|> token)")
    extra = [s for s in specials if s != "<|endoftext|>"]
    tok = WhisperTokenizer(tokenizer_file=tokenizer_json, extra_special_tokens=extra)
    first_ts = tok.convert_tokens_to_ids("<|notimestamps|>") + 1
    if len(tok) != first_ts:
        raise CT2FormatError(
            f"{tokenizer_json}: expected {first_ts} tokens up to <|notimestamps|>, found {len(tok)}"
        )
    n_ts = vocab_size - first_ts
    tok.add_tokens(
        [AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False, special=False)
         for i in range(n_ts)]
    )
    return tok


def build_generation_config(ct2_config: dict, tokenizer, model_config):
    """A ``GenerationConfig`` equivalent to the decoding set-up stored in CTranslate2's ``config.json``."""
    from transformers import GenerationConfig

    eot = model_config.eos_token_id
    ids = tokenizer.convert_tokens_to_ids
    multilingual = model_config.vocab_size >= _MULTILINGUAL_MIN_VOCAB
    gen = GenerationConfig(
        max_length=448,
        decoder_start_token_id=eot + 1,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
    )
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        id_to_token = {tokenizer.convert_tokens_to_ids(t): t for t in tokenizer.extra_special_tokens}
        lang_ids = ct2_config.get("lang_ids") or []
        gen.lang_to_id = {id_to_token[i]: int(i) for i in lang_ids if i in id_to_token}
        gen.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
        # <|startoftranscript|><|lang|><|transcribe|><|notimestamps|>, language detected unless given
        gen.task = "transcribe"
    return gen


# --------------------------------------------------------------------------- entry point


def convert(model_bin: str, config_json: str, tokenizer_json: str, out_dir: str) -> str:
    """Converts a CTranslate2 Whisper model into a transformers checkpoint in ``out_dir``.

    ``out_dir`` receives ``model.safetensors`` + ``config.json`` + ``generation_config.json``,
    the tokenizer files and ``preprocessor_config.json``; load it with
    ``WhisperForConditionalGeneration.from_pretrained(out_dir)`` and ``WhisperProcessor.from_pretrained(out_dir)``.
    Returns ``out_dir``.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2 = read_model_bin(model_bin)
    config = infer_config(ct2)
    logger.info(
        "whisper: d_model=%d, %d+%d layers, %d heads, vocab %d, %d mels",
        config.d_model, config.encoder_layers, config.decoder_layers,
        config.encoder_attention_heads, config.vocab_size, config.num_mel_bins,
    )
    state = _state_dict(ct2.variables, config.encoder_layers, config.decoder_layers)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "proj_out.weight")]
    if missing or unexpected:
        raise CT2FormatError(f"{model_bin}: weights do not fit Whisper (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CT2FormatError(f"{model_bin}: no weights for {left}")
    model.eval()

    with open(config_json, encoding="utf-8") as f:
        ct2_config = json.load(f)
    tokenizer = build_tokenizer(tokenizer_json, config.vocab_size)
    model.generation_config = build_generation_config(ct2_config, tokenizer, config)
    model.save_pretrained(out_dir, safe_serialization=True)

    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    extractor.save_pretrained(out_dir)  # preprocessor_config.json, for loaders that look for it
    return out_dir
