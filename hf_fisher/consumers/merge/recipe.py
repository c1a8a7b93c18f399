"""The merge recipe: what ``merge_with_fisher`` writes as ``mergekit_config.yml`` beside a merged
model and what ``hf-fisher merge RECIPE.yaml`` reads back (mergekit-like YAML).

``merge_method`` is any registered method (:mod:`hf_fisher.consumers.merge.registry`), built-in or
from a plugin; ``parameters`` are the options the registered methods declare
(:class:`~hf_fisher.consumers.merge.base.Option`, checked by type here and by value when the
method is built) and the merge-wide keys of :data:`MERGE_KEYS`. Reading a recipe imports neither
torch nor transformers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher.errors import InvalidInputError

from . import registry
from .parameters import ALIASES, PER_MODEL_KEYS, mergekit_names, varies

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from .base import MergeMethod

__all__ = ["CARD_NAME", "LEGACY_RECIPE_NAMES", "MERGE_KEYS", "RECIPE_NAME", "build_recipe", "load_recipe", "recipe_to_kwargs", "yaml_text"]

RECIPE_NAME = "mergekit_config.yml"  # mergekit's name for the recipe beside a merge
#: the names earlier versions gave it (a folder holding one is a previous merge output)
LEGACY_RECIPE_NAMES = ("merge_recipe.yaml",)
CARD_NAME = "README.md"

#: recipe ``parameters`` that are not method options: merge-wide settings and their YAML types
MERGE_KEYS: dict[str, tuple[type, ...]] = {
    "allow_tokenizer_mismatch": (bool,), "max_shard_size": (str, int), "rank": (int, str), "merge_into_base": (bool,),
}


def _ref_of(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    return f"<loaded {type(obj).__name__}>"


def _param_keys() -> dict[str, tuple[type, ...]]:
    """Every key a recipe's ``parameters`` may hold, with its YAML types."""
    keys = {name: o.recipe_types for name, o in registry.option_catalogue().items()}
    keys.update(MERGE_KEYS)
    return keys


def _version() -> str:
    from hf_fisher.artifacts.fisher import _library_version

    return _library_version()


def build_recipe(models, fishers, method: MergeMethod, weights, base_model, out_dtype, choice, no_fisher,
                 gram_params) -> dict:
    """The mergekit-like recipe of a merge (what ``hf-fisher merge RECIPE.yaml`` reads back)."""
    from .base import RULE_TEXT

    use_fisher = method.fishers is not None
    entries = []
    for i, m in enumerate(models):
        params: dict[str, Any] = {"weight": weights[i]}
        if use_fisher and fishers is not None:
            params["fisher"] = _ref_of(fishers[i]) if isinstance(fishers[i], (str, os.PathLike)) else \
                f"<in-memory {'KFAC ' if method.fishers == 'kfac' else ''}Fisher, task {fishers[i].metadata.task!r}>"
        entries.append({"model": _ref_of(m), "parameters": params})
    section: dict[str, Any] = {"version": _version(), "validation": choice}
    if use_fisher:
        rule = getattr(method, "no_fisher_rule", "average")
        section["no_fisher"] = {"rule": rule, "text": RULE_TEXT[rule], "tensors": list(no_fisher)}
    section.update(method.recipe_notes())
    if gram_params is not None:
        section["regmean_tensors"] = gram_params
    plan = getattr(models[0], "plan", None)  # a slices: recipe's virtual models: its slices written back
    if plan is not None:
        return {"merge_method": method.name, "base_model": plan.spec["base_model"], "slices": plan.spec["slices"],
                "parameters": mergekit_names(method.parameters()),
                "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
                "hf_fisher": section}
    if base_model is None and method.name == "slerp":  # mergekit's slerp goes from its base_model: the first model
        base_model = models[0]
    return {
        "merge_method": method.name,
        "base_model": _ref_of(base_model) if base_model is not None else None,
        "models": entries,
        "parameters": mergekit_names(method.parameters()),
        "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
        "hf_fisher": section,
    }


_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "hf_fisher", "out_dtype",
             "tokenizer_source")

#: mergekit's recipe keys that ``hf-fisher merge`` does not carry out, with what to do instead
_UNSUPPORTED = {
    "modules": "mergekit's per-module merges are not supported by hf-fisher merge; give models: and merge_method:",
    "tokenizer": "mergekit's tokenizer building (tokens, pad_to_multiple_of) is not supported by hf-fisher merge; "
                 "use tokenizer_source: base or a model of the recipe",
    "chat_template": "mergekit's chat_template is not supported by hf-fisher merge; the tokenizer files are copied "
                     "from tokenizer_source (default: the first model)",
}

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


def _check_value(types: tuple[type, ...], what: str, where: str):
    def check(v, at):
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)) or (
                isinstance(v, float) and not math.isfinite(v)):
            raise _bad(at, f"must be of type {'/'.join(t.__name__ for t in types)}{what}, got {v!r}", where)
    return check


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a recipe YAML file (hf_fisher's, or mergekit's form: per-model ``weight`` /
    ``density`` / ``gamma`` / ``epsilon``, gradients over the layers and ``filter:`` conditions,
    ``lambda``, ``normalize``, ``int8_mask``, ``rescale``, ``t``, ``dtype`` / ``out_dtype``,
    ``tokenizer_source``, ``slices:`` with their ``sources`` / ``layer_range`` / ``parameters``);
    :class:`InvalidInputError` naming the key."""
    import yaml

    from .parameters import PER_MODEL_KEYS, check_setting

    where = os.fspath(path)
    try:
        text = Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read recipe {where}: {e}") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
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
        if k in _UNSUPPORTED:
            raise _bad(str(k), f"is not supported: {_UNSUPPORTED[k]}", where)
        if k not in _TOP_KEYS:
            raise _bad(str(k), f"is not a known key (expected {list(_TOP_KEYS)})", where)
    if "merge_method" not in data:
        raise _bad("merge_method", "is missing (the name of a registered merge method, e.g. fisher)", where)
    models = data.get("models")
    slices = data.get("slices")
    if models is not None and slices is not None:
        raise _bad("slices", "and models are both given; give one of them (as mergekit requires)", where)
    number = _check_value((float, int), "", where)

    def check_model_params(params, p):
        for k, v in params.items():
            if k == "weight":
                def weight(x, at):
                    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                        raise _bad(at, f"must be a number, got {x!r}", where)
                check_setting(v, weight, f"{p}.weight")
            elif k == "fisher":
                if v is not None and (not isinstance(v, str) or v.startswith("<")):
                    raise _bad(f"{p}.fisher", f"must be a Fisher artifact folder or Hub id, got {v!r}", where)
            elif k in PER_MODEL_KEYS:
                check_setting(v, number, f"{p}.{k}")
            else:
                raise _bad(f"{p}.{k}", f"is not a known key (expected weight, fisher, {', '.join(PER_MODEL_KEYS[1:])})",
                           where)

    if slices is None and (not isinstance(models, list) or not models):
        raise _bad("models", "must be a list of entries {model: ..., parameters: {...}} (or give slices:)", where)
    for i, e in enumerate(models or []):
        p = f"models[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("model"), str) or not e["model"]:
            raise _bad(f"{p}.model", "must be a model folder or Hub id (a string)", where)
        extra = sorted(set(e) - {"model", "parameters"})
        if extra:
            raise _bad(f"{p}.{extra[0]}", "is not a known key (expected model, parameters)", where)
        params = e.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"{p}.parameters", "must be a mapping (weight, fisher)", where)
        check_model_params(params, f"{p}.parameters")
        if isinstance(e["model"], str) and e["model"].startswith("<"):
            raise _bad(f"{p}.model", f"names an in-memory model ({e['model']}); a recipe needs a folder or Hub id", where)
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base or base.startswith("<")):
        raise _bad("base_model", f"must be a model folder or Hub id, got {base!r}", where)
    # the method's name, from the registry (loading the plugins imports torch: after the checks above)
    methods = registry.available()
    cls = methods.get(data["merge_method"]) if isinstance(data["merge_method"], str) else None
    if cls is None:
        raise _bad("merge_method", f"must be one of {list(methods)}, got {data['merge_method']!r}", where)
    if cls.needs_data:
        raise _bad("merge_method", f"{cls.name!r} needs data batches, which a recipe cannot hold; use the Python API", where)
    if models is not None and len(models) < cls.min_models:
        least = "two entries" if cls.min_models == 2 else f"{cls.min_models} entries"
        raise _bad("models", f"must be a list of at least {least} {{model: ..., parameters: {{...}}}} for method "
                   f"{cls.name!r}, got {len(models)}", where)
    param_keys = _param_keys()
    for k in PER_MODEL_KEYS:
        param_keys.setdefault(k, (float, int))

    def check_shared(params, path):
        for k, v in params.items():
            types = param_keys.get(ALIASES.get(k, k))
            if types is None:
                raise _bad(f"{path}.{k}", f"is not a known parameter (expected {sorted([*param_keys, *ALIASES])})", where)
            if v is None:  # the option's default (what a written recipe records for "the method's default")
                continue
            if k in MERGE_KEYS:
                _check_value(types, "", where)(v, f"{path}.{k}")
            else:
                check_setting(v, _check_value(types, "", where), f"{path}.{k}")

    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters", "must be a mapping", where)
    check_shared(params, "parameters")
    if slices is not None:
        from .slices import check_slices

        def check_params(p, path):
            if path.endswith("].parameters") and ".sources[" in path:
                check_model_params(p, path)
            else:
                check_shared(p, path)
        check_slices(slices, where, check_params)
    if "lambda" in params and "scaling" in params:
        raise _bad("parameters.lambda", "and parameters.scaling are the same option (mergekit's name and hf_fisher's); "
                   "give one", where)
    for key in ("dtype", "out_dtype"):
        dtype = data.get(key)
        if dtype is not None:
            from .api import _out_dtype

            try:
                _out_dtype(dtype)
            except InvalidInputError:
                raise _bad(key, f"must be a floating dtype name (float32, bfloat16, float16, float64), got {dtype!r}",
                           where) from None
    ts = data.get("tokenizer_source")
    if ts is not None:
        names = [e["model"] for e in models or []] + [src["model"] for sl in slices or [] for src in sl["sources"]]
        names = list(dict.fromkeys(names + ([base] if base else [])))
        if ts == "union":
            raise _bad("tokenizer_source", "'union' (mergekit's merged vocabulary) is not supported by hf-fisher merge; "
                       "use base or one model of the recipe", where)
        if not isinstance(ts, str) or (ts != "base" and ts not in names):
            raise _bad("tokenizer_source", f"must be 'base' or one of the recipe's models {names}, got {ts!r}", where)
        if ts == "base" and not base:
            raise _bad("tokenizer_source", "is 'base' but the recipe has no base_model", where)
    if data.get("hf_fisher") is not None and not isinstance(data["hf_fisher"], dict):
        raise _bad("hf_fisher", "must be a mapping", where)
    return data


def recipe_to_kwargs(recipe: Mapping[str, Any], *, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """``merge_with_fisher`` arguments of a validated recipe (relative local paths resolved against
    ``relative_to`` when they exist there).

    As mergekit reads its recipes: a model entry that is the ``base_model`` is the base of the
    task-vector methods (not merged in); ``slerp`` interpolates from the base to the other model;
    ``linear`` merges the base as one more input when it is not listed; ``lambda`` is ``scaling``;
    ``out_dtype`` (else ``dtype``) is the output dtype; ``ties`` without a density keeps everything
    (mergekit's default density 1). Settings that differ between models (other than ``weight``),
    gradients and filters become ``tensor_parameters``
    (:class:`~hf_fisher.consumers.merge.parameters.TensorParameters`). A ``slices:`` recipe gives
    virtual models instead (:func:`_slices_to_kwargs`, :mod:`hf_fisher.consumers.merge.slices`)."""
    from .parameters import TensorParameters

    def loc(ref):
        if ref is None or relative_to is None or os.path.isabs(ref):
            return ref
        cand = Path(relative_to) / ref
        return str(cand) if cand.exists() else ref

    method = recipe["merge_method"]
    cls = registry.get(method)
    _warn_reduced_arithmetic(recipe)
    if recipe.get("slices"):
        return _slices_to_kwargs(recipe, cls, loc)
    base = recipe.get("base_model")
    entries = list(recipe["models"])
    if base is not None:
        if cls.name == "slerp":
            own = [e for e in entries if e["model"] == base]
            entries = (own or [{"model": base}])[:1] + [e for e in entries if e["model"] != base]
            base = None
        elif cls.name == "linear":
            if all(e["model"] != base for e in entries):
                entries.append({"model": base})
            base = None
        elif cls.needs_base or cls.name == "nuslerp":  # nuslerp: the base, when given, is the base
            entries = [e for e in entries if e["model"] != base]
    shared = {ALIASES.get(k, k): v for k, v in (recipe.get("parameters") or {}).items()}
    merge_wide = {k: shared.pop(k) for k in list(shared) if k in MERGE_KEYS}
    params = [dict(e.get("parameters") or {}) for e in entries]
    fishers = [loc(p.pop("fisher", None)) for p in params]
    if cls.name == "ties" and "density" not in shared and all("density" not in p for p in params):
        shared["density"] = 1.0  # mergekit's default density
    kwargs: dict[str, Any] = dict(merge_wide)
    varying: dict[str, Any] = {}
    for k, v in shared.items():
        if v is not None and varies(v):
            varying[k] = v
        elif k not in PER_MODEL_KEYS:
            kwargs[k] = v
    per_model: list[dict[str, Any]] = [{} for _ in params]
    for k in PER_MODEL_KEYS:
        values = [p.get(k, shared.get(k)) for p in params]
        if any(v is None for v in values):
            if k == "weight" and any(v is not None for v in values):
                raise InvalidInputError("recipe: give parameters.weight for every model or for none")
            if all(v is None for v in values):
                continue
        if any(varies(v) for v in values if v is not None) or (k != "weight" and len({repr(v) for v in values}) > 1):
            for i, p in enumerate(params):
                if k in p:
                    per_model[i][k] = p[k]
            if k in shared:
                varying[k] = shared[k]
        elif k == "weight":
            kwargs["weights"] = values
        else:
            kwargs[k] = values[0]
    if varying or any(per_model):
        kwargs["tensor_parameters"] = TensorParameters(varying, per_model)
    out_dtype = recipe.get("out_dtype") or recipe.get("dtype")
    kwargs.update(method=method, base_model=loc(base), dtype=out_dtype)
    ts = recipe.get("tokenizer_source")
    if ts is not None:
        kwargs["tokenizer_source"] = loc(recipe.get("base_model") if ts == "base" else ts)
    if cls.fishers is not None:
        if any(f is None for f in fishers):
            raise InvalidInputError(f"recipe: method {method!r} needs models[i].parameters.fisher for every model")
        kwargs["fishers"] = fishers
    kwargs["models"] = [loc(e["model"]) for e in entries]
    return kwargs


def _warn_reduced_arithmetic(recipe: Mapping[str, Any]) -> None:
    """mergekit reads the inputs in the recipe's ``dtype`` and computes in it; hf_fisher computes in
    float32 (float64 for float64 inputs) and rounds once to the output dtype: said loudly when the
    recipe's ``dtype`` is a 16-bit one (the outputs then differ from mergekit's)."""
    dtype = recipe.get("dtype")
    if dtype in ("bfloat16", "float16", "bf16", "fp16", "half"):
        logger.warning(
            "recipe dtype %s: mergekit reads the models in %s and merges in %s arithmetic; hf-fisher merges in "
            "float32 and rounds the result once to %s, so the output equals mergekit's float32 merge rounded to %s, "
            "not mergekit's %s-arithmetic merge (which differs in the last bits, and where %s rounding flips a "
            "trim or sign decision)", dtype, dtype, dtype, recipe.get("out_dtype") or dtype, recipe.get("out_dtype") or dtype,
            dtype, dtype)


def _slices_to_kwargs(recipe: Mapping[str, Any], cls, loc) -> dict[str, Any]:
    """``merge_with_fisher`` arguments of a ``slices:`` recipe: the ``j``-th model of every slice
    (the base set apart as :func:`recipe_to_kwargs` sets it apart) as virtual model ``j``
    (:class:`~hf_fisher.consumers.merge.slices.SlicedSource`), every tensor's settings by
    :class:`~hf_fisher.consumers.merge.slices.SliceParameters`."""
    from .slices import SlicedSource, SliceParameters, SlicePlan, _Piece

    method = cls.name
    if cls.fishers is not None:
        raise InvalidInputError(f"recipe: method {method!r} takes Fishers per model, which slices: cannot give; "
                                "use models: with whole models")
    top_base = recipe.get("base_model")
    base_inside = cls.name == "slerp" or cls.needs_base or (cls.name == "nuslerp" and top_base is not None)
    columns: list[list] = []
    bases: list = []
    lengths, slice_params = [], []
    for s, sl in enumerate(recipe["slices"]):
        sources = sl["sources"]
        b = sl.get("base_model") or top_base
        pieces = [(src["model"], _Piece(loc(src["model"]), src["layer_range"][0], dict(src.get("parameters") or {})))
                  for src in sources]
        if base_inside:
            if b is None or all(m != b for m, _ in pieces):
                raise InvalidInputError(f"recipe: slices[{s}]: method {method!r} needs its base_model ({b!r}) among the "
                                        "slice's sources (mergekit requires it too)")
            own = [pc for m, pc in pieces if m == b]
            rest = [pc for m, pc in pieces if m != b]
            if cls.name == "slerp":
                rest = own + rest
            else:
                bases.append(own[0])
        else:
            rest = [pc for _, pc in pieces]
        if columns and len(rest) != len(columns):
            raise InvalidInputError(f"recipe: slices[{s}] merges {len(rest)} model(s), slices[0] {len(columns)}; "
                                    "hf-fisher merge needs the same number of models in every slice")
        if not columns:
            columns = [[] for _ in rest]
        for j, pc in enumerate(rest):
            columns[j].append(pc)
        lengths.append(sources[0]["layer_range"][1] - sources[0]["layer_range"][0])
        slice_params.append({ALIASES.get(k, k): v for k, v in (sl.get("parameters") or {}).items()})
    if len(columns) < cls.min_models:
        raise InvalidInputError(f"recipe: method {method!r} merges at least {cls.min_models} models per slice, "
                                f"the slices give {len(columns)}")
    shared = {ALIASES.get(k, k): v for k, v in (recipe.get("parameters") or {}).items()}
    merge_wide = {k: shared.pop(k) for k in list(shared) if k in MERGE_KEYS}
    if cls.name == "ties" and not any("density" in scope for scope in [shared, *slice_params]) and not any(
            "density" in pc.parameters for col in columns for pc in col):
        shared["density"] = 1.0  # mergekit's default density
    donor = loc(top_base) if top_base else columns[0][0].ref
    plan = SlicePlan(columns, bases or None, lengths, slice_params, donor)
    plan.spec = {"slices": [{**sl, "sources": [{**src, "model": loc(src["model"])} for src in sl["sources"]],
                             **({"base_model": loc(sl["base_model"])} if sl.get("base_model") else {})}
                            for sl in recipe["slices"]],
                 "base_model": loc(top_base)}
    kwargs: dict[str, Any] = dict(merge_wide)
    for k, v in shared.items():  # the scalar options also on the method (recorded in the written recipe)
        if v is not None and k not in PER_MODEL_KEYS and not varies(v):
            kwargs[k] = v
    kwargs.update(method=method, models=[SlicedSource(plan, j) for j in range(len(columns))],
                  base_model=SlicedSource(plan, "base") if bases else None,
                  dtype=recipe.get("out_dtype") or recipe.get("dtype"),
                  tensor_parameters=SliceParameters(plan, shared))
    ts = recipe.get("tokenizer_source")
    if ts is not None:
        kwargs["tokenizer_source"] = loc(top_base if ts == "base" else ts)
    return kwargs
