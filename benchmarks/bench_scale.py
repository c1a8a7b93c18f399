"""Fisher collection at real model widths (random weights from the configs) against a plain step.

    python benchmarks/bench_scale.py --model qwen2.5-0.5b --layers 2 --seq-len 512
    python benchmarks/bench_scale.py --model qwen2.5-0.5b --layers 2 --seq-len 2048 --modes group
    python benchmarks/bench_scale.py --model llama-3.2-1b --layers 1 --modes group
    python benchmarks/bench_scale.py --model llama-3-8b --device cuda --dtype bfloat16 --seq-len 2048
    python benchmarks/bench_scale.py --model qwen2.5-0.5b --layers 2 --modes group,trainer,probe
    python benchmarks/bench_scale.py --model llama-3.2-1b --modes merge --no-memory   # merges only
    python benchmarks/bench_scale.py --model tiny --repeats 1 --modes group,param,kfac,trainer,probe,merge  # smoke

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
kfac-oneshot    ``hf_fisher.collect(model, [batch r], estimator="kfac")`` (``--modes`` with kfac);
trainer-plain   ``Trainer.train()`` for ``--trainer-steps`` S optimizer steps (AdamW, learning rate 0
                so every round sees the same weights; batches r, r+1, ... of the round): the
                baseline of the trainer rows; the figure is the mean step time (``on_step_begin`` to
                ``on_step_end``) of the round's S steps. The Trainer and its callbacks are built
                once and run once before the rounds (so the callback's first-batch checks are
                not in the rounds), then ``train()`` again each round;
trainer-free    the same with ``FisherCallback()`` (training mode, group reduction: free, from the
                Trainer's own backward) (``--modes`` with trainer);
trainer-probe   the same with ``FisherCallback("probe", probe_data=[batch 0],
                probe_every_n_steps=S)``: one probe per round, its cost spread over the S steps
                (``--modes`` with probe).

The trainer rows' ratios are to trainer-plain, the others' to plain. A method that raises (a
refusal, e.g. of a dtype, or an error) is reported with its exception instead of figures and the
others go on: nothing is skipped silently. Times are wall clock; the process CPU time is in the
JSON too.

Merge (``--modes`` with merge): the model (base), two fine-tunes (base + 0.01 N(0, 1) per
tensor) and a parameter Fisher artifact of random positive values per fine-tune are saved as
safetensors in ``--workdir`` (default the system temp folder; removed at the end); then, each in a
fresh process, interleaved over ``--merge-repeats`` rounds: ``merge-fisher``
(``merge_with_fisher([A, B], [F_A, F_B], method="fisher")``), ``merge-ties``
(``merge_with_fisher([A, B], method="ties", base_model=base, density=0.2)``), with
``--merge-methods`` also ``task_arithmetic``, ``dare``, ``dare_ties``, ``dare_linear``,
``breadcrumbs`` (each method's defaults, on base), and (unless ``--no-mergekit``)
``mergekit-ties`` (mergekit's ``run_merge`` with the same TIES: weights 1, density 0.2,
``normalize: true``, i.e. the disjoint mean; lazy unpickling, CPU), run by the Python of
benchmarks/.peers-venv (``python benchmarks/_peers_venv.py`` builds it; without it the row says
so). Time until the output is on disk (``os.sync()``), peak RSS above the RSS after every import
(VmHWM after ``clear_refs``), its ratio to the largest tensor x the inputs read for it (4 for
fisher: 2 models and 2 Fishers; 3 for the others: 2 models and the base; issue 23's bound is
<= 2 x largest tensor x inputs), and max |hf_fisher ties - mergekit ties|. Merges always run on
the CPU (they stream files), also with ``--device cuda``. Disk: about 6 x the model's size in its
dtype plus 2 float32 Fishers (the 1B config in float32: ~40 GB; the 8B config does not fit a
64 GB disk: use ``--layers``); checked before anything is written.

``--isolate``: every method in a fresh process of its own instead (the parent builds no model): one
untimed plain warm-up step, the method's set-up (steady: the collector's first batch; one-shot: one
untimed run on batch 0, the process's first-call costs), then ``--repeats`` timed runs on batches
1..R, and the peak RSS over those runs. Not interleaved, but no two methods' state shares a process:
the full-depth 1B param Fisher (model 4.9 GB, float32 accumulators 14.8 GB) cannot sit next to a
second collector or a plain step's gradients. Without it, the parent also drops its model before
the memory children (each builds its own)::

    python benchmarks/bench_scale.py --model llama-3.2-1b --modes param --accumulation-dtype float32 \
        --offload-dir /big/disk --isolate --repeats 2

``--no-atomic-batches``: the group/param collectors (steady and one-shot) are built with
``atomic_batches=False``: each parameter's batch moments are merged into its accumulator as soon
as the backward has produced them, instead of staging every parameter's (4 bytes per value for
B=1 in float32) until the batch is complete. The full-depth 1B param Fisher with its float32
accumulators in memory (no ``--offload-dir``) needs it::

    python benchmarks/bench_scale.py --model llama-3.2-1b --modes param --accumulation-dtype float32 \
        --isolate --no-atomic-batches --repeats 2

``--no-variance``: the group/param collectors keep the mean only (``variance=False``): no ``M2``,
accumulators of 8 bytes per value instead of 12 in float32 (16 in float64); the same Fisher, an
artifact without variances. With it the full-depth 1B param Fisher's float32 accumulators take
9.9 GB instead of 14.8 GB::

    python benchmarks/bench_scale.py --model llama-3.2-1b --modes param --accumulation-dtype float32 \
        --isolate --no-atomic-batches --no-variance --repeats 2

Peak memory. On CPU the high-water mark of the resident set only grows, so each method's peak is
measured in a fresh process (the script re-invokes itself with ``--one METHOD``): the process
builds the model and the batches (steady: and feeds the collector its first batch), resets the
kernel's peak-RSS counter to the current RSS (``echo 5 > /proc/self/clear_refs``), runs the method
once on another batch and reports ``VmHWM``: the whole process's peak (model, batch and all), so
the ratio to the plain step's is the ratio a user sees. (``ru_maxrss`` is only the fallback where
``clear_refs`` is refused: Linux carries the parent's high-water mark over fork + exec, so it
reads high.) On CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, in the same process, absolute.

Printed: a table of times and peaks with their ratios to the baseline, and the machine (CPU
model, cores, RAM, GPU, torch and transformers versions, threads, date, commit); ``--json OUT``
writes the same, the machine included. Unattended on a GPU box::

    python benchmarks/bench_scale.py --model llama-3-8b --device cuda --dtype bfloat16 --seq-len 2048 \
        --modes group,param,kfac,trainer --json scale-8b.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):  # runs from a checkout without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _common
import _peers_venv

PRESETS = {
    # not a real model: hidden 64, vocabulary 512, for smoke runs of the script itself
    "tiny": dict(
        kind="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
        vocab_size=512,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
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


MODES = ("group", "param", "kfac", "trainer", "probe", "merge")


def methods(modes):
    out = ["plain"]
    for m in modes:
        if m == "kfac":
            out += ["kfac-oneshot"]
        elif m in ("group", "param"):
            out += [f"{m}-steady", f"{m}-oneshot"]
    trainer = [f"trainer-{k}" for k, m in (("free", "trainer"), ("probe", "probe")) if m in modes]
    return out + (["trainer-plain"] + trainer if trainer else [])


def baseline_of(method: str) -> str:
    return "trainer-plain" if method.startswith("trainer-") else "plain"


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Runner:
    """Runs one method on one batch; keeps the steady collectors and the Trainers between calls."""

    def __init__(self, model, batches, args):
        self.model = model
        self.batches = batches
        self.first = batches[0]
        self.args = args
        self.collectors = {}
        self.trainers = {}
        #: the collectors' accumulation options (--accumulation-dtype, --offload-dir, --no-atomic-batches, --no-variance)
        self.options = {"accumulation_dtype": getattr(torch, args.accumulation_dtype)}
        if args.offload_dir:
            self.options["offload_dir"] = args.offload_dir
        if args.no_atomic_batches:
            self.options["atomic_batches"] = False
        if args.no_variance:
            self.options["variance"] = False
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-scale-trainer-"))

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _rows(self, r: int):
        """The round's S batches (r, r+1, ... cyclically) as dataset rows: the same for every trainer method."""
        S, n = self.args.trainer_steps, len(self.batches)
        rows = []
        for k in range(S):
            b = self.batches[(r + k) % n]
            rows += [{key: v[i] for key, v in b.items()} for i in range(b["input_ids"].shape[0])]
        return _Rows(rows)

    def _trainer(self, method):
        import logging

        from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

        import hf_fisher

        logging.getLogger("transformers").setLevel(logging.ERROR)
        S = self.args.trainer_steps
        callbacks = []
        if method == "trainer-free":
            callbacks = [hf_fisher.FisherCallback(reduction="group", log_summary=False)]
        elif method == "trainer-probe":
            callbacks = [hf_fisher.FisherCallback("probe", probe_data=[self.first], probe_every_n_steps=S,
                                                  log_summary=False)]
        clock = _common.step_clock()
        targs = TrainingArguments(
            str(self.tmp / method), per_device_train_batch_size=self.args.batch, max_steps=S, learning_rate=0.0,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=self.args.device == "cpu",
            disable_tqdm=True, seed=0, dataloader_pin_memory=False,
        )
        trainer = Trainer(model=self.model, args=targs, train_dataset=self._rows(0),
                          data_collator=default_data_collator, callbacks=callbacks + [clock])
        trainer.remove_callback(PrinterCallback)  # the end-of-train metrics line of every round
        return trainer, clock

    def prepare(self, method):
        from hf_fisher.collection.collector import FisherCollector

        if method.endswith("-steady"):
            c = FisherCollector(self.model, reduction=method.split("-")[0], **self.options)
            c.update(self.first)
            self.collectors[method] = c
        elif method.startswith("trainer-"):
            self.trainers[method] = self._trainer(method)
            self.run(method, None, r=0)  # the callback's first batch (checks) and the Trainer's lazy set-up

    def run(self, method, batch, r: int = 1):
        """Runs ``method``; returns the seconds to report for trainer methods (mean step time), else None."""
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
        elif method.startswith("trainer-"):
            trainer, clock = self.trainers[method]
            trainer.train_dataset = self._rows(r)
            clock.steps.clear()
            try:
                trainer.train()
            finally:
                model.eval()
                model.zero_grad(set_to_none=True)
            return sum(clock.steps) / len(clock.steps)
        else:
            hf_fisher.collect(model, [batch], reduction=method.split("-")[0], progress=False, **self.options)
        return None


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")[:300]


def one(args):
    """--one METHOD: a fresh process measures one method; prints JSON.

    Without ``--rounds``: the peak memory of one run on batch 1. With ``--rounds R`` (``--isolate``):
    one untimed plain warm-up step (as the interleaved rounds have), the method's set-up (a one-shot
    method: one untimed run on batch 0), then R timed runs on batches 1..R; the peak is over the
    R runs (VmHWM reset after the set-up)."""
    model, _ = build_model(args)
    batches = make_batches(args, model.config.vocab_size)
    runner = Runner(model, batches, args)
    method = args.one
    rounds = args.rounds or 1
    reset_ok = False
    times, cpu, reported = [], [], None
    try:
        if args.rounds:
            runner.run("plain", batches[0])  # warm-up, untimed
        runner.prepare(method)
        if args.rounds and method.endswith("-oneshot"):
            # once untimed on batch 0: the process's first-call costs (lazy imports), which the
            # interleaved rounds pay in the steady collector's set-up, not in a one-shot round
            runner.run(method, batches[0], r=0)
        sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            # reset the kernel's peak-RSS counter to the current RSS (model, batches, steady collector):
            # ru_maxrss cannot be used alone, Linux carries the parent's high-water mark over fork+exec
            reset_ok = _common.reset_peak()
        for r in range(1, rounds + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            reported = runner.run(method, batches[r], r=r)
            sync(args.device)
            times.append(reported if reported is not None else time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    except Exception as exc:
        print("RESULT " + json.dumps({"method": method, "error": _error(exc)}))
        return
    finally:
        runner.close()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _common.peak_rss(reset_ok)
    print("RESULT " + json.dumps({"method": method, "peak_bytes": peak, "hwm_reset": reset_ok, "times_s": times, "cpu_s": cpu}))


def memory_in_subprocess(args, method, rounds: int | None = None):
    """Runs ``--one method`` in a fresh process (``rounds``: also R timed runs, see :func:`one`)."""
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
        str(rounds or 1),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--trainer-steps",
        str(args.trainer_steps),
    ]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    cmd += ["--accumulation-dtype", args.accumulation_dtype] + (["--offload-dir", args.offload_dir] if args.offload_dir else [])
    cmd += ["--no-atomic-batches"] if args.no_atomic_batches else []
    cmd += ["--no-variance"] if args.no_variance else []
    if rounds:
        cmd += ["--rounds", str(rounds)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * (1 + (rounds or 0)))
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


def run_merges(args, model) -> dict:
    """The merge rows: fisher and ties (hf_fisher) and mergekit's ties on the same files, each in a
    fresh process, ``--merge-repeats`` interleaved rounds; median time and peak."""
    venv_py = _peers_venv.venv_python(Path(args.peers_venv))
    st = _peers_venv.status(Path(args.peers_venv))
    have_mergekit = venv_py.exists() and st.get("peers", {}).get("mergekit") == "ok"
    variants = [v.strip() for v in args.merge_methods.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("fisher", "ties", *_common.BASE_MERGES)]
    if bad:
        raise SystemExit(f"--merge-methods: unknown {bad}; choose from fisher, ties, {', '.join(_common.BASE_MERGES)}")
    variants += ["mergekit-ties"] if have_mergekit and not args.no_mergekit else []
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # base + 2 fine-tunes in the model's dtype, 2 float32 Fishers, 3 merged outputs: refuse before writing
    n = sum(p.numel() for p in model.parameters())
    need = 6 * n * next(model.parameters()).element_size() + 2 * 4 * n
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if free < need * 1.1:
        msg = (f"not enough disk in {args.workdir or tempfile.gettempdir()}: the merge needs ~{need / 1e9:.1f} GB, "
               f"{free / 1e9:.1f} GB free; pass --workdir on a larger disk or fewer --layers")
        print(f"  merge: {msg}", flush=True)
        return {"inputs": None, "rows": [{"method": "merge", "error": msg}], "ties_vs_mergekit": None}
    work = Path(tempfile.mkdtemp(prefix="bench-scale-merge-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        cpu_model = model.to("cpu") if args.device != "cpu" else model
        info = _common.write_merge_inputs(work, cpu_model)
        (work / "inputs.json").write_text(json.dumps(info))
        print(f"  merge inputs: base + 2 fine-tunes of {info['model_bytes'] / 1e9:.2f} GB and 2 Fishers in {work} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        res = {v: [] for v in variants}
        for r in range(args.merge_repeats):
            for v in variants:
                py = str(venv_py) if v.startswith("mergekit") else sys.executable
                res[v].append(_common.run_merge_child(v, work, args.threads, python=py, timeout=args.timeout))
                x = res[v][-1]
                print(f"  merge round {r + 1}: {v} " + (f"{x['seconds']:.2f}s peak +{x['peak_above_baseline_bytes'] / 1e9:.2f} GB"
                                                      if "error" not in x else x["error"]), flush=True)
        agree = None
        if have_mergekit and (work / "out-ties").is_dir() and (work / "out-mergekit-ties").is_dir():
            agree = _common.compare_folders(work / "out-ties", work / "out-mergekit-ties")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for v in variants:
        ok = [x for x in res[v] if "error" not in x]
        errors = [x["error"] for x in res[v] if "error" in x]
        row = {"method": "merge-" + v if not v.startswith("mergekit") else v, "runs": res[v]}
        if ok:
            row["time_s"] = statistics.median(x["seconds"] for x in ok)
            row["peak_above_baseline_bytes"] = statistics.median(x["peak_above_baseline_bytes"] for x in ok)
            row["inputs"] = 4 if v == "fisher" else 3  # 2 models + 2 Fishers; 2 models + the base
            row["peak_per_largest_tensor_x_inputs"] = row["peak_above_baseline_bytes"] / (row["inputs"] * info["largest_tensor_bytes"])
        if errors:
            row["error"] = errors[0]
        rows.append(row)
    if not have_mergekit and not args.no_mergekit:
        why = ("no peers venv at " + str(args.peers_venv) if not venv_py.exists()
               else f"mergekit {st.get('peers', {}).get('mergekit', 'not recorded')}")
        rows.append({"method": "mergekit-ties",
                     "error": f"mergekit not installed ({why}): python benchmarks/_peers_venv.py builds it"})
    base = next((r for r in rows if r["method"] == "mergekit-ties" and "time_s" in r), None)
    for row in rows:
        if base and "time_s" in row:
            row["time_ratio"] = row["time_s"] / base["time_s"]
            row["mem_ratio"] = row["peak_above_baseline_bytes"] / max(base["peak_above_baseline_bytes"], 1)
    return {"inputs": info, "rows": rows, "ties_vs_mergekit": agree}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="keep only N decoder layers (real widths and vocabulary)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="group,param", help="comma list of " + ", ".join(MODES))
    p.add_argument("--trainer-steps", type=int, default=2, help="optimizer steps per trainer round (S)")
    p.add_argument("--merge-repeats", type=int, default=1, help="rounds of the merge rows (median)")
    p.add_argument("--merge-methods", default="fisher,ties",
                   help="hf_fisher merges to run: fisher, ties and any of " + ", ".join(_common.BASE_MERGES))
    p.add_argument("--no-mergekit", action="store_true", help="leave out mergekit's ties (its peak: ~4 x largest tensor x 3)")
    p.add_argument("--workdir", default=None, help="where the merge's model files go (removed at the end)")
    p.add_argument("--peers-venv", default=str(_peers_venv.DEFAULT_VENV), help="the venv with mergekit")
    p.add_argument("--accumulation-dtype", choices=["float64", "float32"], default="float64",
                   help="the group/param collectors' accumulators (float32: compensated mean, 12 bytes per value)")
    p.add_argument("--offload-dir", default=None, help="keep the group/param accumulators in memory-mapped files here")
    p.add_argument("--no-atomic-batches", action="store_true",
                   help="the group/param collectors merge each parameter's batch moments as soon as they are complete "
                        "(atomic_batches=False: no staged copy of the model's moments at the end of the backward)")
    p.add_argument("--no-variance", action="store_true",
                   help="the group/param collectors keep the mean only (variance=False: no M2, 8 bytes per value)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each subprocess")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--isolate", action="store_true",
                   help="each method in a fresh process of its own, timed there (R rounds) and its peak taken there: "
                        "no two methods' state in one process (the full-depth param runs); not interleaved")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.one:
        return one(args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    names = methods(modes)
    if args.isolate and args.device == "cpu" and "merge" not in modes:
        # the parent only names the model: its weights would sit next to every child's
        model, attn = build_model(argparse.Namespace(**{**vars(args), "device": "meta"}))
    else:
        model, attn = build_model(args)
    n_params = sum(t.numel() for t in model.parameters())
    n_layers = model.config.num_hidden_layers
    print(
        f"{args.model} layers={n_layers} params={n_params / 1e6:.1f}M attn={attn} "
        f"B={args.batch} T={args.seq_len} {args.dtype} {args.device}",
        flush=True,
    )
    errors: dict[str, str] = {}
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    mem = {}
    if args.isolate:
        times, cpu, mem = isolated(args, names, errors)
    else:
        interleaved_rounds(args, model, names, errors, times, cpu)
    med = {n: statistics.median(v) for n, v in times.items() if v}

    merges = run_merges(args, model) if "merge" in modes else None

    if not args.no_memory and not args.isolate:
        # the children build their own model: this one would sit next to theirs
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        for name in names:
            if name in errors:
                continue
            mem[name] = memory_in_subprocess(args, name)
            print(f"  memory {name}: {mem[name]}", flush=True)
    _report(args, names, errors, times, cpu, med, mem, merges, n_params, n_layers, attn)
    return None


def isolated(args, names, errors):
    """``--isolate``: every method in a fresh process (:func:`one` with ``--rounds``): times and peak."""
    times, cpu, mem = {n: [] for n in names}, {n: [] for n in names}, {}
    for name in names:
        res = memory_in_subprocess(args, name, rounds=args.repeats)
        print(f"  {name}: {res}", flush=True)
        if "error" in res:
            errors[name] = res["error"] + (f" ({' / '.join(res['tail'])})" if res.get("tail") else "")
            continue
        times[name], cpu[name] = res["times_s"], res["cpu_s"]
        if not args.no_memory:
            mem[name] = res
    return times, cpu, mem


def interleaved_rounds(args, model, names, errors, times, cpu):
    """The methods timed round by round in this process (fills ``times``/``cpu``, ``errors``)."""
    batches = make_batches(args, model.config.vocab_size)
    runner = Runner(model, batches, args)
    runner.run("plain", batches[0])  # warm-up
    for name in names:
        t0 = time.perf_counter()
        try:
            runner.prepare(name)
        except Exception as exc:  # e.g. a dtype the method refuses: reported, the others go on
            errors[name] = _error(exc)
            print(f"  {name}: {errors[name]}", flush=True)
            continue
        if name.endswith("-steady") or name.startswith("trainer-"):
            print(f"  {name}: first batch / first train() {time.perf_counter() - t0:.1f}s", flush=True)
    live = [n for n in names if n not in errors]
    for r in range(1, args.repeats + 1):
        for name in list(live):
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                reported = runner.run(name, batches[r], r=r)
            except Exception as exc:
                errors[name] = _error(exc)
                live.remove(name)
                print(f"  {name}: {errors[name]}", flush=True)
                continue
            sync(args.device)
            times[name].append(reported if reported is not None else time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"  round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in live), flush=True)
    runner.close()


def _report(args, names, errors, times, cpu, med, mem, merges, n_params, n_layers, attn):
    info = _common.machine_info(args.device)
    info["threads"] = args.threads
    rows = []
    for n in names:
        base = baseline_of(n)
        pk = mem.get(n, {}).get("peak_bytes")
        base_m = mem.get(base, {}).get("peak_bytes")
        rows.append(
            {
                "method": n,
                "baseline": base,
                "time_s": med.get(n),
                "times_s": times[n],
                "cpu_s": cpu[n],
                "time_ratio": med[n] / med[base] if n in med and base in med else None,
                "peak_bytes": pk,
                "mem_ratio": (pk / base_m) if pk and base_m else None,
                "mem_error": mem.get(n, {}).get("error"),
                "error": errors.get(n),
            }
        )
    print()
    print(_common.machine_line(info))
    print(
        f"{args.model} ({n_layers} layers, "
        f"{n_params / 1e6:.1f}M params), B={args.batch}, T={args.seq_len}, {args.dtype}, {args.device}, "
        f"{args.accumulation_dtype} accumulators" + (" (offloaded)" if args.offload_dir else "")
        + (", streaming commit (--no-atomic-batches)" if args.no_atomic_batches else "")
        + (", mean only (--no-variance)" if args.no_variance else "") + ", "
        f"median of {args.repeats}" + (" (each method in a fresh process of its own)" if args.isolate else "")
        + (f"; trainer rows: mean step of {args.trainer_steps}" if any(
            n.startswith("trainer-") for n in names) else "")
    )
    print("| method | time (s) | x baseline | peak memory (GB) | x baseline |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row["error"]:
            print(f"| {row['method']} | refused / failed: {row['error']} | | | |")
            continue
        pk = f"{row['peak_bytes'] / 1e9:.2f}" if row["peak_bytes"] else (row["mem_error"] or "-")
        mr = f"{row['mem_ratio']:.2f}" if row["mem_ratio"] else "-"
        tr = f"{row['time_ratio']:.2f}" + (" (of trainer-plain)" if row["baseline"] != "plain" else "") if row[
            "time_ratio"] else "-"
        print(f"| {row['method']} | {row['time_s']:.2f} | {tr} | {pk} | {mr} |")
    if merges and merges["inputs"] is None:
        print(f"\nmerge: {merges['rows'][0]['error']}")
    elif merges:
        inp = merges["inputs"]
        print()
        print(f"Two-model merge from safetensors ({inp['model_bytes'] / 1e9:.2f} GB per model, {inp['dtype']}, "
              f"largest tensor {inp['largest_tensor_bytes'] / 1e6:.0f} MB), CPU, fresh process each, "
              f"median of {args.merge_repeats}")
        print("| merge | time (s) | x mergekit ties | peak above baseline (GB) | x mergekit ties | inputs | "
              "/ (largest tensor x inputs) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in merges["rows"]:
            if "time_s" not in row:
                print(f"| {row['method']} | {row.get('error')} | | | | | |")
                continue
            tr = f"{row['time_ratio']:.2f}" if "time_ratio" in row else "-"
            mr = f"{row['mem_ratio']:.2f}" if "mem_ratio" in row else "-"
            print(f"| {row['method']} | {row['time_s']:.2f} | {tr} | {row['peak_above_baseline_bytes'] / 1e9:.3f} | {mr} "
                  f"| {row.get('inputs', 3)} | {row['peak_per_largest_tensor_x_inputs']:.2f} |")
        if merges["ties_vs_mergekit"]:
            a = merges["ties_vs_mergekit"]
            print(f"hf_fisher ties vs mergekit ties: {a['tensors']} tensors, max |diff| {a['max_abs']:.3g}, "
                  f"max relative {a['max_rel']:.3g} (of the tensor's max), entries differing by > 1e-5 of it: "
                  f"{a['entries_differing']} of {a['entries']}" + (f", only in one: {a['only_one_side']}" if a["only_one_side"] else ""))
    if args.json:
        out = {
            "config": {k: v for k, v in vars(args).items() if k != "one"},
            "params": n_params,
            "attn_implementation": attn,
            "machine": info,
            "results": rows,
            "merge": merges,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return None


if __name__ == "__main__":
    main()
