"""Fisher collection at real model widths (random weights from the configs) against a plain step.

    python benchmarks/bench_scale.py --model qwen2.5-0.5b --layers 2 --seq-len 512
    python benchmarks/bench_scale.py --model qwen2.5-0.5b --layers 2 --seq-len 2048 --modes group
    python benchmarks/bench_scale.py --model llama-3.2-1b --layers 1 --modes group
    python benchmarks/bench_scale.py --model llama-3-8b --device cuda --dtype bfloat16 --seq-len 2048

The models are built from their real configurations (hidden size, heads, MLP channels,
vocabulary, tied or untied embeddings, RoPE) with random weights: nothing is downloaded.
``--layers N`` keeps the widths and the vocabulary and keeps only N decoder layers. The model is
in eval mode (no dropout) with ``attn_implementation="sdpa"`` (eager where sdpa fails).
``torch.set_num_threads(--threads)`` (default 2).

Batches: ``--repeats`` + 1 different batches of ``--batch`` x ``--seq-len`` random token ids,
labels = input ids, no padding. Methods, timed interleaved round by round in one process (round r
uses batch r for every method; one untimed warm-up of the plain step first); the figure is the
median over the rounds:

plain           ``model(**batch).loss.backward()`` -- the baseline;
MODE-steady     a ``FisherCollector(model, reduction=MODE)`` fed batch 0 before the rounds (its
                first batch, with the checks), then ``update(batch r)``: time per update;
MODE-oneshot    ``hf_fisher.collect(model, [batch r], reduction=MODE)``: a new collector each
                time, every one-time cost (layout, graph analysis, first-batch checks) included;
kfac-oneshot    ``hf_fisher.collect(model, [batch r], estimator="kfac")`` (``--modes`` with kfac).

Peak memory. On CPU the high-water mark of the resident set only grows, so each method's peak is
measured in a fresh process (the script re-invokes itself with ``--one METHOD``): the process
builds the model and the batches (steady: and feeds the collector its first batch), resets the
kernel's peak-RSS counter to the current RSS (``echo 5 > /proc/self/clear_refs``), runs the method
once on another batch and reports ``VmHWM``: the whole process's peak (model, batch and all), so
the ratio to the plain step's is the ratio a user sees. (``ru_maxrss`` is only the fallback where
``clear_refs`` is refused: Linux carries the parent's high-water mark over fork + exec, so it
reads high.) On CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, in the same process, absolute.

Printed: a table of times and peaks with their ratios to the plain step, and the machine (CPU
model, cores, torch version, threads); ``--json OUT`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(REPO))

PRESETS = {
    "qwen2.5-0.5b": dict(
        kind="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        kind="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        head_dim=64,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama-3-8b": dict(
        kind="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(PRESETS[args.model])
    kind = spec.pop("kind")
    if args.layers is not None:
        spec["num_hidden_layers"] = args.layers
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    for attn in ("sdpa", "eager"):
        try:
            config = config_cls(**spec, attn_implementation=attn)
            with torch.device(args.device):
                model = model_cls(config).to(dtype)
            break
        except Exception as exc:  # try eager if sdpa is refused
            if attn == "eager":
                raise
            print(f"sdpa refused ({exc}); using eager", file=sys.stderr)
    model.eval()
    return model, attn


def make_batches(args, vocab):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(args.repeats + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append({k: v.to(args.device) for k, v in b.items()})
    return out


def methods(modes):
    out = ["plain"]
    for m in modes:
        out += ["kfac-oneshot"] if m == "kfac" else [f"{m}-steady", f"{m}-oneshot"]
    return out


class Runner:
    """Runs one method on one batch; keeps the steady collectors between calls."""

    def __init__(self, model, first_batch):
        self.model = model
        self.first = first_batch
        self.collectors = {}

    def prepare(self, method):
        from hf_fisher.collection.collector import FisherCollector

        if method.endswith("-steady"):
            c = FisherCollector(self.model, reduction=method.split("-")[0])
            c.update(self.first)
            self.collectors[method] = c

    def run(self, method, batch):
        import hf_fisher

        model = self.model
        if method == "plain":
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        elif method.endswith("-steady"):
            self.collectors[method].update(batch)
        elif method == "kfac-oneshot":
            hf_fisher.collect(model, [batch], estimator="kfac", progress=False)
        else:
            hf_fisher.collect(model, [batch], reduction=method.split("-")[0], progress=False)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def read_status(key):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def one(args):
    """--one METHOD: a fresh process measures the peak memory of one method; prints JSON."""
    model, _ = build_model(args)
    batches = make_batches(args, model.config.vocab_size)
    runner = Runner(model, batches[0])
    method = args.one
    reset_ok = False
    if method.endswith("-steady"):
        runner.prepare(method)
    if args.device == "cuda":
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
    else:
        # reset the kernel's peak-RSS counter to the current RSS (model, batches, steady collector):
        # ru_maxrss cannot be used alone, Linux carries the parent's high-water mark over fork+exec
        try:
            Path("/proc/self/clear_refs").write_text("5")
            reset_ok = True
        except OSError:
            reset_ok = False
    runner.run(method, batches[1])
    sync(args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = read_status("VmHWM") if reset_ok else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"method": method, "peak_bytes": peak, "hwm_reset": reset_ok}))


def memory_in_subprocess(args, method):
    cmd = [
        sys.executable,
        __file__,
        "--one",
        method,
        "--model",
        args.model,
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--repeats",
        "1",
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "error": f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else ""),
        "tail": tail,
    }


def machine(args):
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="keep only N decoder layers (real widths and vocabulary)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="group,param", help="comma list of group, param, kfac")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each memory subprocess")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        return one(args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("group", "param", "kfac"):
            p.error(f"unknown mode {m!r}")
    names = methods(modes)
    model, attn = build_model(args)
    n_params = sum(t.numel() for t in model.parameters())
    n_layers = model.config.num_hidden_layers
    batches = make_batches(args, model.config.vocab_size)
    print(
        f"{args.model} layers={n_layers} params={n_params / 1e6:.1f}M attn={attn} "
        f"B={args.batch} T={args.seq_len} {args.dtype} {args.device}",
        flush=True,
    )
    runner = Runner(model, batches[0])
    runner.run("plain", batches[0])  # warm-up
    for name in names:
        t0 = time.perf_counter()
        runner.prepare(name)
        if name.endswith("-steady"):
            print(f"  {name}: collector's first batch {time.perf_counter() - t0:.1f}s", flush=True)
    times = {n: [] for n in names}
    for r in range(1, args.repeats + 1):
        for name in names:
            sync(args.device)
            t0 = time.perf_counter()
            runner.run(name, batches[r])
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    del runner
    med = {n: statistics.median(v) for n, v in times.items()}

    mem = {}
    if not args.no_memory:
        if args.device == "cuda":
            del model
            torch.cuda.empty_cache()
        for name in names:
            mem[name] = memory_in_subprocess(args, name)
            print(f"  memory {name}: {mem[name]}", flush=True)

    info = machine(args)
    base_t = med["plain"]
    base_m = mem.get("plain", {}).get("peak_bytes")
    rows = []
    for n in names:
        pk = mem.get(n, {}).get("peak_bytes")
        rows.append(
            {
                "method": n,
                "time_s": med[n],
                "times_s": times[n],
                "time_ratio": med[n] / base_t,
                "peak_bytes": pk,
                "mem_ratio": (pk / base_m) if pk and base_m else None,
                "mem_error": mem.get(n, {}).get("error"),
            }
        )
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads")
    print(
        f"{args.model} ({n_layers} layers, "
        f"{n_params / 1e6:.1f}M params), B={args.batch}, T={args.seq_len}, {args.dtype}, {args.device}, "
        f"median of {args.repeats}"
    )
    print("| method | time (s) | x plain | peak memory (GB) | x plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        pk = f"{row['peak_bytes'] / 1e9:.2f}" if row["peak_bytes"] else (row["mem_error"] or "-")
        mr = f"{row['mem_ratio']:.2f}" if row["mem_ratio"] else "-"
        print(f"| {row['method']} | {row['time_s']:.2f} | {row['time_ratio']:.2f} | {pk} | {mr} |")
    if args.json:
        out = {
            "config": {k: v for k, v in vars(args).items() if k != "one"},
            "params": n_params,
            "attn_implementation": attn,
            "machine": info,
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return None


if __name__ == "__main__":
    main()
