"""One answer to "was this already done, for these inputs?".

A stage that writes an output directory records what determined it, as JSON next to its
outputs: ``{"config": {option: value}, "inputs": {name: identity}}``, where an input's identity
is its content (a store's fingerprint, a file's sha256, a checkpoint's weights), optionally
with the ``path`` it was given by (shown in messages, never compared). A rerun computes the
record it would write and compares: the same record means the work is reused (or resumed);
another is refused with every difference named, unless the user forces a fresh start.

Two rules keep records comparable across versions: an option missing from an older record
counts as the same when the new value is that option's default (options are added over time),
and options named ``resumable`` (e.g. how many checkpoints to keep) may change freely.
"""
from __future__ import annotations

import json
import os

from .fileio import file_sha256, model_identity, read_json, write_atomic

_MISSING = object()


def read(path: str, hint: str = "use --force to start over") -> dict | None:
    """The record at ``path``; None when there is none (a damaged one is a ValueError)."""
    return read_json(path, hint)


def write(path: str, record: dict) -> None:
    write_atomic(path, json.dumps(record, indent=1))


def identity(path: str) -> dict:
    """A checkpoint directory's content identity (not its name), or a file's sha256."""
    if os.path.isdir(path) or not os.path.isfile(path):
        return {k: v for k, v in model_identity(path).items() if k != "dir"}
    return {"sha256": file_sha256(path)}


def _content(value):
    """What is compared of an entry: all but the ``path`` it was given by."""
    if isinstance(value, dict) and "path" in value:
        return {k: v for k, v in value.items() if k != "path"}
    return value


def _describe_input(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict) and "path" in value:
        key = next((k for k in value if k != "path"), None)
        if key is None:
            return str(value["path"])
        shown = value[key]
        if isinstance(shown, dict):
            shown = shown.get("sha256") or shown.get("hub_id") or shown
        return f"{value['path']} ({key} {str(shown)[:12]})"
    return str(value)[:12] if isinstance(value, str) else str(value)


def differences(old: dict, new: dict, defaults: dict | None = None,
                resumable: tuple[str, ...] = (), labels: dict | None = None) -> list[str]:
    """Each difference between two records, one readable item per setting or input:
    ``lr: 0.005 there, 0.001 now`` or ``--feats: exp/a (fingerprint 3f2a...) there, ...``;
    an input named in ``labels`` is said in words (``--adapter: its weights differ``)."""
    defaults, labels = defaults or {}, labels or {}
    diffs = []
    for section in dict.fromkeys([*new, *old]):
        was, now = old.get(section) or {}, new.get(section) or {}
        for key in dict.fromkeys([*now, *was]):
            if key in resumable:
                continue
            if key not in was and defaults.get(key, _MISSING) == now.get(key):
                continue  # an option added since that record, at its default
            if _content(was.get(key)) == _content(now.get(key)):
                continue
            if section == "inputs" and key in labels:
                diffs.append(f"--{key.replace('_', '-')}: {labels[key]}")
            elif section == "inputs":
                diffs.append(f"--{key.replace('_', '-')}: {_describe_input(was.get(key))} "
                             f"there, {_describe_input(now.get(key))} now")
            else:
                diffs.append(f"{key}: {was.get(key)!r} there, {now.get(key)!r} now")
    return diffs


def check(path: str, new: dict, what: str, defaults: dict | None = None,
          resumable: tuple[str, ...] = ()) -> dict | None:
    """The record at ``path`` when it matches ``new`` (None when there is none); a
    ValueError naming every difference when it does not."""
    old = read(path)
    if old is None:
        return None
    diffs = differences(old, new, defaults, resumable)
    if diffs:
        raise ValueError(refusal(os.path.dirname(path) or ".", what, diffs))
    return old


def refusal(out: str, what: str, diffs: list[str]) -> str:
    """The one message of a stage that will not replace ``what`` in ``out`` made otherwise."""
    return (f"{out} holds {what} with another configuration or other inputs "
            f"({'; '.join(diffs)}); use another --out, or --force to start over")
