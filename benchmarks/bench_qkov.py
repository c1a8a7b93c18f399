"""Time and peak memory of a QK-OV interference heatmap against a plain forward + backward.

    python benchmarks/bench_qkov.py            # reference run: 7.9M-parameter LLaMA, 2 x 64 samples, CPU, ~4-6 min
    python benchmarks/bench_qkov.py --quick    # tiny model, 2 x 8 samples, seconds

Model: a randomly initialised ``LlamaForCausalLM`` (hidden 256, 8 layers, 8 heads / 4 kv-heads,
intermediate 688, vocab 4096), float32, eval mode; random token batches (labels = input ids) of
16 x 64 tokens: 4 batches for task A and 4 for task B (128 samples).

Measured (each in a fresh Python process, see below):

(a) baseline: a plain ``model(**batch).loss.backward()`` over the same 8 batches;
(b) ``qkov_interference(model, A, B)`` end to end (both gradient stores, the pooled Fisher, the
    scores ``[64, 64, 8, 8, 4]``), with ``memory_budget_mb`` as given (default 1024: the two
    float32 stores of all attention parameters need 768 MB, 6 MB per sample, more than the
    512 MB default, which the script shows refusing first);
(c) its parts: ``store_gradients`` for A and B, then ``qkov_interference`` on the two stores
    (scoring only).

Each measurement runs in a fresh Python process (no allocator cache from an earlier one hides an
allocation), once, after a warm-up on the first batch (a forward+backward and a QK-OV call on
it). Wall time and process CPU time (``time.process_time``, less sensitive to other load on the
machine) are reported. Peak memory: the extra resident memory at the operation's peak, VmHWM -
VmRSS after resetting the kernel's peak counter (``echo 5 > /proc/self/clear_refs``); where that
is unavailable, a 5 ms sampler of VmRSS. Memory the process already holds (freed by an earlier
step but kept by the allocator) is not counted again, so (c2), run after building the stores in
its process, shows only what scoring needs beyond that. The store bytes are
``GradientStore.nbytes()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers as tf

from hf_fisher.collection.gradients import store_gradients
from hf_fisher.consumers.circuits.qkov import qkov_interference
from hf_fisher.errors import InvalidInputError


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Peak:
    """Extra resident bytes at the peak of the ``with`` block, and its wall time."""

    def __enter__(self):
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.mode = "hwm"
        except OSError:
            self.mode = "sampler"
        self.start = _status("VmRSS")
        if self.mode == "sampler":
            self.max = self.start
            self.stop = threading.Event()

            def run():
                while not self.stop.wait(0.005):
                    self.max = max(self.max, _status("VmRSS"))

            self.sampler = threading.Thread(target=run, daemon=True)
            self.sampler.start()
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        if self.mode == "hwm":
            self.peak = _status("VmHWM")
        else:
            self.stop.set()
            self.sampler.join()
            self.peak = max(self.max, _status("VmRSS"))
        self.extra = max(0, self.peak - self.start)
        return False


def build(quick: bool):
    torch.manual_seed(0)
    if quick:
        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        n_batches, B, T = 2, 4, 32
    else:
        cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
        n_batches, B, T = 4, 16, 64
    model = tf.LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(1)

    def batches(k):
        out = []
        for _ in range(k):
            ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out

    return model, cfg, batches(n_batches), batches(n_batches)


def baseline(model, batches):
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


PHASES = ("baseline", "qkov", "stores", "scoring")


def run_phase(phase: str, quick: bool, budget: float, variant: str) -> dict:
    """One measurement in this (fresh) process, after a warm-up on the first batch."""
    model, _, A, B = build(quick)
    baseline(model, A[:1])
    # same batch shape as the measured ones: the per-sample engine's one-time analysis of a new
    # batch shape (seconds) is not part of the steady-state figures
    qkov_interference(model, A[:1], A[:1], variant=variant, memory_budget_mb=budget, progress=False)
    out: dict = {}
    if phase == "baseline":
        with Peak() as m:
            baseline(model, A + B)
    elif phase == "qkov":
        with Peak() as m:
            res = qkov_interference(model, A, B, variant=variant, memory_budget_mb=budget, progress=False)
        out["scores_bytes"] = res.scores.numel() * res.scores.element_size()
        out["top"] = res.top(1)[0]
    elif phase == "stores":
        with Peak() as m:
            sa = store_gradients(model, A, memory_budget_mb=budget, progress=False)
            sb = store_gradients(model, B, memory_budget_mb=budget, progress=False)
        out["store_bytes"] = sa.nbytes() + sb.nbytes()
    else:
        sa = store_gradients(model, A, memory_budget_mb=budget, progress=False)
        sb = store_gradients(model, B, memory_budget_mb=budget, progress=False)
        with Peak() as m:
            qkov_interference(model, sa, sb, variant=variant, progress=False)
    out.update(seconds=m.seconds, cpu=m.cpu, extra=m.extra, mode=m.mode)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 x 8 samples")
    ap.add_argument("--budget", type=float, default=None, help="memory_budget_mb (default: 1024; quick: 64)")
    ap.add_argument("--variant", default="unsigned")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args(argv)
    budget = args.budget if args.budget is not None else (64.0 if args.quick else 1024.0)
    if args.phase:
        print("RESULT " + json.dumps(run_phase(args.phase, args.quick, budget, args.variant)))
        return

    model, cfg, A, B = build(args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    nA, nB = sum(b["input_ids"].shape[0] for b in A), sum(b["input_ids"].shape[0] for b in B)
    T = A[0]["input_ids"].shape[1]
    print(f"model: LLaMA hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
          f"{cfg.num_key_value_heads} kv-heads, {n_params:,} parameters; {nA} + {nB} samples of {T} tokens; "
          f"torch threads {torch.get_num_threads()}")
    # the default budget refuses when the stores do not fit (and says how many samples fit)
    try:
        qkov_interference(model, A, B, memory_budget_mb=512, progress=False)
        print("memory_budget_mb=512: fits")
    except InvalidInputError as e:
        print(f"memory_budget_mb=512 refused before any work: {str(e).split('. ')[0]}")
    del model

    r = {}
    for phase in PHASES:  # each in a fresh process: no allocator cache hides an allocation
        cmd = [sys.executable, __file__, "--phase", phase, "--budget", str(budget), "--variant", args.variant]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        r[phase] = json.loads(line[len("RESULT "):])

    mb = 2**20
    base = r["baseline"]["seconds"]
    rows = [
        (f"(a) forward+backward, {len(A) + len(B)} batches", "baseline"),
        ("(b) qkov_interference end to end", "qkov"),
        ("(c1) store_gradients A + B", "stores"),
        ("(c2) scoring on the two stores", "scoring"),
    ]
    print()
    cpu_base = r["baseline"]["cpu"]
    print(f"| {nA}+{nB} samples, {args.variant} | wall (s) | x baseline | CPU (s) | x baseline | peak extra RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key in rows:
        x = r[key]
        print(f"| {label} | {x['seconds']:.2f} | {x['seconds'] / base:.2f} | {x['cpu']:.2f} | {x['cpu'] / cpu_base:.2f} "
              f"| {x['extra'] / mb:.0f} |")
    store_bytes = r["stores"]["store_bytes"]
    print()
    print(f"stores: {store_bytes / mb:.1f} MB ({store_bytes / (nA + nB) / mb:.2f} MB/sample, float32) of "
          f"memory_budget_mb={budget:g} ({100 * store_bytes / (budget * mb):.0f}%); scores tensor float64 "
          f"{r['qkov']['scores_bytes'] / mb:.1f} MB; memory measured by {r['qkov']['mode']}")
    top = r["qkov"]["top"]
    print(f"top entry: layer {top['layer']} head {top['head']} {top['block']} score {top['score']:.4g}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
