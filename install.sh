#!/usr/bin/env bash
# Installs what lalmtool and its offline recipes need on a fresh Debian/Ubuntu machine:
# system packages (TTS voices and real test speech for recipes/mini) and the Python package.
# Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"

# The interpreter to install into (lalmtool/setup_python.py): the running python3 (an active
# venv/conda environment, pyenv, ...), or on a stock Debian/Ubuntu python3 (PEP 668, "externally
# managed") outside any environment a project venv in .venv, which `python3 -m pytest` (through
# the root conftest.py) and the recipes (PYTHON=.venv/bin/python) use.
where=$(python3 lalmtool/setup_python.py)

apt_pkgs="espeak-ng flite pocketsphinx-testdata wordnet-base libsndfile1 apertium apertium-eng-spa"
# the venv needs ensurepip; the stock python3 needs pytest to start the tests in the venv
[ "$where" = venv ] && apt_pkgs="$apt_pkgs python3-venv python3-pytest"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq $missing
fi

python=python3
if [ "$where" = venv ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  python=.venv/bin/python
  echo "install.sh: $(command -v python3) is externally managed (PEP 668): installing into" \
    "$(pwd)/.venv (python3 -m pytest and the recipes use it)" >&2
fi
"$python" -m pip install -q --upgrade pip
# exact releases CI tests; without -c, pyproject.toml's ranges keep an installed CUDA torch
"$python" -m pip install -q -c constraints.txt -e ".[test]"
# Voxtral's processor reads a mistral-common tokenizer (the voxtral family's tests need it).
# Every release transformers 5.24 accepts (>= 1.11.5) declares numpy<2.4 on Python <= 3.12; it
# runs unchanged on the pinned numpy 2.4 (tests/test_audio_llm.py), so it goes in without deps.
"$python" -m pip install -q --no-deps mistral-common==1.13.1
"$python" -m pip install -q -c constraints.txt tiktoken==0.14.0 pydantic-extra-types==2.11.1 \
  pycountry==26.2.16 pillow jsonschema pydantic requests
