#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite on 2 cores.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh tests/test_cli.py -x
# The default run (and CI) is the full suite. For a quick local run, leave out the ~50 slowest
# tests (marked @pytest.mark.slow):  bash scripts/test.sh -m "not slow"
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# Nothing in the test suite may reach the Hugging Face Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# One intra-op thread per pytest worker: 2 workers x 2 OpenMP threads on 2 cores oversubscribe the
# CPU, and OpenMP's spin-waiting then makes small models many times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "${HF_FISHER_VENV:-$repo/.venv}/bin/python" -m pytest -n 2 -q "$@"
