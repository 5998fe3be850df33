"""Typed options: one dataclass per set of options (a training job's, a backend's), each field
with its default, one line of help and, for a name, the values it may take.

Values are coerced and checked when the dataclass is built (``3e-4`` from YAML becomes a float,
``"fast"`` for a field with choices is refused naming them), so a wrong option is one line
before anything is written; ``--help`` and ``lalmtool backends`` list the fields as declared.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field

import yaml


def option(default, help: str, choices: tuple | None = None):
    """An option: its default, one line of help and, for a name, the values it may take."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Options:
    """Base of every options dataclass: coercion and the ``choices`` check on construction;
    subclasses add their own rules in ``check`` (calling ``super().check()``)."""

    #: how the options are named in messages, and the command whose --help lists them
    WHAT: typing.ClassVar[str] = "option"
    COMMAND: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(self.WHAT, f.name, hints[f.name], getattr(self, f.name)))
        self.check()

    def need(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{self.WHAT} {key} must be {rule}, not {getattr(self, key)!r}")

    def check(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and isinstance(value, str):  # (a dtype may also be a torch.dtype)
                self.need(value in choices, f.name, f"one of {', '.join(map(str, choices))}")

    @classmethod
    def load(cls, path: str | None, overrides: dict | None = None):
        """From a YAML file (optional) plus ``key=value`` overrides, names and types checked."""
        values = {}
        if path:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: a configuration is a YAML mapping of option: value")
        values.update(overrides or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"unknown {cls.WHAT} {key!r}{hint}; `lalmtool {cls.COMMAND} "
                                 "--help` lists them all")
        return cls(**values)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    @classmethod
    def describe(cls) -> list[dict]:
        """One row per option: name, default, choices, help (for tables and --help)."""
        return [{"option": f.name, "default": d, "choices": ", ".join(
                     map(str, f.metadata.get("choices") or ())), "help": f.metadata["help"]}
                for f, d in zip(dataclasses.fields(cls), cls.defaults().values())]

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def coerce(what: str, key: str, hint, value):
    """``value`` as the option's type (YAML gives ``3e-4`` as a string); else a clear error."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is typing.Any:
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if number.is_integer():
                return int(number)
        elif kind is float and not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                return number
        elif kind is str and isinstance(value, str):
            return value
        elif typing.get_origin(kind) is list and isinstance(value, list):
            item = typing.get_args(kind)[0]
            if item is str and all(isinstance(v, str) for v in value):
                return value
            if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) for v in value):
                return [float(v) for v in value]
        elif kind is dict and isinstance(value, dict):
            return value
    names = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             bool: "true or false", type(None): "null", list[float]: "a list of numbers"}
    wanted = " or ".join(names.get(k, "a list of names") for k in kinds)
    raise ValueError(f"{what} {key} must be {wanted}, not {value!r}")
