"""Quality of the merge methods on several task pairs made offline (issues 14 and 26), measured in one run.

    python benchmarks/bench_merge_quality.py                       # every pair, reference settings (~15 min a pair on one busy core)
    python benchmarks/bench_merge_quality.py --pairs llama-gqa gpt2
    python benchmarks/bench_merge_quality.py --quick               # smoke run: small pairs, few samples, small grids (minutes)
    python benchmarks/bench_merge_quality.py --fisher-samples 128 --json out.json
    python benchmarks/bench_merge_quality.py --extended-grid --only ties dare   # + TIES density / DARE drop_p
    python benchmarks/bench_merge_quality.py --no-layers           # without the per-layer rows
    python benchmarks/bench_merge_quality.py --report-only benchmarks/.cache/bench_merge_quality.json

The task pairs (``benchmarks/merge_tasks.py``, built and cached on first use; ``--pairs``, default
all of ``merge_tasks.PAIRS``): per pair a tiny base model pre-trained on a mix of two domains of
real text read from this machine, and two task models fine-tuned from it, one per domain.
Shapes differ: LLaMA with grouped-query attention (``llama-gqa``: Python source vs licence prose),
LLaMA with multi-head attention (``llama-mha``: man pages vs package descriptions), GPT-2 with
its fused ``c_attn`` and tied embeddings (``gpt2``: C headers vs Debian changelogs). Each domain's
files are split into train / validation / test by a hash of their path (disjoint files). For
each pair this script

1. collects, for each task model on its own train split (``--fisher-samples`` sequences,
   batches of ``--batch-size``):
   - the exact per-sample (empirical) Fisher, ``hf_fisher.collect(..., reduction="param")``;
   - the "Fisher" of the published merge benchmarks (fusion_bench, MergeBench): the mean over
     the same batches of the square of the *batch* gradient, ``mean_b (∇ L_b)²`` with ``L_b``
     the batch-mean loss, packed as a ``Fisher`` with reduction "param";
   - KFAC factors of the same sequences; RegMean's Grams are collected by the library from the
     same train batches (``data=``);
2. merges the two task models with every method of ``merge_with_fisher`` from their
   ``save_pretrained`` folders (the streaming reader) in three configurations:
   - ``default``: the library's default hyper-parameters (uniform weights), no validation;
   - ``tuned``: ``validation=[val_a, val_b]``: the library's grid (the model weights λ, and what
     the method tunes: the scaling of task arithmetic / TIES / DARE, the Fisher floor, RegMean's
     ``alpha``, KFAC's damping), every method including the data-aware ones; the weights searched
     on half of each task's validation batches and kept, shrunk toward uniform, only as far as the
     other half confirms (``weight_shrink``), the options then chosen on all of it;
   - ``tuned+layers``: the same plus the per-layer refinement (``validation_grid={"layer_lean":
     ...}``: per-layer model weights, AdaMerging-style, chosen by a coordinate search on half of
     each task's validation batches and kept, shrunk toward the grid's choice, only as far as the
     other half confirms);
3. evaluates every merged model on both held-out **test** splits (mean token loss, nats, and
   perplexity) and on the validation splits; the test split is never used to choose anything.

It prints one markdown table per pair (plus the base and the two task models as reference rows),
a summary table over the pairs, and the checks of issue 26 per pair: the best validation-tuned
method (picked by its validation loss, not its test loss) against plain averaging, tuned TIES and
DARE, and untuned RegMean; everything goes to a JSON file.

Validation criterion (the library's): the mean over the two domains of the mean batch loss on the
validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_tasks  # benchmarks/merge_tasks.py, beside this script

DOMAINS = merge_tasks.DOMAINS  # the llama-gqa pair's (each pair has its own: pair.domains)
BATCH_GRAD = "fisher (squared batch gradient, as fusion_bench)"
# rows of the table: (label, library method, which Fisher)
ROWS = [
    ("fisher", "fisher", "per_sample"),
    (BATCH_GRAD, "fisher", "batch_grad"),
    ("fisher_task_vector", "fisher_task_vector", "per_sample"),
    ("fisher_regmean", "fisher_regmean", "per_sample"),
    ("kfac", "kfac", "kfac"),
    ("regmean", "regmean", None),
    ("average", "average", None),
    ("task_arithmetic", "task_arithmetic", None),
    ("ties", "ties", None),
    ("dare", "dare", None),
]
FISHER_LABELS = ("fisher", BATCH_GRAD, "fisher_task_vector", "fisher_regmean", "kfac")
BASELINE_LABELS = ("average", "task_arithmetic", "ties", "dare")
DATA_AWARE = ("regmean", "fisher_regmean", "kfac")
LAYER_LEAN = (0.25, 0.5)  # the per-layer refinement's leans (validation_grid["layer_lean"])
# --quick: a small grid (the library's DEFAULT_GRID otherwise)
QUICK_GRID = {"weight_lean": (0.0, 0.5), "scaling": (0.5, 1.0), "fisher_floor": (1e-6, 1e-4), "alpha": (0.5, 0.9),
              "kfac_damping": (1e-3, 1e-1, 10.0)}
# --extended-grid: the hyper-parameter the library's validation grid leaves fixed, searched around it
EXTENDED = {"ties": ("density", (0.1, 0.2, 0.5, 0.8, 1.0)), "dare": ("drop_p", (0.1, 0.3, 0.5, 0.7, 0.9))}


# ------------------------------------------------------------------------------------ Fishers
def batch_grad_fisher(model, batches, like, task: str):
    """``mean_b (∇ L_b)²`` over ``batches`` (``L_b`` = the batch-mean loss), as a param-level
    ``Fisher`` (metadata copied from ``like``, the per-sample Fisher, with another estimator name)."""
    from hf_fisher.artifacts.fisher import Counts, Fisher

    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n in like.param_shapes}
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    model.eval()
    n_samples = n_tokens = 0
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n, p in params.items():
            acc[n].add_(p.grad.detach().double().square())
        n_samples += len(b["input_ids"])
        n_tokens += int((b["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    mean = {n: (a / len(batches)).to(torch.float32) for n, a in acc.items()}
    meta = dataclasses.replace(
        like.metadata, task=task, estimator="squared_batch_gradient",
        extra={"definition": "mean over batches of the squared gradient of the batch-mean loss",
               "batches": len(batches), "batch_size": len(batches[0]["input_ids"])},
    )
    return Fisher(mean, None, reduction="param", groups=None,
                  param_shapes={n: tuple(params[n].shape) for n in mean},
                  counts=Counts(samples=n_samples, tokens=n_tokens), metadata=meta)


# ---------------------------------------------------------------------------------- evaluation
def _row(label: str, config: str, losses: dict[str, float], domains, **extra) -> dict:
    vals = [losses[d] for d in domains]
    return {"method": label, "config": config, "test_loss": losses, "mean_loss": sum(vals) / len(vals),
            "test_ppl": {d: math.exp(losses[d]) for d in domains}, **extra}


def _fmt_hp(hp: dict | None) -> str:
    if not hp:
        return ""
    parts = []
    for k, v in hp.items():
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        elif isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, dict):
            v = "{" + ", ".join(f"{k2.split('.')[-1]}: [" + ", ".join(f"{x:.3g}" for x in w) + "]"
                                for k2, w in v.items()) + "}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------- merging
def library_merge(mw, pair, method, fishers, data, validation, grid=None, **extra):
    """One call of ``merge_with_fisher`` from the saved folders; returns (model, chosen settings,
    the recipe's validation record)."""
    kw = dict(method=method, progress=False, **extra)
    if method in ("fisher", "fisher_task_vector", "fisher_regmean", "kfac"):
        kw["fishers"] = fishers
    if method in ("fisher_task_vector", "task_arithmetic", "ties", "dare"):
        kw["base_model"] = str(pair.path("base"))
    if method in ("regmean", "fisher_regmean"):
        kw["data"] = data
    if validation is not None:
        kw["validation"] = validation
        kw["validation_grid"] = grid
    with tempfile_dir() as out:
        folder = mw.merge_with_fisher([str(pair.path(d)) for d in pair.domains], output_dir=out / "merged", **kw)
        import yaml

        recipe = yaml.safe_load((Path(folder) / mw.RECIPE_NAME).read_text())
        model = merge_tasks._model_class(pair.spec).from_pretrained(str(folder), dtype=torch.float32).eval()
    hp = dict(recipe["parameters"])
    weights = [m["parameters"]["weight"] for m in recipe["models"]]
    if all(isinstance(w, list) for w in weights):  # per-layer weights: mergekit's filter list, the global weight last
        hp["weights"] = [w[-1]["value"] for w in weights]
    else:
        hp["weights"] = weights
    val = recipe["hf_fisher"].get("validation")
    if val and val.get("weights_holdout"):  # the weights searched on one half, shrunk as far as the other confirms
        hp["weight_shrink"] = val["weights_holdout"]["chosen_shrink"]
        hp["searched_weights"] = val["weights_holdout"]["searched"]["weights"]
    if val and val["chosen"].get("layer_weights"):
        hp["layer_weights"] = val["chosen"]["layer_weights"]
    for k in ("no_fisher_rule", "seed", "normalize_fishers", "kfac_damping_mode"):
        hp.pop(k, None)
    if hp.get("dare_then") == "task_arithmetic":
        hp.pop("dare_then")
    return model, hp, val


class tempfile_dir:
    def __enter__(self) -> Path:
        import tempfile

        self._d = tempfile.TemporaryDirectory(prefix="bench-merge-")
        return Path(self._d.name)

    def __exit__(self, *exc) -> None:
        self._d.cleanup()


# ------------------------------------------------------------------------------------------ run
def run_pair(name: str, args, grid: dict) -> dict:
    import hf_fisher
    from hf_fisher.consumers.merge import api as mw

    t_start = time.perf_counter()
    pair = merge_tasks.load_task_pair(threads=args.threads, pair=name, quick=args.quick)
    domains = pair.domains
    base = pair.load("base")
    models = [pair.load(d) for d in domains]
    print(f"\n=== {name}: {pair.root} ({pair.spec.arch}, {pair.meta['parameters']:,} parameters, seq len "
          f"{merge_tasks.SEQ_LEN}, domains {', '.join(domains)}); {args.threads} threads", flush=True)

    # ---- Fishers, validation batches (the Grams: the library, from the same train batches)
    train = [pair.batches(d, "train", args.batch_size, args.fisher_samples) for d in domains]
    validation = [pair.batches(d, "validation", args.batch_size, args.validation_samples) for d in domains]
    timing = {}
    needed = {which for label, _, which in ROWS if not args.only or label in args.only}  # what the rows run use
    per_sample = batch_grad = kfac = None
    if needed & {"per_sample", "batch_grad"}:
        t = time.perf_counter()
        per_sample = [hf_fisher.collect(m, b, reduction="param", task=d, progress=False)
                      for m, b, d in zip(models, train, domains)]
        timing["per_sample_fisher_s"] = time.perf_counter() - t
    if "batch_grad" in needed:
        t = time.perf_counter()
        batch_grad = [batch_grad_fisher(m, b, f, d) for m, b, f, d in zip(models, train, per_sample, domains)]
        timing["batch_grad_fisher_s"] = time.perf_counter() - t
    if "kfac" in needed:
        t = time.perf_counter()
        kfac = [hf_fisher.collect(m, b, estimator="kfac", task=d, progress=False) for m, b, d in zip(models, train, domains)]
        timing["kfac_s"] = time.perf_counter() - t
    print(f"Fishers of {args.fisher_samples} train sequences per task: per-sample {timing.get('per_sample_fisher_s', 0):.1f} s, "
          f"squared batch gradient {timing.get('batch_grad_fisher_s', 0):.1f} s, KFAC {timing.get('kfac_s', 0):.1f} s")

    def ref_row(label, model):
        return _row(label, "reference", pair.evaluate(model, "test"), domains,
                    validation_loss=mw.validation_loss(model, validation))

    rows = [ref_row("base", base)] + [ref_row(f"{d} model", m) for d, m in zip(domains, models)]
    configs = [("default", None), ("tuned", grid)]
    if not args.no_layers:
        configs.append(("tuned+layers", {**grid, "layer_lean": LAYER_LEAN}))
    for label, method, which in ROWS:
        if args.only and label not in args.only:
            continue
        fishers = {"per_sample": per_sample, "batch_grad": batch_grad, "kfac": kfac, None: None}[which]
        for config, g in configs:
            t = time.perf_counter()
            model, hp, val = library_merge(mw, pair, method, fishers, train, validation if g else None, g)
            secs = time.perf_counter() - t
            extra = {"hyper": hp, "merge_s": secs, "validation_loss": mw.validation_loss(model, validation)}
            if val:
                extra["grid_points"] = val["points"]
            rows.append(_row(label, config, pair.evaluate(model, "test"), domains, **extra))
            r = rows[-1]
            points = f", {val['points']} points" if val else ""
            print(f"{label:50s} {config:12s} test {r['mean_loss']:.4f}  val {r['validation_loss']:.4f}  ({secs:.1f} s"
                  f"{points})  {_fmt_hp(hp)}", flush=True)
        if args.extended_grid and method in EXTENDED:
            # the library's grid leaves TIES' density and DARE's drop probability at their defaults:
            # search them too (one validation-tuned merge per value; the lowest validation loss wins)
            key, values = EXTENDED[method]
            t = time.perf_counter()
            best = None
            points = 0
            for v in values:
                m_, hp_, val_ = library_merge(mw, pair, method, fishers, train, validation, grid, **{key: v})
                points += val_["points"]
                if best is None or val_["chosen"]["loss"] < best[2]:
                    best = (m_, hp_, val_["chosen"]["loss"])
            secs = time.perf_counter() - t
            rows.append(_row(label, "tuned+", pair.evaluate(best[0], "test"), domains, hyper=best[1], merge_s=secs,
                             validation_loss=best[2], grid_points=points))
            print(f"{label:50s} {'tuned+':12s} test {rows[-1]['mean_loss']:.4f}  val {best[2]:.4f}  ({secs:.1f} s, "
                  f"{points} points)  {_fmt_hp(best[1])}", flush=True)
    return {"pair": name, "domains": list(domains), "rows": rows, "timing_s": timing,
            "total_s": time.perf_counter() - t_start,
            "task_pair": {k: pair.meta.get(k) for k in ("version", "arch", "parameters", "model", "losses", "quick")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["all"], help=f"task pairs: {list(merge_tasks.PAIRS)} or 'all'")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: the small pairs, 64 train / 64 validation sequences, a small grid")
    ap.add_argument("--fisher-samples", type=int, default=None, help="train sequences per task for Fishers / Grams (512)")
    ap.add_argument("--validation-samples", type=int, default=None, help="validation sequences per task (all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--json", default=None, help="output JSON (default benchmarks/.cache/bench_merge_quality[-quick].json)")
    ap.add_argument("--only", nargs="*", help="run only these rows (labels of the table)")
    ap.add_argument("--no-layers", action="store_true", help="leave out the per-layer ('tuned+layers') rows")
    ap.add_argument("--extended-grid", action="store_true",
                    help="also tune TIES' density and DARE's drop probability on validation (rows 'tuned+')")
    ap.add_argument("--report-only", metavar="JSON", help="print the tables and checks of a saved run, run nothing")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        results = saved.get("pairs") or {"llama-gqa": {"rows": saved["rows"], "domains": list(DOMAINS)}}
        print_all(results, saved["fisher_samples"])
        return
    if args.fisher_samples is None:
        args.fisher_samples = 64 if args.quick else 512
    if args.validation_samples is None and args.quick:
        args.validation_samples = 64
    if args.json is None:
        args.json = str(merge_tasks.CACHE.parent / f"bench_merge_quality{'-quick' if args.quick else ''}.json")
    names = merge_tasks.parse_pairs(args.pairs)
    torch.set_num_threads(args.threads)
    logging.getLogger("hf_fisher").setLevel(logging.ERROR)
    from hf_fisher.consumers.merge.api import DEFAULT_GRID

    grid = {k: v for k, v in (QUICK_GRID if args.quick else DEFAULT_GRID).items() if k != "layer_lean"}
    t_start = time.perf_counter()
    results = {name: run_pair(name, args, grid) for name in names}
    checks = print_all(results, args.fisher_samples)
    out = {"pairs": results, "checks": checks, "fisher_samples": args.fisher_samples,
           "validation_samples": args.validation_samples, "batch_size": args.batch_size, "threads": args.threads,
           "quick": args.quick, "grid": {k: list(v) for k, v in grid.items()}, "layer_lean": list(LAYER_LEAN),
           "total_s": time.perf_counter() - t_start, "torch": torch.__version__}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwritten {args.json} (total {out['total_s']:.0f} s)")


# ----------------------------------------------------------------------------------------- report
def print_table(name: str, rows: list[dict], domains) -> None:
    a, b = domains
    print(f"\n#### {name}: test loss (nats/token) and perplexity; val = mean validation loss (what tuning sees)\n")
    print(f"| method | config | {a} loss | {b} loss | mean loss | val | {a} ppl | {b} ppl | hyper-parameters |")
    print("| --- " * 9 + "|")
    for r in rows:
        l, p = r["test_loss"], r["test_ppl"]
        v = r.get("validation_loss")
        print(f"| {r['method']} | {r['config']} | {l[a]:.4f} | {l[b]:.4f} | {r['mean_loss']:.4f} | "
              f"{'' if v is None else f'{v:.4f}'} | {p[a]:.2f} | {p[b]:.2f} | {_fmt_hp(r.get('hyper'))} |")


def pair_checks(rows: list[dict]) -> list[dict]:
    """Issue 26's merge target on one pair: the best validation-tuned method (picked by its
    validation loss among every tuned row, never by test loss) beats plain averaging, tuned TIES,
    tuned DARE and untuned RegMean on the mean test loss; and the best Fisher-based row (picked on
    validation) against each data-free baseline."""
    merged = [r for r in rows if r["config"] != "reference"]

    def get(label, config):
        return next((r for r in merged if r["method"] == label and r["config"] == config), None)

    def best_on_validation(rs):
        rs = [r for r in rs if r.get("validation_loss") is not None]
        return min(rs, key=lambda r: r["validation_loss"]) if rs else None

    checks = []
    tuned = best_on_validation([r for r in merged if r["config"].startswith("tuned")])
    if tuned is not None:
        for label, config in (("average", "default"), ("ties", "tuned"), ("dare", "tuned"), ("regmean", "default"),
                              ("fisher_regmean", "default")):
            other = get(label, config)
            if other is not None:
                checks.append({"check": f"best validation-tuned beats {label} ({config})",
                               "met": tuned["mean_loss"] < other["mean_loss"],
                               "mine": [tuned["method"], tuned["config"], tuned["mean_loss"]],
                               "other": [other["method"], other["config"], other["mean_loss"]]})
    for method in DATA_AWARE:
        d, t = get(method, "default"), best_on_validation([r for r in merged if r["method"] == method and r["config"] != "default"])
        if d is not None and t is not None:
            checks.append({"check": f"{method} tuned on validation beats {method} untuned",
                           "met": t["mean_loss"] < d["mean_loss"],
                           "mine": [t["method"], t["config"], t["mean_loss"]],
                           "other": [d["method"], d["config"], d["mean_loss"]]})
    return checks


def print_all(results: dict, fisher_samples) -> dict:
    checks = {}
    for name, res in results.items():
        print_table(name, res["rows"], res["domains"])
        checks[name] = pair_checks(res["rows"])
        print(f"\nChecks on {name} (mean test loss; rows picked on validation, not on test):")
        for c in checks[name]:
            print(f"  [{'met' if c['met'] else 'MISSED'}] {c['check']}: {c['mine'][0]} ({c['mine'][1]}) "
                  f"{c['mine'][2]:.4f} vs {c['other'][0]} ({c['other'][1]}) {c['other'][2]:.4f}")
    names = list(results)
    keys = []
    for res in results.values():
        for r in res["rows"]:
            if (r["method"], r["config"]) not in keys and r["config"] != "reference":
                keys.append((r["method"], r["config"]))
    print(f"\n#### Summary: mean test loss per pair ({fisher_samples} train sequences per task for Fishers and Grams)\n")
    print("| method | config | " + " | ".join(names) + " |")
    print("| --- " * (2 + len(names)) + "|")
    for method, config in keys:
        cells = []
        for n in names:
            r = next((r for r in results[n]["rows"] if r["method"] == method and r["config"] == config), None)
            cells.append("" if r is None else f"{r['mean_loss']:.4f}")
        print(f"| {method} | {config} | " + " | ".join(cells) + " |")
    met = [c["met"] for cs in checks.values() for c in cs]
    print(f"\n{sum(met)} of {len(met)} checks met over {len(names)} pair(s)")
    return checks


if __name__ == "__main__":
    main()
