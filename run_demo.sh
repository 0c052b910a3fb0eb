#!/usr/bin/env bash
# The main job, from a fresh clone: makes .venv (once), installs the pinned requirements,
# generates the built-in data (preset "small" unless MUSICREC_PRESET says otherwise),
# prepares it, runs the whole pipeline, then serves recommendations on localhost:8000.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
export MUSICREC_DATA_DIR="${MUSICREC_DATA_DIR:-data}"
export MUSICREC_PARQUET_DIR="${MUSICREC_PARQUET_DIR:-parquet}"
if [ ! -f "$MUSICREC_DATA_DIR/interactions.parquet" ]; then
  .venv/bin/python -m musicrec generate
fi
.venv/bin/python -m musicrec prepare
.venv/bin/python -m musicrec run
exec .venv/bin/python recommendation_service.py
