"""Which Python ``install.sh`` installs into, and where the tests find it (standard library
only: it runs before anything is installed, as ``python3 lalmtool/setup_python.py``).

A stock Debian/Ubuntu ``python3`` is *externally managed* (PEP 668: ``EXTERNALLY-MANAGED`` in
its standard library directory), and ``pip install`` into it stops with
``externally-managed-environment``. There, unless a virtual environment (venv, virtualenv) or
conda environment is active, the project gets its own venv in ``.venv/`` at the repository
root (ESPnet's ``tools/venv`` pattern); anywhere else (an active venv or conda environment,
pyenv, a self-built Python) the interpreter that runs ``install.sh`` is used as before.
``python3 -m pytest`` from a stock ``python3`` then runs the tests in ``.venv`` (the root
``conftest.py`` calls ``reexec_in_venv``).
"""
from __future__ import annotations

import os
import sys
import sysconfig

VENV = ".venv"


def externally_managed(stdlib: str | None = None) -> bool:
    """Whether the interpreter whose standard library is ``stdlib`` is marked by PEP 668."""
    return os.path.isfile(os.path.join(stdlib or sysconfig.get_path("stdlib"),
                                       "EXTERNALLY-MANAGED"))


def in_environment(prefix: str | None = None, base_prefix: str | None = None,
                   environ: dict | None = None) -> bool:
    """Whether a venv/virtualenv (``sys.prefix != sys.base_prefix``) or a conda environment
    (``CONDA_PREFIX``) is active."""
    environ = os.environ if environ is None else environ
    prefix = sys.prefix if prefix is None else prefix
    base_prefix = sys.base_prefix if base_prefix is None else base_prefix
    return prefix != base_prefix or bool(environ.get("CONDA_PREFIX"))


def choose(managed: bool, active: bool) -> str:
    """``"venv"`` (make and use ``.venv``) for an externally managed interpreter outside any
    environment, else ``"here"`` (install into the running interpreter)."""
    return "venv" if managed and not active else "here"


def venv_python(root: str) -> str:
    """The project venv's interpreter under ``root``."""
    return os.path.join(root, VENV, "bin", "python")


#: What the tests import beyond the standard library: an interpreter without them is not the
#: one install.sh installed into. (lalmtool itself is no sign: from the repository root its
#: source and ``lalmtool.egg-info`` are importable from any interpreter.)
REQUIRED = ("numpy", "torch", "transformers")


def has_requirements(find_spec=None) -> bool:
    """Whether this interpreter can import what the tests need (``REQUIRED``)."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    return all(find_spec(name) is not None for name in REQUIRED)


def reexec_in_venv(root: str, argv: list[str], can_import: bool, execv=os.execv,
                   prefix: str | None = None) -> bool:
    """Runs ``python -m pytest argv`` again under ``root``'s ``.venv`` when this interpreter
    cannot import what the tests need and that venv exists; False (nothing done) otherwise.

    Whether this is already the venv's interpreter is told by ``sys.prefix`` (``prefix``):
    the venv's ``bin/python`` is a link to the very interpreter it was made from."""
    python = venv_python(root)
    prefix = sys.prefix if prefix is None else prefix
    if can_import or not os.access(python, os.X_OK) or os.path.realpath(
            prefix) == os.path.realpath(os.path.join(root, VENV)):
        return False
    if execv is os.execv:  # (tests pass a stand-in, and their pytest keeps capturing)
        _release_capture()
    execv(python, [python, "-m", "pytest", *argv])
    return True


def _release_capture() -> None:
    """pytest captures file descriptors 1 and 2 while it imports conftest files: give them
    back, or the rerun's whole output would go to pytest's capture file."""
    import gc

    try:
        from _pytest.capture import CaptureManager
    except ImportError:  # not under pytest
        return
    for obj in gc.get_objects():
        if isinstance(obj, CaptureManager):
            obj.stop_global_capturing()


if __name__ == "__main__":
    print(choose(externally_managed(), in_environment()))
