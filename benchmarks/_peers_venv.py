"""The peers' virtual environment of bench_peers.py (and of bench_scale.py's mergekit row).

    python benchmarks/_peers_venv.py              # build (or check) benchmarks/.peers-venv
    python benchmarks/_peers_venv.py --venv DIR   # elsewhere

Steps, in order (each peer's step may fail on its own: the failure is recorded in
``DIR/peers_status.json`` and the others go on):

1. ``python -m venv DIR`` (clean: no system site-packages);
2. ``torch==2.13.0`` FIRST (the local CPU build; an unpinned torch could pull a multi-GB CUDA
   build), then hf_fisher's own dependencies (from pyproject.toml; hf_fisher itself is imported
   from the checkout through ``sys.path``, never installed there);
3. the peers at pinned versions, every pip call with the constraint ``torch==<the installed
   version>`` so no resolution can swap torch, and ``--no-deps`` for those that declare
   torchvision / torchaudio / bitsandbytes (never imported by the code paths measured here),
   their real dependencies listed explicitly;
4. after every step torch's version is read again: a change is a loud failure (exit 1), since
   every ratio would then compare different builds.

A stamp (hash of this file) makes a second run return at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = HERE / ".peers-venv"
TORCH = "torch==2.13.0"

# peer -> (pip calls: each a list of pip install arguments, the module whose import proves it)
PEERS: dict[str, tuple[list[list[str]], str]] = {
    # BackPACK declares torchvision (never imported by backpack.extensions)
    "backpack": ([["einops", "unfoldNd"], ["--no-deps", "backpack-for-pytorch==1.7.1"]], "backpack"),
    "opacus": ([["opacus==1.6.0"]], "opacus"),
    # curvlinops' dependency backpack declares torchvision: same as scripts/setup.sh
    "curvlinops": (
        [["einops", "opt-einsum", "linear_operator>=0.5", "unfoldNd"],
         ["--no-deps", "curvlinops-for-pytorch==3.0.1", "backpack-for-pytorch==1.7.1", "einconv==0.1.0"]],
        "curvlinops",
    ),
    # kronfluence declares torchvision
    "kronfluence": (
        [["accelerate>=0.31", "einops", "opt-einsum", "safetensors", "tqdm", "scikit-learn"],
         ["--no-deps", "kronfluence==1.0.1", "einconv==0.1.0"]],
        "kronfluence",
    ),
    # Bergson declares torchvision, torchaudio and bitsandbytes
    "bergson": (
        [["accelerate", "datasets", "jinja2", "jaxtyping>=0.3.3", "ml_dtypes", "natsort", "numpy", "scipy",
          "peft>=0.17", "petname", "pyarrow", "pyyaml", "simple-parsing", "transformers>=5.0",
          "huggingface-hub>=1.13.0", "optree", "typing-extensions"],
         ["--no-deps", "torchopt", "bergson==2.5.1"]],
        "bergson",
    ),
    "mergekit": ([["mergekit==0.1.5"]], "mergekit"),
}


def hf_fisher_dependencies() -> list[str]:
    """``[project] dependencies`` of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))


def log(msg: str) -> None:
    print(f"[peers-venv] {msg}", file=sys.stderr, flush=True)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _stamp() -> str:
    """What the venv was built from: torch's pin, hf_fisher's dependencies, the peers' installs."""
    return hashlib.sha256(json.dumps([TORCH, hf_fisher_dependencies(), PEERS]).encode()).hexdigest()


def torch_version(py: Path) -> str | None:
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def status(venv: Path) -> dict:
    """What the last build recorded: {"torch": ..., "peers": {name: "ok" | "failed: ..."}}."""
    f = venv / "peers_status.json"
    return json.loads(f.read_text()) if f.exists() else {}


def ensure(venv: Path = DEFAULT_VENV, python: str | None = None) -> dict:
    """Builds the venv if its stamp is missing or stale; returns its status. Exits 1 if torch moved."""
    venv = Path(venv)
    py = venv_python(venv)
    st = status(venv)
    if py.exists() and st.get("stamp") == _stamp():
        return st
    if not py.exists():
        log(f"creating {venv}")
        subprocess.run([python or sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-q"]
    if torch_version(py) is None:
        log(f"installing {TORCH} first")
        subprocess.run(pip + [TORCH], check=True)
    torch_v = torch_version(py)
    constraint = venv / "torch-constraint.txt"
    constraint.write_text(f"torch=={torch_v}\n")
    pip += ["-c", str(constraint)]
    deps = hf_fisher_dependencies()
    log("installing hf_fisher's dependencies (hf_fisher itself runs from the checkout)")
    subprocess.run(pip + deps, check=True)
    peers = {}
    for name, (calls, module) in PEERS.items():
        log(f"installing {name}")
        try:
            for call in calls:
                out = subprocess.run(pip + call, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"pip install {' '.join(call)}: " + (out.stderr.strip().splitlines() or ["?"])[-1])
            out = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"import {module}: " + (out.stderr.strip().splitlines() or ["?"])[-1])
            peers[name] = "ok"
        except RuntimeError as exc:
            peers[name] = f"failed: {exc}"
            log(f"{name} FAILED: {exc}")
        now = torch_version(py)
        if now != torch_v:
            log(f"ERROR: installing {name} changed torch ({torch_v} -> {now}); delete {venv} and rebuild")
            sys.exit(1)
    st = {"stamp": _stamp(), "torch": torch_v, "peers": peers}
    (venv / "peers_status.json").write_text(json.dumps(st, indent=2))
    log(f"ready: {venv} (torch {torch_v}); " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    return st


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = p.parse_args(argv)
    print(json.dumps(ensure(args.venv), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
