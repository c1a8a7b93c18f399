"""KFAC factor collection: time and peak memory relative to one plain gradient computation.

    python benchmarks/bench_kfac.py            # LLaMA of ~7M parameters, B=8, T=64, CPU
    python benchmarks/bench_kfac.py --quick    # a tiny model, seconds
    python benchmarks/bench_kfac.py --device cuda

Measured in one run, on the same batch (random tokens, labels = input ids), float32, eval mode:

(a) one plain forward + backward, ``model(**batch).loss.backward()``: the baseline;
(b) ``KFACEstimator(fisher_type="empirical", kfac_approx="expand").collect(model, [batch])``
    over every nn.Linear (q/k/v/o, gate/up/down, lm_head; the lm_head's 8192 outputs exceed
    ``diagonal_g_above=4096`` so its G is diagonal); factors accumulated in float64 (the default),
    and (g) in float32 (``accumulation_dtype=torch.float32``, as curvlinops stores them);
(c) the same over the projections only (no lm_head), and (d) with ``kfac_approx="reduce"``;
(e) curvlinops' ``KFACLinearOperator.compute_kronecker_factors()`` (empirical, expand) over the
    projections (like (c)), and (f) over every linear layer including lm_head, whose G is a
    dense 8192 x 8192 matrix there (``--no-curvlinops-lm-head`` skips it).

Time: ``--stat`` (median, or min) of ``--repeats`` interleaved rounds after one warm-up round. Memory: the extra peak memory of one call
above the loaded model and batch. On CPU each measurement runs in a fresh Python process: it
builds the model and batch, runs the operation once on a 1x8 batch (imports, lazy set-up), resets
the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads VmRSS, runs the
operation and reads VmHWM: the figure is VmHWM - VmRSS (fallback without clear_refs: ru_maxrss
minus VmRSS, an upper bound). On CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus the memory allocated before the call.

Targets (issue 7): (b)/(a) <= 1.5x time, <= 1.2x memory; curvlinops reports 1.57x and 1.21x on
nanoGPT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = {
    "a": "plain forward + backward (baseline)",
    "b": "hf_fisher KFAC, all linear (lm_head diag G)",
    "g": "hf_fisher KFAC, all linear, float32 factors",
    "c": "hf_fisher KFAC, projections",
    "d": "hf_fisher KFAC reduce, projections",
    "e": "curvlinops KFAC, projections",
    "f": "curvlinops KFAC, all linear (dense lm_head G)",
}


def build(quick: bool, device: str):
    import transformers as tf

    torch.manual_seed(0)
    if quick:
        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        B, T = 4, 32
    else:
        cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        B, T = 8, 64
    model = tf.LlamaForCausalLM(cfg).float().eval().to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g).to(device)
    return model, ids


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(input_ids=x).logits[:, :-1].permute(0, 2, 1)


def operation(name: str, model, ids):
    """A callable running method ``name`` on the batch ``ids``."""
    from hf_fisher.estimators.kfac import KFACEstimator

    if name == "a":
        def run(x=ids):
            model.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x).loss.backward()
            model.zero_grad(set_to_none=True)
        return run
    if name in "bcdg":
        est = KFACEstimator(params=r"proj|lm_head" if name in "bg" else r"proj",
                            kfac_approx="reduce" if name == "d" else "expand",
                            accumulation_dtype=torch.float32 if name == "g" else torch.float64)
        return lambda x=ids: est.collect(model, [{"input_ids": x}], progress=False)
    from curvlinops import KFACLinearOperator

    params = [p for n, p in model.named_parameters() if "proj" in n or (name == "f" and "lm_head" in n)]

    def run(x=ids):
        K = KFACLinearOperator(_Logits(model), torch.nn.CrossEntropyLoss(), params, [(x, x[:, 1:])],
                               fisher_type="empirical", kfac_approx="expand", check_deterministic=False,
                               num_data=x.shape[0], num_per_example_loss_terms=x.shape[1] - 1)
        K.compute_kronecker_factors()
    return run


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_worker(name: str, quick: bool, device: str) -> dict:
    model, ids = build(quick, device)
    operation(name, model, ids[:1, :8])()  # imports, lazy initialisation
    run = operation(name, model, ids)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return {"extra_mb": (torch.cuda.max_memory_allocated() - before) / 2**20, "how": "cuda max_memory_allocated"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (upper bound)"
    rss = _status_kb("VmRSS")
    run()
    peak = _status_kb("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_mb": (peak - rss) / 1024, "how": how}


def measure_memory(name: str, quick: bool, device: str) -> dict:
    cmd = [sys.executable, __file__, "--_memory", name, "--device", device] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_times(runs: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Interleaved rounds (one warm-up round first): on a busy machine a slow spell hits every
    method of a round rather than one method's whole series."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for run in runs.values():
        run()
    sync()
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(repeats):
        for m, run in runs.items():
            t = time.perf_counter()
            run()
            sync()
            times[m].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--no-curvlinops-lm-head", action="store_true")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        print(json.dumps(memory_worker(args._memory, args.quick, args.device)))
        return 0
    try:
        import curvlinops  # noqa: F401
        methods = list("abgcdef")
    except ImportError:
        print("curvlinops is not installed: its rows are skipped")
        methods = list("abgcd")
    if args.no_curvlinops_lm_head and "f" in methods:
        methods.remove("f")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids = build(args.quick, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM, {n_params:,} parameters, float32, batch {tuple(ids.shape)}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    series = measure_times({m: operation(m, model, ids) for m in methods}, args.repeats, args.device)
    pick = min if args.stat == "min" else statistics.median
    times = {m: pick(v) for m, v in series.items()}
    mem = {} if args.no_memory else {m: measure_memory(m, args.quick, args.device) for m in methods}
    print()
    print(f"time: {args.stat} of {args.repeats} interleaved rounds")
    print("| | method | time (s) | time / (a) | extra peak memory (MB) | memory / (a) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in methods:
        mm = mem.get(m)
        mtxt = f"{mm['extra_mb']:.1f} | {mm['extra_mb'] / mem['a']['extra_mb']:.2f}x" if mm else "- | -"
        print(f"| ({m}) | {METHODS[m]} | {times[m]:.4f} | {times[m] / times['a']:.2f}x | {mtxt} |")
    if mem:
        print(f"\nmemory measured with {mem['a']['how']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
