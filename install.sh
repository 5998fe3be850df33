#!/usr/bin/env bash
# Installs what lalmtool and its offline recipes need on a fresh Debian/Ubuntu machine:
# system packages (TTS voices and real test speech for recipes/mini) and the Python package.
# Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"

apt_pkgs="espeak-ng flite pocketsphinx-testdata wordnet-base libsndfile1 apertium apertium-eng-spa"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq $missing
fi

python3 -m pip install -q --upgrade pip
# exact releases CI tests; without -c, pyproject.toml's ranges keep an installed CUDA torch
python3 -m pip install -q -c constraints.txt -e ".[test]"
