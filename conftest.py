"""At the repository root: `python3 -m pytest` from a stock (externally managed) python3, where
install.sh put lalmtool into the project's .venv, runs the same command in that venv."""
import os
import sys
from importlib import metadata

from lalmtool.setup_python import reexec_in_venv


def _installed() -> bool:
    try:
        metadata.distribution("lalmtool")
    except metadata.PackageNotFoundError:
        return False
    return True


reexec_in_venv(os.path.dirname(os.path.abspath(__file__)), sys.argv[1:], _installed())

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs pytest on synthetic test files
