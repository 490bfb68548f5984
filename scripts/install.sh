#!/usr/bin/env bash
# Installs the project into a virtual environment. The Makefile, CI and the Dockerfile all call this one script,
# so that what CI tests is what users get.  Usage: scripts/install.sh [VENV_DIR] [EXTRAS]
set -euo pipefail
venv="${1:-.venv}"
extras="${2:-test}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[${extras}]"
