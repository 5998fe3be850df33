"""Whisper exported to CTranslate2 (``lalmtool export --format ct2``), for ``Transcriber``.

The export merges the LoRA into Whisper's weights and converts them with CTranslate2's own
converter (int8, float16 or float32). CTranslate2's Whisper ``generate`` takes encoder outputs
instead of a mel spectrogram, of any number of positions, so the compressed memory goes straight
in: encode (CTranslate2's encoder on 30 s windows, trimmed to the frames that cover the audio as
the whisper backend does), compress, generate. It decodes only: no loss, no LoRA.

CTranslate2 has no cross-attention mask, so memories of unequal length are generated in groups
of equal length (the pieces of one long recording are equal but for the last). Its
``max_length`` counts twice the new tokens (Whisper's ``sample_len``): a cap of N new tokens is
``max_length=2N``. Greedy by default, as ``decode`` (CTranslate2's own default is a beam of 5).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import sinusoids

from ..trained import read as read_record
from .base import Backend
from .whisper import WhisperBackend, WhisperOptions

#: What ``lalmtool export --format ct2`` records in ``lalmtool.json`` under this key.
CT2_KEY = "ct2"


class Ct2WhisperBackend(WhisperBackend):
    """The whisper backend's encode and transcribe, run by CTranslate2."""

    def __init__(self, model_path: str, device: str = "cpu", **options):
        import ctranslate2

        o = self.options = WhisperOptions(**{k: v for k, v in options.items() if k != "dtype"})
        Backend.__init__(self, model_path, device, torch.float32)
        self.positions, self.trim = o.positions, o.trim
        self.ct2 = read_record(model_path)[CT2_KEY]
        index = self.device.index or 0
        self.model = ctranslate2.models.Whisper(model_path, device=self.device.type,
                                                device_index=index, compute_type="default")
        self.features = WhisperFeatureExtractor.from_pretrained(model_path)
        self.language = o.language if self.model.is_multilingual else None
        self.task = o.task if self.model.is_multilingual else None

    def identity(self) -> dict:
        return {**super().identity(), "ct2": self.ct2["quantization"]}

    def _encoder(self, mel: torch.Tensor) -> torch.Tensor:
        import ctranslate2

        hidden = self.model.encode(ctranslate2.StorageView.from_array(
            mel.numpy().astype(np.float32)))
        if self.device.type != "cpu":
            hidden = hidden.to_device(ctranslate2.Device.cpu)
        return torch.from_numpy(np.array(hidden).astype(np.float32))

    def max_new_tokens_limit(self) -> int:
        return self.ct2["max_target_positions"] - len(self.tokenizer.prefix_tokens)

    def loss(self, feats, texts):
        raise NotImplementedError("a CTranslate2 export decodes only: train with the adapter")

    def new_token_ids(self, feats, beam, max_new_tokens, processors=None):
        raise NotImplementedError("CTranslate2 generates through transcribe()")

    def transcribe(self, feats: list[torch.Tensor], beam: int, caps: list[int],
                   floors: list[int] | None = None) -> list[tuple[str, bool]]:
        """(text, cut) per memory, as ``Backend.transcribe``: memories of one length are
        generated together; each is cut at its own cap (``floors``: not supported)."""
        import ctranslate2

        if floors and any(floors):
            raise ValueError("a CTranslate2 export has no length-aware end (--min-tokens-per-s); "
                             "decode with the transformers export or the adapter")

        self.check_new_tokens(max(caps))
        prompt = list(self.tokenizer.prefix_tokens)
        out: list[tuple[str, bool] | None] = [None] * len(feats)
        for length in sorted({len(f) for f in feats}):
            group = [i for i, f in enumerate(feats) if len(f) == length]
            memory = np.stack([feats[i].float().numpy() for i in group])
            if self.positions == "global":
                memory = memory + sinusoids(length, memory.shape[2]).numpy()
            cap = max(caps[i] for i in group)
            results = self.model.generate(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(memory, np.float32)),
                [prompt] * len(group), beam_size=beam, max_length=2 * cap)
            for i, r in zip(group, results):
                ids = r.sequences_ids[0][: caps[i]]
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                out[i] = (text, len(ids) >= caps[i])
        return out
