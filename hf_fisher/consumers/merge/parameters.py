"""Parameters that vary by tensor, as mergekit's recipes give them: a per-layer gradient (a list of
numbers interpolated over the layers) and ``filter:`` conditions on the tensor name, model by model
(``models[i].parameters``) or for the whole merge (``parameters``).

Resolution follows mergekit 0.1.5 (``mergekit/config.py: evaluate_setting``,
``parameter_resolver.py``): a model's own setting wins over the merge-wide one; a scalar is taken as
is; a list of numbers ``[v_0, ..., v_m]`` is read at ``x = t·m``, ``t = layer / (L − 1)`` (``t = 1``
with one layer, ``t = 0`` for tensors outside the layers: embeddings, final norm, head), as
``(1 − frac(x)) v_⌊x⌋ + frac(x) v_⌊x⌋+1``; a list of ``{filter, value}`` takes the first whose
``filter`` is absent, ``"*"`` or a substring of the tensor name (none: the next scope, then the default).
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hf_fisher.errors import InvalidInputError

__all__ = ["ALIASES", "PER_MODEL_KEYS", "TensorParameters", "evaluate", "is_scalar", "layer_position", "mergekit_names"]

#: options a recipe may give model by model (mergekit's non-base parameters; ``scale``: passthrough's) besides ``fisher``
PER_MODEL_KEYS = ("weight", "density", "gamma", "epsilon", "scale")

_LAYER = re.compile(r"\.(\d+)\.")

#: mergekit's names of options: recipe key -> option
ALIASES = {"lambda": "scaling"}
#: option -> the name a written recipe gives it (mergekit's, so that mergekit reads it)
WRITTEN_NAMES = {v: k for k, v in ALIASES.items()}


def mergekit_names(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with each option under the name mergekit reads (``scaling`` -> ``lambda``:
    mergekit ignores a key it does not know, so a recipe written with ``scaling`` would merge at
    mergekit's default λ = 1)."""
    return {WRITTEN_NAMES.get(k, k): v for k, v in parameters.items()}


def is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def layer_position(name: str, num_layers: int | None) -> float:
    """mergekit's ``t`` of a tensor: ``layer / (L − 1)`` inside layer ``layer`` of ``L`` (1 when
    ``L = 1``), 0 outside the layers (no ``.N.`` in its name, or the layer count is unknown)."""
    m = _LAYER.search(name)
    if m is None or not num_layers:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
    """One setting's value for tensor ``name`` at layer position ``t`` (None: no filter matched)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if is_scalar(setting):
        return setting
    if not setting:
        return None
    if all(is_scalar(e) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        x = t * (len(setting) - 1)
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (name and f in name):
            return evaluate(cond["value"], name, t)
    return None


def check_setting(setting: Any, check, where: str) -> None:
    """Every scalar a setting can produce checked by ``check(value, where)`` (endpoints of gradients,
    values of conditions); :class:`InvalidInputError` naming ``where`` for a malformed setting."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if is_scalar(setting):
        check(setting, where)
        return
    if not isinstance(setting, list) or not setting:
        raise InvalidInputError(f"key '{where}' must be a value, a list of values (a gradient over the layers) or a list "
                                f"of {{filter, value}}, got {setting!r}")
    if all(is_scalar(e) for e in setting):
        for i, e in enumerate(setting):
            check(e, f"{where}[{i}]")
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise InvalidInputError(f"key '{where}[{i}]' must be a mapping {{filter: <part of a tensor name>, value: ...}}, "
                                    f"got {cond!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise InvalidInputError(f"key '{where}[{i}].filter' must be a string (part of a tensor name), got {cond['filter']!r}")
        check_setting(cond["value"], check, f"{where}[{i}].value")


def varies(setting: Any) -> bool:
    """Whether a setting depends on the tensor (a gradient or a filter)."""
    return not is_scalar(setting)


class TensorParameters:
    """The settings of one merge that vary by tensor or by model: ``shared`` (the recipe's
    ``parameters``: method options, and per-model keys given for every model) and ``per_model`` (each
    model's ``parameters``). :meth:`resolve` gives one tensor's values."""

    def __init__(self, shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> None:
        self.shared = dict(shared)
        self.per_model = [dict(p) for p in per_model]
        self.num_layers: int | None = None

    def __repr__(self) -> str:
        return f"TensorParameters(shared={self.shared!r}, per_model={self.per_model!r})"

    def write_to(self, recipe: dict) -> None:
        """Record these settings in a written recipe (mergekit's names): the merge-wide ones in its
        ``parameters``, each model's in its entry (an entry's scalar ``weight`` is dropped where the
        merge-wide ``weight`` applies, since a model's own setting would win)."""
        recipe.setdefault("parameters", {}).update(mergekit_names(self.shared))
        for entry, own in zip(recipe["models"], self.per_model):
            params = entry.setdefault("parameters", {})
            if "weight" in self.shared and "weight" not in own:
                params.pop("weight", None)
            params.update(own)

    def bind(self, config: Mapping[str, Any]) -> None:
        """Read the layer count ``L`` from the first model's config."""
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                self.num_layers = config[key]
                return

    def resolve(self, name: str, method: Any, default_weights: Sequence[float]) -> tuple[dict, dict[str, list]]:
        """``(options, per_model)`` for tensor ``name``: the method options set here (``shared``),
        and each per-model key's value for every model (a model without one gets the merge-wide
        setting, else the method's value; ``weight``: ``default_weights``)."""
        t = layer_position(name, self.num_layers)
        options = {}
        for k, v in self.shared.items():
            if k in PER_MODEL_KEYS:
                continue
            got = evaluate(v, name, t)
            if got is not None:
                options[k] = got
        keys = {k for p in self.per_model for k in p} | {k for k in self.shared if k in PER_MODEL_KEYS}
        per_model: dict[str, list] = {}
        for k in sorted(keys):
            values = []
            for i, p in enumerate(self.per_model):
                got = evaluate(p[k], name, t) if k in p else None
                if got is None and k in self.shared:
                    got = evaluate(self.shared[k], name, t)
                if got is None:
                    got = default_weights[i] if k == "weight" else options.get(k, getattr(method, k, None))
                values.append(got)
            per_model[k] = values
        return options, per_model
