"""At the repository root: `python3 -m pytest` from a stock (externally managed) python3, where
install.sh put lalmtool into the project's .venv, runs the same command in that venv."""
import os
import sys

from lalmtool.setup_python import has_requirements, reexec_in_venv

reexec_in_venv(os.path.dirname(os.path.abspath(__file__)), sys.argv[1:], has_requirements())

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs pytest on synthetic test files
