"""Quality of structured pruning criteria on tiny models trained offline on real text (issues 15, 26).

    python benchmarks/bench_prune_quality.py                      # the default pairs, full table
    python benchmarks/bench_prune_quality.py --pairs all          # also the ~23M-parameter pair (hours on CPU)
    python benchmarks/bench_prune_quality.py --pairs gpt2-man --json out.json
    python benchmarks/bench_prune_quality.py --quick              # smoke run: tiny models, few rows (a minute)
    python benchmarks/bench_prune_quality.py --rebuild            # train the models again

Pairs (a model trained from scratch on one source of real text found on this machine, nothing
downloaded; byte vocabulary of 260; files split into train / validation / test by a hash of their
path, paragraphs de-duplicated across splits, ``benchmarks/merge_tasks.py``):

- ``llama-gqa-python``: LLaMA, hidden 192, 4 layers, 12 query heads over 2 kv-heads, MLP 512
  (1.6M parameters), on the Python source of the interpreter's standard library;
- ``llama-mha-prose``: LLaMA, hidden 128, 4 layers, 4 heads = 4 kv-heads (multi-head), MLP 384,
  on licence and copyright prose (``/usr/share/common-licenses``, ``/usr/share/doc/*/copyright``);
- ``gpt2-man``: GPT-2 (fused ``c_attn``, Conv1D), hidden 128, 4 layers, 4 heads, MLP 512, on the
  troff source of the English man pages (``/usr/share/man/man[1-8]``);
- ``merge-task-python``, ``merge-task-prose``: the two fine-tuned task models of
  ``merge_tasks.py``'s ``llama-gqa`` pair (LLaMA, hidden 128, 3 layers, 4 query heads over 2
  kv-heads, pre-trained on Python + prose, then fine-tuned on one; its cache and splits);
- ``llama-gqa-23m-python`` (only with ``--pairs all``): LLaMA, hidden 512, 8 layers, 8 query
  heads over 2 kv-heads, MLP 1408 (about 23M parameters), Python source.

Cached in ``benchmarks/.cache/prune_<pair>-<version>/`` (``--quick``: ``prune_quick_<pair>``).

Every criterion prunes the same model at 20 / 40 / 60 % of the attention-head + MLP-channel
parameters with ``scope="layer"``: the same per-layer counts for every criterion (query heads
balanced over the kv groups, channels filling each layer's budget), so only the choice of units
and what is done to the kept ones differ. Calibration: ``--calib`` sequences of the **train**
split; ``validation=`` data: the **validation** split; evaluation: the held-out **test** split
(never used to choose anything). Rows: hf_fisher's default with ``validation=`` (the criterion
chosen on the validation split among KFAC-OBS, mask Fisher + rescale, FLAP and Wanda-sp, each with and without
FLAP's bias compensation), its default without validation data (``score="kfac"``, half of the
OBS update folded in), KFAC-OBS with its full update (``obs_update=1``, the default before),
KFAC-OBS whose (half) update reconstructs the layer's own output on the pruned model's inputs
(``obs_target="layer"``, OBS / SparseGPT's target) instead of the unpruned model's,
``validation="holdout"`` (the same choice made on the last quarter of the calibration batches, held
out, the candidates pruning with the rest; then the chosen one prunes with all of them),
``mask_fisher`` and ``fisher`` with the rescale, a plain Kwon et al. 2022 written independently
(``tests/kwon_reference.py``: mask Fisher, lowest units within the same counts, least-squares
mask tuning reconstructing the unpruned layer), FLAP with its bias compensation, Wanda-sp,
magnitude; without ``--quick`` also the variants without rescale, OBD, LLM-Pruner Taylor and random.

The time column: the seconds of each criterion's statistics (for the two chosen rows: of the whole
choice, every candidate's pruning and loss) divided by the seconds of one forward+backward pass
over the calibration set, measured in the same process. ``--rows WORD,...`` runs only the rows
whose label contains one of the words (e.g. ``--rows held-out`` for the ``validation="holdout"`` row).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import merge_tasks as mt

VERSION = "v1"
PAIRS = {
    "llama-gqa-python": dict(arch="llama", domain="python", model=dict(hidden=192, layers=4, heads=12, kv_heads=2, intermediate=512),
                             train=dict(steps=1500, batch=32, lr=3e-3, warmup=100, seed=0)),
    "llama-mha-prose": dict(arch="llama", domain="prose", model=dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384),
                            train=dict(steps=1200, batch=32, lr=3e-3, warmup=100, seed=1)),
    "gpt2-man": dict(arch="gpt2", domain="man", model=dict(hidden=128, layers=4, heads=4, intermediate=512),
                     train=dict(steps=1200, batch=32, lr=2e-3, warmup=100, seed=2)),
    # the fine-tuned task models of merge_tasks' "llama-gqa" pair (LLaMA, hidden 128, 3 layers, 4 query heads over
    # 2 kv-heads, pre-trained on python + prose, then fine-tuned on one): built / cached by merge_tasks
    "merge-task-python": dict(arch="merge_task", domain="python"),
    "merge-task-prose": dict(arch="merge_task", domain="prose"),
    "llama-gqa-23m-python": dict(arch="llama", domain="python",
                                 model=dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408),
                                 train=dict(steps=1500, batch=32, lr=1.5e-3, warmup=150, seed=3)),
}
DEFAULT_PAIRS = ("llama-gqa-python", "llama-mha-prose", "gpt2-man", "merge-task-python", "merge-task-prose")
QUICK_MODEL = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
QUICK_TRAIN = dict(steps=40, batch=16, lr=3e-3, warmup=10, seed=0)
CAPS = {"train": 12000, "validation": 256, "test": 512}
SPARSITIES = (0.2, 0.4, 0.6)


# ----------------------------------------------------------------------------------- the text
def _man_files() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(Path("/usr/share/man").glob("man[1-8]/*")):
        if p.is_file():
            out.append((p.relative_to("/usr/share/man").as_posix(), p))
    return out


def splits(domain: str) -> dict[str, list[str]]:
    """The de-duplicated paragraphs of each split of ``domain`` (``python`` / ``prose`` from
    merge_tasks; ``man``: English man pages, gzip-decoded troff source)."""
    if domain != "man":
        return mt.domain_splits(domain)
    by_split: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for rel, path in _man_files():
        by_split[mt._split_of(rel)].append(path)
    seen: set[bytes] = set()
    out: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):
        paras = []
        for path in by_split[split]:
            try:
                raw = path.read_bytes()
                text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                continue
            for p in mt._paragraphs(text):
                key = hashlib.sha1(re.sub(r"\s+", " ", p).strip().encode()).digest()
                if key not in seen:
                    seen.add(key)
                    paras.append(p)
        out[split] = paras
    return out


# ---------------------------------------------------------------------------------- the models
def config(arch: str, m: dict):
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=mt.VOCAB, n_embd=m["hidden"], n_layer=m["layers"], n_head=m["heads"],
                          n_inner=m["intermediate"], n_positions=mt.SEQ_LEN, bos_token_id=mt.BOS, eos_token_id=mt.BOS,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=mt.VOCAB, hidden_size=m["hidden"], intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], max_position_embeddings=mt.SEQ_LEN,
        tie_word_embeddings=False, bos_token_id=mt.BOS, eos_token_id=mt.BOS, pad_token_id=None,
    )


def _model_class(arch: str):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM


def load(name: str, quick: bool, rebuild: bool):
    spec = PAIRS[name]
    if spec["arch"] == "merge_task":  # merge_tasks' cache: its splits, calibration from the train split as below
        tp = mt.load_task_pair(rebuild=rebuild, quick=quick)
        d = spec["domain"]
        model = tp.load(d)
        meta = {"pair": name, "arch": tp.meta["arch"], "domain": d, "parameters": sum(p.numel() for p in model.parameters()),
                "merge_tasks": {k: tp.meta.get(k) for k in ("version", "model", "pretrain", "finetune")}}
        return model, tp.data[d], meta
    model_cfg = QUICK_MODEL if quick else spec["model"]
    if quick and spec["arch"] == "llama" and spec["model"]["kv_heads"] == spec["model"]["heads"]:
        model_cfg = {**QUICK_MODEL, "kv_heads": QUICK_MODEL["heads"]}
    train = QUICK_TRAIN if quick else spec["train"]
    root = HERE / ".cache" / (f"prune_quick_{name}" if quick else f"prune_{name}-{VERSION}")
    cls = _model_class(spec["arch"])
    if not rebuild and (root / "meta.json").is_file():
        return cls.from_pretrained(root / "model", dtype=torch.float32).eval(), torch.load(root / "data.pt"), \
            json.loads((root / "meta.json").read_text())
    t0 = time.perf_counter()
    caps = {"train": 2000, "validation": 64, "test": 64} if quick else CAPS
    paras = splits(spec["domain"])
    data = {s: mt.encode(p, caps[s], seed=200 + i) for i, (s, p) in enumerate(paras.items())}
    print(f"{name}: {spec['domain']}: " + ", ".join(f"{s} {len(t)} sequences" for s, t in data.items()), flush=True)
    torch.manual_seed(train["seed"])
    model = cls(config(spec["arch"], model_cfg))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {spec['arch']} {n:,} parameters; training {train['steps']} steps", flush=True)
    mt._train(model, mt._sampler(data["train"], batch=train["batch"]), train["steps"], train["lr"], train["warmup"],
              train["seed"], name)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / "model")
    torch.save(data, root / "data.pt")
    meta = {"pair": name, "version": VERSION, "arch": spec["arch"], "domain": spec["domain"], "model": model_cfg,
            "train": train, "parameters": n, "quick": quick,
            "losses": {s: mt.eval_loss(model, data[s]) for s in ("validation", "test")},
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return model.eval(), data, meta


def forward_backward_seconds(model, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ the rows
# label, score (None: the library's default), rescale, validation, in --quick
ROWS = [
    ("hf_fisher default + validation= (chosen on the validation split)", None, True, True, True),
    ("hf_fisher default without validation (kfac: KFAC-OBS + half its update)", None, True, False, True),
    ("KFAC-OBS + its full update (obs_update=1, the default before)", "kfac_full", True, False, True),
    ("KFAC-OBS, half its update reconstructing the layer's own output (obs_target='layer')", "kfac_layer", True, False, True),
    ('validation="holdout" (chosen on held-out calibration batches)', None, True, "holdout", True),
    ("mask_fisher + rescale", "mask_fisher", True, False, True),
    ("fisher + rescale", "fisher", True, False, True),
    ("plain Kwon et al. + LSQ (tests/kwon_reference.py, same counts)", "plain_kwon", True, False, True),
    ("FLAP (bias compensation)", "flap", False, False, True),
    ("Wanda-sp", "wanda_sp", False, False, True),
    ("magnitude", "magnitude", False, False, True),
    ("fisher (no rescale)", "fisher", False, False, False),
    ("mask_fisher (no rescale)", "mask_fisher", False, False, False),
    ("obd + rescale", "obd", True, False, False),
    ("LLM-Pruner Taylor 1st order", "taylor1", False, False, False),
    ("LLM-Pruner Taylor 2nd order", "taylor2", False, False, False),
    ("random", "random", False, False, False),
]


def run_pair(name: str, args) -> dict:
    import kwon_reference as K

    import hf_fisher
    from hf_fisher.consumers.prune.core import prune

    model, data, meta = load(name, args.quick, args.rebuild)
    calib = mt.batches(data["train"][-args.calib:], args.batch_size)  # training sampled rows uniformly
    val = mt.batches(data["validation"][: args.validation], args.batch_size)
    test = mt.batches(data["test"][: args.test], 64)
    base_loss = K.loss_with(model, test, None)
    fb = forward_backward_seconds(model, calib)
    t0 = time.perf_counter()
    fisher_group = hf_fisher.collect(model, calib, reduction="group", progress=False)
    t_group = time.perf_counter() - t0
    rows = [r for r in ROWS if r[4] or not args.quick]
    if args.rows:
        rows = [r for r in rows if any(w in r[0] for w in args.rows.split(","))]
    fisher_param = None
    t_param = 0.0
    if any(r[1] == "obd" for r in rows):
        t0 = time.perf_counter()
        fisher_param = hf_fisher.collect(model, calib, reduction="param", progress=False)
        t_param = time.perf_counter() - t0
    print(f"\n{name}: {meta['parameters']:,} parameters, test loss {base_loss:.4f} nats/byte; one forward+backward over "
          f"{len(data['train'][-args.calib:])} calibration sequences: {fb:.2f} s", flush=True)
    mask_fisher_scores = None
    results = []
    counts: dict[str, dict] = {}
    for label, score, rescale, use_val, _ in rows:
        row = {"label": label, "score": score, "rescale": rescale, "validation": use_val, "loss": {}, "time_ratio": None}
        secs = []
        for sp in SPARSITIES:
            if score == "plain_kwon":
                if str(sp) not in counts:
                    continue
                t0 = time.perf_counter()
                if mask_fisher_scores is None:
                    mask_fisher_scores = K.mask_fisher(model, calib)
                    secs.append(time.perf_counter() - t0)
                zero_one = K.select(K.layers_of(model), *mask_fisher_scores, counts[str(sp)], balance_groups=True)
                tuned = K.tune(model, calib, zero_one, lsq="kwon")
                row["loss"][str(sp)] = K.loss_with(model, test, tuned)
                continue
            losses = []
            for seed in range(args.seeds) if score == "random" else [0]:
                fisher = fisher_param if score == "obd" else fisher_group if score == "fisher" else None
                full, layer = score == "kfac_full", score == "kfac_layer"
                kfac = {"obs_update": 1.0} if full else {"obs_target": "layer"} if layer else {}
                r = prune(model, fisher, sparsity=sp, structured=("heads", "channels"), score="kfac" if kfac else score,
                          scope="layer", rescale_batches=calib if rescale else None, calibration_batches=calib,
                          rescale=None if score is None or kfac else rescale, seed=seed, progress=False,
                          validation=val if use_val is True else use_val or None, **kfac)
                losses.append(K.loss_with(model, test, None))
                extra = t_param if score == "obd" else t_group if score == "fisher" else 0.0
                # with validation= / the held-out selection: every candidate's pruning counts
                secs.append(r.stats["validation"]["seconds"] if "validation" in r.stats else r.stats["score_seconds"] + extra)
                layer_counts = {int(k): (v["removed"].get("head", 0), v["removed"].get("channel", 0))
                                for k, v in r.stats["per_layer"].items()}
                counts.setdefault(str(sp), layer_counts)
                row.setdefault("per_layer", {})[str(sp)] = layer_counts
                if "validation" in r.stats:
                    row.setdefault("chosen", {})[str(sp)] = r.stats["validation"]["chosen"]
                r.restore()
            row["loss"][str(sp)] = statistics.mean(losses)
        row["time_ratio"] = statistics.mean(secs) / fb if secs else None
        results.append(row)
        chosen = "  chosen: " + ", ".join(f"{c['score']}{'+rescale' if c['rescale'] else ''}{'+comp' if c['compensate'] else ''}" for c in row["chosen"].values()) \
            if "chosen" in row else ""
        print(f"{label:68s} " + "  ".join(f"{row['loss'][str(sp)]:.4f}" for sp in SPARSITIES if str(sp) in row["loss"]) + chosen,
              flush=True)
    head = "| criterion | " + " | ".join(f"{int(sp * 100)}%" for sp in SPARSITIES) + " | statistics time (x fwd+bwd) |"
    lines = [f"{name} ({meta['arch']}, {meta['parameters']:,} parameters, {meta['domain']} text): held-out test loss "
             f"(nats/byte) after pruning heads + MLP channels; unpruned {base_loss:.4f}", "", head,
             "| --- |" + " --- |" * (len(SPARSITIES) + 1)]
    best = {str(sp): min(r["loss"][str(sp)] for r in results if str(sp) in r["loss"]) for sp in SPARSITIES}
    for r in results:
        cells = [("" if str(sp) not in r["loss"] else f"**{r['loss'][str(sp)]:.4f}**" if r["loss"][str(sp)] == best[str(sp)]
                  else f"{r['loss'][str(sp)]:.4f}") for sp in SPARSITIES]
        t = "" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {t} |")
    table = "\n".join(lines)
    print("\n" + table)
    plain = next((r for r in results if r["score"] == "plain_kwon"), None)
    summary = {}
    for which, default in (("with validation", next((r for r in results if r["score"] is None and r["validation"] is True), None)),
                           ("without validation", next((r for r in results if r["score"] is None and r["validation"] is False), None))):
        if default is None:
            continue
        wins = {str(sp): default["loss"][str(sp)] == best[str(sp)] for sp in SPARSITIES}
        vs_kwon = {str(sp): default["loss"][str(sp)] <= plain["loss"][str(sp)] for sp in SPARSITIES} if plain else {}
        summary[which] = {"wins": wins, "not_worse_than_plain_kwon": vs_kwon}
        print(f"default {which} lowest at every budget: {all(wins.values())} {wins}; "
              f"<= plain Kwon+LSQ: {all(vs_kwon.values())} {vs_kwon}")
    same = all(r.get("per_layer", counts) == counts for r in results if r["score"] != "plain_kwon")
    print(f"same per-layer counts for every criterion: {same}")
    return {"meta": meta, "base_loss": base_loss, "forward_backward_seconds": fb, "fisher_seconds": {"group": t_group, "param": t_param},
            "results": results, "table": table, "default": summary, "same_counts": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS),
                    help=f"comma list of {', '.join(PAIRS)}, or 'all' (default: {','.join(DEFAULT_PAIRS)})")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models trained briefly, the main rows, few sequences")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--calib", type=int, default=None, help="calibration sequences from the train split (default 128; quick 16)")
    ap.add_argument("--validation", type=int, default=None, help="validation sequences (default 128; quick 16)")
    ap.add_argument("--test", type=int, default=None, help="held-out test sequences (default 512; quick 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the random criterion (default 3)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json", default=None)
    ap.add_argument("--sparsities", default=None,
                    help="comma list of budgets in (0, 1) to run (default 0.2,0.4,0.6), e.g. '0.4' for one column")
    ap.add_argument("--rows", default=None,
                    help="comma list of words: run only the rows whose label contains one (e.g. 'default,plain Kwon')")
    args = ap.parse_args()
    global SPARSITIES
    if args.sparsities:
        try:
            SPARSITIES = tuple(float(x) for x in args.sparsities.split(",") if x.strip())
        except ValueError:
            ap.error(f"--sparsities must be a comma list of numbers, got {args.sparsities!r}")
        if not SPARSITIES or not all(0.0 < sp < 1.0 for sp in SPARSITIES):
            ap.error(f"--sparsities must be numbers in (0, 1), got {args.sparsities!r}")
    names = list(PAIRS) if args.pairs == "all" else [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in names if p not in PAIRS]
    if bad:
        ap.error(f"unknown pair(s) {bad}; choose from {', '.join(PAIRS)} or 'all'")
    args.calib = args.calib or (16 if args.quick else 128)
    args.validation = args.validation or (16 if args.quick else 128)
    args.test = args.test or (32 if args.quick else 512)
    torch.set_num_threads(args.threads)
    out = {name: run_pair(name, args) for name in names}
    print("\nSummary (hf_fisher's default):")
    for name, r in out.items():
        for which, d in r["default"].items():
            print(f"  {name}, {which}: lowest of all criteria {d['wins']}; not worse than plain Kwon+LSQ "
                  f"{d['not_worse_than_plain_kwon']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
