"""The :class:`MergeMethod` base class: one class per merge method, its formula in its docstring.

A method declares, once, on the class:

- what it needs (:attr:`MergeMethod.fishers`: ``None``, ``"diagonal"`` or ``"kfac"``;
  :attr:`~MergeMethod.needs_base`; :attr:`~MergeMethod.needs_data`);
- its options (:class:`Option`: name, default, type and range), checked before any work by
  :meth:`MergeMethod.__init__`, whether the merge is of full models, LoRA adapters or a recipe;
- how its model weights ``λ_i`` behave (:attr:`~MergeMethod.task_vectors`);
- the per-tensor merge :meth:`MergeMethod.merge` of a :class:`TensorInputs`.

``merge_with_fisher``, LoRA merging, recipes and ``hf-fisher merge`` find methods by name in
:mod:`hf_fisher.consumers.merge.registry` only, so a plugin's method (registered through the
hook ``hf_fisher_register_merge_methods``) works everywhere a built-in does.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from hf_fisher.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["MergeMethod", "Option", "TensorInputs", "real_number"]


def real_number(name: str, value: Any) -> float:
    """``float(value)`` for the numeric argument ``name``, or an :class:`InvalidInputError` naming it
    when ``value`` is a bool (``True`` is not 1.0 here), not a real number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)


@dataclass(frozen=True)
class Option:
    """One option of a merge method, declared once: its ``kind`` (``"real"``: a finite number,
    ``"int"``, ``"bool"``, ``"choice"``: one of ``choices``), ``default`` and range ``[low, high]``
    (either end open with ``low_open`` / ``high_open``; None: unbounded). ``note`` is appended to
    the range error (what the number means)."""

    name: str
    default: Any
    kind: str = "real"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    help: str = ""
    note: str = ""

    def check(self, value: Any) -> Any:
        """The checked value (None: the default); :class:`InvalidInputError` naming the option."""
        if value is None:
            return self.default
        name = self.name
        if self.kind == "bool":
            return bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise InvalidInputError(f"{name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InvalidInputError(f"{name} must be an integer, got {value!r}")
            return int(value)
        x = real_number(name, value)
        lo_bad = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        hi_bad = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if lo_bad or hi_bad:
            note = f" ({self.note})" if self.note else ""
            if self.low == 0 and self.low_open and self.high is None:
                raise InvalidInputError(f"{name} must be a positive finite number{note}, got {value!r}")
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            raise InvalidInputError(
                f"{name} must be in {lo}{self.low if self.low is not None else '-inf'}, "
                f"{self.high if self.high is not None else 'inf'}{hi}{note}, got {value!r}"
            )
        return x

    @property
    def recipe_types(self) -> tuple[type, ...]:
        """The YAML types a recipe may give."""
        return {"real": (float, int), "int": (int,), "bool": (bool,), "choice": (str,)}[self.kind]


@dataclass
class TensorInputs:
    """What one tensor's merge sees: every model's value ``thetas``, the weights ``λ_i``, the base
    model's value (when the method or its options use it), the per-element Fishers of every model
    (diagonal-Fisher methods, None where not every model's Fisher covers the tensor) and the RegMean
    Grams ``(grams, kind)`` of a Linear weight (methods that need data)."""

    name: str
    thetas: Sequence[torch.Tensor]
    weights: Sequence[float]
    base: torch.Tensor | None = None
    fishers: Sequence[torch.Tensor] | None = None
    gram: tuple[Sequence[torch.Tensor], str] | None = None
    #: per-model values of options a recipe gives model by model (mergekit's ``density``, ``gamma``,
    #: ``epsilon`` under ``models[i].parameters``), resolved for this tensor: option name -> one value per model
    per_model: Mapping[str, Sequence[Any]] | None = None

    def model_values(self, name: str, default: Any) -> list[Any]:
        """Option ``name``'s value for each model: the per-model values when given, else ``default``."""
        got = (self.per_model or {}).get(name)
        return list(got) if got is not None else [default] * len(self.thetas)


class MergeMethod:
    """Base class of merge methods. A subclass states its formula in its docstring, sets the class
    attributes below and implements :meth:`merge`; instances hold checked option values (as
    attributes of the option names) and are immutable (:meth:`replace` makes a new one).

    Register it with the hook ``hf_fisher_register_merge_methods``::

        @hookimpl
        def hf_fisher_register_merge_methods(register):
            register(MyMethod.name, MyMethod)
    """

    #: the registered name (``merge_method`` in recipes)
    name: ClassVar[str] = ""
    #: the paper (Markdown), for the model card
    paper: ClassVar[str] = ""
    #: the formula in one line (cards, ``hf-fisher plugins``)
    formula: ClassVar[str] = ""
    #: the Fishers it takes, one per model: None, ``"diagonal"`` (Fisher artifacts) or ``"kfac"``
    fishers: ClassVar[str | None] = None
    #: whether it needs ``base_model`` (task vectors ``τ_i = θ_i − θ_base``)
    needs_base: ClassVar[bool] = False
    #: whether it needs ``data`` (one iterable of batches per model: RegMean's input Grams)
    needs_data: ClassVar[bool] = False
    #: True: the weights scale task vectors (default 1 each, any sign; the validation grid's
    #: uniform point is all ones); False: an average (default 1/n, non-negative, positive sum)
    task_vectors: ClassVar[bool] = False
    #: the result is a linear combination of the inputs (a LoRA merge keeps rank ≤ Σ r_i)
    linear: ClassVar[bool] = False
    #: why LoRA adapters cannot be merged with it (None: they can, in delta-W space with base 0)
    lora_refusal: ClassVar[str | None] = None
    #: its options, each checked once here
    options: ClassVar[tuple[Option, ...]] = ()
    #: options the validation grid tunes besides the weights (keys of ``DEFAULT_GRID``)
    tuned: ClassVar[tuple[str, ...]] = ()
    #: the fewest models it merges (``passthrough``: 1)
    min_models: ClassVar[int] = 2

    def __init__(self, **options: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidInputError(
                f"merge method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}"
            )
        for o in self.options:
            object.__setattr__(self, o.name, o.check(options.get(o.name)))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({key}=...)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.values().items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.values() == other.values()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]

    def values(self) -> dict[str, Any]:
        """Every option's value."""
        return {o.name: getattr(self, o.name) for o in self.options}

    def replace(self, **changes: Any) -> MergeMethod:
        """A copy with some options changed (checked again)."""
        return type(self)(**{**self.values(), **changes})

    def parameters(self) -> dict[str, Any]:
        """The options the recipe records (default: all of them but those left unset, None: the
        method's default, which a mergekit reader could not parse)."""
        return {k: v for k, v in self.values().items() if v is not None}

    @property
    def uses_base(self) -> bool:
        """Whether the base model's tensors are read (the method or one of its options uses them)."""
        return self.needs_base

    # ------------------------------------------------------------------ inputs
    def default_weights(self, n: int) -> list[float]:
        return [1.0] * n if self.task_vectors else [1.0 / n] * n

    def check_weights(self, weights: Sequence[float]) -> None:
        if not self.task_vectors and (any(x < 0 for x in weights) or sum(weights) <= 0):
            raise InvalidInputError(f"method {self.name!r} needs non-negative weights with a positive sum, got {list(weights)}")

    def check_inputs(self, n: int, *, fishers: Sequence[Any] | None, base_model: Any, data: Any) -> None:
        """What the method needs is there (before any work)."""
        if self.fishers is not None:
            if fishers is None:
                what = ("KFAC Fisher (hf_fisher.collect(..., estimator='kfac'))" if self.fishers == "kfac" else "Fisher")
                raise InvalidInputError(f"method {self.name!r} needs fishers=[one {what} per model]")
            if len(fishers) != n:
                raise InvalidInputError(f"{len(fishers)} Fishers for {n} models; give one Fisher per model")
        if self.needs_base and base_model is None:
            raise InvalidInputError(f"method {self.name!r} needs base_model= (the model the inputs were fine-tuned from)")
        if self.needs_data and (data is None or isinstance(data, (str, Mapping)) or not isinstance(data, Sequence)
                                or len(data) != n):
            raise InvalidInputError(f"method {self.name!r} needs data=[batches_1, ..., batches_{n}], one iterable of batches per model")

    def recipe_notes(self) -> dict[str, Any]:
        """Extra entries of the recipe's ``hf_fisher`` section (how the Fishers were used)."""
        return {}

    def layer_merge(self, fishers: Sequence[Any], sources: Sequence[Any], labels: Sequence[str],
                    hub_options: Mapping[str, Any]) -> Any:
        """For methods that merge whole layers (KFAC): an object with ``block_of`` (tensor name ->
        block), ``covered()`` and :meth:`merge_layer` support; None for per-tensor methods."""
        return None

    def merge_layer(self, layers: Any, name: str, read: Any, weights: Sequence[float]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - only for methods whose layer_merge is not None

    # ------------------------------------------------------------------ the merge
    def merge(self, t: TensorInputs) -> torch.Tensor:
        """The merged value of one floating-point tensor (any dtype; the caller casts)."""
        raise NotImplementedError(f"{type(self).__name__}.merge")


# ---------------------------------------------------------------------------- shared options
FISHER_FLOOR = Option("fisher_floor", 1e-6, low=0, low_open=True, help="F̃ = max(F, floor)")
NORMALIZE_FISHERS = Option("normalize_fishers", False, kind="bool", help="divide each Fisher by its global mean")
NO_FISHER_RULE = Option("no_fisher_rule", "average", kind="choice", choices=("average", "first", "base", "error"),
                        help="tensors not every model's Fisher covers")
SCALING = Option("scaling", 1.0, help="s: the merged task vector's scale")
DENSITY = Option("density", 0.2, low=0, low_open=True, high=1, help="TIES: fraction of each task vector kept")
DROP_P = Option("drop_p", 0.9, low=0, high=1, high_open=True, help="DARE: drop probability")
SEED = Option("seed", 0, kind="int", help="DARE: random seed")
DARE_THEN = Option("dare_then", "task_arithmetic", kind="choice", choices=("task_arithmetic", "ties"),
                   help="DARE: combine the rescaled task vectors by")
CONVENTION = Option("convention", "mergekit", kind="choice", choices=("mergekit", "hf_fisher"),
                    help="'mergekit': mergekit 0.1.5's numbers (trim max(1, int(d·n)), a zero sign sum elects +1, "
                         "weighted TIES divides by the agreeing weights, DARE rescales to the L1 norm); 'hf_fisher': "
                         "round(d·n), a zero sign sum keeps nothing, divides by the agreeing count, DARE rescales by 1/(1 − p)")
NORMALIZE = Option("normalize", None, kind="bool",
                   help="divide the merged task vector by the sum of the (agreeing) weights (None: the method's default)")
RESCALE = Option("rescale", None, kind="bool", help="rescale each sparsified task vector to its L1 norm (None: the method's default)")
INT8_MASK = Option("int8_mask", False, kind="bool", help="mergekit's int8 sign mask (memory only: the numbers are the same)")
MK_DENSITY = Option("density", 1.0, low=0, low_open=True, high=1, help="fraction of each task vector kept")
GAMMA = Option("gamma", 0.01, low=0, high=1, help="Model Breadcrumbs: fraction of largest-magnitude entries dropped")
EPSILON = Option("epsilon", 0.15, low=0, high=1, help="DELLA: spread of the keep probabilities around density")
ALPHA = Option("alpha", 0.9, low=0, high=1, help="RegMean: off-diagonal Gram scale")
KFAC_DAMPING = Option("kfac_damping", 1e-3, low=0, low_open=True, note="δ relative to the mean Fisher diagonal")
KFAC_DAMPING_MODE = Option("kfac_damping_mode", "factor", kind="choice", choices=("factor", "exact"),
                           help="'factor': (G + √c·ḡI) ⊗ (A + √c·āI), each factor damped by its mean diagonal; 'exact': G ⊗ A + δI")

RULE_TEXT = {
    "average": "λ-weighted average",
    "first": "the first model's value",
    "base": "the base model's value",
    "error": "refused",
}


class FisherInputMethod(MergeMethod):
    """A method that takes one Fisher per model; tensors not every model's Fisher covers are merged
    by ``no_fisher_rule``: ``"average"`` (λ-weighted average), ``"first"``, ``"base"`` or ``"error"``."""

    @property
    def uses_base(self) -> bool:
        return self.needs_base or self.no_fisher_rule == "base"  # type: ignore[attr-defined]

    def check_inputs(self, n: int, *, fishers, base_model, data) -> None:
        super().check_inputs(n, fishers=fishers, base_model=base_model, data=data)
        if self.no_fisher_rule == "base" and base_model is None:  # type: ignore[attr-defined]
            raise InvalidInputError("no_fisher_rule='base' needs base_model=")

    def merge_uncovered(self, t: TensorInputs) -> torch.Tensor:
        """A tensor without a Fisher in every model, by ``no_fisher_rule``."""
        from . import math as mm

        rule = self.no_fisher_rule  # type: ignore[attr-defined]
        if rule == "first":
            return t.thetas[0].clone()
        if rule == "base":
            return t.base.clone()
        return mm.weighted_average(t.thetas, t.weights)
