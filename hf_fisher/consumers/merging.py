"""Merging models with their Fisher information: :func:`merge_with_fisher` and its recipe.

Notation: models ``θ_1..θ_n`` with weights ``λ_i``, Fishers ``F_i``, base ``θ_base``, task vectors
``τ_i = θ_i − θ_base``. Per tensor (formulas in :mod:`hf_fisher.consumers.merge_math`):

- ``fisher`` (Matena & Raffel 2022): ``θ* = Σ λ_i F̃_i θ_i / Σ λ_i F̃_i``, ``F̃_i = max(F_i, floor)``
  (where every Fisher vanishes the floor makes it the λ-weighted average);
- ``fisher_task_vector``: ``θ* = θ_base + Σ λ_i F̃_i τ_i / Σ λ_i F̃_i``;
- ``average``: ``Σ λ_i θ_i / Σ λ_i``; ``task_arithmetic`` (Ilharco et al. 2023):
  ``θ_base + s Σ λ_i τ_i``; ``ties`` (Yadav et al. 2023): trim ``λ_i τ_i`` to the top ``density``,
  elect signs, disjoint mean, ``× s``; ``dare`` (Yu et al. 2024): drop each τ entry with
  probability ``p``, rescale by ``1/(1−p)`` (seeded per tensor and model), then task arithmetic
  or TIES;
- ``regmean`` (Jin et al. 2023): every Linear/Conv1D weight ``W* = (Σ G̃_i)⁻¹ Σ G̃_i W_i`` with input
  Gram matrices ``G_i`` (off-diagonal scaled by ``alpha``; :mod:`hf_fisher.consumers.regmean`),
  other tensors the λ-weighted average; ``fisher_regmean``: RegMean for Linear weights, Fisher
  merging for every other tensor;
- ``kfac``: each model's Kronecker-factored Fisher ``F_i ≈ G_i ⊗ A_i`` per layer (KFAC artifacts,
  ``hf_fisher.collect(..., estimator="kfac")``): solve ``Σ λ_i (G_i ⊗ A_i + δI) vec(M − M_i) = 0``
  per block by conjugate gradients, damped relative to the Fishers' scale
  (:mod:`hf_fisher.consumers.merge_kfac`); tensors no KFAC covers follow ``no_fisher_rule``.

Group Fishers are broadcast to their slices with ``spread=True``: each element of group ``g``
gets ``F_g / |g|``, the group's mean per-element Fisher, comparable with parameter-level Fishers
and with the floor. ``normalize_fishers=True`` divides each Fisher by its global mean
``Σ F / (number of elements covered)``. A tensor that not every model's Fisher covers is merged
by ``no_fisher_rule`` (``"average"`` by default; ``"first"``, ``"base"`` or ``"error"``), logged and
recorded in the recipe.

Everything is checked before any tensor is merged or any file written (architecture, tensor
names and shapes, tokenizer vocabulary, each Fisher against its model, the output folder); the
merge then streams tensor by tensor (:mod:`hf_fisher.consumers.merge_io`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher.errors import (
    ArtifactError,
    InvalidInputError,
    ModelMismatchError,
    UnsupportedError,
)
from hf_fisher.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from .merge_io import TensorInfo, TensorSource


class _Lazy:
    """A module imported on first attribute access: reading a recipe (``hf-fisher merge`` with a bad
    recipe) and loading the plugin import neither torch nor transformers."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = _Lazy("torch")
mm = _Lazy("hf_fisher.consumers.merge_math")
_io = _Lazy("hf_fisher.consumers.merge_io")

__all__ = [
    "DEFAULT_GRID",
    "METHODS",
    "NO_FISHER_RULES",
    "RECIPE_NAME",
    "is_merge_output_file",
    "load_recipe",
    "merge_with_fisher",
    "recipe_to_kwargs",
]

logger = logging.getLogger(__name__)

METHODS = ("fisher", "fisher_task_vector", "average", "task_arithmetic", "ties", "dare", "regmean", "fisher_regmean", "kfac")
FISHER_METHODS = ("fisher", "fisher_task_vector", "fisher_regmean")
#: methods that take one Fisher (diagonal or KFAC) per model
FISHER_INPUT_METHODS = FISHER_METHODS + ("kfac",)
BASE_METHODS = ("fisher_task_vector", "task_arithmetic", "ties", "dare")
NO_FISHER_RULES = ("average", "first", "base", "error")
RECIPE_NAME = "merge_recipe.yaml"
CARD_NAME = "README.md"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

#: keyword arguments passed through to the Hub (downloads: revision, token, endpoint, cache_dir;
#: push_to_hub: the others)
HUB_OPTIONS = ("revision", "token", "endpoint", "cache_dir", "path_in_repo", "private", "create_pr", "commit_message", "api")

#: the validation grid (see :func:`merge_with_fisher`): model-weight mixtures
#: ``λ = (1 − t)·uniform + t·e_i`` for each model ``i`` and ``t`` below (``t = 0``: uniform),
#: scalings for task arithmetic / TIES / DARE, Fisher floors for the Fisher methods
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "weight_lean": (0.0, 0.25, 0.5),
    "scaling": (0.25, 0.5, 0.75, 1.0, 1.25),
    "fisher_floor": (1e-8, 1e-6, 1e-4, 1e-2),
}

#: config fields that change tensor shapes or their meaning, compared across the inputs
ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings",
    "num_local_experts", "num_experts", "moe_intermediate_size", "type_vocab_size",
)

PAPERS = {
    "fisher": "Matena & Raffel 2022, *Merging Models with Fisher-Weighted Averaging* (arXiv:2111.09832)",
    "fisher_task_vector": "Matena & Raffel 2022 (Fisher-weighted averaging) applied to task vectors (Ilharco et al. 2023)",
    "average": "weighted parameter averaging (Wortsman et al. 2022, *Model soups*, arXiv:2203.05482)",
    "task_arithmetic": "Ilharco et al. 2023, *Editing Models with Task Arithmetic* (arXiv:2212.04089)",
    "ties": "Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models* (arXiv:2306.01708)",
    "dare": "Yu et al. 2024, *Language Models are Super Mario* (DARE, arXiv:2311.03099)",
    "regmean": "Jin et al. 2023, *Dataless Knowledge Fusion by Merging Weights of Language Models* (RegMean, arXiv:2212.09849)",
    "fisher_regmean": "Jin et al. 2023 (RegMean) for Linear weights + Matena & Raffel 2022 (Fisher merging) elsewhere",
    "kfac": "Matena & Raffel 2022 (Fisher-weighted averaging) with Kronecker-factored Fishers (Martens & Grosse 2015, KFAC)",
}


def is_merge_output_file(name: str) -> bool:
    """Whether a file name belongs to a merge output folder (what a new merge may replace)."""
    from .merge_io import is_model_output_file

    return is_model_output_file(name) or name in (RECIPE_NAME, CARD_NAME, *ADAPTER_FILES)


# ---------------------------------------------------------------------------- Fisher inputs
class FisherInput:
    """One model's Fisher, read tensor by tensor: a :class:`~hf_fisher.fisher.Fisher`, an artifact
    folder (read with :class:`~hf_fisher.fisher.FisherReader`) or a Hub reference."""

    def __init__(self, obj: Any, *, hub_options: dict | None = None) -> None:
        from hf_fisher.fisher import Fisher, FisherReader

        self.fisher = None
        self.reader = None
        if isinstance(obj, Fisher):
            self.fisher = obj
            self.ref = f"<in-memory Fisher, task {obj.metadata.task!r}>"
            self.hub_id = None
            groups = obj.groups
            self.param_shapes = dict(obj.param_shapes)
            self.reduction = obj.reduction
            self.metadata = obj.metadata
        elif isinstance(obj, (str, os.PathLike)):
            text = os.fspath(obj)
            self.ref = text
            self.hub_id = None
            if os.path.exists(text):
                folder = Path(text)
            else:
                folder = _io.resolve_hub(text, what="Fisher artifact", hub_options=hub_options)
                self.hub_id = text
            self.reader = FisherReader(folder)
            groups = self.reader.groups or (self.reader.layout.groups if self.reader.layout is not None else {})
            self.param_shapes = dict(self.reader.param_shapes)
            self.reduction = self.reader.reduction
            self.metadata = self.reader.metadata
        else:
            raise InvalidInputError(
                f"Fisher {obj!r} ({type(obj).__name__}) is not a Fisher, an artifact folder or a Hub id"
            )
        self.groups = dict(groups or {})
        self._scale: float = 1.0
        # every value finite and non-negative, before any work (the reader streams one tensor at a time)
        (self.fisher or self.reader).check_values()

    def names(self) -> set[str]:
        return set(self.param_shapes)

    def raw(self, name: str) -> torch.Tensor:
        return self.fisher[name] if self.fisher is not None else self.reader.get(name)

    def element(self, name: str) -> torch.Tensor:
        """Per-element Fisher of ``name`` (parameter-shaped; group values spread over their slices,
        ``F_g / |g|``), divided by the normalisation scale."""
        values = self.raw(name)
        if self.reduction == "group":
            values = self.groups[name].expand(values, self.param_shapes[name], spread=True)
        if self._scale != 1.0:
            values = values.to(torch.float64) / self._scale
        return values

    def global_mean(self) -> float:
        """``Σ F / number of elements covered`` (reads each tensor once)."""
        total = 0.0
        count = 0
        for name, shape in self.param_shapes.items():
            total += float(self.raw(name).double().sum())
            count += math.prod(shape)
        return total / count if count else 0.0


# ---------------------------------------------------------------------------- checks
def _full_config(src: TensorSource) -> dict[str, Any]:
    """The config with defaults filled in (``config.json`` omits values equal to the defaults)."""
    if hasattr(src, "model"):
        return src.config
    try:
        import transformers

        return transformers.AutoConfig.for_model(**src.config).to_dict()
    except Exception:  # noqa: BLE001 - unknown model type: compare what the file says
        return src.config


def _check_models(sources: Sequence[TensorSource], labels: Sequence[str]) -> None:
    """Same architecture fields, same tensor names, same shapes: ModelMismatchError otherwise."""
    ref = sources[0]
    cfg0 = _full_config(ref)
    for src, label in zip(sources[1:], labels[1:]):
        cfg = _full_config(src)
        diffs = [f"{k}: {cfg0.get(k)!r} vs {cfg.get(k)!r}" for k in ARCH_FIELDS
                 if (k in cfg0 or k in cfg) and cfg0.get(k) != cfg.get(k)]
        if diffs:
            raise ModelMismatchError(
                f"{label} ({src.ref}) has a different architecture from {labels[0]} ({ref.ref}): {'; '.join(diffs)}. "
                "Only models of one architecture (fine-tuned from one base) can be merged"
            )
        a, b = ref.infos(), src.infos()
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        if missing or extra:
            raise ModelMismatchError(
                f"{label} ({src.ref}) and {labels[0]} ({ref.ref}) have different tensors: missing in {label}: "
                f"{missing[:5]}, only in {label}: {extra[:5]}. The models must have the same parameter names"
            )
        for name, info in a.items():
            if info.shape != b[name].shape:
                raise ModelMismatchError(
                    f"tensor {name!r} has shape {b[name].shape} in {label} ({src.ref}) but {info.shape} in "
                    f"{labels[0]} ({ref.ref}); the models must have the same shapes"
                )


def vocabulary_fingerprint(folder: Path | None) -> tuple[str, str] | None:
    """(file, digest) of a folder's tokenizer vocabulary, or None without tokenizer files.

    ``tokenizer.json``: its ``model.vocab`` and ``added_tokens`` (id, content); otherwise the bytes
    of ``vocab.json`` + ``merges.txt``, ``vocab.txt``, ``tokenizer.model`` or ``spiece.model``."""
    if folder is None:
        return None
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
            text = json.dumps([vocab, added], sort_keys=True, ensure_ascii=False)
        except (OSError, ValueError, AttributeError) as e:
            raise InvalidInputError(f"cannot read the tokenizer {tj}: {e}") from e
        return "tokenizer.json", hashlib.sha256(text.encode("utf-8")).hexdigest()
    for names in (("vocab.json", "merges.txt"), ("vocab.txt",), ("tokenizer.model",), ("spiece.model",)):
        if (folder / names[0]).is_file():
            h = hashlib.sha256()
            for n in names:
                if (folder / n).is_file():
                    h.update((folder / n).read_bytes())
            return names[0], h.hexdigest()
    return None


def _check_tokenizers(sources: Sequence[TensorSource], labels: Sequence[str], allow: bool) -> None:
    prints = [(label, src, vocabulary_fingerprint(src.folder)) for label, src in zip(labels, sources)]
    have = [p for p in prints if p[2] is not None]
    if len({p[2] for p in have}) <= 1:
        return
    first = have[0]
    other = next(p for p in have if p[2] != first[2])
    msg = (f"the tokenizer vocabulary of {other[0]} ({other[1].ref}, {other[2][0]}) differs from that of "
           f"{first[0]} ({first[1].ref}, {first[2][0]})")
    if allow:
        logger.warning("%s; merging anyway (allow_tokenizer_mismatch=True); the output gets the tokenizer of %s",
                       msg, first[0])
        return
    raise ModelMismatchError(
        f"{msg}: token ids would mean different tokens in the merged embeddings. Merge models with one "
        "tokenizer, or pass allow_tokenizer_mismatch=True if the vocabularies are known to agree"
    )


def _check_fisher(fi: FisherInput, src: TensorSource, label: str) -> None:
    infos = src.infos()
    extra = sorted(fi.names() - set(infos))
    if extra:
        raise ModelMismatchError(
            f"the Fisher of {label} ({fi.ref}) has parameters its model ({src.ref}) does not have, e.g. {extra[:5]}; "
            "was it collected on another model?"
        )
    for name, shape in fi.param_shapes.items():
        if tuple(shape) != infos[name].shape:
            raise ModelMismatchError(
                f"the Fisher of {label} ({fi.ref}) gives {name!r} shape {tuple(shape)}, the model ({src.ref}) "
                f"has {infos[name].shape}; was it collected on another model?"
            )
    mt_f = fi.metadata.model_type
    mt_m = src.config.get("model_type")
    if mt_f and mt_m and mt_f != mt_m:
        raise ModelMismatchError(
            f"the Fisher of {label} ({fi.ref}) was collected on a {mt_f!r} model, but {src.ref} is {mt_m!r}"
        )


# ---------------------------------------------------------------------------- plan
@dataclass
class MergeSettings:
    """The numbers a merge uses (what the recipe records)."""

    method: str
    weights: list[float]
    fisher_floor: float = 1e-6
    normalize_fishers: bool = False
    scaling: float = 1.0
    density: float = 1.0
    drop_p: float = 0.9
    seed: int = 0
    dare_then: str = "task_arithmetic"
    alpha: float = 0.9
    no_fisher_rule: str = "average"
    kfac_damping: float = 1e-3
    kfac_damping_mode: str = "factor"

    def parameters(self) -> dict[str, Any]:
        m = self.method
        out: dict[str, Any] = {}
        if m in FISHER_METHODS:
            out.update(fisher_floor=self.fisher_floor, normalize_fishers=self.normalize_fishers,
                       no_fisher_rule=self.no_fisher_rule)
        if m in ("task_arithmetic", "ties", "dare"):
            out["scaling"] = self.scaling
        if m == "ties" or (m == "dare" and self.dare_then == "ties"):
            out["density"] = self.density
        if m == "dare":
            out.update(drop_p=self.drop_p, seed=self.seed, dare_then=self.dare_then)
        if m in ("regmean", "fisher_regmean"):
            out["alpha"] = self.alpha
        if m == "kfac":
            out.update(kfac_damping=self.kfac_damping, kfac_damping_mode=self.kfac_damping_mode, no_fisher_rule=self.no_fisher_rule)
        return out


def merge_tensor(
    name: str,
    thetas: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    fishers: Sequence[torch.Tensor] | None,
    s: MergeSettings,
    *,
    gram: tuple[Sequence[torch.Tensor], str] | None = None,
) -> torch.Tensor:
    """The merged value of one tensor (``fishers``: per-element Fishers of every model, or None
    when the no-Fisher rule applies; ``gram``: RegMean Grams and kind for a Linear weight)."""
    w = s.weights
    m = s.method
    if gram is not None:
        from hf_fisher.consumers.regmean import regmean_tensor

        return regmean_tensor(list(thetas), list(gram[0]), alpha=s.alpha, kind=gram[1])
    if m in FISHER_INPUT_METHODS:
        if fishers is None:  # (KFAC-covered tensors never get here: see _merge_one)
            if s.no_fisher_rule == "first":
                return thetas[0].clone()
            if s.no_fisher_rule == "base":
                return base.clone()
            return mm.weighted_average(thetas, w)
        if m == "fisher_task_vector":
            return mm.fisher_task_vector(base, thetas, fishers, w, floor=s.fisher_floor)
        return mm.fisher_weighted(thetas, fishers, w, floor=s.fisher_floor)
    if m in ("average", "regmean"):
        return mm.weighted_average(thetas, w)
    if m == "task_arithmetic":
        return mm.task_arithmetic(base, thetas, w, scaling=s.scaling)
    if m == "ties":
        return mm.ties(base, thetas, w, density=s.density, scaling=s.scaling)
    if m == "dare":
        gens = [mm.tensor_generator(s.seed, name, i) for i in range(len(thetas))]
        return mm.dare(base, thetas, w, p=s.drop_p, generators=gens, then=s.dare_then, density=s.density, scaling=s.scaling)
    raise InvalidInputError(f"unknown merge method {m!r}")  # pragma: no cover - checked before


@dataclass
class _Inputs:
    sources: list[TensorSource]
    labels: list[str]
    base: TensorSource | None
    fishers: list[FisherInput] | None
    covered: set[str] = field(default_factory=set)
    grams: dict[str, tuple[list[torch.Tensor], str]] = field(default_factory=dict)
    kfac: Any = None  # merge_kfac.KFACMerge for method "kfac"


class _Reader:
    """Reads the inputs of one tensor (optionally from a cache filled once, for validation)."""

    def __init__(self, inp: _Inputs, settings: MergeSettings, cache: bool = False) -> None:
        self.inp = inp
        self.cache: dict[str, tuple] | None = {} if cache else None
        self.needs_base = settings.method in BASE_METHODS or settings.no_fisher_rule == "base"
        self.use_fisher = settings.method in FISHER_METHODS

    def read(self, name: str):
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        inp = self.inp
        thetas = [src.get(name) for src in inp.sources]
        base = inp.base.get(name) if (self.needs_base and inp.base is not None) else None
        fishers = None
        if self.use_fisher and name in inp.covered and name not in inp.grams:
            fishers = [fi.element(name) for fi in inp.fishers]
        out = (thetas, base, fishers)
        if self.cache is not None:
            self.cache[name] = out
        return out


def _merge_one(reader: _Reader, info: TensorInfo, s: MergeSettings, out_dtype: torch.dtype | None) -> torch.Tensor:
    kf = reader.inp.kfac
    if kf is not None and info.name in kf.block_of:
        merged = kf.merged(info.name, lambda n: reader.read(n)[0], s.weights, s.kfac_damping, s.kfac_damping_mode)
        return merged.to(out_dtype or info.dtype)
    thetas, base, fishers = reader.read(info.name)
    if not info.dtype.is_floating_point:  # integer buffers are not merged: they must agree
        for i, t in enumerate(thetas[1:], start=1):
            if not torch.equal(t, thetas[0]):
                raise ModelMismatchError(
                    f"integer tensor {info.name!r} differs between {reader.inp.labels[0]} and "
                    f"{reader.inp.labels[i]}; it cannot be averaged"
                )
        return thetas[0]
    merged = merge_tensor(info.name, thetas, base, fishers, s, gram=reader.inp.grams.get(info.name))
    return merged.to(out_dtype or info.dtype)


def _out_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        d = dtype
    else:
        d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, ...), got {dtype!r}")
    return d


# ---------------------------------------------------------------------------- validation
def _eval_model(src: TensorSource, dtype: torch.dtype | None = None):
    """A model instance to evaluate merged weights in (a copy of a loaded input, or loaded from
    the first input's folder)."""
    if hasattr(src, "model"):
        return copy.deepcopy(src.model).eval()
    import transformers

    archs = src.config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise InvalidInputError(
            f"cannot build a model from {src.ref}: config.json names no known architecture ({archs}); "
            "pass the loaded model instead"
        )
    info = next((i for i in src.infos().values() if i.dtype.is_floating_point), None)
    model = cls.from_pretrained(str(src.folder), dtype=dtype or (info.dtype if info else torch.float32))
    return model.eval()


def _batch_loss(model, batch: Mapping[str, Any]) -> float:
    from hf_fisher.engine.losses import model_loss

    return float(model_loss(model, batch))


def validation_loss(model, validation: Sequence[Sequence[Mapping[str, Any]]]) -> float:
    """Mean over tasks of the mean batch loss (``model(**batch).loss``; labels default to the
    input ids with padding ignored)."""
    losses = []
    with torch.no_grad():
        for batches in validation:
            per = [_batch_loss(model, b) for b in batches]
            if not per:
                raise InvalidInputError("a task's validation batches are empty")
            losses.append(sum(per) / len(per))
    return sum(losses) / len(losses)


def validation_candidates(s: MergeSettings, n: int, grid: Mapping[str, Sequence[float]]) -> list[MergeSettings]:
    """Every grid point: weights ``(1−t)/n + t·e_i`` (times ``n`` for task-vector methods, so uniform
    is all ones), × scaling (task arithmetic, TIES, DARE), × Fisher floor (Fisher methods)."""
    unit = float(n) if s.method in ("task_arithmetic", "ties", "dare") else 1.0
    weights: list[list[float]] = []
    for t in grid["weight_lean"]:
        if t == 0:
            cands = [[unit / n] * n]
        else:
            cands = [[unit * ((1 - t) / n + (t if j == i else 0.0)) for j in range(n)] for i in range(n)]
        for c in cands:
            if c not in weights:
                weights.append(c)
    scalings = list(grid["scaling"]) if s.method in ("task_arithmetic", "ties", "dare") else [s.scaling]
    floors = list(grid["fisher_floor"]) if s.method in FISHER_METHODS else [s.fisher_floor]
    return [replace(s, weights=w, scaling=float(sc), fisher_floor=float(fl))
            for w, sc, fl in itertools.product(weights, scalings, floors)]


def _tune(plan: list[TensorInfo], reader: _Reader, s: MergeSettings, validation, grid, progress: bool):
    from tqdm.auto import tqdm

    model = _eval_model(reader.inp.sources[0])
    cands = validation_candidates(s, len(reader.inp.sources), grid)
    results = []
    for cand in tqdm(cands, desc="validation grid", disable=not progress):
        sd = {info.name: _merge_one(reader, info, cand, None) for info in plan}
        _, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected:
            raise InvalidInputError(f"merged tensors the model does not have: {unexpected[:5]}")
        results.append((validation_loss(model, validation), cand))
    best_loss, best = min(results, key=lambda r: r[0])  # first of equal losses
    choice = {"loss": best_loss, "weights": best.weights}
    if s.method in ("task_arithmetic", "ties", "dare"):
        choice["scaling"] = best.scaling
    if s.method in FISHER_METHODS:
        choice["fisher_floor"] = best.fisher_floor
    logger.info("validation picked %s (mean validation loss %.6g over %d tasks, %d grid points)",
                {k: v for k, v in choice.items() if k != "loss"}, best_loss, len(validation), len(cands))
    record = {"criterion": "mean over tasks of the mean batch loss", "grid": {k: list(v) for k, v in grid.items()},
              "points": len(cands), "chosen": choice,
              "losses": [{"weights": c.weights, "scaling": c.scaling, "fisher_floor": c.fisher_floor, "loss": l}
                         for l, c in results]}
    return best, record


# ---------------------------------------------------------------------------- RegMean
def _collect_grams(inp: _Inputs, data, max_samples, progress) -> None:
    try:
        from hf_fisher.consumers.regmean import collect_input_grams
    except ImportError as e:
        raise UnsupportedError(f"RegMean needs hf_fisher.consumers.regmean, which is not available ({e})") from None
    per_model = []
    for src, batches in zip(inp.sources, data):
        model = _eval_model(src) if not hasattr(src, "model") else src.model
        per_model.append(collect_input_grams(model, batches, max_samples=max_samples, progress=progress))
        del model
    names = set(per_model[0].grams)
    infos = inp.sources[0].infos()
    for name in sorted(names):
        if name not in infos or any(name not in g.grams for g in per_model):
            logger.info("RegMean: no Gram matrix of %r for every model (or not a saved tensor); merged by the other rule", name)
            continue
        inp.grams[name] = ([g.grams[name] for g in per_model], per_model[0].kinds[name])


# ---------------------------------------------------------------------------- the API
def _is_adapter(m: Any) -> bool:
    if hasattr(m, "peft_config"):
        return True
    return isinstance(m, (str, os.PathLike)) and (Path(os.fspath(m)) / "adapter_config.json").is_file()


def real_number(name: str, value: Any) -> float:
    """``float(value)`` for the numeric argument ``name``, or an :class:`InvalidInputError` naming it
    when ``value`` is a bool (``True`` is not 1.0 here), not a real number, NaN or infinite."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)


def _nonempty_batches(name: str, items: Sequence[Any]) -> list[Any]:
    """Each entry of ``items`` (one iterable of batches per model) with at least one batch, checked
    before any work: sized entries by their length, iterators by peeking at their first batch
    (which is put back). :class:`InvalidInputError` naming the empty entry."""
    out = []
    for i, batches in enumerate(items):
        if isinstance(batches, Mapping) or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise InvalidInputError(
                f"{name}[{i}] must be an iterable of batches (dicts of tensors), got {type(batches).__name__}"
            )
        if hasattr(batches, "__len__"):
            empty = len(batches) == 0
        else:
            it = iter(batches)
            first = next(it, _EMPTY)
            empty = first is _EMPTY
            batches = batches if empty else itertools.chain([first], it)
        if empty:
            raise InvalidInputError(f"{name}[{i}] holds no batch; give at least one batch for every model")
        out.append(batches)
    return out


_EMPTY = object()


def _ref_of(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    return f"<loaded {type(obj).__name__}>"


def merge_with_fisher(
    models: Sequence[Any],
    fishers: Sequence[Any] | None = None,
    *,
    weights: Sequence[float] | None = None,
    method: str = "fisher",
    base_model: Any = None,
    fisher_floor: float = 1e-6,
    normalize_fishers: bool = False,
    output_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    push_to_hub: str | None = None,
    scaling: float = 1.0,
    density: float | None = None,
    drop_p: float = 0.9,
    seed: int = 0,
    dare_then: str = "task_arithmetic",
    alpha: float = 0.9,
    data: Sequence[Iterable[Mapping[str, Any]]] | None = None,
    max_samples: int | None = None,
    validation: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    validation_grid: Mapping[str, Sequence[float]] | None = None,
    no_fisher_rule: str = "average",
    allow_tokenizer_mismatch: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    rank: int | str | None = None,
    merge_into_base: bool = False,
    kfac_damping: float = 1e-3,
    kfac_damping_mode: str = "factor",
    **hub_options: Any,
):
    """Merge ``models`` (folders, Hub ids or loaded ``PreTrainedModel``\\ s) into one.

    Methods and formulas: see the module docstring. ``fishers``: one per model (``Fisher``,
    artifact folder, Hub ``repo`` / ``repo:subfolder``), required by ``fisher``,
    ``fisher_task_vector``, ``fisher_regmean``; for ``kfac`` one KFAC Fisher per model
    (``KFACFisher``, artifact folder or Hub ref), ``kfac_damping`` (relative δ, default 1e-3) and
    ``kfac_damping_mode`` ("factor", default, or "exact"; :mod:`hf_fisher.consumers.merge_kfac`).
    ``weights`` λ_i: default ``1/n`` each for the
    averaging methods and ``1.0`` each for task arithmetic / TIES / DARE (mergekit's default).
    ``base_model``: required by ``fisher_task_vector``, ``task_arithmetic``, ``ties``, ``dare``.
    ``scaling`` s (default 1.0), ``density`` (TIES; default 0.2, the paper's top-20%), ``drop_p``
    (DARE; default 0.9) and ``seed``, ``dare_then`` ("task_arithmetic" or "ties"), ``alpha``
    (RegMean; default 0.9), ``data`` (RegMean: one iterable of batches per model).

    ``validation=[batches_1, ...]`` (held-out batches per task) picks λ, the scaling and the Fisher
    floor on :data:`DEFAULT_GRID` (or ``validation_grid``) by the mean validation loss over the
    tasks; the inputs are then read once and kept in memory. The choice is logged and written into
    the recipe and card.

    Returns the merged model when ``output_dir`` is None; else writes ``output_dir`` atomically
    (weights as sharded safetensors + index, config, tokenizer, generation config, ``merge_recipe.yaml``,
    ``README.md``) and returns its path. ``push_to_hub="user/name"`` uploads the folder
    (``hub_options`` go to :func:`hf_fisher.integrations.hub.push_folder` and the downloads).
    Every check runs before any tensor is merged or file written.

    PEFT adapters (folders with ``adapter_config.json`` or ``PeftModel``\\ s) are merged by
    :func:`hf_fisher.consumers.merge_lora.merge_lora_adapters` (``rank``, ``merge_into_base``
    apply to them only); this function writes the folder, recipe and card around the result.
    """
    from tqdm.auto import tqdm

    # ---- arguments
    unknown = sorted(set(hub_options) - set(HUB_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"merge_with_fisher got unknown keyword argument(s) {unknown}; besides its own arguments it takes only "
            f"the Hub options {list(HUB_OPTIONS)}"
        )
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {list(METHODS)}, got {method!r}")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or len(models) < 2:
        raise InvalidInputError("models must be a list of at least two models (folders, Hub ids or loaded models)")
    n = len(models)
    if no_fisher_rule not in NO_FISHER_RULES:
        raise InvalidInputError(f"no_fisher_rule must be one of {list(NO_FISHER_RULES)}, got {no_fisher_rule!r}")
    if dare_then not in ("task_arithmetic", "ties"):
        raise InvalidInputError(f"dare_then must be 'task_arithmetic' or 'ties', got {dare_then!r}")
    if not real_number("fisher_floor", fisher_floor) > 0:
        raise InvalidInputError(f"fisher_floor must be a positive finite number, got {fisher_floor!r}")
    real_number("scaling", scaling)
    if not 0 <= real_number("drop_p", drop_p) < 1:
        raise InvalidInputError(f"drop_p must be in [0, 1), got {drop_p!r}")
    dens = 0.2 if density is None else real_number("density", density)
    if not 0 < dens <= 1:
        raise InvalidInputError(f"density must be in (0, 1], got {density!r}")
    if not 0 <= real_number("alpha", alpha) <= 1:
        raise InvalidInputError(f"alpha must be in [0, 1], got {alpha!r}")
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    if isinstance(kfac_damping, bool) or not isinstance(kfac_damping, (int, float)) or not (
        math.isfinite(kfac_damping) and kfac_damping > 0
    ):
        raise InvalidInputError(f"kfac_damping must be a positive finite number (δ relative to the mean Fisher diagonal), got {kfac_damping!r}")
    if kfac_damping_mode not in ("factor", "exact"):
        raise InvalidInputError(f"kfac_damping_mode must be 'factor' ((G + √δI) ⊗ (A + √δI)) or 'exact' (G ⊗ A + δI), got {kfac_damping_mode!r}")
    if weights is None:
        w = [1.0] * n if method in ("task_arithmetic", "ties", "dare") else [1.0 / n] * n
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise InvalidInputError(f"weights must be a list of numbers, one per model, got {weights!r}")
        w = [real_number(f"weights[{i}]", x) for i, x in enumerate(weights)]
        if len(w) != n:
            raise InvalidInputError(f"{len(w)} weights for {n} models; give one weight per model")
        if method in ("fisher", "fisher_task_vector", "average", "regmean", "fisher_regmean", "kfac") and (
            any(x < 0 for x in w) or sum(w) <= 0
        ):
            raise InvalidInputError(f"method {method!r} needs non-negative weights with a positive sum, got {w}")
    if method in FISHER_INPUT_METHODS:
        if fishers is None:
            what = "KFAC Fisher (hf_fisher.collect(..., estimator='kfac'))" if method == "kfac" else "Fisher"
            raise InvalidInputError(f"method {method!r} needs fishers=[one {what} per model]")
        if len(fishers) != n:
            raise InvalidInputError(f"{len(fishers)} Fishers for {n} models; give one Fisher per model")
    if method in BASE_METHODS and base_model is None:
        raise InvalidInputError(f"method {method!r} needs base_model= (the model the inputs were fine-tuned from)")
    if no_fisher_rule == "base" and base_model is None:
        raise InvalidInputError("no_fisher_rule='base' needs base_model=")
    if method in ("regmean", "fisher_regmean"):
        if data is None or isinstance(data, (str, Mapping)) or not isinstance(data, Sequence) or len(data) != n:
            raise InvalidInputError(f"method {method!r} needs data=[batches_1, ..., batches_{n}], one iterable of batches per model")
        if validation is not None:
            raise UnsupportedError("validation tuning is not available for RegMean methods; tune alpha by hand")
        data = _nonempty_batches("data", data)
    if validation is not None:
        if isinstance(validation, (str, Mapping)) or not isinstance(validation, Sequence) or len(validation) != n:
            got = len(validation) if isinstance(validation, Sequence) else type(validation).__name__
            raise InvalidInputError(f"validation must hold one list of batches per model ({n}), got {got}")
        validation = [list(b) for b in _nonempty_batches("validation", validation)]  # read once per grid point
    grid = dict(DEFAULT_GRID)
    if validation_grid:
        unknown = sorted(set(validation_grid) - set(grid))
        if unknown:
            raise InvalidInputError(f"validation_grid has unknown key(s) {unknown}; known: {sorted(grid)}")
        grid.update({k: tuple(real_number(f"validation_grid[{k!r}][{i}]", x) for i, x in enumerate(v))
                     for k, v in validation_grid.items()})
    out_dtype = _out_dtype(dtype)
    shard_bytes = _io.parse_size(max_shard_size)
    settings = MergeSettings(method, w, float(fisher_floor), bool(normalize_fishers), float(scaling), dens,
                             float(drop_p), int(seed), dare_then, float(alpha), no_fisher_rule, float(kfac_damping),
                             kfac_damping_mode)

    if push_to_hub:  # the repository arguments, before any work or request
        from hf_fisher.integrations.hub import check_push_ready

        check_push_ready(str(push_to_hub), **{k: v for k, v in hub_options.items() if k in (
            "path_in_repo", "revision", "create_pr", "commit_message", "private", "token", "api")})

    # ---- the output folder, before the inputs are read
    target = None
    if output_dir is not None:
        target = _check_output(output_dir, _input_paths(models, base_model, fishers))

    if any(_is_adapter(m) for m in models):
        if method == "kfac":
            raise UnsupportedError("method='kfac' merges full models; for LoRA adapters use method='fisher' (delta-W space)")
        return _merge_adapters(models, fishers, settings, base_model, out_dtype, target, push_to_hub, hub_options,
                               rank=rank, merge_into_base=merge_into_base)

    # ---- inputs and checks (no tensor data read)
    labels = [f"model {i}" for i in range(n)]
    sources = [_io.open_source(m, what=f"model {i}", hub_options=hub_options) for i, m in enumerate(models)]
    base = _io.open_source(base_model, what="base_model", hub_options=hub_options) if base_model is not None else None
    check_src = sources + ([base] if base is not None else [])
    check_labels = labels + (["base_model"] if base is not None else [])
    _check_models(check_src, check_labels)
    _check_tokenizers(check_src, check_labels, allow_tokenizer_mismatch)
    fisher_inputs = None
    covered: set[str] = set()
    if method in FISHER_METHODS:
        fisher_inputs = [FisherInput(f, hub_options=hub_options) for f in fishers]
        for fi, src, label in zip(fisher_inputs, sources, labels):
            _check_fisher(fi, src, label)
        covered = set.intersection(*(fi.names() for fi in fisher_inputs))
    elif method == "kfac":
        from hf_fisher.consumers.merge_kfac import KFACMerge, load_kfac

        kfacs = [load_kfac(f, hub_options=hub_options) for f in fishers]
        kfac_merge = KFACMerge(kfacs, [{k: tuple(i.shape) for k, i in src.infos().items()} for src in sources], labels)
        covered = kfac_merge.covered()
    elif fishers is not None:
        logger.info("method %r does not use Fishers; the %d Fishers given are ignored", method, len(fishers))
    plan_infos = list(sources[0].infos().values())
    inp = _Inputs(sources, labels, base, fisher_inputs, covered)
    if method == "kfac":
        inp.kfac = kfac_merge
    no_fisher: list[str] = []
    if method in FISHER_INPUT_METHODS:
        no_fisher = [i.name for i in plan_infos if i.dtype.is_floating_point and i.name not in covered]
        if method == "fisher_regmean":
            pass  # filled in after the Grams are known
        elif no_fisher and no_fisher_rule == "error":
            raise InvalidInputError(
                f"{len(no_fisher)} tensor(s) have no Fisher in every model, e.g. {no_fisher[:5]}; collect Fishers "
                "for them or choose no_fisher_rule='average', 'first' or 'base'"
            )
    out_plan = [_io.TensorInfo(i.name, i.shape, out_dtype if (out_dtype and i.dtype.is_floating_point) else i.dtype)
                for i in plan_infos]

    # ---- work
    if method in ("regmean", "fisher_regmean"):
        _collect_grams(inp, data, max_samples, progress)
        if method == "fisher_regmean":
            no_fisher = [x for x in no_fisher if x not in inp.grams]
            if no_fisher and no_fisher_rule == "error":
                raise InvalidInputError(f"{len(no_fisher)} tensor(s) have neither a Gram nor a Fisher, e.g. {no_fisher[:5]}")
    if fisher_inputs is not None and normalize_fishers:
        for fi in fisher_inputs:
            mean = fi.global_mean()
            if not mean > 0:
                raise InvalidInputError(f"cannot normalise the Fisher {fi.ref}: its global mean is {mean}")
            fi._scale = mean
        logger.info("Fishers normalised by their global means %s", [fi._scale for fi in fisher_inputs])
    if no_fisher:
        logger.warning(
            "%d tensor(s) have no Fisher in every model and are merged by rule %r (%s): %s%s", len(no_fisher),
            no_fisher_rule, _RULE_TEXT[no_fisher_rule], ", ".join(no_fisher[:10]), " ..." if len(no_fisher) > 10 else "",
        )
    reader = _Reader(inp, settings, cache=validation is not None)
    choice = None
    if validation is not None:
        settings, choice = _tune(plan_infos, reader, settings, validation, grid, progress)

    recipe = build_recipe(models, fishers, settings, base_model, out_dtype, choice, no_fisher,
                          sorted(inp.grams) if inp.grams else None)
    folder_ctx = None
    if target is None:
        folder_ctx = tempfile.TemporaryDirectory(prefix="hf-fisher-merge-")
        write_to = Path(folder_ctx.name) / "merged"
    else:
        write_to = target
    from hf_fisher.atomic import atomic_folder

    with atomic_folder(write_to, what="merged model") as tmp:
        writer = _io.ShardedWriter(tmp, out_plan, shard_bytes)
        try:
            for info in tqdm(plan_infos, desc=f"merging ({method})", unit="tensor", disable=not progress):
                writer.write(info.name, _merge_one(reader, info, settings, out_dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_side_files(tmp, sources, base, out_dtype)
        (tmp / RECIPE_NAME).write_text(yaml_text(recipe), encoding="utf-8")
        from hf_fisher.cards import merged_card

        merged_card(recipe, sources=sources, fishers=fisher_inputs, base=base).save(tmp / CARD_NAME)
    logger.info("merged %d models (%s) into %s", n, method, write_to)
    if push_to_hub:
        _push(write_to, push_to_hub, hub_options)
    if target is not None:
        return target
    try:
        return _load_merged(write_to, sources[0])
    finally:
        folder_ctx.cleanup()


_RULE_TEXT = {
    "average": "λ-weighted average",
    "first": "the first model's value",
    "base": "the base model's value",
    "error": "refused",
}


def _input_paths(models, base_model, fishers) -> list[tuple[str, Any]]:
    """``(label, path)`` of the inputs given as paths: an output folder may not be, hold or lie in one."""
    pairs = [(f"model {i}", m) for i, m in enumerate(models)] + [("base_model", base_model)]
    pairs += [(f"Fisher {i}", f) for i, f in enumerate(fishers or [])]
    return [(label, ref) for label, ref in pairs if isinstance(ref, (str, os.PathLike))]


def _check_output(output_dir, inputs=(), flag: str = "output_dir") -> Path:
    from hf_fisher.atomic import check_not_input, check_target

    path = Path(os.path.abspath(os.fspath(output_dir)))
    check_not_input(path, inputs, what="merged model", flag=flag)
    if path.is_dir() and any(path.iterdir()) and not (path / RECIPE_NAME).is_file():
        raise ArtifactError(
            f"{flag} {path} is a non-empty folder that is not a previous merge output (no {RECIPE_NAME}); "
            "choose a new or empty folder"
        )
    return check_target(path, allowed=is_merge_output_file, what="merged model", overwrite=True, flag=flag)


def _write_side_files(tmp: Path, sources: Sequence[TensorSource], base: TensorSource | None, out_dtype) -> None:
    first = sources[0]
    cfg = dict(first.config)
    if out_dtype is not None:
        cfg["dtype"] = str(out_dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
    if hasattr(first, "model"):
        first.model.config.save_pretrained(tmp)
        if out_dtype is not None:
            data = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            data["dtype"] = cfg["dtype"]
            data.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        gen = getattr(first.model, "generation_config", None)
        if gen is not None and first.folder is None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # an invalid generation config is not worth failing a merge
                logger.info("generation config of %s not saved", first.ref, exc_info=True)
    else:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    folders = [s.folder for s in sources] + ([base.folder] if base is not None else [])
    _io.copy_side_files(folders, tmp, [f for f in (*_io.TOKENIZER_FILES, "generation_config.json") if not (tmp / f).exists()])


def _load_merged(folder: Path, first: TensorSource):
    import transformers

    if hasattr(first, "model"):
        cls = type(first.model)
    else:
        archs = first.config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        cls = cls or transformers.AutoModel
    info = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = info.get("dtype") or info.get("torch_dtype")
    return cls.from_pretrained(str(folder), dtype=getattr(torch, dtype) if isinstance(dtype, str) else "auto").eval()


def _push(folder: Path, repo_id: str, hub_options: Mapping[str, Any]) -> str:
    try:
        from hf_fisher.integrations.hub import push_folder
    except ImportError as e:
        raise UnsupportedError(f"push_to_hub needs hf_fisher.integrations.hub ({e})") from None
    keys = ("path_in_repo", "private", "revision", "create_pr", "commit_message", "token", "api")
    return push_folder(folder, repo_id, **{k: v for k, v in hub_options.items() if k in keys})


def _merge_adapters(models, fishers, s: MergeSettings, base_model, out_dtype, target, push_to_hub, hub_options, *,
                    rank=None, merge_into_base=False):
    """LoRA / PEFT adapters: delegated to :func:`hf_fisher.consumers.merge_lora.merge_lora_adapters`."""
    try:
        from hf_fisher.consumers.merge_lora import merge_lora_adapters
    except ImportError as e:
        raise UnsupportedError(f"merging PEFT adapters needs hf_fisher.consumers.merge_lora, which is not available ({e})") from None
    if not all(_is_adapter(m) for m in models):
        raise InvalidInputError("either every input is a PEFT adapter or none is; got a mix of adapters and full models")
    result = merge_lora_adapters(models, fishers, weights=s.weights, method=s.method, base_model=base_model,
                                 fisher_floor=s.fisher_floor, normalize_fishers=s.normalize_fishers, dtype=out_dtype,
                                 rank=rank, merge_into_base=merge_into_base, scaling=s.scaling, density=s.density,
                                 drop_p=s.drop_p, dare_then=s.dare_then, seed=s.seed)
    if target is None and not push_to_hub:
        return result.to_model()
    recipe = build_recipe(models, fishers, s, base_model, out_dtype, None, [], None)
    recipe["hf_fisher"]["adapters"] = dict(getattr(result, "summary", {}) or {})
    if rank is not None:
        recipe["parameters"]["rank"] = rank
    if merge_into_base:
        recipe["parameters"]["merge_into_base"] = True
    from hf_fisher.atomic import atomic_folder
    from hf_fisher.cards import merged_card

    ctx = tempfile.TemporaryDirectory(prefix="hf-fisher-merge-") if target is None else None
    write_to = target if target is not None else Path(ctx.name) / "merged"
    with atomic_folder(write_to, what="merged adapter") as tmp:
        result.write_files(tmp)
        (tmp / RECIPE_NAME).write_text(yaml_text(recipe), encoding="utf-8")
        merged_card(recipe, library_name="transformers" if merge_into_base else "peft").save(tmp / CARD_NAME)
    if push_to_hub:
        _push(write_to, push_to_hub, hub_options)
    if ctx is not None:
        model = result.to_model()
        ctx.cleanup()
        return model
    return target


# ---------------------------------------------------------------------------- recipe
def _version() -> str:
    from hf_fisher.fisher import _library_version

    return _library_version()


def build_recipe(models, fishers, s: MergeSettings, base_model, out_dtype, choice, no_fisher, gram_params) -> dict:
    """The mergekit-like recipe of a merge (what ``hf-fisher merge RECIPE.yaml`` reads back)."""
    use_fisher = s.method in FISHER_INPUT_METHODS
    entries = []
    for i, m in enumerate(models):
        params: dict[str, Any] = {"weight": s.weights[i]}
        if use_fisher and fishers is not None:
            params["fisher"] = _ref_of(fishers[i]) if isinstance(fishers[i], (str, os.PathLike)) else \
                f"<in-memory {'KFAC ' if s.method == 'kfac' else ''}Fisher, task {fishers[i].metadata.task!r}>"
        entries.append({"model": _ref_of(m), "parameters": params})
    section: dict[str, Any] = {"version": _version(), "validation": choice}
    if use_fisher:
        section["no_fisher"] = {"rule": s.no_fisher_rule, "text": _RULE_TEXT[s.no_fisher_rule], "tensors": list(no_fisher)}
        if s.method == "kfac":
            section["kfac"] = ("per block: sum_i lambda_i F_i vec(M - M_i) = 0, F_i = (G_i + sqrt(delta) I) x (A_i + sqrt(delta) I) "
                               "(factor) or G_i x A_i + delta I (exact); delta = kfac_damping x mean Fisher diagonal")
        else:
            section["fisher_broadcast"] = "group Fishers spread over their slices: F_g / |g| per element"
    if gram_params is not None:
        section["regmean_tensors"] = gram_params
    return {
        "merge_method": s.method,
        "base_model": _ref_of(base_model) if base_model is not None else None,
        "models": entries,
        "parameters": s.parameters(),
        "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
        "hf_fisher": section,
    }


_PARAM_KEYS = {
    "fisher_floor": (float, int), "normalize_fishers": (bool,), "scaling": (float, int), "density": (float, int),
    "drop_p": (float, int), "seed": (int,), "dare_then": (str,), "alpha": (float, int), "no_fisher_rule": (str,),
    "allow_tokenizer_mismatch": (bool,), "max_shard_size": (str, int), "rank": (int, str), "merge_into_base": (bool,),
    "kfac_damping": (float, int), "kfac_damping_mode": (str,),
}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "hf_fisher")


def _bad(path: str, problem: str, where: str) -> InvalidInputError:
    return InvalidInputError(f"recipe {where}: key '{path}' {problem}")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, line: int) -> None:
        super().__init__(key, first, line)
        self.key, self.first, self.line = key, first, line


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
                    if first is not None:
                        raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def yaml_text(data: Any) -> str:
    """``data`` as plain YAML (block style, key order kept, no anchors/aliases: a value that
    appears twice is written twice, so every reader sees it where it is used)."""
    import yaml

    class PlainDumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return yaml.dump(data, Dumper=PlainDumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a recipe YAML file; :class:`InvalidInputError` naming the key."""
    import yaml

    where = os.fspath(path)
    try:
        text = Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read recipe {where}: {e}") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise InvalidInputError(
            f"recipe {where}: key '{e.key}' is given twice in one mapping (lines {e.first} and {e.line}); "
            "YAML would keep only the last one silently: remove one of them"
        ) from None
    except yaml.YAMLError as e:
        raise InvalidInputError(f"recipe {where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"recipe {where} must be a mapping with keys merge_method, models, ...")
    for k in data:
        if k not in _TOP_KEYS:
            raise _bad(str(k), f"is not a known key (expected {list(_TOP_KEYS)})", where)
    if "merge_method" not in data:
        raise _bad("merge_method", f"is missing (one of {list(METHODS)})", where)
    if data["merge_method"] not in METHODS:
        raise _bad("merge_method", f"must be one of {list(METHODS)}, got {data['merge_method']!r}", where)
    if data["merge_method"] in ("regmean", "fisher_regmean"):
        raise _bad("merge_method", "RegMean needs data batches, which a recipe cannot hold; use the Python API", where)
    models = data.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise _bad("models", "must be a list of at least two entries {model: ..., parameters: {...}}", where)
    for i, e in enumerate(models):
        p = f"models[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("model"), str) or not e["model"]:
            raise _bad(f"{p}.model", "must be a model folder or Hub id (a string)", where)
        extra = sorted(set(e) - {"model", "parameters"})
        if extra:
            raise _bad(f"{p}.{extra[0]}", "is not a known key (expected model, parameters)", where)
        params = e.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"{p}.parameters", "must be a mapping (weight, fisher)", where)
        for k, v in params.items():
            if k == "weight":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise _bad(f"{p}.parameters.weight", f"must be a number, got {v!r}", where)
            elif k == "fisher":
                if v is not None and (not isinstance(v, str) or v.startswith("<")):
                    raise _bad(f"{p}.parameters.fisher", f"must be a Fisher artifact folder or Hub id, got {v!r}", where)
            else:
                raise _bad(f"{p}.parameters.{k}", "is not a known key (expected weight, fisher)", where)
        if isinstance(e["model"], str) and e["model"].startswith("<"):
            raise _bad(f"{p}.model", f"names an in-memory model ({e['model']}); a recipe needs a folder or Hub id", where)
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base or base.startswith("<")):
        raise _bad("base_model", f"must be a model folder or Hub id, got {base!r}", where)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters", "must be a mapping", where)
    for k, v in params.items():
        types = _PARAM_KEYS.get(k)
        if types is None:
            raise _bad(f"parameters.{k}", f"is not a known parameter (expected {sorted(_PARAM_KEYS)})", where)
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise _bad(f"parameters.{k}", f"must be of type {'/'.join(t.__name__ for t in types)}, got {v!r}", where)
    dtype = data.get("dtype")
    if dtype is not None:
        try:
            _out_dtype(dtype)
        except InvalidInputError:
            raise _bad("dtype", f"must be a floating dtype name (float32, bfloat16, float16, float64), got {dtype!r}", where) from None
    if data.get("hf_fisher") is not None and not isinstance(data["hf_fisher"], dict):
        raise _bad("hf_fisher", "must be a mapping", where)
    return data


def recipe_to_kwargs(recipe: Mapping[str, Any], *, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """``merge_with_fisher`` arguments of a validated recipe (relative local paths resolved against
    ``relative_to`` when they exist there)."""
    def loc(ref):
        if ref is None or relative_to is None or os.path.isabs(ref):
            return ref
        cand = Path(relative_to) / ref
        return str(cand) if cand.exists() else ref

    method = recipe["merge_method"]
    models = [loc(e["model"]) for e in recipe["models"]]
    params = [e.get("parameters") or {} for e in recipe["models"]]
    weights = [p.get("weight") for p in params]
    fishers = [loc(p.get("fisher")) for p in params]
    kwargs: dict[str, Any] = dict(recipe.get("parameters") or {})
    kwargs.update(method=method, base_model=loc(recipe.get("base_model")), dtype=recipe.get("dtype"))
    if all(x is not None for x in weights):
        kwargs["weights"] = weights
    elif any(x is not None for x in weights):
        raise InvalidInputError("recipe: give parameters.weight for every model or for none")
    if method in FISHER_INPUT_METHODS:
        if any(f is None for f in fishers):
            raise InvalidInputError(f"recipe: method {method!r} needs models[i].parameters.fisher for every model")
        kwargs["fishers"] = fishers
    kwargs["models"] = models
    return kwargs


# ---------------------------------------------------------------------------- plugin
@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("merge", merge_with_fisher)
