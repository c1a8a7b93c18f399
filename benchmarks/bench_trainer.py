"""Trainer step time and peak memory with FisherCallback against without, in one run.

    python benchmarks/bench_trainer.py            # LLaMA of ~7M parameters, B=16, T=64, CPU
    python benchmarks/bench_trainer.py --quick    # a tiny model, seconds
    python benchmarks/bench_trainer.py --wide     # twice the width (~19M parameters)

(a) ``Trainer.train()`` for ``--steps`` optimizer steps without a callback: the baseline;
(b) the same with ``FisherCallback()`` (mode "training", group reduction): free, from the
    Trainer's own backward passes;
(c) the same with ``FisherCallback("probe", probe_data=..., probe_every_n_steps=--probe-every)``;
    reported as the cost of one probe relative to a plain forward + backward over the probe set.

Times: the median optimizer-step time over every step of ``--repeats`` runs (a step timed from
``on_step_begin`` to ``on_step_end``: forward, backward, the callback's work, optimizer), and the
median whole ``train()`` time, after one warm-up run per method, the methods interleaved run by
run; each run builds a fresh model (seeded), so the runs are identical. The per-step median is
the figure the target applies to: it is robust to the machine's load changing within a run.
Memory: extra peak RSS of one ``train()`` above the loaded model, in a fresh process per
measurement (``/proc/self/clear_refs`` + VmHWM, as
bench_engine.py). Targets (issue 5): (b) <= 1.2x the time and <= 1.1x the memory of (a).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

FULL = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, vocab=8000, B=16, T=64)
#: the same depth and vocabulary, twice the width: the Gram products of the group reduction grow
#: like T²·width while the model's products grow like T·width², so the overhead shrinks
WIDE = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1376, vocab=8000, B=16, T=64)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, vocab=512, B=8, T=32)


def build_model(spec):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.LlamaForCausalLM(cfg).float()


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def dataset(spec, n):
    g = torch.Generator().manual_seed(1)
    return Rows(torch.randint(3, spec["vocab"], (n, spec["T"]), generator=g))


def run(spec, method: str, steps: int, probe_every: int):
    """``(train() seconds, [seconds of each optimizer step])``."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    import hf_fisher

    model = build_model(spec)
    data = dataset(spec, spec["B"] * steps)
    callbacks = []
    if method == "training":
        callbacks = [hf_fisher.FisherCallback(reduction="group", log_summary=False)]
    elif method == "probe":
        probe = [default_data_collator([data[i] for i in range(k, k + spec["B"])]) for k in (0, spec["B"])]
        callbacks = [hf_fisher.FisherCallback("probe", probe_data=probe, probe_every_n_steps=probe_every, log_summary=False)]
    import gc

    gc.collect()  # the previous run's Trainer, model and hooks (reference cycles)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, per_device_train_batch_size=spec["B"], max_steps=steps, learning_rate=1e-4, report_to=[],
            save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        )
        clock = _common.step_clock()
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=callbacks + [clock])
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, clock.steps


def plain_fwd_bwd(spec, batches: int) -> float:
    model = build_model(spec)
    data = dataset(spec, spec["B"] * batches)
    from transformers import default_data_collator

    t0 = time.perf_counter()
    for k in range(batches):
        batch = default_data_collator([data[i] for i in range(k * spec["B"], (k + 1) * spec["B"])])
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def memory_here(spec, method, steps) -> float:
    run(spec, method, 1, 1)  # imports and lazy set-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    run(spec, method, steps, 1)
    return (_status_kb("VmHWM") - before) / 1024


def memory(spec, method, steps) -> float:
    cmd = [sys.executable, __file__, "--_memory", json.dumps({"spec": spec, "method": method, "steps": steps})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke run in seconds")
    p.add_argument("--wide", action="store_true", help="hidden 512 instead of 256 (~19M parameters)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3, quick 1)")
    p.add_argument("--probe-every", type=int, default=4, help="probe mode: probe every N steps (default 4)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._memory:
        job = json.loads(a._memory)
        print(memory_here(job["spec"], job["method"], job["steps"]))
        return 0
    spec = QUICK if a.quick else WIDE if a.wide else FULL
    steps = a.steps or (3 if a.quick else 8)
    repeats = a.repeats or (1 if a.quick else 3)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    methods = ("plain", "training", "probe")
    for method in methods:
        run(spec, method, steps, a.probe_every)  # warm-up
    # interleaved (plain, training, probe, plain, ...): a change of the machine's load during the
    # run hits every method alike instead of one block of repeats
    samples = {m: [] for m in methods}
    step_samples = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            total, per_step = run(spec, method, steps, a.probe_every)
            samples[method].append(total)
            step_samples[method] += per_step
    times = {m: statistics.median(v) for m, v in samples.items()}
    step = {m: statistics.median(v) for m, v in step_samples.items()}
    probes = steps // a.probe_every + (0 if steps % a.probe_every == 0 else 1)
    probe_set = plain_fwd_bwd(spec, 2)
    per_probe = (times["probe"] - times["plain"]) / max(1, probes)
    print(f"LLaMA {sum(p.numel() for p in build_model(spec).parameters()):,} parameters, B={spec['B']}, T={spec['T']}, "
          f"{steps} steps, torch {torch.__version__} ({torch.get_num_threads()} threads), median of {repeats}")
    print(f"(a) Trainer, no callback        step {1000 * step['plain']:.1f} ms  1.00   train() {times['plain']:.3f} s  1.00")
    print(f"(b) + FisherCallback training   step {1000 * step['training']:.1f} ms  {step['training'] / step['plain']:.2f}   "
          f"train() {times['training']:.3f} s  {times['training'] / times['plain']:.2f}")
    print(f"(c) + FisherCallback probe      {times['probe']:.3f} s   {probes} probes of 2 batches: "
          f"{per_probe:.3f} s each = {per_probe / probe_set:.2f}x a plain fwd+bwd over the probe set ({probe_set:.3f} s)")
    checks = [("training mode <= 1.2x the step time", step["training"] / step["plain"] <= 1.2)]
    if not a.no_memory:
        m_plain, m_train = memory(spec, "plain", steps), memory(spec, "training", steps)
        print(f"peak memory above the loaded model: (a) {m_plain:.1f} MiB, (b) {m_train:.1f} MiB, ratio {m_train / m_plain:.2f}")
        checks.append(("training mode <= 1.1x the memory", m_train / m_plain <= 1.1))
    if not a.quick:
        for text, ok in checks:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
