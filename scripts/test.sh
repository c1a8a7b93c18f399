#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite on 2 cores.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh tests/test_cli.py -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# Nothing in the test suite may reach the Hugging Face Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${HF_FISHER_VENV:-$repo/.venv}/bin/python" -m pytest -n 2 -q "$@"
