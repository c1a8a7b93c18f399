"""Quality of the merge methods on a task pair made offline (issue 14), measured in one run.

    python benchmarks/bench_merge_quality.py                  # the reference run (~15 min on one busy CPU core)
    python benchmarks/bench_merge_quality.py --fisher-samples 128
    python benchmarks/bench_merge_quality.py --json out.json
    python benchmarks/bench_merge_quality.py --extended-grid --only ties dare   # + TIES density / DARE drop_p
    python benchmarks/bench_merge_quality.py --report-only benchmarks/.cache/bench_merge_quality.json

The task pair (``benchmarks/merge_tasks.py``, built and cached on first use): one tiny base
LLaMA pre-trained on a mix of Python source and English licence prose, and two task models
fine-tuned from it, one per domain. This script

1. collects, for each task model on its own train split (``--fisher-samples`` sequences,
   batches of ``--batch-size``):
   - the exact per-sample (empirical) Fisher, ``hf_fisher.collect(..., reduction="param")``;
   - the "Fisher" of the published merge benchmarks (fusion_bench, MergeBench): the mean over
     the same batches of the square of the *batch* gradient, ``mean_b (∇ L_b)²`` with ``L_b``
     the batch-mean loss, packed as a ``Fisher`` with reduction "param";
2. merges the two task models with every method of ``hf_fisher.consumers.merge.api.merge_with_fisher``
   from their ``save_pretrained`` folders (the streaming reader), once with the library's default
   hyper-parameters and once tuned on the validation splits (``validation=[val_python,
   val_prose]``: the library's grid over the model weights λ, the scaling and the Fisher floor;
   ``merge_with_fisher`` refuses ``validation=`` for RegMean methods, so for ``regmean`` and
   ``fisher_regmean`` this script searches ``alpha`` (0, .25, .5, .75, .9, 1) x the library's λ
   grid itself (then, for fisher_regmean, the library's Fisher floors at the best point) on the
   same validation criterion, merging in memory with the library's per-tensor ``merge_tensor``
   and Grams from ``collect_input_grams``);
3. evaluates every merged model on both held-out **test** splits (mean token loss, nats, and
   perplexity) -- the test split is never used to choose anything -- and prints one markdown
   table (plus the base and the two task models as reference rows), the winner by the mean of
   the two test losses, and the checks of the issue; everything goes to a JSON file.

Validation criterion (library and this script alike): the mean over the two domains of the mean
batch loss on the validation split.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
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

DOMAINS = merge_tasks.DOMAINS
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
ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)  # this script's RegMean alpha grid
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
def evaluate(pair, model) -> dict[str, float]:
    return pair.evaluate(model, "test")


def _row(label: str, config: str, losses: dict[str, float], **extra) -> dict:
    vals = [losses[d] for d in DOMAINS]
    return {"method": label, "config": config, "test_loss": losses, "mean_loss": sum(vals) / len(vals),
            "test_ppl": {d: math.exp(losses[d]) for d in DOMAINS}, **extra}


def _fmt_hp(hp: dict | None) -> str:
    if not hp:
        return ""
    parts = []
    for k, v in hp.items():
        if isinstance(v, list):
            v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        elif isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------- merging
def library_merge(mw, label, method, fishers, pair, data, validation, **extra):
    """One call of ``merge_with_fisher`` from the saved folders; returns (model, chosen settings)."""
    kw = dict(method=method, progress=False, **extra)
    if method in ("fisher", "fisher_task_vector", "fisher_regmean", "kfac"):
        kw["fishers"] = fishers
    if method in mw.BASE_METHODS:
        kw["base_model"] = str(pair.path("base"))
    if method in ("regmean", "fisher_regmean"):
        kw["data"] = data
    if validation is not None:
        kw["validation"] = validation
    with tempfile_dir() as out:
        folder = mw.merge_with_fisher([str(pair.path(d)) for d in DOMAINS], output_dir=out / "merged", **kw)
        import yaml

        recipe = yaml.safe_load((Path(folder) / mw.RECIPE_NAME).read_text())
        model = pair_model_from(folder)
    hp = dict(recipe["parameters"])
    hp["weights"] = [m["parameters"]["weight"] for m in recipe["models"]]
    hp.pop("no_fisher_rule", None)
    hp.pop("seed", None)
    if hp.get("dare_then") == "task_arithmetic":
        hp.pop("dare_then")
    return model, hp, recipe["hf_fisher"].get("validation")


class tempfile_dir:
    def __enter__(self) -> Path:
        import tempfile

        self._d = tempfile.TemporaryDirectory(prefix="bench-merge-")
        return Path(self._d.name)

    def __exit__(self, *exc) -> None:
        self._d.cleanup()


def pair_model_from(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def regmean_tuned(method, fisher_pair, grams, validation, models, eval_model):
    """``regmean`` / ``fisher_regmean`` tuned on validation by this script: ``alpha`` x λ (the
    library's λ grid), then for fisher_regmean the library's Fisher floors at the best of those;
    merged in memory with the library's per-tensor ``merge_tensor``. ``grams``: ``{weight name:
    ([G_1, G_2], kind)}``."""
    from hf_fisher.consumers.merge.api import (
        DEFAULT_GRID,
        MergeSettings,
        merge_tensor,
        validation_candidates,
        validation_loss,
    )

    sds = [m.state_dict() for m in models]
    names = list(sds[0])
    weight_grid = []  # the library's λ candidates (its candidate list repeats them once per Fisher floor)
    for c in validation_candidates(MergeSettings(method, [0.5, 0.5]), 2, DEFAULT_GRID):
        if c.weights not in weight_grid:
            weight_grid.append(c.weights)
    floors = DEFAULT_GRID["fisher_floor"] if method == "fisher_regmean" else (1e-6,)
    fis = {}
    if method == "fisher_regmean":
        fis = {n: [f[n] for f in fisher_pair] for n in names if all(n in f for f in fisher_pair)}

    def merged(s):
        return {n: merge_tensor(n, [x[n] for x in sds], None, fis.get(n), s, gram=grams.get(n)).to(sds[0][n].dtype)
                for n in names}

    results = []

    def score(s):
        eval_model.load_state_dict(merged(s))
        results.append((validation_loss(eval_model, validation), s))

    for alpha, w in itertools.product(ALPHAS, weight_grid):  # alpha x weights at the default floor ...
        score(MergeSettings(method, list(w), alpha=float(alpha)))
    if len(floors) > 1:  # ... then the floor at the best of those (a coordinate search: 30 + 3 points, not 120)
        first = min(results, key=lambda r: r[0])[1]
        for floor in floors:
            if floor != first.fisher_floor:
                score(dataclasses.replace(first, fisher_floor=float(floor)))
    best_loss, best = min(results, key=lambda r: r[0])  # first of equal losses
    eval_model.load_state_dict(merged(best))
    hp = {"alpha": best.alpha, "weights": best.weights}
    if method == "fisher_regmean":
        hp["fisher_floor"] = best.fisher_floor
    return hp, {"loss": best_loss, "points": len(results)}


# ------------------------------------------------------------------------------------------ run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fisher-samples", type=int, default=512, help="train sequences per task for Fisher / Grams")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--json", default=str(merge_tasks.CACHE.parent / "bench_merge_quality.json"))
    ap.add_argument("--only", nargs="*", help="run only these rows (labels of the table)")
    ap.add_argument("--extended-grid", action="store_true",
                    help="also tune TIES' density and DARE's drop probability on validation (rows 'tuned+')")
    ap.add_argument("--report-only", metavar="JSON", help="print the table and checks of a saved run, run nothing")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        print_report(saved["rows"], saved["fisher_samples"])
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("hf_fisher").setLevel(logging.ERROR)
    t_start = time.perf_counter()

    import hf_fisher
    from hf_fisher.consumers.merge import api as mw
    from hf_fisher.consumers.merge.regmean import collect_input_grams

    pair = merge_tasks.load_task_pair(threads=args.threads)
    base = pair.load("base")
    models = [pair.load(d) for d in DOMAINS]
    print(f"task pair: {pair.root} ({pair.meta['parameters']:,} parameters, seq len {merge_tasks.SEQ_LEN}, "
          f"domains {', '.join(DOMAINS)}); {args.threads} threads")

    # ---- Fishers, Grams, validation batches
    train = [pair.batches(d, "train", args.batch_size, args.fisher_samples) for d in DOMAINS]
    validation = [pair.batches(d, "validation", args.batch_size) for d in DOMAINS]
    timing = {}
    t = time.perf_counter()
    per_sample = [hf_fisher.collect(m, b, reduction="param", task=d, progress=False) for m, b, d in zip(models, train, DOMAINS)]
    timing["per_sample_fisher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    batch_grad = [batch_grad_fisher(m, b, f, d) for m, b, f, d in zip(models, train, per_sample, DOMAINS)]
    timing["batch_grad_fisher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    per_model_grams = [collect_input_grams(m, b, progress=False) for m, b in zip(models, train)]
    grams = {n: ([g.grams[n] for g in per_model_grams], per_model_grams[0].kinds[n])
             for n in per_model_grams[0].grams if all(n in g.grams for g in per_model_grams)}
    timing["grams_s"] = time.perf_counter() - t
    kfac = None
    if not args.only or "kfac" in args.only:
        t = time.perf_counter()
        kfac = [hf_fisher.collect(m, b, estimator="kfac", task=d, progress=False) for m, b, d in zip(models, train, DOMAINS)]
        timing["kfac_s"] = time.perf_counter() - t
        print(f"KFAC factors of the same sequences: {timing['kfac_s']:.1f} s")
    print(f"Fishers of {args.fisher_samples} train sequences per task: per-sample {timing['per_sample_fisher_s']:.1f} s, "
          f"squared batch gradient {timing['batch_grad_fisher_s']:.1f} s, RegMean Grams {timing['grams_s']:.1f} s")
    fisher_stats = {}
    for kind, fl in (("per_sample", per_sample), ("batch_grad", batch_grad)):
        for d, f in zip(DOMAINS, fl):
            vals = torch.cat([f[n].double().flatten() for n in f.names()])
            fisher_stats[f"{kind}/{d}"] = {"mean": float(vals.mean()), "median": float(vals.median()),
                                           "frac_below_1e-6": float((vals < 1e-6).double().mean())}
    for k, v in fisher_stats.items():
        print(f"  {k:22s} mean {v['mean']:.3g}  median {v['median']:.3g}  below the default floor 1e-6: "
              f"{100 * v['frac_below_1e-6']:.1f}%")

    # ---- reference rows
    rows = [_row("base", "reference", evaluate(pair, base))]
    for d, m in zip(DOMAINS, models):
        rows.append(_row(f"{d} model", "reference", evaluate(pair, m)))

    eval_model = copy.deepcopy(models[0]).eval()
    for label, method, which in ROWS:
        if args.only and label not in args.only:
            continue
        fishers = {"per_sample": per_sample, "batch_grad": batch_grad, "kfac": kfac, None: None}[which]
        # default hyper-parameters
        t = time.perf_counter()
        model, hp, _ = library_merge(mw, label, method, fishers, pair, train, None)
        secs = time.perf_counter() - t
        rows.append(_row(label, "default", evaluate(pair, model), hyper=hp, merge_s=secs))
        print(f"{label:50s} default  mean test loss {rows[-1]['mean_loss']:.4f}  ({secs:.1f} s)  {_fmt_hp(hp)}", flush=True)
        # tuned on the validation split
        t = time.perf_counter()
        if method in ("regmean", "fisher_regmean"):
            hp, val = regmean_tuned(method, fishers, grams, validation, models, eval_model)
            model, how = eval_model, "this script's alpha x weights grid (library refuses validation= for RegMean)"
        else:
            model, hp, val = library_merge(mw, label, method, fishers, pair, train, validation)
            val = {"loss": val["chosen"]["loss"], "points": val["points"]}
            how = "merge_with_fisher(validation=...), library grid"
        secs = time.perf_counter() - t
        rows.append(_row(label, "tuned", evaluate(pair, model), hyper=hp, merge_s=secs,
                         validation_loss=val["loss"], grid_points=val["points"], tuning=how))
        print(f"{label:50s} tuned    mean test loss {rows[-1]['mean_loss']:.4f}  ({secs:.1f} s, {val['points']} points, "
              f"val {val['loss']:.4f})  {_fmt_hp(hp)}", flush=True)
        if args.extended_grid and method in EXTENDED:
            # the library's grid leaves TIES' density and DARE's drop probability at their defaults:
            # search them too (one validation-tuned merge per value; the lowest validation loss wins)
            key, values = EXTENDED[method]
            t = time.perf_counter()
            best = None
            points = 0
            for v in values:
                m_, hp_, val_ = library_merge(mw, label, method, fishers, pair, train, validation, **{key: v})
                points += val_["points"]
                if best is None or val_["chosen"]["loss"] < best[2]:
                    best = (m_, hp_, val_["chosen"]["loss"])
            secs = time.perf_counter() - t
            rows.append(_row(label, "tuned+", evaluate(pair, best[0]), hyper=best[1], merge_s=secs,
                             validation_loss=best[2], grid_points=points,
                             tuning=f"library grid x {key} in {list(values)}"))
            print(f"{label:50s} tuned+   mean test loss {rows[-1]['mean_loss']:.4f}  ({secs:.1f} s, {points} points, "
                  f"val {best[2]:.4f})  {_fmt_hp(best[1])}", flush=True)

    report(rows, args, pair, timing, fisher_stats, time.perf_counter() - t_start)


def print_report(rows, fisher_samples) -> tuple[dict | None, list[dict]]:
    print()
    print(f"Test loss (nats/token, mean over tokens) and perplexity; {fisher_samples} train sequences per task for "
          f"the Fishers and Grams; default = the library's defaults, tuned = chosen on the validation splits")
    print()
    head = (f"| method | config | {DOMAINS[0]} loss | {DOMAINS[1]} loss | mean loss | {DOMAINS[0]} ppl | "
            f"{DOMAINS[1]} ppl | hyper-parameters |")
    print(head)
    print("| --- " * 8 + "|")
    for r in rows:
        l, p = r["test_loss"], r["test_ppl"]
        print(f"| {r['method']} | {r['config']} | {l[DOMAINS[0]]:.4f} | {l[DOMAINS[1]]:.4f} | {r['mean_loss']:.4f} | "
              f"{p[DOMAINS[0]]:.2f} | {p[DOMAINS[1]]:.2f} | {_fmt_hp(r.get('hyper'))} |")
    merged = [r for r in rows if r["config"] != "reference"]
    if not merged:
        return None, []
    best = min(merged, key=lambda r: r["mean_loss"])
    print(f"\nLowest mean test loss of all rows: {best['method']} ({best['config']}), {best['mean_loss']:.4f}")

    def pick(labels, configs):
        """The row of ``labels`` the validation split picks among ``configs`` (tuned: lowest
        validation loss; default: the first default row, i.e. plain ``fisher`` for the Fisher
        methods) -- never chosen by the test loss."""
        rs = [r for r in merged if r["method"] in labels and r["config"] in configs]
        if not rs:
            return None
        if "validation_loss" in rs[0]:
            return min(rs, key=lambda r: r.get("validation_loss", math.inf))
        return rs[0]

    checks = []
    for configs, what in ((("tuned", "tuned+"), "tuned on validation"), (("default",), "library defaults")):
        bf = pick(FISHER_LABELS, configs)
        if bf is None:
            continue
        others = [(o, pick((o,), configs)) for o in BASELINE_LABELS + ("regmean",)]
        others.append(("the squared-batch-gradient Fisher", pick((BATCH_GRAD,), configs)))
        ps = pick(("fisher",), configs)
        for other, bo in others:
            if bo is None:
                continue
            mine = ps if other.startswith("the squared") else bf
            if mine is None:
                continue
            tol = 1e-3 if other == "regmean" else 0.0
            ok = mine["mean_loss"] <= bo["mean_loss"] + tol if tol else mine["mean_loss"] < bo["mean_loss"]
            verb = "matches (within 0.001) or beats" if tol else "beats"
            if other.startswith("the squared"):
                who = "per-sample fisher"
            else:
                who = "best Fisher-based (picked on validation)" if configs != ("default",) else "fisher"
            checks.append({"check": f"{what}: {who} {verb} {other}", "met": bool(ok),
                           "fisher": [mine["method"], mine["config"], mine["mean_loss"]],
                           "other": [bo["method"], bo["config"], bo["mean_loss"]]})
    print("\nChecks (mean of the two test losses; each method's row picked on validation, not on test):")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['check']}: {c['fisher'][0]} ({c['fisher'][1]}) "
              f"{c['fisher'][2]:.4f} vs {c['other'][0]} ({c['other'][1]}) {c['other'][2]:.4f}")
    return best, checks


def report(rows, args, pair, timing, fisher_stats, total_s) -> None:
    best, checks = print_report(rows, args.fisher_samples)
    out = {"rows": rows, "best": best, "checks": checks, "fisher_samples": args.fisher_samples,
           "batch_size": args.batch_size, "threads": args.threads, "timing_s": timing, "fisher_stats": fisher_stats,
           "total_s": total_s, "task_pair": {k: pair.meta[k] for k in ("version", "parameters", "model", "losses")},
           "torch": torch.__version__}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwritten {args.json} (total {total_s:.0f} s)")


if __name__ == "__main__":
    main()
