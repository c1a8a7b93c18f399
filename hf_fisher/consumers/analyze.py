"""One-call analysis: ``hf_fisher.analyze(model, tasks={"math": batches_a, "code": batches_b})``.

Runs every *analysis stage* that applies, in order, under one :class:`AnalysisConfig`, and writes
one report folder. A stage is a consumer registered under a name ``"stage.<name>"``
(``hf_fisher_register_consumers``), called as ``stage(ctx)`` with an :class:`AnalysisContext`;
it returns a JSON-ready dict (its results) and may write files into ``ctx.folder(name)``. The
built-in stages register through the same hook as a plugin's, so a stage a plugin adds simply
joins (after the built-ins, in registration order). A stage that raises is reported (status
"failed" with the error) and the others still run; a stage whose inputs are missing (e.g. every
two-task stage with one task) is "skipped" with the reason.

Built-in stages (``AnalysisConfig.stages`` selects them):

========================  ====================================================================
``fisher``                group Fisher per task (``collect``), saved as ``fisher-<task>/``
``importance``            top groups, layers, heads, channels per task; critical / compressible
``head_categories``       behavioural head categories; Fisher head mass per category
``pruning``               structured masks per task at ``sparsity`` (restored), their overlap
                          and the Fishers' head / channel overlap (first two tasks)
``conflicts``             per-sample conflicts between the first two tasks
``qkov``                  QK-OV interference between the first two tasks (heatmaps)
``estimators``            ``compare_estimators`` on the first task
``report``                ``write_report`` of the (first two) Fishers: CSV, summary, plots
========================  ====================================================================

Folder: ``analysis.json`` (config, per-stage status, seconds and results), ``summary.txt``
(one line per stage), and each stage's files; written to a temporary folder, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_fisher.consumers.circuits.conflict_defaults import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE
from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl

__all__ = ["STAGE_PREFIX", "AnalysisConfig", "AnalysisContext", "AnalysisResult", "analyze"]

logger = logging.getLogger(__name__)

STAGE_PREFIX = "stage."
BUILTIN_STAGES = ("fisher", "importance", "head_categories", "pruning", "conflicts", "qkov", "estimators", "report")
ANALYSIS_FILES = ("analysis.json", "summary.txt")


@dataclass
class AnalysisConfig:
    """Settings of every stage. ``stages``: the stage names to run (default: all registered)."""

    stages: Sequence[str] | None = None
    sparsity: float = 0.3
    structured: Sequence[str] = ("heads", "channels")
    keep: float = 0.2
    alpha: float = DEFAULT_ALPHA
    min_effect_size: float = DEFAULT_MIN_EFFECT_SIZE
    memory_budget_mb: float = 256.0
    max_samples: int | None = None
    layers: Sequence[int] | None = None
    estimators: Sequence[str] = ("empirical", "kfac")
    top_k: int = 10
    progress: bool = True

    @staticmethod
    def of(config: AnalysisConfig | Mapping[str, Any] | None) -> AnalysisConfig:
        if config is None:
            return AnalysisConfig()
        if isinstance(config, AnalysisConfig):
            return config
        if not isinstance(config, Mapping):
            raise InvalidInputError(f"config must be an AnalysisConfig or a dict, got {type(config).__name__}")
        known = set(AnalysisConfig.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise InvalidInputError(f"config has unknown key(s) {unknown}; known: {sorted(known)}")
        return AnalysisConfig(**dict(config))


@dataclass
class AnalysisContext:
    """What a stage sees: the model, the tasks' batches, the config, the Fishers (filled by the
    ``fisher`` stage), every earlier stage's results, and the (temporary) output folder."""

    model: Any
    tasks: dict[str, list]
    config: AnalysisConfig
    root: Path
    fishers: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def pair(self) -> tuple[str, str]:
        names = list(self.tasks)
        if len(names) < 2:
            raise _Skip("needs two tasks")
        return names[0], names[1]

    def need_fishers(self) -> None:
        if not self.fishers:
            raise _Skip("needs the Fishers of the 'fisher' stage")


@dataclass
class AnalysisResult:
    """``folder`` written, per-stage ``status`` ("ok" / "failed" / "skipped"), ``results``,
    ``errors`` and ``seconds``."""

    folder: Path
    status: dict[str, str]
    results: dict[str, Any]
    errors: dict[str, str]
    seconds: dict[str, float]


class _Skip(Exception):
    """A stage's inputs are missing: skipped, with the reason."""


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        pass
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def _stages() -> dict[str, Callable]:
    from hf_fisher import plugins

    found = {k[len(STAGE_PREFIX):]: v for k, v in plugins.consumers().items() if isinstance(k, str) and k.startswith(STAGE_PREFIX)}
    order = [s for s in BUILTIN_STAGES if s in found] + [s for s in found if s not in BUILTIN_STAGES]
    return {s: found[s] for s in order}


def check_out(out: str | Path, *, overwrite: bool = False, flag: str | None = None) -> Path:
    """The rules of :func:`hf_fisher.artifacts.atomic.check_target` for an analysis folder ``out`` (new, empty,
    or a previous analysis with ``overwrite``; writable), checked before any work."""
    from hf_fisher.artifacts.atomic import check_target

    stages = _stages()

    def ours(entry: str) -> bool:  # what a previous analysis leaves at the top of its folder
        return entry in ANALYSIS_FILES or entry.startswith("fisher-") or entry in stages

    return check_target(out, allowed=ours, what="analysis", overwrite=overwrite, flag=flag)


def analyze(model, tasks: Mapping[str, Sequence[Mapping[str, Any]]], *, out: str | Path, config=None,
            overwrite: bool = False) -> AnalysisResult:
    """Run the analysis stages (module docstring) on ``tasks`` (``{name: list of batch dicts}``)
    and write the report folder ``out``. Arguments are checked before any stage runs."""
    from tqdm.auto import tqdm

    from hf_fisher.artifacts.atomic import atomic_folder, scratch_folder

    cfg = AnalysisConfig.of(config)
    if not isinstance(tasks, Mapping) or not tasks:
        raise InvalidInputError("tasks must be a non-empty dict {task name: list of batch dicts}")
    batches = {}
    for name, b in tasks.items():
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise InvalidInputError(f"task name {name!r} must be a non-empty string without '/'")
        if isinstance(b, Mapping) or not isinstance(b, Sequence) or not b:
            raise InvalidInputError(f"task {name!r}: give a non-empty list of batch dicts with input_ids")
        for i, x in enumerate(b):
            if not isinstance(x, Mapping) or "input_ids" not in x:
                raise InvalidInputError(f"task {name!r}, batch {i}: not a batch dict with input_ids")
        batches[name] = list(b)
    if not 0.0 <= cfg.sparsity < 1.0:
        raise InvalidInputError(f"config sparsity must be in [0, 1), got {cfg.sparsity}")
    stages = _stages()
    wanted = list(stages) if cfg.stages is None else list(cfg.stages)
    unknown = [s for s in wanted if s not in stages]
    if unknown:
        raise InvalidInputError(f"unknown stage(s) {unknown}; registered: {list(stages)}")
    target = check_out(out, overwrite=overwrite)
    status, errors, seconds = {}, {}, {}
    target.parent.mkdir(parents=True, exist_ok=True)
    # Stages write into a staging folder beside the target (their own saves are atomic writes
    # too, which must not nest inside a locked temporary folder); it is moved in at the end.
    with scratch_folder(target) as staging:
        tmp = Path(staging)
        ctx = AnalysisContext(model, batches, cfg, tmp)
        for name in tqdm(wanted, desc="analysis", unit="stage", disable=not cfg.progress):
            t0 = time.perf_counter()
            try:
                res = stages[name](ctx)
                ctx.results[name] = _jsonable(res) if res is not None else {}
                status[name] = "ok"
            except _Skip as e:
                status[name], errors[name] = "skipped", str(e)
            except Exception as e:  # a failing stage is reported; the others still run
                status[name], errors[name] = "failed", f"{type(e).__name__}: {e}"
                logger.warning("analysis stage %r failed: %s", name, errors[name])
                logger.debug("%s", traceback.format_exc())
            seconds[name] = time.perf_counter() - t0
        doc = {"config": _jsonable(asdict(cfg)), "tasks": {k: len(v) for k, v in batches.items()},
               "stages": {s: {"status": status[s], "seconds": seconds[s], **({"error": errors[s]} if s in errors else {})}
                          for s in wanted},
               "results": ctx.results}
        (tmp / "analysis.json").write_text(json.dumps(doc, indent=1))
        lines = ["hf_fisher analysis", "", *(f"{s:18s} {status[s]:8s} {seconds[s]:7.1f} s" + (f"  {errors[s]}" if s in errors else "")
                                          for s in wanted)]
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        with atomic_folder(target, what="analysis") as final:
            for entry in tmp.iterdir():
                os.replace(entry, Path(final) / entry.name)
    return AnalysisResult(target, status, ctx.results, errors, seconds)


# ----------------------------------------------------------------------------- built-in stages
def stage_fisher(ctx: AnalysisContext) -> dict:
    from hf_fisher.api import collect

    out = {}
    for name, b in ctx.tasks.items():
        f = collect(ctx.model, b, reduction="group", task=name, max_samples=ctx.config.max_samples,
                    progress=ctx.config.progress)
        ctx.fishers[name] = f
        f.save_pretrained(ctx.root / f"fisher-{name}")
        out[name] = {"samples": f.counts.samples, "trace": f.total(), "folder": f"fisher-{name}"}
    return out


def stage_importance(ctx: AnalysisContext) -> dict:
    from hf_fisher.analysis.importance import classify_units, importance

    ctx.need_fishers()
    out = {}
    for name, f in ctx.fishers.items():
        imp = importance(f, k=ctx.config.top_k)
        if f.layout is not None and f.layout.attention:
            labels = classify_units(f, unit="heads")
            imp["head_labels"] = labels.counts()
            imp["critical_heads"] = [list(k) for k in labels.of("critical")]
        out[name] = imp
    return out


def stage_head_categories(ctx: AnalysisContext) -> dict:
    from hf_fisher.consumers.circuits.head_behaviour import aggregate_by_category, head_categories

    cats = head_categories(ctx.model, progress=ctx.config.progress)
    out = {"categories": cats.to_dict()}
    for name, f in ctx.fishers.items():
        out[f"fisher_by_category/{name}"] = aggregate_by_category(f.head_importance(), cats)
    return out


def stage_pruning(ctx: AnalysisContext) -> dict:
    from hf_fisher.consumers.overlap import mask_overlap, task_overlap
    from hf_fisher.consumers.prune.core import prune

    ctx.need_fishers()
    masks, out = {}, {}
    for name, f in ctx.fishers.items():
        r = prune(ctx.model, f, sparsity=ctx.config.sparsity, structured=tuple(ctx.config.structured), scope="layer",
                  progress=False)
        r.restore()
        masks[name] = r.masks
        out[name] = {k: r.stats[k] for k in ("achieved_sparsity", "removed_units", "units")}
        out[name]["removed"] = r.removed
    names = list(ctx.fishers)
    if len(names) >= 2:
        a, b = names[:2]
        out["mask_overlap"] = mask_overlap(masks[a], masks[b]).to_dict() if masks[a].keys() == masks[b].keys() else None
        out["head_overlap"] = task_overlap(ctx.fishers[a], ctx.fishers[b], keep=ctx.config.keep, unit="heads").to_dict()
        out["channel_overlap"] = task_overlap(ctx.fishers[a], ctx.fishers[b], keep=ctx.config.keep, unit="channels").to_dict()
    return out


def stage_conflicts(ctx: AnalysisContext) -> dict:
    from hf_fisher.consumers.circuits.conflicts import sample_conflicts

    a, b = ctx.pair()
    res = sample_conflicts(ctx.model, ctx.tasks[a], ctx.tasks[b], layers=ctx.config.layers,
                           alpha=ctx.config.alpha, min_effect_size=ctx.config.min_effect_size,
                           memory_budget_mb=ctx.config.memory_budget_mb,
                           top_k=ctx.config.top_k, progress=ctx.config.progress)
    folder = ctx.folder("conflicts")
    res.to_json(folder / "conflicts.json")
    return {"tasks": [a, b], "claims": res.claims[: ctx.config.top_k], "recommendations": res.recommendations}


def stage_qkov(ctx: AnalysisContext) -> dict:
    from hf_fisher.consumers.circuits.qkov import qkov_interference

    a, b = ctx.pair()
    res = qkov_interference(ctx.model, ctx.tasks[a], ctx.tasks[b], layers=ctx.config.layers,
                            memory_budget_mb=ctx.config.memory_budget_mb, top_k=ctx.config.top_k,
                            progress=ctx.config.progress, task_names=(a, b))
    folder = ctx.folder("qkov")
    (folder / "qkov.json").write_text(res.to_json())
    res.save_heatmaps(folder)
    out = {"tasks": [a, b], "top": res.top(ctx.config.top_k)}
    cats = ctx.results.get("head_categories", {}).get("categories")
    if cats is not None:
        from hf_fisher.consumers.circuits.head_behaviour import HeadCategories, aggregate_by_category

        out["by_category"] = aggregate_by_category(res.by_head(), HeadCategories.from_dict(cats))
    return out


def stage_estimators(ctx: AnalysisContext) -> dict:
    from hf_fisher.consumers.compare_estimators import compare_estimators

    first = next(iter(ctx.tasks))
    res = compare_estimators(ctx.model, ctx.tasks[first], methods=tuple(ctx.config.estimators), progress=ctx.config.progress)
    (ctx.folder("estimators") / "comparison.md").write_text(res.to_markdown())
    return {"task": first, "comparison": json.loads(res.to_json())}


def stage_report(ctx: AnalysisContext) -> dict:
    """The report of the first two Fishers, with the per-head spectral metrics of each task
    (:func:`hf_fisher.consumers.spectrum.spectrum`, ``blocks="head"`` over the attention
    parameters) when its per-sample gradient matrix fits ``memory_budget_mb``; a note otherwise."""
    from hf_fisher import plugins
    from hf_fisher.collection.gradients import attention_params
    from hf_fisher.consumers.report import write_report
    from hf_fisher.consumers.spectrum import spectrum

    ctx.need_fishers()
    names = list(ctx.fishers)[:2]
    spectra, notes = [], []
    for name in names:
        try:
            params = attention_params(ctx.model, plugins.model_layout(ctx.model), ctx.config.layers)
            spectra.append(spectrum(ctx.model, ctx.tasks[name], blocks="head", k=1, hutchinson_probes=0, slq_vectors=0,
                                    params=params, max_memory_mb=ctx.config.memory_budget_mb))
        except InvalidInputError as e:
            spectra.append(None)
            notes.append(f"per-head spectra of {name!r} not computed: {e}")
            logger.warning("analyze report: per-head spectra of %r not computed: %s", name, e)
    res = write_report([ctx.fishers[n] for n in names], ctx.root / "report", k=ctx.config.top_k, spectra=spectra)
    return {"files": [f"report/{f}" for f in res.files], "notes": notes + res.notes}


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("analyze", analyze)
    for name in BUILTIN_STAGES:
        register(STAGE_PREFIX + name, globals()[f"stage_{name}"])
