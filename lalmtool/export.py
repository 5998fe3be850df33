"""``lalmtool export``: a trained compressed model as one standalone directory.

The LoRA adapter is merged into the base model's weights (in float32: the merged model's logits
equal the unmerged adapter's to float tolerance, tested) and saved as a normal transformers
checkpoint beside the base model's tokenizer and processor files; ``lalmtool.json`` (its
record, kind ``export``: ``lalmtool.trained``) holds the backend, its options, the base model,
the compression the adapter was trained on and its learnt pooler's shape (the pooler's weights
beside it). ``Transcriber(DIR)`` and ``lalmtool transcribe --model DIR`` use it without peft,
the adapter or any store; transformers loads it as the base model's class.

``format="ct2"`` (Whisper only) converts the merged weights with CTranslate2's own converter
(``quantization`` int8, int8_float16, float16 or float32; ``pip install ctranslate2``) and
``Transcriber(DIR)`` decodes with CTranslate2 (``models/ct2_whisper.py``): the compressed
memory goes straight into its ``generate``.
"""
from __future__ import annotations

import os
import shutil

from . import trained
from .fileio import atomic_dir
from .models import model_directory

#: Files of the base model that the merged weights replace (not copied).
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
FORMATS = ("transformers", "ct2")
QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32")


def read_export(model_dir: str) -> trained.Record | None:
    """An exported model's record (``lalmtool.json``), or None for any other directory."""
    record = trained.read(model_dir) if os.path.isdir(model_dir) else None
    return record if record and record["kind"] == "export" else None


def export(adapter: str, out: str, model: str | None = None, force: bool = False,
           format: str = "transformers", quantization: str = "int8") -> dict:
    """Writes the model with ``adapter`` merged to ``out`` (``model``: the base model, default
    the one the adapter names; ``format``: ``transformers`` or ``ct2``, whose weights are
    stored as ``quantization``); returns the record written. ``out`` is replaced whole and only
    at the end (``force``); a failed export leaves it as it was."""
    import torch

    from .models.ct2_whisper import CT2_KEY
    from .transcribe import Transcriber

    if os.path.exists(out) and not force:
        raise ValueError(f"--out {out} exists; give another folder, or --force to replace it "
                         "(only once the export has succeeded)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: give a folder")
    held = trained.read_kind(adapter, "lora-adapter", "--adapter",
                             "pass OUT/adapter of `lalmtool finetune`")
    base = model or held["base_model"]
    if not base:
        raise ValueError(f"--adapter {adapter} does not name its base model: give --model")
    if format not in FORMATS:
        raise ValueError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if format == "ct2" and quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quantization}: choose one of "
                         f"{', '.join(QUANTIZATIONS)}")
    if held["compression"] is None:
        raise ValueError(f"--adapter {adapter} does not record the compression it was trained "
                         "on (an adapter from before compression.json): train it again to "
                         "export it")
    t = Transcriber(base, adapter=adapter, device="cpu", dtype="float32")
    if t.backend == "speechllm":
        raise ValueError("a speechllm adapter is exported with `lalmtool export-speechllm` "
                         "(projector and LLM in one directory)")
    if format == "ct2" and t.backend != "whisper":
        raise ValueError(f"--format ct2 exports Whisper only (this adapter is {t.backend}'s); "
                         "export it with --format transformers")
    merged = t.be.model
    if not all(p.dtype == torch.float32 for p in merged.parameters()) or \
            hasattr(merged, "peft_config"):
        raise ValueError(f"{adapter} could not be merged into float32 weights")
    from .pooler import WEIGHTS_FILE

    options = {k: v for k, v in (held["backend_options"] or {}).items()
               if k not in ("dtype", "device_map")}
    fields = {"backend": t.backend, "backend_options": options, "base_model": base,
              **{k: held[k] for k in ("base_weights", "compression", "pooler", "trained_on")},
              "adapter": os.path.abspath(adapter), "format": format}
    with atomic_dir(out) as tmp:  # a failed export leaves OUT as it was
        merged_dir = out.rstrip("/") + ".merged-tmp" if format == "ct2" else tmp
        try:
            merged.save_pretrained(merged_dir)
            source = model_directory(base)
            for name in os.listdir(source):  # tokenizer, processor, chat template ...
                path = os.path.join(source, name)
                if os.path.isfile(path) and not name.endswith(_WEIGHTS) and \
                        not os.path.exists(os.path.join(merged_dir, name)):
                    shutil.copy2(path, merged_dir)
            if held["pooler"] is not None:
                shutil.copy2(os.path.join(adapter, WEIGHTS_FILE), merged_dir)
            if format == "ct2":
                fields[CT2_KEY] = {"quantization": quantization,
                                   "max_target_positions": merged.config.max_target_positions}
                _to_ct2(merged_dir, tmp, quantization)
        finally:
            if merged_dir != tmp:
                shutil.rmtree(merged_dir, ignore_errors=True)
        return trained.write(tmp, "export", **fields)


def _to_ct2(merged: str, out: str, quantization: str) -> None:
    """``merged`` (a transformers Whisper directory) converted to CTranslate2 into the
    directory ``out``, with its other files (tokenizer, processor, pooler)."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as e:
        raise ValueError("--format ct2 needs CTranslate2: pip install ctranslate2") from e
    keep = [n for n in os.listdir(merged) if n != "config.json"
            and not n.startswith(("model.safetensors", "model-", "pytorch_model"))]
    TransformersConverter(merged).convert(out, quantization=quantization, force=True)
    for name in keep:
        shutil.copy2(os.path.join(merged, name), out)
