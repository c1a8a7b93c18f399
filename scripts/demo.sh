#!/usr/bin/env bash
# The demo command: set up .venv if needed, then train a tiny LLaMA on a copy task, collect its
# Fisher information, print the most important heads and channels, and save the artifact.
# Extra arguments go to the demo, e.g.  bash scripts/demo.sh --out /tmp/fisher-copy
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${HF_FISHER_VENV:-$repo/.venv}/bin/python" -m hf_fisher.demo "$@"
