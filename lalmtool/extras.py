"""Optional dependencies: each is imported where it is used, and a missing one is one line
naming the extra that installs it (``pip install 'lalmtool[hf]'``)."""
from __future__ import annotations

import importlib

# module → the extra of pyproject.toml that installs it
EXTRAS = {"datasets": "hf", "pyarrow": "hf", "lhotse": "lhotse"}


class MissingExtra(RuntimeError):
    """An optional package is not installed; the message says which extra to install."""


def require(module: str, what: str):
    """``module`` imported, or MissingExtra saying that ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module.split(".")[0]]
        raise MissingExtra(f"{what} needs the optional package {module.split('.')[0]}, which is "
                           f"not installed: pip install 'lalmtool[{extra}]'") from e
