#!/usr/bin/env bash
# Installs the project into a virtual environment. The Makefile, CI and the Dockerfile all call this one script,
# so that what CI tests is what users get.  Usage: scripts/install.sh [VENV_DIR] [EXTRAS] [CONSTRAINTS]
# CONSTRAINTS (default constraints.txt): the versions the suite passed with; "none" installs the newest that
# pyproject.toml's floors allow (make lock does that, then records them).
set -euo pipefail
venv="${1:-.venv}"
extras="${2:-test}"
constraints="${3:-constraints.txt}"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: this project needs Python 3.11 or newer (tomllib); python3 is $(python3 --version 2>&1)" >&2
  exit 2
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$constraints" = "none" ]; then
  "$venv/bin/python" -m pip install --quiet -e ".[${extras}]"
else
  "$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[${extras}]"
fi
