"""The record of a trained directory, ``lalmtool.json``: one file that says what the directory
holds and how to use it, chosen by its ``kind``; this module is its only reader and writer.

Kinds::

    lora-adapter   OUT/adapter (and OUT/last, OUT/best) of ``lalmtool finetune``, beside peft's
                   adapter_config.json and adapter_model.safetensors (and pooler.safetensors:
                   the learnt pooler's weights)
    ctc-aligner    OUT of ``lalmtool align``, beside projector.safetensors and ctc.safetensors
    export         OUT of ``lalmtool export``, beside the merged model's files

Fields (every kind; null where they do not apply)::

    kind, format_version   which record this is, and of which layout (``FORMAT_VERSION``)
    backend, backend_options
                           the model family and the options it was trained (exported) with
    base_model             the base model as the user gave it (asset name, hub id or path)
    base_weights           the base model's weights by content (``models.base_weights``)
    compression            the compression it was trained on: condition, steps from the
                           encoder's frames, frame_rate, trim, input_seconds
    pooler                 the learnt pooler's shape (dim, heads, rank, width), or null
    trained_on             condition, feats {path, fingerprint}, manifest {path, sha256} and,
                           with a learnt pooler, segments {path, fingerprint}

plus what one kind needs: ``ctc_head`` (ctc-aligner: the head's ``hidden`` width), ``adapter``,
``format`` and ``ct2`` (export).

Directories written before the record are read from the files they held then (``read``; their
``format_version`` is 0): an adapter's backend.json (else its finetune run's ../config.yaml),
compression.json, pooler.json, ../summary.json (the condition) and adapter_config.json (the
base model); an alignment's config.yaml; an export's lalmtool.json without ``kind`` (and its
pooler.json). Fields they never held are null.
"""
from __future__ import annotations

import json
import os

import yaml

from .fileio import file_sha256, read_json, write_atomic

RECORD_FILE = "lalmtool.json"
FORMAT_VERSION = 1
KINDS = ("lora-adapter", "ctc-aligner", "export")
#: The fields every record has (null where they do not apply).
FIELDS = ("backend", "backend_options", "base_model", "base_weights", "compression", "pooler",
          "trained_on")
_FIX = "copy the directory again whole, or train it again"


class Record(dict):
    """A directory's record (its fields, as a dict); ``source(field)``: the file it came from
    (lalmtool.json, or a file of a directory written before it)."""

    def __init__(self, directory: str, fields: dict, sources: dict | None = None):
        super().__init__(fields)
        self.directory = directory
        self.sources = sources or {}

    def source(self, field: str) -> str:
        return self.sources.get(field, os.path.join(self.directory, RECORD_FILE))


# -- writing ---------------------------------------------------------------------------------
def write(directory: str, kind: str, **fields) -> dict:
    """Writes ``directory``'s lalmtool.json (``fields``: those of ``FIELDS`` given, the others
    null, and the kind's own); returns the record."""
    if kind not in KINDS:
        raise ValueError(f"a trained directory's kind is one of {', '.join(KINDS)}, not {kind!r}")
    record = {"kind": kind, "format_version": FORMAT_VERSION,
              **{name: fields.pop(name, None) for name in FIELDS}, **fields}
    write_atomic(os.path.join(directory, RECORD_FILE), json.dumps(record, indent=1))
    return record


def base(model: str) -> dict:
    """``base_model`` and ``base_weights`` of a model given as ``model``."""
    from .assets import resolve_model
    from .models import base_weights
    from .models.speechllm import portable_name

    return {"base_model": portable_name(model), "base_weights": base_weights(resolve_model(model))}


def compression(feats: str, segments: str | None = None,
                input_seconds: float | None = None) -> dict:
    """The compression of the store ``feats`` (with ``segments``: the learnt pooler's, on these
    boundaries): the condition, the steps from the encoder's frames
    (``StoreMeta.compression_steps``), the frames' rate, the trim, and ``input_seconds`` (the
    longest training input: joined examples)."""
    from .store import Store

    meta = Store(segments or feats).meta
    learnt = "learnt" if segments else None
    return {"condition": meta.condition(learnt)[2], "steps": meta.compression_steps(learnt),
            "frame_rate": meta.extracted.get("frame_rate"), "trim": meta.trim,
            "input_seconds": input_seconds}


def store_ref(path: str) -> dict:
    """A store as a run records it: its path and fingerprint."""
    from .store import Store

    return {"path": os.path.abspath(path), "fingerprint": Store(path).fingerprint}


def manifest_ref(path: str) -> dict:
    """A manifest as a run records it: its path and sha256."""
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


# -- reading ---------------------------------------------------------------------------------
def read(directory: str | None) -> Record | None:
    """``directory``'s record; one written before lalmtool.json (or before its ``kind``) is read
    from the files it held then; None for a directory that is no trained one."""
    if not directory:
        return None
    path = os.path.join(directory, RECORD_FILE)
    record = read_json(path, _FIX) if os.path.isfile(path) else None
    if record is not None and not isinstance(record, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); {_FIX}")
    if record and "format_version" in record:
        _check(record, path)
        return Record(directory, record)
    kind = "export" if record else _older_kind(directory)
    if kind is None:
        return None
    fields, sources = OLDER[kind](directory)
    return Record(directory, {"kind": kind, "format_version": 0, **dict.fromkeys(FIELDS),
                              **fields, **(record or {})}, sources)


def read_kind(directory: str, kind: str, flag: str, fix: str) -> Record:
    """``directory``'s record, which must be of ``kind``; else a ValueError naming ``flag``
    and what to do (``fix``)."""
    record = read(directory)
    if record is None or record["kind"] != kind:
        said = f"its {RECORD_FILE} says {record['kind']}" if record else \
            f"no {RECORD_FILE} there"
        raise ValueError(f"{flag} {directory} is not a {kind} directory ({said}); {fix}")
    return record


def _check(record: dict, path: str) -> None:
    if not isinstance(record["format_version"], int) or record["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {record['format_version']!r}, newer than "
                         f"this lalmtool reads ({FORMAT_VERSION}): upgrade lalmtool")
    if record.get("kind") not in KINDS:
        raise ValueError(f"{path} is damaged (kind {record.get('kind')!r}, not one of "
                         f"{', '.join(KINDS)}); {_FIX}")


# -- directories written before the record -------------------------------------------------
def _older_kind(directory: str) -> str | None:
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        return "lora-adapter"
    if os.path.isfile(os.path.join(directory, "ctc.safetensors")):
        return "ctc-aligner"
    return None


def _read_yaml(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            return yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}); {_FIX}") from e


def _older_adapter(directory: str) -> tuple[dict, dict]:
    """An adapter's record from backend.json (else its finetune run's ../config.yaml),
    compression.json, pooler.json, ../summary.json and adapter_config.json."""
    run = os.path.dirname(os.path.abspath(directory))
    fields, sources = {}, {}

    def take(path: str, read, pick) -> None:
        held = read(path)
        if held is not None:
            got = pick(held)
            fields.update(got)
            sources.update(dict.fromkeys(got, path))

    backend = os.path.join(directory, "backend.json")
    if os.path.isfile(backend):
        take(backend, _json, lambda r: {"backend": r.get("backend"),
                                        "backend_options": r.get("backend_options") or {},
                                        "base_weights": r.get("base_weights")})
    else:
        take(os.path.join(run, "config.yaml"), _read_yaml,
             lambda r: {"backend": r.get("backend"), "backend_options": r.get("extra") or {}})
    take(os.path.join(directory, "compression.json"), _json, lambda r: {"compression": r})
    take(os.path.join(directory, "pooler.json"), _json, lambda r: {"pooler": r})
    take(os.path.join(run, "summary.json"), _json,
         lambda r: {"trained_on": {"condition": r.get("condition")}})
    take(os.path.join(directory, "adapter_config.json"), _json,
         lambda r: {"base_model": r.get("base_model_name_or_path")})
    return fields, sources


def _older_aligner(directory: str) -> tuple[dict, dict]:
    """An alignment's record from its config.yaml (backend, options, the head's width)."""
    path = os.path.join(directory, "config.yaml")
    config = _read_yaml(path) or {}
    fields = {"backend": config.get("backend", "speechllm"),
              "backend_options": config.get("extra") or {},
              "ctc_head": {"hidden": int(config.get("head_hidden") or 0)}}
    return fields, dict.fromkeys(fields, path)


def _older_export(directory: str) -> tuple[dict, dict]:
    """An export's pooler shape from pooler.json (the rest is in its lalmtool.json)."""
    path = os.path.join(directory, "pooler.json")
    shape = _json(path)
    return ({"pooler": shape}, {"pooler": path}) if shape is not None else ({}, {})


def _json(path: str):
    return read_json(path, _FIX)


#: How a directory of each kind written before the record holds its fields.
OLDER = {"lora-adapter": _older_adapter, "ctc-aligner": _older_aligner, "export": _older_export}
