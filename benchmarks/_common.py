"""Shared pieces of the benchmarks: peak memory, interleaved timing, machine info, merge inputs.

Nothing here imports torch at module level, so a child process of another virtual environment
(mergekit's) can use it too.

- :func:`reset_peak` / :func:`status_bytes`: the process's peak resident set on Linux. The
  kernel's high-water mark ``VmHWM`` only grows; ``echo 5 > /proc/self/clear_refs`` resets it
  to the current RSS, so ``VmHWM`` read after an operation is that operation's peak.
  (``ru_maxrss`` cannot be reset and carries the parent's mark over fork + exec.)
- :func:`interleaved`: methods timed round by round (a slow spell of a shared machine hits every
  method of a round, not one method's whole series), wall and process CPU time per run.
- :func:`machine_info`: what a figure was measured on.
- :func:`write_merge_inputs` / :func:`merge_child` / :func:`run_merge_child`: a base model, two
  fine-tunes of it and a parameter Fisher artifact each as safetensors on disk, and one merge
  (hf_fisher's streaming merger, or mergekit in its own interpreter) measured in a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ------------------------------------------------------------------------------ memory
def status_bytes(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(reset_ok: bool) -> int:
    """The peak RSS since :func:`reset_peak` (``ru_maxrss``, an upper bound, where it was refused)."""
    import resource

    hwm = status_bytes("VmHWM") if reset_ok else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ timing
def interleaved(runs: dict[str, Callable[[int], object]], rounds: int, sync: Callable[[], None] = lambda: None,
                warmup: bool = True, log: Callable[[str], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run ``runs[name](r)`` for r = 1..rounds, every method once per round, in order.

    Returns ``{name: {"wall": [...], "cpu": [...]}}`` (seconds; cpu = ``time.process_time``, all
    threads of the process). ``warmup`` runs each once with r = 0 first, untimed. A method that
    raises is dropped from the later rounds; its entry gets ``"error"``.
    """
    out: dict[str, dict] = {n: {"wall": [], "cpu": []} for n in runs}
    live = dict(runs)
    if warmup:
        for n, fn in list(live.items()):
            try:
                fn(0)
                sync()
            except Exception as exc:  # a peer's refusal is a result, not a crash
                out[n]["error"] = f"{type(exc).__name__}: {exc}".strip()[:400]
                del live[n]
    for r in range(1, rounds + 1):
        for n, fn in list(live.items()):
            sync()
            w, c = time.perf_counter(), time.process_time()
            try:
                fn(r)
                sync()
            except Exception as exc:
                out[n]["error"] = f"{type(exc).__name__}: {exc}".strip()[:400]
                del live[n]
                continue
            out[n]["wall"].append(time.perf_counter() - w)
            out[n]["cpu"].append(time.process_time() - c)
        if log:
            log(f"round {r}: " + ", ".join(f"{n} {out[n]['wall'][-1]:.3f}s" for n in live if out[n]["wall"]))
    return out


def summary(series: list[float], base: list[float]) -> dict:
    """Median, min, max of a series and of its ratio to the baseline's median."""
    if not series:
        return {}
    b = statistics.median(base)
    return {"median": statistics.median(series), "min": min(series), "max": max(series),
            "ratio": statistics.median(series) / b, "ratio_min": min(series) / b, "ratio_max": max(series) / b}


# ------------------------------------------------------------------------------ machine
def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, RAM, GPU, library versions, date and commit."""
    info: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "platform": platform.platform(),
                  "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "?"
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        info["ram_gb"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        info["commit"] = out.stdout.strip() or None
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    except ImportError:
        pass
    for lib in ("transformers", "numpy"):
        with contextlib.suppress(ImportError):
            info[lib] = __import__(lib).__version__
    return info


def machine_line(info: dict) -> str:
    gpu = f", {info['gpu']} ({info['gpu_memory_gb']} GB, CUDA {info['cuda']})" if info.get("gpu") else ""
    return (f"machine: {info.get('cpu')}, {info.get('cores')} cores, {info.get('ram_gb', '?')} GB RAM{gpu}; "
            f"torch {info.get('torch')} ({info.get('threads')} threads), transformers {info.get('transformers')}; "
            f"{info['date_utc']} UTC, commit {info.get('commit')}")


# ------------------------------------------------------------------------------ merges
#: what the merge rows compare; "mergekit-ties" runs in the peers' venv (benchmarks/_peers_venv.py)
MERGE_VARIANTS = ("fisher", "ties", "mergekit-ties")
#: TIES options used by both implementations (mergekit's names; hf_fisher's ``density``/``scaling``)
TIES_DENSITY = 0.2
#: the other hf_fisher merges :func:`merge_child` runs (A and B on base, each method's defaults)
BASE_MERGES = ("task_arithmetic", "dare", "dare_ties", "dare_linear", "breadcrumbs")


def write_merge_inputs(work: Path, model, noise: float = 0.01, shard: str = "2GB") -> dict:
    """Save ``model`` as ``work/base`` and two fine-tunes (base + ``noise``·N(0,1) per tensor, seeds 1
    and 2) as ``work/A``, ``work/B`` (safetensors, ``save_pretrained``), and a parameter Fisher
    artifact of random positive values for each fine-tune (``work/fisher-A``, ``work/fisher-B``).
    One extra copy of the weights at a time is held in memory."""
    import torch

    from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata

    model.save_pretrained(work / "base", max_shard_size=shard)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, name in enumerate(("A", "B"), start=1):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + noise * torch.randn(p.shape, generator=g).to(p.dtype))
        model.save_pretrained(work / name, max_shard_size=shard)
        mean = {n: torch.rand(p.shape, generator=g).add_(1e-3) for n, p in model.named_parameters()}
        meta = FisherMetadata(task=f"task-{name}", reduction="param", model_type=model.config.model_type,
                              accumulation_dtype=None)
        Fisher(mean, None, reduction="param", groups=None, param_shapes={n: tuple(t.shape) for n, t in mean.items()},
               counts=Counts(samples=1, tokens=1), metadata=meta).save_pretrained(work / f"fisher-{name}",
                                                                                  max_shard_size=shard)
        del mean
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])
    largest = max(t.numel() * t.element_size() for t in base.values())
    return {"model_bytes": sum(f.stat().st_size for f in (work / "A").glob("*.safetensors")),
            "largest_tensor_bytes": largest, "dtype": str(next(iter(base.values())).dtype).replace("torch.", "")}


def mergekit_config(work: Path, dtype: str) -> str:
    """mergekit's TIES of A and B on base, as hf_fisher's TIES computes it: weights 1, density
    ``TIES_DENSITY``, the disjoint mean (mergekit's ``normalize: true``), scaling 1."""
    models = "\n".join(f"  - model: {work / n}\n    parameters: {{weight: 1.0, density: {TIES_DENSITY}}}" for n in "AB")
    return (f"merge_method: ties\nbase_model: {work / 'base'}\nmodels:\n{models}\n"
            f"parameters: {{normalize: true}}\ndtype: {dtype}\n")


def merge_child(variant: str, work: Path, out: Path, threads: int) -> dict:
    """One merge in this (fresh) process: seconds until the output is on disk and peak RSS above
    the RSS after every import (VmHWM after ``clear_refs``)."""
    import safetensors.torch  # noqa: F401  (every import before the baseline RSS)
    import torch
    import transformers  # noqa: F401
    import yaml

    torch.set_num_threads(threads)
    if variant == "mergekit-ties":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        dtype = json.loads((work / "inputs.json").read_text())["dtype"]
        config = MergeConfiguration.model_validate(yaml.safe_load(mergekit_config(work, dtype)))

        def op():
            run_merge(config, out_path=str(out), options=MergeOptions(cuda=False, copy_tokenizer=False,
                                                                      lazy_unpickle=True, quiet=True))
    else:
        import logging

        from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401

        from hf_fisher.consumers.merge import io, math  # noqa: F401
        from hf_fisher.consumers.merge.api import merge_with_fisher

        logging.getLogger("hf_fisher").setLevel(logging.ERROR)
        models = [str(work / "A"), str(work / "B")]
        if variant == "fisher":
            def op():
                merge_with_fisher(models, [str(work / "fisher-A"), str(work / "fisher-B")], method="fisher",
                                  output_dir=out, progress=False)
        elif variant == "ties":
            def op():
                merge_with_fisher(models, method="ties", base_model=str(work / "base"), density=TIES_DENSITY,
                                  output_dir=out, progress=False)
        elif variant in BASE_MERGES:  # the method's defaults (mergekit's convention), weights 1
            def op():
                merge_with_fisher(models, method=variant, base_model=str(work / "base"), output_dir=out, progress=False)
        else:
            raise SystemExit(f"unknown merge variant {variant}")
    base_rss = status_bytes("VmRSS") or 0
    ok = reset_peak()
    t0 = time.perf_counter()
    op()
    os.sync()  # every variant pays for its writes reaching the disk
    secs = time.perf_counter() - t0
    return {"variant": variant, "seconds": secs, "peak_above_baseline_bytes": peak_rss(ok) - base_rss,
            "baseline_bytes": base_rss, "hwm_reset": ok}


def run_merge_child(variant: str, work: Path, threads: int, python: str | None = None, timeout: int = 3600) -> dict:
    """:func:`merge_child` in a fresh process of ``python`` (default this one); ``{"error": ...}`` on failure."""
    import shutil

    out = work / f"out-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [python or sys.executable, str(Path(__file__)), "merge-child", variant, str(work), str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timeout after {timeout}s"}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "error": f"exit {res.returncode}: " + " | ".join(tail)}


def compare_folders(x: Path, y: Path) -> dict:
    """Max |difference| and max relative difference between two saved models, tensor by tensor."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    ix, iy = index(x), index(y)
    common = sorted(set(ix) & set(iy))
    worst, rel, differ, total = 0.0, 0.0, 0, 0
    for k in common:
        with safe_open(str(ix[k]), "pt") as h:
            a = h.get_tensor(k).double()
        with safe_open(str(iy[k]), "pt") as h:
            b = h.get_tensor(k).double()
        d = (a - b).abs()
        scale = max(float(b.abs().max()), 1e-30)
        worst = max(worst, float(d.max()))
        rel = max(rel, float(d.max()) / scale)
        differ += int((d > 1e-5 * scale).sum())
        total += d.numel()
    return {"tensors": len(common), "only_one_side": sorted(set(ix) ^ set(iy))[:5], "max_abs": worst, "max_rel": rel,
            "entries_differing": differ, "entries": total}


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "merge-child":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    variant, work, threads = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    print("RESULT " + json.dumps(merge_child(variant, work, work / f"out-{variant}", threads)), flush=True)


def step_clock():
    """A TrainerCallback recording the wall time of each optimizer step in ``.steps`` (put it last
    in the callback list: it then includes the other callbacks' ``on_step_end``)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.steps.append(time.perf_counter() - self.t0)

    return Clock()
