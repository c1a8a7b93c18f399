#!/usr/bin/env bash
# The demo command: set up .venv if needed, then run the offline demo: a tiny LLaMA on two
# generated tasks (Trainer + FisherCallback), top heads, pruning, Fisher merging vs averaging,
# a report with plots, all in one folder. Extra arguments go to the demo, e.g.
#   bash scripts/demo.sh --out /tmp/hf-fisher-demo
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${HF_FISHER_VENV:-$repo/.venv}/bin/python" -m hf_fisher.demo "$@"
