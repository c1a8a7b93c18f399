"""Merging models with their Fisher information: :func:`merge_with_fisher`.

Notation: models ``θ_1..θ_n`` with weights ``λ_i``, Fishers ``F_i``, base ``θ_base``, task vectors
``τ_i = θ_i − θ_base``. The method is a registered
:class:`~hf_fisher.consumers.merge.base.MergeMethod` (found by name in
:mod:`hf_fisher.consumers.merge.registry`); its class states its formula, what it needs and its
options. The built-ins (:mod:`hf_fisher.consumers.merge.methods`): ``fisher`` (Matena & Raffel
2022) ``θ* = Σ λ_i F̃_i θ_i / Σ λ_i F̃_i``, ``fisher_task_vector``, ``average``,
``task_arithmetic``, ``ties``, ``dare``, ``regmean``, ``fisher_regmean``, ``kfac``.

Group Fishers are broadcast to their slices with ``spread=True``: each element of group ``g``
gets ``F_g / |g|``, the group's mean per-element Fisher, comparable with parameter-level Fishers
and with the floor. ``normalize_fishers=True`` divides each Fisher by its global mean
``Σ F / (number of elements covered)``. A tensor that not every model's Fisher covers is merged
by ``no_fisher_rule`` (``"average"`` by default; ``"first"``, ``"base"`` or ``"error"``), logged and
recorded in the recipe.

Everything is checked before any tensor is merged or any file written (the method and its
options, architecture, tensor names and shapes, tokenizer vocabulary, each Fisher against its
model, the output folder); the merge then streams tensor by tensor
(:mod:`hf_fisher.consumers.merge.io`).
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
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher.errors import (
    ArtifactError,
    InvalidInputError,
    ModelMismatchError,
    UnsupportedError,
)
from hf_fisher.hookspecs import hookimpl

from . import registry
from .base import RULE_TEXT, MergeMethod, TensorInputs, real_number
from .recipe import (  # noqa: F401
    CARD_NAME,
    LEGACY_RECIPE_NAMES,
    RECIPE_NAME,
    _ref_of,
    build_recipe,
    load_recipe,
    recipe_to_kwargs,
    yaml_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from .io import TensorInfo, TensorSource


class _Lazy:
    """A module imported on first attribute access: reading a recipe (``hf-fisher merge`` with a bad
    recipe) and loading the plugin import neither torch nor transformers."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = _Lazy("torch")
_io = _Lazy("hf_fisher.consumers.merge.io")

__all__ = [
    "DEFAULT_GRID",
    "HUB_OPTIONS",
    "RECIPE_NAME",
    "is_merge_output_file",
    "load_recipe",
    "merge_with_fisher",
    "recipe_to_kwargs",
]

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

#: keyword arguments passed through to the Hub (downloads: revision, token, endpoint, cache_dir;
#: push_to_hub: the others)
HUB_OPTIONS = ("revision", "token", "endpoint", "cache_dir", "path_in_repo", "private", "create_pr", "commit_message", "api")

#: the validation grid (see :func:`merge_with_fisher`): model-weight mixtures
#: ``λ = (1 − t)·uniform + t·e_i`` for each model ``i`` and ``t`` below (``t = 0``: uniform),
#: scalings for task arithmetic / TIES / DARE, Fisher floors for the Fisher methods, RegMean's
#: ``alpha`` (``regmean``, ``fisher_regmean``), KFAC's relative damping (``kfac``: from nearly
#: undamped to nearly the weighted average, which it reaches as the damping grows); each method
#: tunes the keys of its ``MergeMethod.tuned`` (the full product with the weights). ``layer_lean``:
#: the per-layer refinement after it (empty: off), see :func:`merge_with_fisher`. ``weight_shrink``:
#: the held-out confirmation of the model weights (:func:`_confirm_weights`; empty: the weights are
#: chosen on all of the validation data with the options, as one grid point).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "weight_lean": (0.0, 0.25, 0.5),
    "scaling": (0.25, 0.5, 0.75, 1.0, 1.25),
    "fisher_floor": (1e-8, 1e-6, 1e-4, 1e-2),
    "alpha": (0.0, 0.5, 0.9, 1.0),
    "kfac_damping": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
    "layer_lean": (),
    "weight_shrink": (0.0, 0.5, 1.0),
}
#: grid keys whose values are fractions in [0, 1] (leans toward one model, shrinkages), not method options
LEAN_KEYS = ("weight_lean", "layer_lean", "weight_shrink")
#: grid keys that may be empty (a step turned off)
OPTIONAL_KEYS = ("layer_lean", "weight_shrink")

#: config fields that change tensor shapes or their meaning, compared across the inputs
ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings",
    "num_local_experts", "num_experts", "moe_intermediate_size", "type_vocab_size",
)


def __getattr__(name: str) -> Any:
    """Names of the string era, computed from the registry (kept for one release)."""
    if name == "METHODS":
        return tuple(registry.available())
    if name == "PAPERS":
        return {k: cls.paper for k, cls in registry.available().items()}
    if name == "NO_FISHER_RULES":
        from .base import NO_FISHER_RULE

        return NO_FISHER_RULE.choices
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_merge_output_file(name: str) -> bool:
    """Whether a file name belongs to a merge output folder (what a new merge may replace)."""
    from .io import is_model_output_file

    return is_model_output_file(name) or name in (RECIPE_NAME, *LEGACY_RECIPE_NAMES, CARD_NAME, *ADAPTER_FILES)


# ---------------------------------------------------------------------------- Fisher inputs
class FisherInput:
    """One model's Fisher, read tensor by tensor: a :class:`~hf_fisher.artifacts.fisher.Fisher`, an artifact
    folder (read with :class:`~hf_fisher.artifacts.fisher.FisherReader`) or a Hub reference."""

    def __init__(self, obj: Any, *, hub_options: dict | None = None) -> None:
        from hf_fisher.artifacts.fisher import Fisher, FisherReader

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

    def use_checkpoint_names(self, renamed: Mapping[str, str]) -> None:
        """Name the tensors as the model's checkpoint does (``renamed``: loaded-model name -> name
        on disk, transformers' weight conversions, e.g. ViT's), for a Fisher collected on the
        loaded model whose names the checkpoint does not have."""
        if not renamed:
            return
        new = {n: renamed.get(n, n) for n in self.param_shapes}
        self._source_name = {v: k for k, v in new.items()}
        self.param_shapes = {new[n]: s for n, s in self.param_shapes.items()}
        self.groups = {new.get(n, n): g for n, g in self.groups.items()}

    def raw(self, name: str) -> torch.Tensor:
        name = getattr(self, "_source_name", {}).get(name, name)
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
    except Exception:
        return src.config


def _check_models(sources: Sequence[TensorSource], labels: Sequence[str]) -> None:
    """Same architecture fields, same tensor names, same shapes: ModelMismatchError otherwise."""
    ref = sources[0]
    cfg0 = _full_config(ref)
    parts = [(label, part) for src, label in zip(sources, labels) for part in (src.parts() if hasattr(src, "parts") else [])]
    if parts:  # a slices recipe's virtual models: every model they read, of one architecture but the layer count
        first = _full_config(parts[0][1])
        for label, part in parts[1:]:
            cfg = _full_config(part)
            diffs = [f"{k}: {cfg.get(k)!r} vs {first.get(k)!r}" for k in ARCH_FIELDS if k not in ("num_hidden_layers", "n_layer")
                     and (k in cfg or k in first) and cfg.get(k) != first.get(k)]
            if diffs:
                raise ModelMismatchError(f"model {part.ref!r} (read by {label}) has another architecture than "
                                         f"{parts[0][1].ref!r}: {'; '.join(diffs)}. Slices need models of one architecture")
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
    parts = [(label, part) for label, src in zip(labels, sources)  # a slices recipe's virtual model: each model it reads
             for part in (src.parts() if hasattr(src, "parts") else [src])]
    prints = [(label, src, vocabulary_fingerprint(src.folder)) for label, src in parts]
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
_LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_group(name: str) -> str | None:
    """The layer a tensor name belongs to: its name up to the first numbered module
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``, ``transformer.h.0.attn.c_attn.weight``
    -> ``transformer.h.0``); None for tensors outside numbered layers (embeddings, final norm, head)."""
    m = _LAYER.match(name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class MergeSettings:
    """The numbers a merge uses (what the recipe records): the method with its options, and the
    model weights ``λ_i``; ``layer_weights`` (from the per-layer validation refinement) overrides
    them for the tensors of a layer (:func:`layer_group`)."""

    method: MergeMethod
    weights: list[float]
    #: settings that vary by tensor or model (a mergekit recipe's gradients, filters, per-model density)
    tensor_parameters: Any = None
    #: per-layer model weights chosen on validation data (``layer_group(name)`` -> weights), or None
    layer_weights: dict[str, list[float]] | None = None

    def weights_for(self, name: str) -> list[float]:
        if self.layer_weights:
            return self.layer_weights.get(layer_group(name), self.weights)
        return self.weights


@dataclass
class _Inputs:
    sources: list[TensorSource]
    labels: list[str]
    base: TensorSource | None
    fishers: list[FisherInput] | None
    covered: set[str] = field(default_factory=set)
    grams: dict[str, tuple[list[torch.Tensor], str]] = field(default_factory=dict)
    layers: Any = None  # the method's layer merge (KFAC blocks), if it merges whole layers
    tokenizer_source: Any = None  # the source whose tokenizer files the output gets first


class _Reader:
    """Reads the inputs of one tensor (optionally from a cache filled once, for validation)."""

    def __init__(self, inp: _Inputs, method: MergeMethod, cache: bool = False) -> None:
        self.inp = inp
        self.cache: dict[str, tuple] | None = {} if cache else None
        self.needs_base = method.uses_base
        self.use_fisher = method.fishers == "diagonal"

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


def _weight_name(reader: _Reader, name: str) -> str:
    """The tensor whose layer decides ``name``'s weights: itself, or the first tensor of its KFAC
    block (a block is merged with one set of weights)."""
    layers = reader.inp.layers
    if layers is not None and name in layers.block_of:
        return min(layers.blocks[layers.block_of[name]])
    return name


def _merge_one(reader: _Reader, info: TensorInfo, s: MergeSettings, out_dtype: torch.dtype | None) -> torch.Tensor:
    layers = reader.inp.layers
    weights = s.weights_for(_weight_name(reader, info.name))
    if layers is not None and info.name in layers.block_of:
        merged = s.method.merge_layer(layers, info.name, lambda n: reader.read(n)[0], weights)
        return merged.to(out_dtype or info.dtype)
    thetas, base, fishers = reader.read(info.name)
    method, weights, per_model = _tensor_settings(s, info.name, len(thetas), weights)
    if not info.dtype.is_floating_point:  # integer buffers are not merged: they must agree
        for i, t in enumerate(thetas[1:], start=1):
            if not torch.equal(t, thetas[0]):
                raise ModelMismatchError(
                    f"integer tensor {info.name!r} differs between {reader.inp.labels[0]} and "
                    f"{reader.inp.labels[i]}; it cannot be averaged"
                )
        return thetas[0]
    merged = method.merge(TensorInputs(info.name, thetas, weights, base, fishers, reader.inp.grams.get(info.name),
                                       per_model=per_model))
    return merged.to(out_dtype or info.dtype)


def _tensor_settings(s: MergeSettings, name: str, n: int, weights: list[float]):
    """``(method, weights, per-model values)`` for tensor ``name`` (``s.tensor_parameters`` resolved),
    starting from ``weights`` (the tensor's layer weights: :meth:`MergeSettings.weights_for`)."""
    tp = s.tensor_parameters
    if tp is None:
        return s.method, weights, None
    options, per_model = tp.resolve(name, s.method, weights)
    method = s.method.replace(**options) if options else s.method
    weights = [real_number(f"weight of model {i} for {name!r}", w) for i, w in enumerate(per_model.pop("weight", weights))]
    method.check_weights(weights)
    own = {o.name: o for o in method.options}
    for k, values in per_model.items():  # each model's value checked by the option's declaration
        if k in own:
            for i, v in enumerate(values):
                try:
                    own[k].check(v)
                except InvalidInputError as e:
                    raise InvalidInputError(f"model {i}'s {k} for tensor {name!r}: {e}") from None
    return method, weights, {k: v for k, v in per_model.items() if k in own}


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


def batch_losses(model, validation: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[float]]:
    """Each task's batch losses ``model(**batch).loss`` (labels default to the input ids with
    padding ignored), in the order of its batches."""
    with torch.no_grad():
        return [[_batch_loss(model, b) for b in batches] for batches in validation]


def task_mean(losses: Sequence[Sequence[float]], part: slice = slice(None)) -> float:
    """``(1/T) Σ_t mean_b L_{t,b}`` over each task's batches ``[part]`` (the validation criterion)."""
    means = []
    for per in losses:
        per = list(per)[part]
        if not per:
            raise InvalidInputError("a task's validation batches are empty")
        means.append(sum(per) / len(per))
    return sum(means) / len(means)


def validation_loss(model, validation: Sequence[Sequence[Mapping[str, Any]]]) -> float:
    """Mean over tasks of the mean batch loss (``model(**batch).loss``; labels default to the
    input ids with padding ignored)."""
    return task_mean(batch_losses(model, validation))


def _leaned(base: Sequence[float], unit: float, t: float) -> list[list[float]]:
    """``(1 − t)·base + t·unit·e_i`` for each model ``i`` (``t = 0``: ``base`` itself)."""
    n = len(base)
    if t == 0:
        return [list(base)]
    return [[(1 - t) * base[j] + (unit * t if j == i else 0.0) for j in range(n)] for i in range(n)]


def validation_candidates(s: MergeSettings, n: int, grid: Mapping[str, Sequence[float]]) -> list[MergeSettings]:
    """Every grid point: weights ``(1−t)/n + t·e_i`` (times ``n`` for task-vector methods, so uniform
    is all ones), × each option the method tunes (``MergeMethod.tuned``: the scaling of task
    arithmetic / TIES / DARE, the Fisher floor of the Fisher methods, ``alpha`` of the RegMean
    methods, the damping of KFAC) over its grid values."""
    method = s.method
    unit = float(n) if method.task_vectors else 1.0
    weights: list[list[float]] = []
    for t in grid["weight_lean"]:
        for c in _leaned([unit / n] * n, unit, float(t)):
            if c not in weights:
                weights.append(c)
    tuned = [k for k in method.tuned if k in grid]
    values = [[float(v) for v in grid[k]] for k in tuned]
    return [MergeSettings(method.replace(**dict(zip(tuned, point))) if tuned else method, w)
            for w, *point in itertools.product(weights, *values)]


def _tune(plan: list[TensorInfo], reader: _Reader, s: MergeSettings, validation, grid, progress: bool):
    """The grid point with the lowest validation loss (first of equal losses), the model weights
    confirmed on held-out batches when ``grid["weight_shrink"]`` is not empty
    (:func:`_confirm_weights`), then, when ``grid["layer_lean"]`` is not empty, the per-layer
    refinement (:func:`_tune_layers`). Only the combination step runs per point: the inputs,
    Fishers, Grams and KFAC factors are read once."""
    from tqdm.auto import tqdm

    model = _eval_model(reader.inp.sources[0])

    def state(cand: MergeSettings) -> dict[str, torch.Tensor]:
        return {info.name: _merge_one(reader, info, cand, None) for info in plan}

    def load(sd: Mapping[str, torch.Tensor]) -> None:
        _, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected:
            raise InvalidInputError(f"merged tensors the model does not have: {unexpected[:5]}")

    def loss_of(sd: Mapping[str, torch.Tensor], batches=validation) -> float:
        load(sd)
        return validation_loss(model, batches)

    def per_batch(cand: MergeSettings) -> list[list[float]]:
        load(state(cand))
        return batch_losses(model, validation)

    cands = validation_candidates(s, len(reader.inp.sources), grid)
    results = [(per_batch(cand), cand) for cand in tqdm(cands, desc="validation grid", disable=not progress)]
    tuned = [k for k in s.method.tuned if k in grid]
    record = {"criterion": "mean over tasks of the mean batch loss", "grid": {k: list(v) for k, v in grid.items()},
              "points": len(cands),
              "losses": [{"weights": c.weights, **{k: getattr(c.method, k) for k in tuned}, "loss": task_mean(per)}
                         for per, c in results]}
    halves = validation_halves(validation)
    if grid.get("weight_shrink") and len({tuple(c.weights) for c in cands}) > 1 and halves is not None:
        best, best_loss, weight_record = _confirm_weights(results, s, grid["weight_shrink"], per_batch, tuned)
        record["weights_holdout"] = weight_record
        record["points"] += weight_record["points"]
    else:
        if grid.get("weight_shrink") and halves is None and len({tuple(c.weights) for c in cands}) > 1:
            why = ("the model weights cannot be confirmed on held-out validation data (a task has fewer than two "
                   "validation batches): they are chosen on all of it with the options")
            logger.warning(why)
            record["weights_not_held_out"] = why
        best_per, best = min(results, key=lambda r: task_mean(r[0]))  # first of equal losses
        best_loss = task_mean(best_per)
    choice = {"loss": best_loss, "weights": best.weights, **{k: getattr(best.method, k) for k in tuned}}
    record["chosen"] = choice
    if grid.get("layer_lean"):
        best, layer_record = _tune_layers(plan, reader, best, best_loss, state(best), loss_of, grid["layer_lean"],
                                          progress, validation)
        record["layers"] = layer_record
        record["points"] += layer_record["points"]
        choice["grid_loss"] = best_loss
        choice["loss"] = layer_record["loss"]
        if best.layer_weights:
            choice["layer_weights"] = best.layer_weights
    logger.info("validation picked %s (mean validation loss %.6g over %d tasks, %d points)",
                {k: v for k, v in choice.items() if k != "loss"}, choice["loss"], len(validation), record["points"])
    return best, record


def _confirm_weights(results, s: MergeSettings, shrinks, per_batch, tuned):
    """The model weights searched on one half of the validation batches and kept only as far as
    the other half confirms them; the options then chosen on all of it at those weights.

    With ``V_A``, ``V_B`` the halves of :func:`validation_halves` and ``L_X(λ, h)`` the criterion
    (:func:`task_mean`) on ``X`` of the grid point with weights ``λ`` and options ``h``:

    1. search: ``(λ_A, h_A) = argmin L_{V_A}`` over the grid (weights and options jointly);
    2. confirm: ``λ(s) = u + s·(λ_A − u)`` (``u`` the uniform weights, ``1/n`` each, or 1 each
       for task-vector methods; ``s`` in ``shrinks``, in order), ``s* = argmin_s L_{V_B}(λ(s), h_A)``,
       the first of equal losses (with ``shrinks = (0, ½, 1)``: uniform weights unless the lean
       also helps on the batches it was not chosen on);
    3. options: ``h* = argmin_h L_V(λ(s*), h)`` over the grid's options, on all batches ``V``.

    ``results``: ``(per-batch losses, settings)`` of every grid point; ``per_batch(settings)``
    merges and evaluates a point off the grid; ``tuned``: the option names recorded. Returns
    ``(settings, L_V, record)``."""
    A, B = slice(0, None, 2), slice(1, None, 2)  # = validation_halves: batches [0::2] and [1::2]
    n = len(s.weights)
    u = [(float(n) if s.method.task_vectors else 1.0) / n] * n
    evaluated = {_point_key(c): (per, c) for per, c in results}

    def get(cand: MergeSettings):
        key = _point_key(cand)
        if key not in evaluated:
            evaluated[key] = (per_batch(cand), cand)
        return evaluated[key][0]

    extra = len(evaluated)
    per_a, searched = min(results, key=lambda r: task_mean(r[0], A))
    confirm = []
    for shrink in shrinks:
        w = [a + float(shrink) * (b - a) for a, b in zip(u, searched.weights)]
        confirm.append({"shrink": float(shrink), "weights": w,
                        "loss": task_mean(get(MergeSettings(searched.method, w)), B)})
    chosen = min(confirm, key=lambda c: c["loss"])  # first of equal losses
    options = [c.method for _, c in results if c.weights == results[0][1].weights]  # every option point once
    at = [(task_mean(get(MergeSettings(m, chosen["weights"]))), MergeSettings(m, chosen["weights"])) for m in options]
    loss, best = min(at, key=lambda r: r[0])
    record = {"search": "batches [0::2] of each task", "confirm": "batches [1::2] of each task",
              "searched": {"weights": searched.weights, **{k: getattr(searched.method, k) for k in tuned},
                           "loss": task_mean(per_a, A)},
              "shrink": confirm, "chosen_shrink": chosen["shrink"], "points": len(evaluated) - extra}
    return best, loss, record


def _point_key(c: MergeSettings) -> tuple:
    """A grid point's identity: its weights (rounded) and the options its method tunes."""
    return (tuple(round(float(w), 12) for w in c.weights),
            tuple((k, getattr(c.method, k)) for k in c.method.tuned))


def validation_halves(validation):
    """The two halves of the validation batches for the held-out confirmations (model weights,
    per-layer refinement): each task's even-numbered batches (``[0::2]``, where the search
    chooses) and odd-numbered ones (``[1::2]``, where the choice is confirmed); None when a task
    has fewer than two batches."""
    if any(len(batches) < 2 for batches in validation):
        return None
    return [list(b[0::2]) for b in validation], [list(b[1::2]) for b in validation]


#: the shrinkages ``s`` of the per-layer refinement tried on the held-out half:
#: ``λ_layer = λ* + s·(λ_layer_searched − λ*)`` (0: the grid's choice, 1: the searched weights)
LAYER_SHRINK = (0.0, 0.5, 1.0)


def _tune_layers(plan, reader: _Reader, s: MergeSettings, loss: float, sd: dict, loss_of, leans, progress: bool,
                 validation=None):
    """Per-layer model weights (AdaMerging-style layer-wise coefficients, chosen by a coordinate
    search): for each numbered layer in order (:func:`layer_group`), try the weights
    ``(1 − t)·λ* + t·u·e_i`` (``λ*`` the grid's choice, ``u`` 1, or ``n`` for task-vector methods,
    ``t`` in ``leans``) for that layer's tensors only, the other layers fixed, and keep one when it
    lowers the validation loss. One deterministic sweep; only the layer's tensors are merged again.

    Held-out confirmation (when every task has at least two validation batches,
    :func:`validation_halves`): the sweep sees only the first half ``V_A``; on the second half
    ``V_B`` the searched per-layer weights are shrunk toward the grid's choice,
    ``λ_g(s) = λ* + s·(λ_g − λ*)`` for ``s`` in :data:`LAYER_SHRINK`, and the ``s`` with the
    lowest ``L(V_B)`` is kept (the first of equal losses, so ``s = 0``, the grid's choice, unless
    the refinement also helps on data it was not chosen on). With one batch for some task there
    is nothing to hold out: the sweep runs on all of it, with a WARNING (recorded as ``holdout: None``)."""
    from tqdm.auto import tqdm

    n = len(reader.inp.sources)
    unit = float(n) if s.method.task_vectors else 1.0
    groups: dict[str, list] = {}
    for info in plan:
        g = layer_group(_weight_name(reader, info.name))
        if g is not None and info.dtype.is_floating_point:
            groups.setdefault(g, []).append(info)
    halves = validation_halves(validation) if validation is not None else None
    grid_sd = sd
    not_held_out = None
    if halves is None:
        not_held_out = ("the per-layer refinement cannot hold out validation data (a task has fewer than two "
                        "validation batches): its weights are searched and kept on the same batches")
        logger.warning(not_held_out)
        search_loss = loss_of
    else:
        def search_loss(state):
            return loss_of(state, halves[0])

        loss = search_loss(sd)
    layer_weights: dict[str, list[float]] = {}
    trials = []
    for g, infos in tqdm(groups.items(), desc="validation per layer", disable=not progress):
        for t in leans:
            for w in _leaned(s.weights, unit, float(t)):
                if w == layer_weights.get(g, s.weights):
                    continue
                cand = MergeSettings(s.method, s.weights, layer_weights={**layer_weights, g: w})
                trial = {**sd, **{i.name: _merge_one(reader, i, cand, None) for i in infos}}
                trial_loss = search_loss(trial)
                trials.append({"layer": g, "weights": w, "loss": trial_loss})
                if trial_loss < loss:
                    loss, sd, layer_weights = trial_loss, trial, cand.layer_weights
    record = {"layers": list(groups), "layer_lean": [float(t) for t in leans], "points": len(trials),
              "loss": loss, "losses": trials, "holdout": None}
    if halves is not None:
        record["search_loss"] = loss
        confirm = []
        best_lw, best_sd, best_holdout = {}, grid_sd, None
        for shrink in LAYER_SHRINK if layer_weights else ():
            lw = {g: [a + shrink * (b - a) for a, b in zip(s.weights, w)] for g, w in layer_weights.items()}
            if shrink == 0.0:
                lw, state = {}, grid_sd
            else:
                cand = MergeSettings(s.method, s.weights, layer_weights=lw)
                state = {**grid_sd, **{i.name: _merge_one(reader, i, cand, None) for g in lw for i in groups[g]}}
            held = loss_of(state, halves[1])
            confirm.append({"shrink": shrink, "loss": held})
            if best_holdout is None or held < best_holdout:
                best_lw, best_sd, best_holdout = lw, state, held
        record["holdout"] = {"search": "batches [0::2] of each task", "confirm": "batches [1::2] of each task",
                             "shrink": confirm, "chosen_shrink": next((c["shrink"] for c in confirm
                                                                      if c["loss"] == best_holdout), 0.0)}
        record["points"] += len(confirm)
        layer_weights = best_lw
        record["loss"] = loss_of(best_sd)  # the whole validation set, as every other choice's loss
    if not_held_out is not None:
        record["not_held_out"] = not_held_out
    return MergeSettings(s.method, s.weights, layer_weights=layer_weights or None), record


# ---------------------------------------------------------------------------- RegMean
def _collect_grams(inp: _Inputs, data, max_samples, progress) -> None:
    try:
        from hf_fisher.consumers.merge.regmean import collect_input_grams
    except ImportError as e:
        raise UnsupportedError(f"RegMean needs hf_fisher.consumers.merge.regmean, which is not available ({e})") from None
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


def _nonempty_batches(name: str, items: Sequence[Any]) -> list[Any]:
    """Each entry of ``items`` (one iterable of batches per model) with at least one batch, checked
    before any work: sized entries by their length, iterators by peeking at their first batch
    (which is put back). :class:`InvalidInputError` naming the empty entry."""
    out = []
    for i, batches in enumerate(items):
        if isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
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


def merge_with_fisher(
    models: Sequence[Any],
    fishers: Sequence[Any] | None = None,
    *,
    weights: Sequence[float] | None = None,
    method: str | MergeMethod = "fisher",
    base_model: Any = None,
    output_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    push_to_hub: str | None = None,
    data: Sequence[Iterable[Mapping[str, Any]]] | None = None,
    max_samples: int | None = None,
    validation: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    validation_grid: Mapping[str, Sequence[float]] | None = None,
    allow_tokenizer_mismatch: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    rank: int | str | None = None,
    merge_into_base: bool = False,
    tensor_parameters: Any = None,
    tokenizer_source: Any = None,
    **options: Any,
):
    """Merge ``models`` (folders, Hub ids or loaded ``PreTrainedModel``\\ s) into one.

    ``method``: a registered method's name (:func:`hf_fisher.plugins.merge_methods`: the built-ins
    ``fisher``, ``fisher_task_vector``, ``average``, ``task_arithmetic``, ``ties``, ``dare``,
    ``regmean``, ``fisher_regmean``, ``kfac``, and any plugin's) or a
    :class:`~hf_fisher.consumers.merge.base.MergeMethod` instance. Its formula and options are
    on its class (:mod:`hf_fisher.consumers.merge.methods`). ``**options`` are the method's
    options (``fisher_floor``, ``normalize_fishers``, ``no_fisher_rule``, ``scaling``, ``density``,
    ``drop_p``, ``seed``, ``dare_then``, ``alpha``, ``kfac_damping``, ``kfac_damping_mode``, or a
    plugin method's), each checked by its declaration, and the Hub options of :data:`HUB_OPTIONS`.
    mergekit's methods (``linear``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``,
    ``della``, ``della_linear``, ``slerp``, ``nuslerp``) take mergekit's options (``normalize``,
    ``rescale``, ``int8_mask``, ``gamma``, ``epsilon``, ``t``; ``scaling`` is mergekit's ``lambda``) and give
    mergekit 0.1.5's numbers; ``ties``, ``dare``, ``task_arithmetic`` and ``average`` do too under
    ``convention="mergekit"`` (the default; ``"hf_fisher"``: the earlier TIES/DARE arithmetic).

    ``fishers``: one per model (``Fisher``, artifact folder, Hub ``repo`` / ``repo:subfolder``;
    for ``kfac`` one KFAC Fisher per model), required by the methods that take Fishers.
    ``weights`` λ_i: default ``1/n`` each for the averaging methods and ``1.0`` each for the
    task-vector methods (task arithmetic / TIES / DARE; mergekit's default). ``base_model``:
    required by the task-vector methods. ``data`` (RegMean: one iterable of batches per model).

    ``validation=[batches_1, ...]`` (held-out batches per task, never the data the result is
    evaluated on) picks λ and the options the method tunes (``MergeMethod.tuned``: the scaling of
    task arithmetic / TIES / DARE, the Fisher floor, RegMean's ``alpha``, KFAC's damping) on the
    full product of :data:`DEFAULT_GRID` (updated by ``validation_grid``) by the mean validation
    loss over the tasks (the first of equal losses). The model weights are held to a second look
    (``weight_shrink``, default ``(0, 0.5, 1)``): the grid is searched on half of each task's
    validation batches, the searched weights are shrunk toward uniform as far as the other half
    confirms (none of the lean unless it helps there too), and the options are then chosen on all
    batches at those weights; ``weight_shrink=()``, or one batch for some task (a WARNING): weights
    and options chosen together on all batches. Every method can be tuned, the data-aware ones
    (``regmean``, ``fisher_regmean``, ``kfac``) included: the inputs, Fishers, Grams and KFAC
    factors are read or collected once and kept in memory, and each point only recombines them.
    ``validation_grid={"layer_lean": (0.25, 0.5)}`` adds per-layer weights (AdaMerging-style
    layer-wise coefficients): after the grid, one coordinate sweep over the numbered layers tries,
    for each layer's tensors alone, ``λ = (1 − t)·λ* + t·e_i`` (times ``n`` for task-vector methods)
    and keeps a layer's weights when they lower the validation loss; the sweep searches on half of
    each task's validation batches and the other half decides how far the searched weights are
    kept (shrunk toward the grid's choice, none of them unless they help there too; one batch for
    a task: no half to hold out, a WARNING); the recipe then writes each
    model's ``weight`` as mergekit's per-tensor list (``{filter: layer., value: λ}``).
    The grid, every point's loss and the choice are logged and written into the recipe
    (``hf_fisher.validation``) and card.

    Returns the merged model when ``output_dir`` is None; else writes ``output_dir`` atomically
    (weights as sharded safetensors + index, config, tokenizer, generation config, ``mergekit_config.yml``,
    ``README.md``) and returns its path. ``push_to_hub="user/name"`` uploads the folder
    (the Hub options go to :func:`hf_fisher.artifacts.hub.push_folder` and the downloads).
    Every check runs before any tensor is merged or file written.

    PEFT adapters (folders with ``adapter_config.json`` or ``PeftModel``\\ s) are merged by
    :func:`hf_fisher.consumers.merge.lora.merge_lora_adapters` (``rank``, ``merge_into_base``
    apply to them only); this function writes the folder, recipe and card around the result.

    ``tensor_parameters`` (:class:`~hf_fisher.consumers.merge.parameters.TensorParameters`, what
    ``recipe_to_kwargs`` makes of a mergekit recipe's per-layer gradients, ``filter:`` conditions and
    per-model densities) sets options and weights tensor by tensor, each resolved and checked before
    any tensor is merged. ``tokenizer_source``: the folder (an input's) whose tokenizer files the
    output gets (default: the first model's). A mergekit ``slices:`` recipe becomes virtual models
    (:class:`~hf_fisher.consumers.merge.slices.SlicedSource`, made by ``recipe_to_kwargs``) with
    :class:`~hf_fisher.consumers.merge.slices.SliceParameters`; ``passthrough`` takes one model.
    """
    hub_options = {k: v for k, v in options.items() if k in HUB_OPTIONS}
    settings, data, validation, grid, out_dtype, shard_bytes = _check_arguments(
        models, fishers, weights, method, base_model, dtype, data, validation, validation_grid, max_shard_size,
        {k: v for k, v in options.items() if k not in HUB_OPTIONS})
    if push_to_hub:  # the repository arguments, before any work or request
        from hf_fisher.artifacts.hub import check_push_ready

        check_push_ready(str(push_to_hub), **{k: v for k, v in hub_options.items() if k in (
            "path_in_repo", "revision", "create_pr", "commit_message", "private", "token", "api")})

    # ---- the output folder, before the inputs are read
    target = None
    if output_dir is not None:
        target = _check_output(output_dir, _input_paths(models, base_model, fishers))

    if tensor_parameters is not None and (any(_is_adapter(m) for m in models) or settings.method.fishers == "kfac"):
        raise UnsupportedError("per-tensor settings (a recipe's gradients, filters, per-model densities) apply to "
                               "per-tensor merges of full models, not to LoRA adapters or KFAC blocks; give scalar settings")
    if any(_is_adapter(m) for m in models):
        if validation is not None:
            raise UnsupportedError("validation= is not available for PEFT adapters; merge the merged-in models "
                                   "(peft_model.merge_and_unload()) to tune on validation data")
        return _merge_adapters(models, fishers, settings, base_model, out_dtype, target, push_to_hub, hub_options,
                               rank=rank, merge_into_base=merge_into_base)

    inp, plan_infos, no_fisher = _open_inputs(models, fishers, settings.method, base_model, allow_tokenizer_mismatch,
                                              hub_options)
    method = settings.method
    if tensor_parameters is not None:  # every tensor's settings resolved and checked before any work
        if validation is not None:
            raise UnsupportedError("validation tuning with per-tensor settings (gradients, filters, per-model "
                                   "densities) is not available; give scalar settings")
        tensor_parameters.bind(_full_config(inp.sources[0]))
        settings = MergeSettings(settings.method, settings.weights, tensor_parameters)
        for info in plan_infos:
            _tensor_settings(settings, info.name, len(inp.sources), settings.weights)
    if tokenizer_source is not None:
        inp.tokenizer_source = _io.open_source(tokenizer_source, what="tokenizer_source", hub_options=hub_options)

    # ---- work
    if method.needs_data:
        _collect_grams(inp, data, max_samples, progress)
        no_fisher = [x for x in no_fisher if x not in inp.grams]
        if no_fisher and getattr(method, "no_fisher_rule", None) == "error":
            raise InvalidInputError(f"{len(no_fisher)} tensor(s) have neither a Gram nor a Fisher, e.g. {no_fisher[:5]}")
    if inp.fishers is not None and getattr(method, "normalize_fishers", False):
        for fi in inp.fishers:
            mean = fi.global_mean()
            if not mean > 0:
                raise InvalidInputError(f"cannot normalise the Fisher {fi.ref}: its global mean is {mean}")
            fi._scale = mean
        logger.info("Fishers normalised by their global means %s", [fi._scale for fi in inp.fishers])
    if no_fisher:
        rule = method.no_fisher_rule
        logger.warning(
            "%d tensor(s) have no Fisher in every model and are merged by rule %r (%s): %s%s", len(no_fisher),
            rule, RULE_TEXT[rule], ", ".join(no_fisher[:10]), " ..." if len(no_fisher) > 10 else "",
        )
    reader = _Reader(inp, method, cache=validation is not None)
    choice = None
    if validation is not None:
        settings, choice = _tune(plan_infos, reader, settings, validation, grid, progress)

    recipe = build_recipe(models, fishers, settings.method, settings.weights, base_model, out_dtype, choice, no_fisher,
                          sorted(inp.grams) if inp.grams else None)
    if settings.layer_weights:
        _layer_weights_to_recipe(recipe, settings)
    if settings.tensor_parameters is not None:  # gradients, filters, per-model settings: as given
        settings.tensor_parameters.write_to(recipe)
    out_plan = [_io.TensorInfo(i.name, i.shape, out_dtype if (out_dtype and i.dtype.is_floating_point) else i.dtype)
                for i in plan_infos]
    return _write_merge(plan_infos, out_plan, reader, settings, out_dtype, shard_bytes, inp, recipe, target,
                        push_to_hub, hub_options, progress)


def _layer_weights_to_recipe(recipe: dict, s: MergeSettings) -> None:
    """Per-layer weights written as mergekit writes per-tensor parameters: each model's ``weight``
    a list of ``{filter: <layer>., value: λ}`` (the first filter found in a tensor's name applies)
    ending with ``{value: λ}`` for every other tensor."""
    for i, entry in enumerate(recipe["models"]):
        entry["parameters"]["weight"] = [{"filter": f"{g}.", "value": w[i]} for g, w in s.layer_weights.items()] + [
            {"value": s.weights[i]}]


def _check_arguments(models, fishers, weights, method, base_model, dtype, data, validation, validation_grid,
                     max_shard_size, options):
    """Every argument of :func:`merge_with_fisher` checked, before any work: ``(settings, data,
    validation, grid, out_dtype, shard_bytes)``."""
    catalogue = registry.option_catalogue()
    unknown = sorted(set(options) - set(catalogue))
    if unknown:
        raise InvalidInputError(
            f"merge_with_fisher got unknown keyword argument(s) {unknown}; besides its own arguments it takes the "
            f"options of the merge methods {sorted(catalogue)} and the Hub options {list(HUB_OPTIONS)}"
        )
    m = registry.build(method, options)  # the method name and every option, checked by its declaration
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or len(models) < m.min_models:
        raise InvalidInputError(f"models must be a list of at least {'two models' if m.min_models == 2 else 'one model'} "
                                "(folders, Hub ids or loaded models)")
    n = len(models)
    if weights is None:
        w = m.default_weights(n)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise InvalidInputError(f"weights must be a list of numbers, one per model, got {weights!r}")
        w = [real_number(f"weights[{i}]", x) for i, x in enumerate(weights)]
        if len(w) != n:
            raise InvalidInputError(f"{len(w)} weights for {n} models; give one weight per model")
        m.check_weights(w)
    m.check_inputs(n, fishers=fishers, base_model=base_model, data=data)
    if m.needs_data:
        data = _nonempty_batches("data", data)
    grid = dict(DEFAULT_GRID)
    if validation is not None:
        validation = _check_validation(validation, n)
        grid = _check_grid(m, validation_grid)
    elif validation_grid:
        raise InvalidInputError("validation_grid= is given without validation=; pass the validation batches "
                                "(one list per model) or leave the grid out")
    return MergeSettings(m, w), data, validation, grid, _out_dtype(dtype), _io.parse_size(max_shard_size)


def _check_validation(validation, n: int) -> list[list[Mapping[str, Any]]]:
    """One non-empty list of batches (dicts) per model, read into lists (each point reads them again)."""
    if isinstance(validation, (str, Mapping)) or not isinstance(validation, Sequence) or len(validation) != n:
        got = len(validation) if isinstance(validation, Sequence) else type(validation).__name__
        raise InvalidInputError(f"validation must hold one list of batches per model ({n}), got {got}")
    out = [list(b) for b in _nonempty_batches("validation", validation)]
    for i, batches in enumerate(out):
        for j, b in enumerate(batches):
            if not isinstance(b, Mapping):
                raise InvalidInputError(f"validation[{i}][{j}] must be a batch (a dict of tensors such as input_ids), "
                                        f"got {type(b).__name__}")
    return out


def _check_grid(m: MergeMethod, validation_grid) -> dict[str, tuple[float, ...]]:
    """:data:`DEFAULT_GRID` updated by ``validation_grid``, every value checked (the leans in [0, 1],
    each option the method tunes by its declaration) before any work."""
    grid = dict(DEFAULT_GRID)
    if not validation_grid:
        return grid
    if not isinstance(validation_grid, Mapping):
        raise InvalidInputError(f"validation_grid must be a mapping of grid keys to lists of numbers, got {validation_grid!r}")
    unknown = sorted(set(validation_grid) - set(grid))
    if unknown:
        raise InvalidInputError(f"validation_grid has unknown key(s) {unknown}; known: {sorted(grid)}")
    for k, v in validation_grid.items():
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise InvalidInputError(f"validation_grid[{k!r}] must be a list of numbers, got {v!r}")
        vals = tuple(real_number(f"validation_grid[{k!r}][{i}]", x) for i, x in enumerate(v))
        if not vals and k not in OPTIONAL_KEYS:
            raise InvalidInputError(f"validation_grid[{k!r}] is empty; give at least one value")
        for x in vals:
            if k in LEAN_KEYS:
                if not 0.0 <= x <= 1.0:
                    raise InvalidInputError(f"validation_grid[{k!r}] values are fractions in [0, 1] ("
                                            f"{'shrinkages toward uniform weights' if k == 'weight_shrink' else 'leans towards one model'}); "
                                            f"got {x!r}")
            elif k in m.tuned:
                try:
                    m.replace(**{k: x})
                except InvalidInputError as e:
                    raise InvalidInputError(f"validation_grid[{k!r}]: {e}") from None
        grid[k] = vals
    return grid


def _open_inputs(models, fishers, method: MergeMethod, base_model, allow_tokenizer_mismatch, hub_options):
    """The inputs opened and checked against each other (no tensor data read): ``(inputs, plan,
    tensors without a Fisher in every model)``."""
    n = len(models)
    labels = [f"model {i}" for i in range(n)]
    sources = [_io.open_source(m, what=f"model {i}", hub_options=hub_options) for i, m in enumerate(models)]
    base = _io.open_source(base_model, what="base_model", hub_options=hub_options) if base_model is not None else None
    check_src = sources + ([base] if base is not None else [])
    check_labels = labels + (["base_model"] if base is not None else [])
    _check_models(check_src, check_labels)
    _check_tokenizers(check_src, check_labels, allow_tokenizer_mismatch)
    fisher_inputs = None
    covered: set[str] = set()
    layers = None
    if method.fishers == "diagonal":
        fisher_inputs = [FisherInput(f, hub_options=hub_options) for f in fishers]
        for fi, src, label in zip(fisher_inputs, sources, labels):
            if not fi.names() <= set(src.infos()):  # named as in the loaded model (transformers' renaming)?
                fi.use_checkpoint_names(getattr(src, "checkpoint_names", {}))
            _check_fisher(fi, src, label)
        covered = set.intersection(*(fi.names() for fi in fisher_inputs))
    elif method.fishers is not None:
        layers = method.layer_merge(fishers, sources, labels, hub_options)
        covered = layers.covered()
    elif fishers is not None:
        logger.info("method %r does not use Fishers; the %d Fishers given are ignored", method.name, len(fishers))
    plan_infos = list(sources[0].infos().values())
    inp = _Inputs(sources, labels, base, fisher_inputs, covered, layers=layers)
    no_fisher: list[str] = []
    if method.fishers is not None:
        no_fisher = [i.name for i in plan_infos if i.dtype.is_floating_point and i.name not in covered]
        if no_fisher and method.no_fisher_rule == "error" and not method.needs_data:  # (with data: once Grams are known)
            raise InvalidInputError(
                f"{len(no_fisher)} tensor(s) have no Fisher in every model, e.g. {no_fisher[:5]}; collect Fishers "
                "for them or choose no_fisher_rule='average', 'first' or 'base'"
            )
    return inp, plan_infos, no_fisher


def _write_merge(plan_infos, out_plan, reader, settings, out_dtype, shard_bytes, inp, recipe, target, push_to_hub,
                 hub_options, progress):
    """Merge tensor by tensor into ``target`` (or a temporary folder whose model is returned)."""
    from tqdm.auto import tqdm

    from hf_fisher.artifacts.atomic import atomic_folder
    from hf_fisher.consumers.merge.card import merged_card

    folder_ctx = None
    if target is None:
        folder_ctx = tempfile.TemporaryDirectory(prefix="hf-fisher-merge-")
        write_to = Path(folder_ctx.name) / "merged"
    else:
        write_to = target
    name = settings.method.name
    with atomic_folder(write_to, what="merged model") as tmp:
        writer = _io.ShardedWriter(tmp, out_plan, shard_bytes)
        try:
            for info in tqdm(plan_infos, desc=f"merging ({name})", unit="tensor", disable=not progress):
                writer.write(info.name, _merge_one(reader, info, settings, out_dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_side_files(tmp, inp.sources, inp.base, out_dtype, inp.tokenizer_source)
        (tmp / RECIPE_NAME).write_text(yaml_text(recipe), encoding="utf-8")
        merged_card(recipe, sources=inp.sources, fishers=inp.fishers, base=inp.base).save(tmp / CARD_NAME)
    logger.info("merged %d models (%s) into %s", len(inp.sources), name, write_to)
    if push_to_hub:
        _push(write_to, push_to_hub, hub_options)
    if target is not None:
        return target
    try:
        return _load_merged(write_to, inp.sources[0])
    finally:
        folder_ctx.cleanup()


def _input_paths(models, base_model, fishers) -> list[tuple[str, Any]]:
    """``(label, path)`` of the inputs given as paths: an output folder may not be, hold or lie in one."""
    pairs = [(f"model {i}", m) for i, m in enumerate(models)] + [("base_model", base_model)]
    pairs = [(label, r) for label, ref in pairs for r in (ref.input_refs() if hasattr(ref, "input_refs") else [ref])]
    pairs += [(f"Fisher {i}", f) for i, f in enumerate(fishers or [])]
    return [(label, ref) for label, ref in pairs if isinstance(ref, (str, os.PathLike))]


def _check_output(output_dir, inputs=(), flag: str = "output_dir") -> Path:
    from hf_fisher.artifacts.atomic import check_not_input, check_target

    path = Path(os.path.abspath(os.fspath(output_dir)))
    check_not_input(path, inputs, what="merged model", flag=flag)
    if path.is_dir() and any(path.iterdir()) and not any((path / r).is_file() for r in (RECIPE_NAME, *LEGACY_RECIPE_NAMES)):
        raise ArtifactError(
            f"{flag} {path} is a non-empty folder that is not a previous merge output (no {RECIPE_NAME}); "
            "choose a new or empty folder"
        )
    return check_target(path, allowed=is_merge_output_file, what="merged model", overwrite=True, flag=flag)


def _write_side_files(tmp: Path, sources: Sequence[TensorSource], base: TensorSource | None, out_dtype,
                      tokenizer_source: TensorSource | None = None) -> None:
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
    if tokenizer_source is not None:
        folders.insert(0, tokenizer_source.folder)
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
        from hf_fisher.artifacts.hub import push_folder
    except ImportError as e:
        raise UnsupportedError(f"push_to_hub needs hf_fisher.artifacts.hub ({e})") from None
    keys = ("path_in_repo", "private", "revision", "create_pr", "commit_message", "token", "api")
    return push_folder(folder, repo_id, **{k: v for k, v in hub_options.items() if k in keys})


def _merge_adapters(models, fishers, s: MergeSettings, base_model, out_dtype, target, push_to_hub, hub_options, *,
                    rank=None, merge_into_base=False):
    """LoRA / PEFT adapters: delegated to :func:`hf_fisher.consumers.merge.lora.merge_lora_adapters`."""
    try:
        from hf_fisher.consumers.merge.lora import merge_lora_adapters
    except ImportError as e:
        raise UnsupportedError(f"merging PEFT adapters needs hf_fisher.consumers.merge.lora, which is not available ({e})") from None
    if not all(_is_adapter(m) for m in models):
        raise InvalidInputError("either every input is a PEFT adapter or none is; got a mix of adapters and full models")
    result = merge_lora_adapters(models, fishers, weights=s.weights, method=s.method, base_model=base_model,
                                 dtype=out_dtype, rank=rank, merge_into_base=merge_into_base)
    if target is None and not push_to_hub:
        return result.to_model()
    recipe = build_recipe(models, fishers, s.method, s.weights, base_model, out_dtype, None, [], None)
    recipe["hf_fisher"]["adapters"] = dict(getattr(result, "summary", {}) or {})
    if rank is not None:
        recipe["parameters"]["rank"] = rank
    if merge_into_base:
        recipe["parameters"]["merge_into_base"] = True
    from hf_fisher.artifacts.atomic import atomic_folder
    from hf_fisher.consumers.merge.card import merged_card

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


# ---------------------------------------------------------------------------- plugin
@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("merge", merge_with_fisher)
