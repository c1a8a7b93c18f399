"""Cost of a curvature-vector product (the Lanczos / Hutchinson / SLQ unit of work) relative to
one plain gradient of the same model on the same batch, measured in one run.

    python benchmarks/bench_spectrum.py            # LLaMA of ~0.6M parameters, B=8, T=64 (CPU)
    python benchmarks/bench_spectrum.py --quick    # a tiny model, seconds

Times (median of ``--repeats`` after one warm-up), all on the same batch:

(a) a plain gradient: ``torch.autograd.grad(model(**batch, labels=ids).loss, params)`` -- the baseline;
(b) the engine's signed per-sample gradients of the batch into the N x P matrix G (done once per
    spectrum; the empirical operator then keeps G);
(c) empirical Fisher product with G kept: ``Gᵀ (G v) / N``;
(d) empirical Fisher product, matrix-free: ``torch.func.jvp`` + ``vjp`` of the per-sample losses;
(e) GGN (true Fisher) product: ``jvp`` of the logits, analytic softmax Hessian, ``vjp``;
(e') the same with ``retain_graphs=True`` (the batch's vjp closure kept across products);
(f) one whole ``hf_fisher``-style spectrum (top-5 by eigsh, 16 Hutchinson probes, no SLQ) per
    curvature, with the number of products it took.

Ratios are to (a). The model uses eager attention (PyTorch's CPU SDPA kernel has no forward-mode
derivative; the library switches to eager by itself, here it is set up front so (a) runs the
same kernels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_fisher.consumers.spectrum import spectrum
from hf_fisher.estimators.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    _Problem,
)


def build(quick: bool, dtype):
    torch.manual_seed(0)
    if quick:
        cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             attn_implementation="eager")
        B, T = 4, 16
    else:
        cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             attn_implementation="eager")
        B, T = 8, 64
    model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, batch = build(args.quick, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    B, T = batch["input_ids"].shape
    print(f"LLaMA {P / 1e6:.2f}M parameters, batch {B}x{T}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")

    def plain():
        loss = model(**batch, labels=batch["input_ids"]).loss
        torch.autograd.grad(loss, params)

    t_plain = timed(plain, args.repeats)
    problem = _Problem(model, [batch], params=None, normalization="mean", task_type=None)
    t_G = timed(problem.gradient_matrix, max(1, args.repeats // 2))
    G = problem.gradient_matrix()
    v = np.random.default_rng(0).standard_normal(problem.dim)
    ops = {
        "empirical, G kept (Gᵀ(Gv)/N)": EmpiricalFisherOperator(problem, G),
        "empirical, matrix-free (jvp+vjp)": EmpiricalFisherOperator(problem, None),
        "GGN / true Fisher (jvp+H+vjp)": GGNOperator(problem),
        "GGN, retain_graphs=True": GGNOperator(problem, retain_graphs=True),
    }
    rows = [("(a) plain gradient", t_plain), ("(b) per-sample gradients -> G (once)", t_G)]
    for label, op in zip(["c", "d", "e", "e'"], ops):
        rows.append((f"({label}) {op} per product", timed(lambda op=ops[op]: op.matvec(v), args.repeats)))
    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        print(f"  {name:<{width}}  {t * 1e3:9.2f} ms   {t / t_plain:7.2f}x")
    for curv in ("empirical", "ggn"):
        t0 = time.perf_counter()
        res = spectrum(model, [batch], curvature=curv, k=5, blocks=None, hutchinson_probes=16, slq_vectors=0)
        dt = time.perf_counter() - t0
        print(f"  (f) spectrum({curv!r}, k=5, 16 probes): {dt:.2f} s, {res.matvecs} products "
              f"({dt / t_plain:.0f}x a plain gradient; {res.seconds_per_matvec / t_plain:.2f}x per product)")


if __name__ == "__main__":
    main()
