"""hf_fisher side by side with its peers, on the same batches, in one run (issue 24).

    python benchmarks/bench_peers.py                  # builds benchmarks/.peers-venv once, then the reference run
    python benchmarks/bench_peers.py --quick          # tiny models, 1 round: a smoke run
    python benchmarks/bench_peers.py --sections core,kfac --rounds 5 --json peers.json

The script runs itself in its own virtual environment, benchmarks/.peers-venv (``--venv DIR``),
which it builds on first use (benchmarks/_peers_venv.py: the local CPU ``torch==2.13.0`` first,
then BackPACK, Opacus, Bergson, curvlinops, kronfluence and mergekit at pinned versions, every
install constrained to keep that torch; a peer whose install fails is reported and the run goes
on; a torch that changes stops the build loudly). hf_fisher itself is imported from this
checkout. ``--no-venv`` runs in the current interpreter instead (missing peers are reported).

Every figure is a ratio to a baseline measured in the same process on the same batches: the
methods run interleaved round by round (round r: every method on batch r; one untimed warm-up
round on batch 0), ``--rounds`` rounds; each row gives the median CPU-time ratio (process CPU
time, all threads: robust to a shared machine's other load) and the median wall ratio, each with
the min-max over the rounds (a round's time over the baseline's median).

Sections:

core     LLaMA (~7M: hidden 256, 4 layers, 8/4 heads, vocab 8000, untied; B=32, T=64) and GPT-2
         (hidden 256, 4 layers, 4 heads, vocab 8000, tied embeddings, learned positions; B=32,
         T=64); quick: hidden 64, 2 layers, vocab 512, B=4, T=16. Baseline: ``plain``, one
         ``model(**batch).loss.backward()``. Methods, each the empirical diagonal Fisher
         ``F = mean_i g_i²`` of the batch (``g_i = ∇ l_i``, ``l_i`` the sample's mean token
         cross-entropy; no padding, so the batch loss is ``mean_i l_i``):
           hf-group / hf-param    ``hf_fisher.collect(model, [batch], reduction=...)`` (one-shot,
                                  first-batch checks included);
           hf-group-steady / hf-param-steady  ``FisherCollector.update(batch)`` after its first batch;
           loop                   one forward + backward per sample, squares accumulated;
           vmap                   ``torch.func.vmap(grad(l_i))`` in chunks of 8 samples;
           opacus                 ``GradSampleModule`` (``loss_reduction="mean"``), ``grad_sample²``;
           backpack-batchgrad     BackPACK ``BatchGrad`` on the extended model, ``(B·grad_batch)²``;
           backpack-sgs           BackPACK ``SumGradSquared``, ``B·sum_grad_squared``;
           bergson                Bergson's hooks (``HookCollectorBase``, no projection): its full
                                  per-example gradients of the Linear / Conv1D layers, squared.
         Agreement with hf_fisher's param Fisher of the same batch (the last round's): the number
         of tensors and the fraction of the model's entries a method covers, the largest relative
         error over them (``max|F_peer − F_hf| / max|F_hf|`` per tensor) and the tensors off by
         more than 1e-3 of their scale.
trainer  LLaMA of bench_trainer.py (B=16, T=64; quick: tiny), ``Trainer.train()`` of ``--steps``
         steps: plain, ``FisherCallback()`` (free mode, group), Bergson's
         ``GradientCollectorCallback`` (default: projection 16, Adam normalisation) and its
         cheapest form (``use_optimizer_state=False``); median optimizer-step time, ratio to plain.
kfac     LLaMA of bench_kfac.py (B=8, T=64): one plain gradient vs hf_fisher KFAC (projections;
         and every linear; float32 factors, as the peers keep them), curvlinops
         ``KFACLinearOperator.compute_kronecker_factors`` (the same projections, empirical,
         expand) and kronfluence ``fit_covariance_matrices`` (the same projections; it writes its
         factors to disk, included). Agreement: each factor normalised by its Frobenius norm (the peers' scale
         conventions differ), max relative error against hf_fisher's.
merge    a base LLaMA (~7M; quick: tiny) and two fine-tunes on disk, fresh process each:
         ``merge_with_fisher`` fisher and ties against mergekit's ties (same density 0.2, weights
         1, disjoint mean): time to disk and peak RSS above the imports, ratios to mergekit;
         max |hf_fisher ties − mergekit ties|.

What a peer cannot do is listed with the exception it raised (e.g. a module type it does not
support), never hidden. ``--json OUT`` writes every figure, the machine and the venv's versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (REPO, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import _common
import _peers_venv

SECTIONS = ("core", "trainer", "kfac", "merge")


# ======================================================================== venv
def in_venv(venv: Path) -> bool:
    return Path(sys.prefix).resolve() == venv.resolve()


def relaunch_in_venv(args, argv) -> None:
    """Build (or check) the venv, then exec this script with its Python."""
    venv = Path(args.venv)
    _peers_venv.ensure(venv)
    py = _peers_venv.venv_python(venv)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *argv], env)


# ======================================================================== helpers
def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")[:300]


def ratios(res: dict, base: str) -> dict:
    """Per method: CPU and wall ratio to the baseline's median, median and min-max over rounds."""
    out = {}
    for n, r in res.items():
        row = {"error": r.get("error")}
        if r["wall"] and res[base]["wall"]:
            for kind in ("cpu", "wall"):
                row[kind] = _common.summary(r[kind], res[base][kind])
        out[n] = row
    return out


def fmt_ratio(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"


def agreement(peer: dict, ref: dict, shared: dict[str, str] | None = None) -> dict:
    """Coverage and max relative error of ``peer`` ({name: F}) against ``ref`` (hf_fisher's)."""
    total = sum(t.numel() for t in ref.values())
    covered, worst, off = 0, 0.0, []
    names = [n for n in peer if n in ref]
    for n in names:
        a, b = peer[n].double().reshape(ref[n].shape), ref[n].double()
        rel = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
        worst = max(worst, rel)
        covered += b.numel()
        if rel > 1e-3:
            off.append(f"{n} ({rel:.2g})")
    return {"tensors": len(names), "of_tensors": len(ref), "entry_fraction": covered / total, "max_rel_err": worst,
            "off_tensors": off}


# ======================================================================== core
def core_models(quick: bool):
    import torch
    import transformers as tf

    small = dict(hidden=64, layers=2, heads=4, kv=2, inter=172, vocab=512, B=4, T=16)
    full = dict(hidden=256, layers=4, heads=8, kv=4, inter=688, vocab=8000, B=32, T=64)
    s = small if quick else full

    def llama():
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                             num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                             max_position_embeddings=512, tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg).float().eval()

    def gpt2():
        torch.manual_seed(0)
        cfg = tf.GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"],
                            n_head=s["heads"] // 2 if not quick else 4, n_positions=512, tie_word_embeddings=True,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg).float().eval()

    return s, [("LLaMA", llama), ("GPT-2", gpt2)]


def make_batches(vocab: int, B: int, T: int, n: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def canonical(model) -> dict[int, str]:
    """id(parameter) -> the name ``named_parameters`` gives it (tied weights: the first name)."""
    return {id(p): n for n, p in model.named_parameters()}


class CoreMethods:
    """The core section's methods on one model; each returns ``{param name: F}`` (or None)."""

    def __init__(self, model, batches, vmap_chunk: int = 8):
        self.model = model
        self.batches = batches
        self.vmap_chunk = vmap_chunk
        self.collectors = {}
        self.copies = {}

    def names(self):
        return ["plain", "hf-group", "hf-param", "hf-group-steady", "hf-param-steady", "loop", "vmap", "opacus",
                "backpack-batchgrad", "backpack-sgs", "bergson"]

    def get(self, name):
        fn = getattr(self, name.replace("-", "_"))
        return lambda r: fn(self.batches[r])

    # -- baseline and hf_fisher
    def plain(self, batch):
        self.model.zero_grad(set_to_none=True)
        self.model(**batch).loss.backward()
        self.model.zero_grad(set_to_none=True)

    def hf_group(self, batch):
        import hf_fisher

        hf_fisher.collect(self.model, [batch], reduction="group", progress=False)

    def hf_param(self, batch):
        import hf_fisher

        return dict(hf_fisher.collect(self.model, [batch], reduction="param", progress=False).items())

    def _steady(self, reduction, batch):
        from hf_fisher.collection.collector import FisherCollector

        if reduction not in self.collectors:  # its first batch (checks) at the warm-up
            self.collectors[reduction] = FisherCollector(self.model, reduction=reduction)
        self.collectors[reduction].update(batch)

    def hf_group_steady(self, batch):
        self._steady("group", batch)

    def hf_param_steady(self, batch):
        self._steady("param", batch)

    # -- generic
    def loop(self, batch):
        import torch

        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        acc = {n: torch.zeros_like(p) for n, p in params}
        B = batch["input_ids"].shape[0]
        for i in range(B):
            self.model.zero_grad(set_to_none=True)
            self.model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
            for n, p in params:
                acc[n].addcmul_(p.grad, p.grad)
        self.model.zero_grad(set_to_none=True)
        return {n: t.div_(B) for n, t in acc.items()}

    def vmap(self, batch):
        import torch
        from torch.func import functional_call, grad, vmap

        model = self.model
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p, ids):
            return functional_call(model, p, (), {"input_ids": ids[None], "labels": ids[None]}).loss

        def sq(p, ids):
            return {n: g * g for n, g in grad(loss)(p, ids).items()}

        ids = batch["input_ids"]
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        for k in range(0, ids.shape[0], self.vmap_chunk):
            for n, t in vmap(sq, in_dims=(None, 0))(params, ids[k : k + self.vmap_chunk]).items():
                acc[n].add_(t.sum(0))
        return {n: t.div_(ids.shape[0]) for n, t in acc.items()}

    # -- peers
    def _copy(self, key, make):
        if key not in self.copies:
            self.copies[key] = make(copy.deepcopy(self.model))
        return self.copies[key]

    def opacus(self, batch):
        from opacus import GradSampleModule

        # Opacus records activations in train mode only (the models here have no dropout)
        gsm = self._copy("opacus", lambda m: GradSampleModule(m.train(), batch_first=True, loss_reduction="mean"))
        names = canonical(gsm._module)
        gsm.zero_grad(set_to_none=True)
        gsm(**batch).loss.backward()
        out = {}
        for p in gsm._module.parameters():
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                out[names[id(p)]] = gs.pow(2).mean(0)
            p.grad_sample = None
            p.grad = None
        return out

    def _backpack(self, ext_name, batch):
        from backpack import backpack, extend
        from backpack import extensions as ext

        m = self._copy("backpack", lambda m: extend(m))
        names = canonical(m)
        m.zero_grad(set_to_none=True)
        B = batch["input_ids"].shape[0]
        with backpack(getattr(ext, ext_name)()):
            m(**batch).loss.backward()
        out = {}
        for p in m.parameters():
            if ext_name == "BatchGrad" and getattr(p, "grad_batch", None) is not None:
                out[names[id(p)]] = (p.grad_batch * B).pow(2).mean(0)
                del p.grad_batch
            elif ext_name == "SumGradSquared" and getattr(p, "sum_grad_squared", None) is not None:
                out[names[id(p)]] = p.sum_grad_squared * B
                del p.sum_grad_squared
            p.grad = None
        return out

    def backpack_batchgrad(self, batch):
        return self._backpack("BatchGrad", batch)

    def backpack_sgs(self, batch):
        return self._backpack("SumGradSquared", batch)

    def bergson(self, batch):
        collector_cls = bergson_collector()
        model = self.model
        names = canonical(model)
        col = collector_cls(model=model)
        B = batch["input_ids"].shape[0]
        model.zero_grad(set_to_none=True)
        with col:
            (model(**batch).loss * B).backward()  # sum_i l_i: each sample's gradient is g_i
        model.zero_grad(set_to_none=True)
        out = {}
        from transformers.pytorch_utils import Conv1D

        for mod_name, F in col.sq.items():
            module = model.get_submodule(mod_name)
            w = module.weight
            if isinstance(module, Conv1D):  # HF Conv1D stores [in, out]; Bergson's gradient is [out, in]
                F = F.reshape(w.shape[1], w.shape[0]).T
            out[names[id(w)]] = F.reshape(w.shape)
        return out


_BERGSON = None


def bergson_collector():
    """A Bergson hook collector that squares its full (unprojected) per-example gradients."""
    global _BERGSON
    if _BERGSON is None:
        from dataclasses import dataclass, field

        from bergson.collector.collector import HookCollectorBase

        @dataclass
        class SquareCollector(HookCollectorBase):
            sq: dict = field(default_factory=dict)

            def setup(self):
                self.sq = {}

            def teardown(self):
                pass

            def backward_hook(self, module, g):
                G = self._compute_gradient(module, g)  # [N, out * in], Bergson's per-example gradient
                self.sq[module._name] = G.pow(2).mean(0)

            def process_batch(self, indices, **kwargs):
                pass

        _BERGSON = SquareCollector
    return _BERGSON


def run_core(args, log) -> dict:
    s, models = core_models(args.quick)
    out = {"shape": {"B": s["B"], "T": s["T"]}, "models": {}}
    for title, build in models:
        model = build()
        n_params = sum(p.numel() for p in model.parameters())
        log(f"core {title}: {n_params:,} parameters, B={s['B']}, T={s['T']}")
        batches = make_batches(s["vocab"], s["B"], s["T"], args.rounds + 1)
        cm = CoreMethods(model, batches)
        names = [n for n in cm.names() if not args.only or n == "plain" or n in args.only]
        last: dict[str, dict] = {}

        def wrap(n, fn, last=last):
            def run(r):
                res = fn(r)
                if r == args.rounds and isinstance(res, dict):
                    last[n] = res
            return run

        res = _common.interleaved({n: wrap(n, cm.get(n)) for n in names}, args.rounds, log=log)
        rows = ratios(res, "plain")
        ref = last.get("hf-param") or cm.hf_param(batches[args.rounds])
        for n, F in last.items():
            rows[n]["agreement"] = agreement(F, ref)
        out["models"][title] = {"parameters": n_params, "rows": rows, "raw": res}
        del cm, model
    return out


# ======================================================================== trainer
def run_trainer(args, log) -> dict:
    import logging

    import bench_trainer
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

    import hf_fisher

    logging.getLogger("transformers").setLevel(logging.ERROR)
    spec = bench_trainer.QUICK if args.quick else bench_trainer.FULL
    steps = args.steps or (2 if args.quick else 8)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-trainer-"))
    data = bench_trainer.dataset(spec, spec["B"] * steps)

    def hf_dataset():
        import datasets

        datasets.disable_progress_bars()
        rows = [data[i] for i in range(len(data))]
        return datasets.Dataset.from_dict({k: [r[k].tolist() for r in rows] for k in rows[0]}).with_format("torch")

    def make(method):
        model = bench_trainer.build_model(spec)
        callbacks, train, prepare = [], data, None
        if method == "hf-free":
            callbacks = [hf_fisher.FisherCallback(reduction="group", log_summary=False)]
        elif method.startswith("bergson"):
            from bergson.huggingface import GradientCollectorCallback, prepare_for_gradient_collection

            kw = {} if method == "bergson-default" else {"use_optimizer_state": False}
            callbacks = [GradientCollectorCallback(tmp / method, **kw)]
            train, prepare = hf_dataset(), prepare_for_gradient_collection
        targs = TrainingArguments(str(tmp / f"out-{method}"), per_device_train_batch_size=spec["B"], max_steps=steps,
                                  learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
                                  use_cpu=True, disable_tqdm=True, seed=0)
        clock = _common.step_clock()
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator,
                          callbacks=callbacks + [clock])
        trainer.remove_callback(PrinterCallback)
        if prepare:
            prepare(trainer)
        return trainer, clock

    methods = ["plain", "hf-free", "bergson-default", "bergson-cheapest"]
    steps_s: dict[str, list[float]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    for r in range(args.rounds + 1):  # round 0: warm-up
        for m in methods:
            if m in errors:
                continue
            try:
                trainer, clock = make(m)
                import gc

                gc.collect()
                trainer.train()
            except Exception as exc:
                errors[m] = _err(exc)
                log(f"trainer {m}: {errors[m]}")
                continue
            if r:
                steps_s[m] += clock.steps
        log(f"trainer round {r}: " + ", ".join(f"{m} {statistics.median(steps_s[m]) * 1e3:.1f} ms" for m in methods
                                               if steps_s[m]))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(steps_s["plain"]) if steps_s["plain"] else None
    rows = {}
    for m in methods:
        v = steps_s[m]
        rows[m] = {"error": errors.get(m)}
        if v and base:
            rows[m].update(step_ms=statistics.median(v) * 1e3, ratio=statistics.median(v) / base,
                           ratio_min=min(v) / base, ratio_max=max(v) / base)
    del torch
    return {"spec": spec, "steps": steps, "rows": rows,
            "note": "median optimizer-step wall time over every step of the rounds; min-max: single steps"}


# ======================================================================== kfac
def run_kfac(args, log) -> dict:
    import bench_kfac
    import torch

    model, ids = bench_kfac.build(args.quick, "cpu")
    batches = [ids] + [ids.roll(k, dims=0) for k in range(1, args.rounds + 1)]  # same rows, each round its own order
    log(f"kfac: LLaMA {sum(p.numel() for p in model.parameters()):,} parameters, batch {tuple(ids.shape)}")
    kept: dict[str, object] = {}

    def hf(params):
        from hf_fisher.estimators.kfac import KFACEstimator

        est = KFACEstimator(params=params, accumulation_dtype=torch.float32)

        def run(r):
            kept[params] = est.collect(model, [{"input_ids": batches[r]}], progress=False)
        return run

    def curvlinops_run(r):
        from curvlinops import KFACLinearOperator

        x = batches[r]
        params = [p for n, p in model.named_parameters() if "proj" in n]
        K = KFACLinearOperator(bench_kfac._Logits(model), torch.nn.CrossEntropyLoss(), params, [(x, x[:, 1:])],
                               fisher_type="empirical", kfac_approx="expand", check_deterministic=False,
                               num_data=x.shape[0], num_per_example_loss_terms=x.shape[1] - 1)
        K.compute_kronecker_factors()
        kept["curvlinops"] = K

    kron_tmp = Path(tempfile.mkdtemp(prefix="bench-peers-kron-"))

    def kronfluence_run(r):
        kept["kronfluence"] = kronfluence_factors(model, batches[r], kron_tmp)

    runs = {"plain": lambda r: bench_kfac.operation("a", model, batches[r])(), "hf-kfac-proj": hf(r"proj"),
            "hf-kfac-all": hf(r"proj|lm_head"), "curvlinops-proj": curvlinops_run, "kronfluence-proj": kronfluence_run}
    res = _common.interleaved(runs, args.rounds, log=log)
    rows = ratios(res, "plain")
    import shutil

    ours = kept.get(r"proj")
    if ours is not None:
        ref = {n: (L.A, L.G) for n, L in ours.layers.items()}
        if "curvlinops" in kept:
            K = kept["curvlinops"]
            peer = {n.removeprefix("m."): (K._input_covariances.get(n), K._gradient_covariances.get(n))
                    for n in K._mapping}
            rows["curvlinops-proj"]["agreement"] = factor_agreement(peer, ref)
        if isinstance(kept.get("kronfluence"), dict):
            rows["kronfluence-proj"]["agreement"] = factor_agreement(kept["kronfluence"], ref)
    shutil.rmtree(kron_tmp, ignore_errors=True)
    return {"rows": rows, "raw": res}


def factor_agreement(peer: dict, ref: dict) -> dict:
    """Max relative error of the Frobenius-normalised factors A and G (the scale conventions differ)."""
    worst, n = 0.0, 0
    for name, (A, G) in ref.items():
        if name not in peer or peer[name][0] is None or peer[name][1] is None:
            continue
        for x, y in zip(peer[name], (A, G)):
            x, y = x.double(), y.double()
            if x.dim() == 1 or y.dim() == 1:  # a diagonal factor
                x, y = (x.diagonal() if x.dim() == 2 else x), (y.diagonal() if y.dim() == 2 else y)
            x, y = x / x.norm(), y / y.norm()
            worst = max(worst, float((x - y).abs().max() / y.abs().max()))
        n += 1
    return {"layers": n, "of_layers": len(ref), "max_rel_err_normalised": worst}


def kronfluence_factors(model, ids, tmp: Path) -> dict:
    """kronfluence's covariance factors of the projections for one batch: {module: (A, G)}."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    tracked = [n for n, m in model.named_modules() if n.endswith("proj") and isinstance(m, torch.nn.Linear)]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch).logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    m = copy.deepcopy(model)
    task = LMTask()
    m = prepare_model(m, task)
    import logging

    analyzer = Analyzer(analysis_name="bench", model=m, task=task, output_dir=str(tmp), disable_tqdm=True,
                        disable_model_save=True, cpu=True, log_level=logging.WARNING)
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return ids[i]

    analyzer.fit_covariance_matrices("f", dataset=Rows(), per_device_batch_size=ids.shape[0],
                                     factor_args=FactorArguments(strategy="kfac"), overwrite_output_dir=True)
    cov = analyzer.load_covariance_matrices("f")
    A = cov.get("activation_covariance", {})
    G = cov.get("gradient_covariance", {})
    return {n: (A.get(n), G.get(n)) for n in A}


# ======================================================================== merge
def run_merge(args, log) -> dict:
    import torch
    import transformers as tf

    transformers_logging = tf.utils.logging
    transformers_logging.disable_progress_bar()
    s = dict(hidden=64, layers=2, heads=4, kv=2, inter=172, vocab=512) if args.quick else \
        dict(hidden=256, layers=4, heads=8, kv=4, inter=688, vocab=8000)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-merge-"))
    import shutil

    try:
        info = _common.write_merge_inputs(work, model)
        (work / "inputs.json").write_text(json.dumps(info))
        log(f"merge: 3 LLaMA of {info['model_bytes'] / 1e6:.0f} MB in {work}")
        res = {v: [] for v in _common.MERGE_VARIANTS}
        for r in range(args.rounds):
            for v in _common.MERGE_VARIANTS:
                res[v].append(_common.run_merge_child(v, work, torch.get_num_threads()))
                x = res[v][-1]
                log(f"merge round {r + 1}: {v} " + (f"{x['seconds']:.2f}s +{x['peak_above_baseline_bytes'] / 1e6:.0f} MB"
                                                    if "error" not in x else x["error"]))
        agree = None
        if (work / "out-ties").is_dir() and (work / "out-mergekit-ties").is_dir():
            agree = _common.compare_folders(work / "out-ties", work / "out-mergekit-ties")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for v, xs in res.items():
        ok = [x for x in xs if "error" not in x]
        rows[v] = {"error": next((x["error"] for x in xs if "error" in x), None)}
        if ok:
            rows[v].update(seconds=statistics.median(x["seconds"] for x in ok),
                           peak_mb=statistics.median(x["peak_above_baseline_bytes"] for x in ok) / 1e6)
    mk = rows.get("mergekit-ties", {})
    for row in rows.values():
        if "seconds" in row and "seconds" in mk:
            row.update(time_ratio=row["seconds"] / mk["seconds"], peak_ratio=row["peak_mb"] / max(mk["peak_mb"], 1e-9))
    return {"inputs": info, "rows": rows, "ties_vs_mergekit": agree}


# ======================================================================== report
def report(result: dict) -> str:
    lines = [_common.machine_line(result["machine"]), "peers: " + ", ".join(
        f"{k} {v}" for k, v in result["versions"].items()), ""]
    core = result.get("core")
    if core:
        lines.append(f"## core: diagonal Fisher of one batch (B={core['shape']['B']}, T={core['shape']['T']}), "
                     f"ratios to plain fwd+bwd, median (min-max) of {result['rounds']} rounds")
        for title, m in core["models"].items():
            lines += ["", f"{title}, {m['parameters']:,} parameters", "",
                      "| method | CPU time / plain | wall / plain | tensors | entries | max rel err vs hf_fisher | cannot |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for n, row in m["rows"].items():
                ag = row.get("agreement")
                cov = (f"{ag['tensors']}/{ag['of_tensors']}", f"{100 * ag['entry_fraction']:.1f}%",
                       f"{ag['max_rel_err']:.1e}" + (f" ({len(ag['off_tensors'])} off: {', '.join(ag['off_tensors'][:3])})"
                                                     if ag["off_tensors"] else "")) if ag else ("", "", "")
                lines.append(f"| {n} | {fmt_ratio(row.get('cpu'))} | {fmt_ratio(row.get('wall'))} | {cov[0]} | {cov[1]} | "
                             f"{cov[2]} | {row.get('error') or ''} |")
    tr = result.get("trainer")
    if tr:
        lines += ["", f"## trainer: optimizer-step time over {tr['steps']} steps x {result['rounds']} runs "
                      f"(B={tr['spec']['B']}, T={tr['spec']['T']}), ratio to plain Trainer, median (min-max of steps)", "",
                  "| callback | step (ms) | / plain | cannot |", "| --- | --- | --- | --- |"]
        for n, row in tr["rows"].items():
            if "ratio" in row:
                lines.append(f"| {n} | {row['step_ms']:.1f} | {row['ratio']:.2f} ({row['ratio_min']:.2f}-"
                             f"{row['ratio_max']:.2f}) | {row.get('error') or ''} |")
            else:
                lines.append(f"| {n} | - | - | {row.get('error')} |")
    kf = result.get("kfac")
    if kf:
        lines += ["", f"## kfac: factors of one batch, ratios to one plain gradient, median (min-max) of "
                      f"{result['rounds']} rounds", "",
                  "| method | CPU time / plain | wall / plain | layers | max rel err (normalised factors) | cannot |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for n, row in kf["rows"].items():
            ag = row.get("agreement")
            layers = f"{ag['layers']}/{ag['of_layers']}" if ag else ""
            err = f"{ag['max_rel_err_normalised']:.1e}" if ag else ""
            lines.append(f"| {n} | {fmt_ratio(row.get('cpu'))} | {fmt_ratio(row.get('wall'))} | {layers} | {err} | "
                         f"{row.get('error') or ''} |")
    mg = result.get("merge")
    if mg:
        lines += ["", f"## merge: two fine-tunes of a {mg['inputs']['model_bytes'] / 1e6:.0f} MB LLaMA from safetensors, "
                      "fresh process each, median", "",
                  "| merge | time (s) | / mergekit ties | peak above imports (MB) | / mergekit ties | cannot |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for n, row in mg["rows"].items():
            if "seconds" in row:
                lines.append(f"| {n} | {row['seconds']:.2f} | {row.get('time_ratio', float('nan')):.2f} | "
                             f"{row['peak_mb']:.0f} | {row.get('peak_ratio', float('nan')):.2f} | {row.get('error') or ''} |")
            else:
                lines.append(f"| {n} | - | - | - | - | {row.get('error')} |")
        a = mg.get("ties_vs_mergekit")
        if a:
            lines.append(f"\nhf_fisher ties vs mergekit ties: {a['tensors']} tensors, max |diff| {a['max_abs']:.3g}, max "
                         f"relative {a['max_rel']:.3g}; entries differing by > 1e-5 of the tensor's max: "
                         f"{a['entries_differing']} of {a['entries']}")
    return "\n".join(lines)


def versions(status: dict) -> dict:
    import importlib.metadata as md

    out = {}
    for name, dist in (("backpack", "backpack-for-pytorch"), ("opacus", "opacus"), ("bergson", "bergson"),
                       ("curvlinops", "curvlinops-for-pytorch"), ("kronfluence", "kronfluence"), ("mergekit", "mergekit")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            why = status.get("peers", {}).get(name, "not installed")
            out[name] = f"not installed ({why})"
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 1 round: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; quick 1)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--only", default=None, help="core: comma list of methods to run (plain always runs)")
    p.add_argument("--steps", type=int, default=None, help="trainer: optimizer steps per run (default 8; quick 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--venv", default=str(_peers_venv.DEFAULT_VENV))
    p.add_argument("--no-venv", action="store_true", help="run in this interpreter (missing peers are reported)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not args.no_venv and not in_venv(Path(args.venv)):
        relaunch_in_venv(args, argv)  # does not return
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.only = set(args.only.split(",")) if args.only else None
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("hf_fisher").setLevel(logging.ERROR)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    status = _peers_venv.status(Path(args.venv)) if not args.no_venv else {}
    result = {"machine": _common.machine_info("cpu"), "versions": versions(status), "rounds": args.rounds,
              "quick": args.quick}
    result["machine"]["threads"] = args.threads
    runners = {"core": run_core, "trainer": run_trainer, "kfac": run_kfac, "merge": run_merge}
    for s in sections:
        try:
            result[s] = runners[s](args, log)
        except Exception as exc:  # one section's failure does not lose the others
            import traceback

            traceback.print_exc()
            result[s + "_error"] = _err(exc)
            log(f"section {s} failed: {result[s + '_error']}")
    result["seconds"] = time.perf_counter() - t0
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
