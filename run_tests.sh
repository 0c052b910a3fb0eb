#!/usr/bin/env bash
# Every test, from a fresh clone: makes .venv (once), installs the pinned requirements,
# then runs ruff and pytest (unit and integration tests, test_service.py against a real
# uvicorn process, the notebook executed headless on the tiny preset).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
# Debian packages the tests drive (never downloaded at run time): Chromium for tests/test_ui.py,
# redis-server for tests/test_history*.py, Java 17 for tests/test_spark_engine.py
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "run_tests.sh: the tests need Debian's packages ${missing[*]};" \
         "install them: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/codespell
.venv/bin/python -m mypy
# one test file per worker (--dist loadfile): a module's fixtures are built once
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
