"""Quality of structured pruning criteria on a tiny LLaMA trained offline on real text (issue 15).

    python benchmarks/bench_prune_quality.py                 # build (or load) the model, run the table
    python benchmarks/bench_prune_quality.py --json out.json
    python benchmarks/bench_prune_quality.py --rebuild       # train the model again

The model: a LLaMA (hidden 192, 4 layers, 12 query heads sharing 2 kv-heads, MLP 512, byte
vocabulary of 260, untied; 1.6M parameters) trained from scratch on the Python source of the
interpreter's standard library (``benchmarks/merge_tasks.py``'s ``python`` domain: files split
into train / validation / test by a hash of their path, paragraphs de-duplicated across splits),
cached in ``benchmarks/.cache/prune_model-<version>/``.

Every criterion prunes the same model at 20 / 40 / 60 % of the attention-head + MLP-channel
parameters with ``scope="layer"``: the same per-layer counts for every criterion (query heads
balanced over the kv groups, channels filling each layer's budget), so only the choice of units
differs. Calibration: ``--calib`` sequences of the **train** split; evaluation: the held-out
**test** split (never used to choose anything). Rows:

- hf_fisher's default with calibration data, ``score="kfac"``: layer by layer, units removed
  greedily by the least loss increase under the KFAC quadratic (the Fisher of the layer output
  ``G`` times the Gram of its input), the kept units' scales re-optimised and folded in
  (``hf_fisher/consumers/prune_obs.py``); the other score options ``"fisher"`` (group Fisher of
  exactly what a unit removes), ``"mask_fisher"`` and ``"obd"``, each with and without the
  least-squares rescale;
- the baselines in their published form: FLAP (fluctuation metric + bias compensation),
  Wanda-sp, LLM-Pruner Taylor first and second order (element-wise, summed over the unit), Kwon
  et al.'s mask Fisher with its rescale (the ``mask_fisher + rescale`` row), weight magnitude,
  random (mean over ``--seeds`` seeds).

The time column: the seconds of each criterion's statistics (Fisher collection, activation
statistics, gradients, ...) divided by the seconds of one forward+backward pass over the
calibration set, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import merge_tasks as mt

VERSION = "v1"
CACHE = HERE / ".cache" / f"prune_model-{VERSION}"
MODEL = dict(hidden=192, layers=4, heads=12, kv_heads=2, intermediate=512)
TRAIN = dict(steps=1500, batch=32, lr=3e-3, warmup=100, seed=0)
CAPS = {"train": 12000, "validation": 256, "test": 512}
SPARSITIES = (0.2, 0.4, 0.6)


def config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=mt.VOCAB, hidden_size=MODEL["hidden"], intermediate_size=MODEL["intermediate"],
        num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"], num_key_value_heads=MODEL["kv_heads"],
        max_position_embeddings=mt.SEQ_LEN, tie_word_embeddings=False, bos_token_id=mt.BOS, eos_token_id=mt.BOS,
        pad_token_id=None,
    )


def build(root: Path) -> tuple:
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    paras = mt.domain_splits("python")
    data = {s: mt.encode(p, CAPS[s], seed=200 + i) for i, (s, p) in enumerate(paras.items())}
    print("python: " + ", ".join(f"{s} {len(t)} sequences" for s, t in data.items()), flush=True)
    torch.manual_seed(TRAIN["seed"])
    model = LlamaForCausalLM(config())
    n = sum(p.numel() for p in model.parameters())
    print(f"LLaMA {n:,} parameters; training {TRAIN['steps']} steps", flush=True)
    mt._train(model, mt._sampler(data["train"], batch=TRAIN["batch"]), TRAIN["steps"], TRAIN["lr"], TRAIN["warmup"],
              TRAIN["seed"], "prune-model")
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "model")
    torch.save(data, root / "data.pt")
    meta = {"version": VERSION, "model": MODEL, "train": TRAIN, "parameters": n,
            "losses": {s: mt.eval_loss(model, data[s]) for s in ("validation", "test")},
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return model.eval(), data, meta


def load(rebuild: bool):
    from transformers import LlamaForCausalLM

    if rebuild or not (CACHE / "meta.json").is_file():
        return build(CACHE)
    return (LlamaForCausalLM.from_pretrained(CACHE / "model", dtype=torch.float32).eval(), torch.load(CACHE / "data.pt"),
            json.loads((CACHE / "meta.json").read_text()))


def forward_backward_seconds(model, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


ROWS = [
    # label, score (None: the library's default), rescale, kind
    ("hf_fisher default (kfac: KFAC-OBS + its rescale)", None, True, "ours"),
    ("fisher + rescale", "fisher", True, "ours"),
    ("fisher (no rescale)", "fisher", False, "ours"),
    ("mask_fisher + rescale (Kwon et al. 2022)", "mask_fisher", True, "baseline"),
    ("mask_fisher (no rescale)", "mask_fisher", False, "ours"),
    ("obd + rescale", "obd", True, "ours"),
    ("obd (no rescale)", "obd", False, "ours"),
    ("FLAP (bias compensation)", "flap", False, "baseline"),
    ("Wanda-sp", "wanda_sp", False, "baseline"),
    ("LLM-Pruner Taylor 1st order", "taylor1", False, "baseline"),
    ("LLM-Pruner Taylor 2nd order", "taylor2", False, "baseline"),
    ("magnitude", "magnitude", False, "baseline"),
    ("random", "random", False, "baseline"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--calib", type=int, default=128, help="calibration sequences from the train split (default 128)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the random criterion (default 3)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import hf_fisher
    from hf_fisher.consumers.prune.core import prune

    model, data, meta = load(args.rebuild)
    # calibration: the LAST rows of the train split (training sampled rows uniformly; the test split is held out)
    calib = mt.batches(data["train"][-args.calib:], args.batch_size)
    test = data["test"]
    base_loss = mt.eval_loss(model, test)
    fb = forward_backward_seconds(model, calib)
    t0 = time.perf_counter()
    fisher_group = hf_fisher.collect(model, calib, reduction="group", progress=False)
    t_group = time.perf_counter() - t0
    t0 = time.perf_counter()
    fisher_param = hf_fisher.collect(model, calib, reduction="param", progress=False)
    t_param = time.perf_counter() - t0
    print(f"model: {meta['parameters']:,} parameters, test loss {base_loss:.4f} nats/byte; one forward+backward over "
          f"{args.calib} calibration sequences: {fb:.2f} s", flush=True)

    results = []
    for label, score, rescale, kind in ROWS:
        row = {"label": label, "score": score, "rescale": rescale, "kind": kind, "loss": {}, "time_ratio": None}
        for sp in SPARSITIES:
            seeds = range(args.seeds) if score == "random" else [0]
            losses, secs = [], []
            for seed in seeds:
                fisher = fisher_param if score == "obd" else fisher_group if score == "fisher" else None
                r = prune(model, fisher, sparsity=sp, structured=("heads", "channels"), score=score, scope="layer",
                          rescale_batches=calib if rescale else None, calibration_batches=calib,
                          rescale=None if score is None else rescale, seed=seed, progress=False)
                row["score"] = r.stats["score"]
                losses.append(mt.eval_loss(model, test))
                extra = t_param if score == "obd" else t_group if score == "fisher" else 0.0
                secs.append(r.stats["score_seconds"] + extra)
                row.setdefault("per_layer", {})[str(sp)] = {k: v["removed"] for k, v in r.stats["per_layer"].items()}
                row.setdefault("achieved", {})[str(sp)] = r.stats["achieved_sparsity"]
                r.restore()
            row["loss"][str(sp)] = statistics.mean(losses)
            row["time_ratio"] = statistics.mean(secs) / fb
        results.append(row)
        print(f"{label:45s} " + "  ".join(f"{row['loss'][str(sp)]:.4f}" for sp in SPARSITIES)
              + f"   stats {row['time_ratio']:.2f}x", flush=True)

    head = "| criterion | " + " | ".join(f"{int(sp * 100)}%" for sp in SPARSITIES) + " | statistics time (x fwd+bwd) |"
    lines = [f"Held-out test loss (nats/byte) after pruning heads + MLP channels; unpruned {base_loss:.4f}", "",
             head, "| --- |" + " --- |" * (len(SPARSITIES) + 1)]
    best = {str(sp): min(r["loss"][str(sp)] for r in results) for sp in SPARSITIES}
    for r in results:
        cells = [(f"**{r['loss'][str(sp)]:.4f}**" if r["loss"][str(sp)] == best[str(sp)] else f"{r['loss'][str(sp)]:.4f}")
                 for sp in SPARSITIES]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['time_ratio']:.2f} |")
    table = "\n".join(lines)
    print()
    print(table)
    default = results[0]
    wins = {str(sp): default["loss"][str(sp)] == best[str(sp)] for sp in SPARSITIES}
    print(f"\nhf_fisher's default lowest at every budget: {all(wins.values())} {wins}")
    counts = results[0]["per_layer"]
    same = all(r["per_layer"] == counts for r in results)
    print(f"same per-layer counts for every criterion: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "base_loss": base_loss, "forward_backward_seconds": fb,
                                               "fisher_seconds": {"group": t_group, "param": t_param},
                                               "results": results, "table": table, "default_wins": wins,
                                               "same_counts": same}, indent=1))


if __name__ == "__main__":
    main()
