"""Time and peak memory of a two-model merge of a ~100M-parameter LLaMA from safetensors (issue 14).

    python benchmarks/bench_merge_speed.py              # ~100M parameters (needs ~2.5 GB of free disk, in /tmp)
    python benchmarks/bench_merge_speed.py --quick      # ~6M parameters, seconds (smoke run)
    python benchmarks/bench_merge_speed.py --repeats 3 --workdir /some/fast/disk

Set-up (not timed): a ``LlamaForCausalLM`` from a config (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocabulary 8000, untied embeddings: 97.4M parameters, float32) is initialised
twice with different seeds and saved with ``save_pretrained`` as sharded safetensors (200 MB
shards); each gets a parameter-level Fisher artifact (random positive tensors, float32, saved with
``Fisher.save_pretrained``). Everything lives in a temporary folder (``--workdir``, default the
system temp folder) that is removed at the end.

Measured, each run in a fresh Python process (order interleaved over ``--repeats`` rounds):

(a) ``merge_with_fisher([A, B], method="average", output_dir=...)``: the streaming reader and
    writer, one tensor at a time;
(b) ``merge_with_fisher([A, B], [F_A, F_B], method="fisher", output_dir=...)``: the same with the
    two Fisher artifacts streamed alongside;
(c) in memory: ``from_pretrained`` both models, ``(sd_A + sd_B) / 2`` over the state dicts, load
    into model A, ``save_pretrained`` (200 MB shards) -- what a script without a streaming merger
    does.

Time: wall clock of the operation alone (imports and the interpreter start excluded) until its
output is on disk: the parent calls ``os.sync()`` before each run and the run ends with
``os.sync()`` (the merger fsyncs its output folder, ``save_pretrained`` does not; without this
the dirty pages of one run were flushed during the next and the figures moved by 5x); the time
until the call returned is printed too. Peak
memory: the process imports everything every variant uses (torch, transformers' LLaMA,
hf_fisher's merger, safetensors, yaml), reads ``VmRSS`` (the baseline), resets the kernel's
peak counter (``echo 5 > /proc/self/clear_refs``, Linux), runs the operation once and reads
``VmHWM``; the figure is ``VmHWM - baseline``. (Without ``clear_refs``: ``VmHWM`` minus the
baseline, the same as long as the imports were the peak so far.) The input files are in the page
cache (just written): the figures are for a warm cache. The outputs of (a) and (c) are compared
tensor by tensor afterwards (max |difference|).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):  # runs from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _common

FULL = dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=8000)
QUICK = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, vocab=8000)
SHARD = "200MB"
VARIANTS = ("average", "fisher", "in_memory")
LABELS = {
    "average": "(a) streaming average (merge_with_fisher)",
    "fisher": "(b) streaming fisher (merge_with_fisher)",
    "in_memory": "(c) in memory: load both, average state dicts, save",
}


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _config(size: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=512, tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------- set-up
def setup(work: Path, size: dict) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata

    transformers.utils.logging.disable_progress_bar()
    info = {}
    for i, name in enumerate(("A", "B")):
        torch.manual_seed(i)
        model = LlamaForCausalLM(_config(size)).eval()
        model.save_pretrained(work / name, max_shard_size=SHARD)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(100 + i)
        mean = {n: torch.rand(p.shape, generator=gen).add_(1e-3) for n, p in model.named_parameters()}
        meta = FisherMetadata(task=f"task-{name}", reduction="param", model_type="llama", accumulation_dtype=None)
        Fisher(mean, None, reduction="param", groups=None, param_shapes={n: tuple(t.shape) for n, t in mean.items()},
               counts=Counts(samples=1, tokens=1), metadata=meta).save_pretrained(work / f"fisher-{name}", max_shard_size=SHARD)
        del model, mean
    info["model_bytes"] = sum(f.stat().st_size for f in (work / "A").glob("*.safetensors"))
    info["fisher_bytes"] = sum(f.stat().st_size for f in (work / "fisher-A").glob("*.safetensors"))
    info["model_shards"] = len(list((work / "A").glob("*.safetensors")))
    return info


# ----------------------------------------------------------------------------------- child
def child(variant: str, work: Path, out: Path, threads: int) -> None:
    import logging

    import safetensors.torch  # noqa: F401
    import torch
    import yaml  # noqa: F401
    from transformers import LlamaForCausalLM

    from hf_fisher.consumers.merge import io, math  # noqa: F401
    from hf_fisher.consumers.merge.api import merge_with_fisher

    torch.set_num_threads(threads)
    logging.getLogger("hf_fisher").setLevel(logging.ERROR)
    base_rss = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    if variant == "average":
        merge_with_fisher([str(work / "A"), str(work / "B")], method="average", output_dir=out, progress=False)
    elif variant == "fisher":
        merge_with_fisher([str(work / "A"), str(work / "B")], [str(work / "fisher-A"), str(work / "fisher-B")],
                          method="fisher", output_dir=out, progress=False)
    elif variant == "in_memory":
        a = LlamaForCausalLM.from_pretrained(work / "A", dtype=torch.float32)
        b = LlamaForCausalLM.from_pretrained(work / "B", dtype=torch.float32)
        sb = b.state_dict()
        merged = {k: (v + sb[k]) / 2 for k, v in a.state_dict().items()}
        del b, sb
        a.load_state_dict(merged)
        del merged
        a.save_pretrained(out, max_shard_size=SHARD)
    else:
        raise SystemExit(f"unknown variant {variant}")
    returned = time.perf_counter() - t0
    os.sync()  # every variant pays for its writes reaching the disk (the merger fsyncs its output, save_pretrained does not)
    secs = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(json.dumps({"variant": variant, "seconds": secs, "returned_seconds": returned, "peak_bytes": peak - base_rss,
                      "baseline_bytes": base_rss, "hwm_reset": reset}))


def run_child(variant: str, work: Path, threads: int) -> dict:
    out = work / f"out-{variant}"
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    os.sync()  # no dirty pages of an earlier run are flushed during this one
    res = subprocess.run([sys.executable, __file__, "--child", variant, "--workdir", str(work), "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (a), (b), (c); the median is reported")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--workdir", default=None, help="where the temporary models go (removed at the end)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work = Path(args.workdir)
        child(args.child, work, work / f"out-{args.child}", args.threads)
        return

    import torch

    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="hf-fisher-merge-speed-", dir=args.workdir))
    try:
        t = time.perf_counter()
        info = setup(work, size)
        print(f"LLaMA {info['parameters']:,} parameters (hidden {size['hidden']}, {size['layers']} layers, intermediate "
              f"{size['intermediate']}, vocab {size['vocab']}, untied), float32: {info['model_bytes'] / 2**20:.0f} MiB "
              f"per model in {info['model_shards']} shards, {info['fisher_bytes'] / 2**20:.0f} MiB per Fisher; set-up "
              f"{time.perf_counter() - t:.0f} s, in {work}; {args.threads} threads", flush=True)
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for v in VARIANTS:
                results[v].append(run_child(v, work, args.threads))
                print(f"  round {r + 1}: {v:10s} {results[v][-1]['seconds']:7.2f} s  "
                      f"peak +{results[v][-1]['peak_bytes'] / 2**20:7.1f} MiB", flush=True)
        diff = _common.compare_folders(work / "out-average", work / "out-in_memory")["max_abs"]
        summary = {v: {"seconds": statistics.median(x["seconds"] for x in rs),
                       "returned_seconds": statistics.median(x["returned_seconds"] for x in rs),
                       "peak_mib": statistics.median(x["peak_bytes"] for x in rs) / 2**20,
                       "hwm_reset": all(x["hwm_reset"] for x in rs)} for v, rs in results.items()}
        ref = summary["in_memory"]
        avg = summary["average"]
        print(f"\nTwo-model merge, {info['parameters'] / 1e6:.1f}M parameters, median of {args.repeats} "
              f"(fresh process each; peak = VmHWM - RSS after imports)\n")
        print("| variant | time s (to disk) | of which until return | peak MiB | time / streaming average | "
              "peak / streaming average | time / in memory | peak / in memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for v in VARIANTS:
            s = summary[v]
            print(f"| {LABELS[v]} | {s['seconds']:.2f} | {s['returned_seconds']:.2f} | {s['peak_mib']:.0f} | "
                  f"{s['seconds'] / avg['seconds']:.2f} | "
                  f"{s['peak_mib'] / avg['peak_mib']:.2f} | {s['seconds'] / ref['seconds']:.2f} | "
                  f"{s['peak_mib'] / ref['peak_mib']:.2f} |")
        print(f"\nmodel size on disk: {info['model_bytes'] / 2**20:.0f} MiB; max |streaming average - in-memory average| = {diff:.3g}")
        if args.json:
            Path(args.json).write_text(json.dumps({"size": size, "info": info, "results": results, "summary": summary,
                                                   "max_abs_diff_average_vs_in_memory": diff,
                                                   "threads": args.threads, "torch": torch.__version__}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
