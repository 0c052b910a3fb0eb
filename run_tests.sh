#!/usr/bin/env bash
# Every test, from a fresh clone: makes .venv (once), installs the pinned requirements,
# then runs ruff and pytest (unit and integration tests, test_service.py against a real
# uvicorn process, the notebook executed headless on the tiny preset).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
# tests/test_ui.py drives Debian's Chromium headless (never a downloaded browser)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "run_tests.sh: tests/test_ui.py needs Debian's packages chromium and chromium-driver;" \
         "install them: sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
  fi
fi
# tests/test_history*.py start a real redis-server; tests/test_spark_engine.py needs Java 17
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "run_tests.sh: the Redis and Spark tests need Debian's packages ${missing[*]};" \
         "install them: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
