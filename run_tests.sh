#!/usr/bin/env bash
# Every test, from a fresh clone: makes .venv (once), installs the pinned requirements,
# then runs ruff and pytest (unit and integration tests, test_service.py against a real
# uvicorn process, the notebook executed headless on the tiny preset).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
export OPENBLAS_NUM_THREADS=1 MPLBACKEND=Agg
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
