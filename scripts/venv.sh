# Sourced by run_demo.sh and run_tests.sh: makes .venv once, installs the pinned requirements
# and sets the environment every run needs.
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
export OPENBLAS_NUM_THREADS=1 MPLBACKEND=Agg
