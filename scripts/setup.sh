#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: the CPU build of PyTorch first,
# so that nothing pulls a multi-GB CUDA build, then this project (editable) with its test extras.
# As root on Debian it also installs the system packages the tests run (scripts/system-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
