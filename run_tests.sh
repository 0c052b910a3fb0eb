#!/usr/bin/env bash
# Every test, from a fresh clone: makes .venv (once), installs the pinned requirements,
# then runs ruff and pytest (unit and integration tests, test_service.py against a real
# uvicorn process, the notebook executed headless on the tiny preset).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
