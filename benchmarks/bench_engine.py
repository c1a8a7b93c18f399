"""Speed and memory of Fisher collection against a plain training step, measured in one run.

    python benchmarks/bench_engine.py            # the reference run (LLaMA of ~7M parameters, CPU)
    python benchmarks/bench_engine.py --quick    # a tiny model, seconds
    python benchmarks/bench_engine.py --device cuda
    python benchmarks/bench_engine.py --mode multi   # only the several-batch one-shot comparison
    python benchmarks/bench_engine.py --mode steady --hidden 1024 --layers 1 --vocab 2000 \
        --shape 8x64 --methods plain,param --no-memory   # one width, chosen methods (a width sweep)

Two parts (``--mode steady``, ``--mode multi``; both by default).

**steady** -- for each batch shape it times (median of ``--repeats`` runs after one warm-up):

(a) a plain batched forward + backward: ``model(**batch).loss.backward()`` -- the baseline;
(b) group Fisher of the batch: ``FisherCollector(model, reduction="group").update(batch)`` in
    steady state (the collector is built, and its first batch -- which also checks the captured
    per-sample gradients against autograd's batch gradient -- runs, during the warm-up);
(c) the same with ``reduction="param"``;
(d) a one-sample-at-a-time loop: forward + backward per sample, square the gradients and
    accumulate (how the seed projects computed per-sample Fisher).

(e) a one-shot ``hf_fisher.collect(model, [batch], reduction="group")`` including every one-time
    cost (layout, graph analysis, first-batch check): what a single-batch call costs;

and prints times, ratios to (a), and (d)/(b), (d)/(c).

**multi** -- several different batches (4 of B=32, T=64; quick: 4 of B=8, T=32), one-shot,
for the LLaMA above and for a Mixtral of similar size (4 experts, top-2). Interleaved, in the
same process (``--repeats`` rounds after one warm-up round; the figures are the median, or the
minimum with ``--stat min``):

(A) 4 plain forward + backward steps, one per batch -- the baseline;
(B) ``hf_fisher.collect(model, batches, reduction="group", progress=False)``: a new collector
    each time, so every one-time cost (layout, graph analysis, first-batch and padding checks)
    is included;
(C) the same with ``reduction="param"``.

Next to each collect figure it prints ``fisher.metadata.extra["per_sample_path"]`` ("batched",
or "loop" where the engine fell back to one sample at a time).

Memory: the peak memory of (b) is compared with that of (a). On CPU each measurement runs in a
fresh Python process (so no allocator cache from an earlier measurement hides an allocation):
the process builds the model and batch, runs the operation once on a 1x8 batch (imports, lazy
initialisation), resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``),
reads VmRSS, runs the operation once and reads VmHWM; the reported number is VmHWM - VmRSS, the
extra resident memory at the operation's peak. Where ``clear_refs`` is not available it falls
back to ``ru_maxrss`` minus the RSS before the operation (an upper bound). On CUDA it is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
allocated before the operation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(REPO))

FULL = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, vocab=8000)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, vocab=512)
FULL_SHAPES = [(32, 64), (8, 256)]
QUICK_SHAPES = [(8, 32), (2, 64)]
METHODS = ("plain", "group", "param", "loop", "oneshot")
# the several-batch comparison: a Mixtral of about the LLaMA's size (float32; transformers' default
# grouped_mm experts kernel, which needs row strides that are multiples of 16 bytes)
MOE_FULL = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=344, vocab=8000, experts=4, top_k=2)
MOE_QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=88, vocab=512, experts=4, top_k=2)
MULTI_FULL = dict(batches=4, B=32, T=64)
MULTI_QUICK = dict(batches=4, B=8, T=32)
# targets of the several-batch comparison (x the plain steps): (model kind, reduction) -> limit
MULTI_TARGETS = {("llama", "group"): 1.3, ("llama", "param"): 2.0, ("mixtral", "group"): 1.5}
LABELS = {
    "plain": "(a) plain fwd+bwd",
    "group": "(b) collect, group",
    "param": "(c) collect, param",
    "loop": "(d) one-sample loop",
    "oneshot": "(e) collect() 1 batch",
}


def build_model(spec: dict, device: str):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"], max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()


def build_mixtral(spec: dict, device: str):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"], num_local_experts=spec["experts"],
        num_experts_per_tok=spec["top_k"], max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.MixtralForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()


def make_batch(vocab: int, B: int, T: int, device: str, seed: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(B * 1000 + T if seed is None else seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(device) for k, v in batch.items()}


_COLLECTORS: dict = {}


def run_method(method: str, model, batch) -> None:
    if method == "plain":
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    elif method in ("group", "param"):
        # steady state of a collection: one collector per model and reduction, whose first
        # call (the warm-up) also runs the one-time set-up and the first-batch exactness check
        from hf_fisher import FisherCollector

        key = (id(model), method)
        if key not in _COLLECTORS:
            _COLLECTORS[key] = FisherCollector(model, reduction=method)
        _COLLECTORS[key].update(batch)
    elif method == "oneshot":
        import hf_fisher

        hf_fisher.collect(model, [batch], reduction="group", progress=False)
    elif method == "loop":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        acc = {n: torch.zeros_like(p) for n, p in params}
        B = batch["input_ids"].shape[0]
        for i in range(B):
            model.zero_grad(set_to_none=True)
            one = {k: v[i : i + 1] for k, v in batch.items()}
            model(**one).loss.backward()
            for n, p in params:
                acc[n].addcmul_(p.grad, p.grad)
        model.zero_grad(set_to_none=True)
        for t in acc.values():
            t.div_(B)
    else:
        raise ValueError(method)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_method(method: str, model, batch, device: str, repeats: int) -> float:
    run_method(method, model, batch)  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_method(method, model, batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def measure_memory_here(method: str, spec: dict, B: int, T: int, device: str) -> dict:
    """Extra peak memory (MiB) of one ``method`` call, in this (fresh) process."""
    import gc

    model = build_model(spec, device)
    batch = make_batch(spec["vocab"], B, T, device)
    run_method(method, model, make_batch(spec["vocab"], 1, 8, device))  # imports, lazy init
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_method(method, model, batch)
        torch.cuda.synchronize()
        return {"mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "how": "cuda max_memory_allocated"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (upper bound)"
    before = _status_kb("VmRSS")
    run_method(method, model, batch)
    if how.startswith("VmHWM"):
        peak = _status_kb("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mib": (peak - before) / 1024, "how": how}


def measure_memory(method: str, spec: dict, B: int, T: int, device: str) -> dict:
    if device.startswith("cuda"):
        return measure_memory_here(method, spec, B, T, device)
    cmd = [sys.executable, __file__, "--_memory", json.dumps({"method": method, "spec": spec, "B": B, "T": T})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


# ----------------------------------------------------------------------------- several batches


def time_multi(model, batches, device: str, repeats: int, stat: str) -> tuple[dict, dict]:
    """(A) plain steps over ``batches`` vs one-shot ``collect`` (group, param): seconds and paths."""
    import hf_fisher

    def plain():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    paths: dict[str, str] = {}

    def collect(reduction):
        fisher = hf_fisher.collect(model, batches, reduction=reduction, progress=False)
        paths[reduction] = fisher.metadata.extra.get("per_sample_path", "?")

    ops = {"plain": plain, "group": lambda: collect("group"), "param": lambda: collect("param")}
    for op in ops.values():  # warm-up round: imports, lazy initialisation, allocator
        op()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every method
        for k, op in ops.items():
            t0 = time.perf_counter()
            op()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return {k: pick(v) for k, v in times.items()}, paths


def run_multi(args, repeats: int) -> list[tuple[str, bool]]:
    shape = MULTI_QUICK if args.quick else MULTI_FULL
    n, B, T = shape["batches"], shape["B"], shape["T"]
    models = [
        ("llama", "LLaMA", lambda: build_model(QUICK if args.quick else FULL, args.device)),
        ("mixtral", "Mixtral", lambda: build_mixtral(MOE_QUICK if args.quick else MOE_FULL, args.device)),
    ]
    print(f"\nSeveral batches, one-shot: {n} batches of B={B}, T={T}; {args.stat} of {repeats} interleaved rounds "
          "after 1 warm-up round")
    widths = (24, 10, 9, 10)
    checks = []
    for kind, title, build in models:
        model = build()
        vocab = model.config.vocab_size
        batches = [make_batch(vocab, B, T, args.device, seed=1000 + i) for i in range(n)]
        n_params = sum(p.numel() for p in model.parameters())
        extra = f", {model.config.num_local_experts} experts top-{model.config.num_experts_per_tok}" if kind == "mixtral" else ""
        print(f"\n{title} {n_params:,} parameters (hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
              f"intermediate {model.config.intermediate_size}, vocab {vocab}{extra}), float32")
        times, paths = time_multi(model, batches, args.device, repeats, args.stat)
        print(fmt_row(("method", f"{args.stat} s", "x plain", "path"), widths))
        rows = [("plain", f"(A) {n} plain fwd+bwd", ""), ("group", "(B) collect(), group", paths["group"]),
                ("param", "(C) collect(), param", paths["param"])]
        for key, label, path in rows:
            print(fmt_row((label, f"{times[key]:.4f}", f"{times[key] / times['plain']:.2f}", path), widths))
        for (k, red), limit in MULTI_TARGETS.items():
            if k == kind:
                ratio = times[red] / times["plain"]
                checks.append((f"{title} {red} <= {limit}x plain over {n} batches (got {ratio:.2f}x, {paths[red]})", ratio <= limit))
        del model
    return checks


def fmt_row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def run_steady(args, spec: dict, shapes, repeats: int) -> list[tuple[str, bool]]:
    model = build_model(spec, args.device)
    methods = METHODS if not args.methods else tuple(m for m in METHODS if m in args.methods.split(","))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"LLaMA {n_params:,} parameters (hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads / "
        f"{spec['kv_heads']} kv-heads, intermediate {spec['intermediate']}, vocab {spec['vocab']}), float32"
    )
    print(f"Single batch, steady state: median of {repeats} after 1 warm-up")
    summary = []
    for B, T in shapes:
        batch = make_batch(spec["vocab"], B, T, args.device)
        times = {m: time_method(m, model, batch, args.device, repeats) for m in methods}
        print(f"\nB={B}, T={T}")
        widths = (22, 10, 9)
        print(fmt_row(("method", "median s", "x plain"), widths))
        for m in methods:
            print(fmt_row((LABELS[m], f"{times[m]:.4f}", f"{times[m] / times['plain']:.2f}" if "plain" in times else "-"), widths))
        if {"loop", "group", "param"} <= set(times):
            print(f"one-sample loop / group = {times['loop'] / times['group']:.2f}x, "
                  f"one-sample loop / param = {times['loop'] / times['param']:.2f}x")
        summary.append((B, T, times))

    if not args.no_memory:
        B, T = shapes[0]
        mem = {m: measure_memory(m, spec, B, T, args.device) for m in ("plain", "group")}
        ratio = mem["group"]["mib"] / mem["plain"]["mib"] if mem["plain"]["mib"] > 0 else float("nan")
        print(f"\nPeak memory above the loaded model at B={B}, T={T} ({mem['plain']['how']}, "
              f"{'in process' if args.device.startswith('cuda') else 'fresh process each'}):")
        print(f"  (a) plain fwd+bwd: {mem['plain']['mib']:.1f} MiB   (b) group Fisher: {mem['group']['mib']:.1f} MiB"
              f"   ratio {ratio:.2f}")

    checks = []
    if not args.quick and not args.methods and not args.hidden:
        B, T, times = summary[0]
        checks = [
            (f"group <= 1.3x plain at B={B}", times["group"] / times["plain"] <= 1.3),
            (f"param <= 2x plain at B={B}", times["param"] / times["plain"] <= 2.0),
            (f"group >= 2x faster than the one-sample loop at B={B}", times["loop"] / times["group"] >= 2.0),
        ]
        if not args.no_memory:
            checks.append(("group Fisher peak memory <= plain training peak + 10%", ratio <= 1.10))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 5, quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--mode", choices=("all", "steady", "multi"), default="all",
                        help="steady: single-batch steady state (+ memory); multi: several batches, one-shot, LLaMA and Mixtral")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic of the several-batch rounds (default median; min on a shared, noisy machine)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="steady: LLaMA of this width (heads of 32, intermediate 2.6875 x hidden, kv-heads half the heads)")
    parser.add_argument("--layers", type=int, default=None, help="steady: number of layers (with --hidden)")
    parser.add_argument("--vocab", type=int, default=None, help="steady: vocabulary size (with --hidden)")
    parser.add_argument("--shape", default=None, help="steady: one batch shape BxT, e.g. 8x64")
    parser.add_argument("--methods", default=None, help=f"steady: comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory:  # child process of measure_memory
        job = json.loads(args._memory)
        print(json.dumps(measure_memory_here(job["method"], job["spec"], job["B"], job["T"], "cpu")))
        return 0

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    spec = dict(QUICK if args.quick else FULL)
    if args.hidden:
        heads = max(1, args.hidden // 32)
        spec.update(hidden=args.hidden, heads=heads, kv_heads=max(1, heads // 2), intermediate=int(args.hidden * 2.6875))
    if args.layers:
        spec["layers"] = args.layers
    if args.vocab:
        spec["vocab"] = args.vocab
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shape:
        B, T = (int(x) for x in args.shape.lower().split("x"))
        shapes = [(B, T)]
    repeats = args.repeats or (2 if args.quick else 5)

    import transformers

    import hf_fisher

    print(
        f"device {args.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, hf_fisher {hf_fisher.__version__}"
    )
    checks: list[tuple[str, bool]] = []
    if args.mode in ("all", "steady"):
        checks += run_steady(args, spec, shapes, repeats)
    if args.mode in ("all", "multi"):
        multi = run_multi(args, args.repeats or (1 if args.quick else 3))
        if not args.quick:
            checks += multi
    if checks:
        print("\nTargets:")
        for text, ok in checks:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
