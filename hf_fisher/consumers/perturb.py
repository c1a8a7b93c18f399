"""Percolation experiments: perturb the most (or least) Fisher-important units and watch the loss.

A *unit* is an MLP channel (:meth:`Fisher.channel_importance`) or an attention head
(:meth:`Fisher.head_importance`). :func:`perturb` picks ``n = ceil(C · N)`` of the ``N`` units
(concentration ``C ∈ (0, 1]``; :func:`hf_fisher.consumers.overlap.count_of`) — the top-``n`` by
Fisher value, the bottom-``n``, or ``n`` at random — and adds to the model's weights

    ``δ = ε · z / ‖z‖₂``,   ``z ~ N(0, I)`` on the selected positions, 0 elsewhere,

so ``‖δ‖₂ = ε`` whatever the target: the same budget, concentrated where the Fisher says it matters
or where it does not. The positions of a unit are:

- a channel ``c``: every slice of ``ChannelBlock.slices(c)`` (e.g. the gate row, up row and down
  column of a gated MLP);
- a head ``h``: its Q slices (rows of ``q_proj``, and of its bias when there is one) and O slices
  (columns of ``o_proj``) only — not the K/V rows of its kv-head, which under GQA/MQA other heads
  share (a fused ``c_attn``: only its Q part).

Positions are the union of the selected slices: a position in several slices (or several roles on
one parameter) is drawn and counted once, so the norm stays exactly ``ε`` (up to the model
dtype's rounding; :attr:`Perturbation.norm` is the norm actually applied, measured in float64).
:func:`perturbation_sweep` runs the loss curve over concentrations, targets and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hf_fisher.consumers.merge.api import validation_loss
from hf_fisher.consumers.overlap import count_of
from hf_fisher.errors import InvalidInputError
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import Slice

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["Perturbation", "SweepPoint", "SweepResult", "hf_fisher_register_consumers", "perturb", "perturbation_sweep"]

UNITS = ("channels", "heads")
TARGETS = ("top", "bottom", "random")


@dataclass
class Perturbation:
    """A perturbation applied to a model; :meth:`restore` (or leaving a ``with`` block) undoes it.

    ``units``: the selected ``(layer, channel)`` / ``(layer, head)`` pairs, in selection order
    (descending Fisher for "top", ascending for "bottom", draw order for "random"); ``norm``: the
    L2 norm of the change actually applied (float64); ``seed``: the seed used (drawn when none was
    given, so the perturbation can be reproduced); ``masks``: ``{param: BoolTensor}`` of the
    changed positions.
    """

    unit: str
    target: str
    concentration: float
    epsilon: float
    seed: int
    units: list[tuple[int, int]]
    norm: float
    masks: dict[str, torch.Tensor] = field(repr=False)
    _params: dict[str, torch.nn.Parameter] = field(repr=False, default_factory=dict)
    _saved: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the perturbation is still applied."""
        return bool(self._saved)

    def restore(self) -> None:
        """Put back the original weights, bitwise: the values saved before the change are written back
        at the perturbed positions (nothing else was touched). Idempotent."""
        with torch.no_grad():
            for name, saved in self._saved.items():
                self._params[name][self.masks[name]] = saved
        self._saved = {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (no tensors)."""
        return {
            "unit": self.unit,
            "target": self.target,
            "concentration": self.concentration,
            "epsilon": self.epsilon,
            "seed": self.seed,
            "units": [list(u) for u in self.units],
            "norm": self.norm,
            "num_elements": sum(int(m.sum()) for m in self.masks.values()),
        }

    def __enter__(self) -> Perturbation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise InvalidInputError(f"{what} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def _check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise InvalidInputError(f"epsilon (the perturbation's L2 norm) must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidInputError(f"seed must be an integer or None, got {seed!r}")
    return seed


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise InvalidInputError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


Unit = tuple[int, int]  # (layer, channel) or (layer, head)


def _unit_slices(model, fisher: Fisher, unit: str) -> tuple[dict[Unit, float], dict[Unit, tuple[Slice, ...]]]:
    """Validated ``(scores, slices)`` of every unit; raises before anything is changed."""
    layout = fisher.layout
    if layout is None:
        raise InvalidInputError(
            "perturb needs the Fisher's model layout, and this Fisher has none; collect it with "
            "hf_fisher.collect (which records the layout)"
        )
    if unit == "heads" and not layout.attention:
        raise InvalidInputError(f"unit='heads', but the Fisher's layout ({layout.adapter!r}) has no attention heads")
    if unit == "channels" and not layout.mlp:
        raise InvalidInputError(f"unit='channels', but the Fisher's layout ({layout.adapter!r}) has no MLP channels")
    fisher.validate(model)
    if unit == "heads":
        scores = fisher.head_importance()
        slices = {(h.layer, h.head): tuple(h.q) + tuple(h.o) for h in layout.heads()}
    else:
        scores = fisher.channel_importance()
        slices = {(b.layer, c): b.slices(c) for b in layout.mlp for c in range(b.num_channels)}
    params = dict(model.named_parameters())
    for key, ss in slices.items():
        for s in ss:
            p = params.get(s.param)
            if p is None or s.axis >= p.dim() or s.stop > p.shape[s.axis]:
                raise InvalidInputError(
                    f"{unit[:-1]} {key}: its slice {s} is not a slice of a parameter of the model; use the "
                    "model this Fisher was collected on"
                )
            if not p.dtype.is_floating_point:
                raise InvalidInputError(f"{s.param} has dtype {p.dtype}; only floating-point weights can be perturbed")
    return scores, slices


def _select(scores: Mapping[Unit, float], n: int, target: str, gen: torch.Generator) -> list[Unit]:
    keys = sorted(scores)
    if target == "random":
        return [keys[i] for i in torch.randperm(len(keys), generator=gen)[:n].tolist()]
    values = torch.tensor([scores[k] for k in keys], dtype=torch.float64)
    order = torch.sort(values, descending=target == "top", stable=True).indices[:n]
    return [keys[i] for i in order.tolist()]


def _apply(model, units, slices, epsilon: float, gen: torch.Generator) -> tuple[float, dict, dict, dict]:
    """Add ``epsilon · z / ‖z‖`` on the union of the units' slices; ``(norm, masks, params, saved)``."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for key in units:
        for s in slices[key]:
            p = params[s.param]
            m = masks.setdefault(s.param, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
            m[s.index()] = True
    names = sorted(masks)
    z = {n: torch.randn(int(masks[n].sum()), generator=gen, dtype=torch.float64) for n in names}
    z_norm = math.sqrt(sum(float((v * v).sum()) for v in z.values()))
    if z_norm == 0.0:
        raise InvalidInputError(f"the selected units {list(units)[:5]} have no weights to perturb")
    scale = epsilon / z_norm
    saved, sq = {}, 0.0
    with torch.no_grad():
        for n in names:
            p, m = params[n], masks[n]
            before = p[m].clone()
            p[m] = before + (z[n] * scale).to(device=p.device, dtype=p.dtype)
            sq += float(((p[m].double() - before.double()) ** 2).sum())
            saved[n] = before
    return math.sqrt(sq), masks, {n: params[n] for n in names}, saved


def perturb(
    model,
    fisher: Fisher,
    *,
    concentration: float,
    epsilon: float,
    unit: str = "channels",
    target: str = "top",
    seed: int | None = None,
) -> Perturbation:
    """Add a random perturbation of L2 norm ``epsilon`` to ``n = ceil(concentration · N)`` units.

    ``unit``: "channels" (MLP channels) or "heads" (attention heads: Q rows and O columns only);
    ``target``: "top" (the ``n`` largest Fisher values; ties: lower (layer, unit) first), "bottom"
    (the ``n`` smallest) or "random" (``n`` drawn uniformly without replacement). One
    ``torch.Generator`` seeded with ``seed`` draws the random units (for "random") and then the
    direction ``z ~ N(0, I)`` (float64, parameters in sorted name order, C order within each),
    and ``δ = epsilon · z / ‖z‖`` is added in place (see the module docstring). Returns a
    :class:`Perturbation`; ``with perturb(...) as p:`` restores the weights on exit.

    Everything is checked before the model is touched (:class:`InvalidInputError`; a Fisher of
    another model: :class:`~hf_fisher.errors.ModelMismatchError` from :meth:`Fisher.validate`).
    """
    _check_choice(unit, UNITS, "unit")
    _check_choice(target, TARGETS, "target")
    concentration = _check_fraction(concentration, "concentration")
    epsilon = _check_epsilon(epsilon)
    _check_seed(seed)
    scores, slices = _unit_slices(model, fisher, unit)
    return _perturb_planned(model, scores, slices, unit, target, concentration, epsilon, seed)


def _perturb_planned(model, scores, slices, unit, target, concentration, epsilon, seed) -> Perturbation:
    if seed is None:
        seed = torch.Generator().seed() % (2**63)
    gen = torch.Generator().manual_seed(seed)
    units = _select(scores, count_of(concentration, len(scores)), target, gen)
    norm, masks, params, saved = _apply(model, units, slices, epsilon, gen)
    return Perturbation(unit, target, concentration, epsilon, seed, units, norm, masks, params, saved)


# ---------------------------------------------------------------------------- sweep
@dataclass(frozen=True)
class SweepPoint:
    """Loss after perturbing ``num_units`` units of ``target`` at ``concentration``: one loss per
    seed (``losses[i]`` for ``seeds[i]``), their mean, and ``delta = mean_loss − base_loss``."""

    target: str
    concentration: float
    num_units: int
    seeds: tuple[int, ...]
    losses: tuple[float, ...]
    mean_loss: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "concentration": self.concentration,
            "num_units": self.num_units,
            "seeds": list(self.seeds),
            "losses": list(self.losses),
            "mean_loss": self.mean_loss,
            "delta": self.delta,
        }


@dataclass
class SweepResult:
    """:func:`perturbation_sweep`'s curves: ``base_loss`` (unperturbed) and one :class:`SweepPoint`
    per (target, concentration), targets outer, concentrations inner, in the order given."""

    unit: str
    epsilon: float
    base_loss: float
    concentrations: tuple[float, ...]
    targets: tuple[str, ...]
    seeds: tuple[int, ...]
    points: list[SweepPoint]

    def point(self, target: str, concentration: float) -> SweepPoint:
        for p in self.points:
            if p.target == target and p.concentration == concentration:
                return p
        raise KeyError(f"no sweep point for target={target!r}, concentration={concentration!r}")

    def curve(self, target: str) -> list[tuple[float, float]]:
        """``[(concentration, mean_loss), ...]`` of one target."""
        return [(p.concentration, p.mean_loss) for p in self.points if p.target == target]

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "epsilon": self.epsilon,
            "base_loss": self.base_loss,
            "concentrations": list(self.concentrations),
            "targets": list(self.targets),
            "seeds": list(self.seeds),
            "points": [p.to_dict() for p in self.points],
        }


def perturbation_sweep(
    model,
    fisher: Fisher,
    batches: Iterable[Mapping[str, Any]],
    *,
    concentrations: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
    epsilon: float,
    unit: str = "channels",
    targets: Sequence[str] = TARGETS,
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
) -> SweepResult:
    """Loss of ``model`` on ``batches`` unperturbed, then after :func:`perturb` for every target,
    concentration and seed (the weights are restored after each).

    The loss is :func:`hf_fisher.consumers.merge.api.validation_loss` — the mean over ``batches``
    of ``model(**batch).loss`` (labels default to the input ids, padding ignored). Every argument
    is checked before the first forward pass. Progress is shown with tqdm unless ``progress=False``.
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise InvalidInputError("batches is empty; give at least one batch to evaluate the loss on")
    concentrations = tuple(concentrations)
    targets = tuple(targets)
    seeds = tuple(seeds)
    for name, seq in (("concentrations", concentrations), ("targets", targets), ("seeds", seeds)):
        if not seq:
            raise InvalidInputError(f"{name} is empty")
    _check_choice(unit, UNITS, "unit")
    concentrations = tuple(_check_fraction(c, "each concentration") for c in concentrations)
    for t in targets:
        _check_choice(t, TARGETS, "each target")
    for s in seeds:
        if _check_seed(s) is None:
            raise InvalidInputError("seeds must be integers (None is not reproducible)")
    epsilon = _check_epsilon(epsilon)
    scores, slices = _unit_slices(model, fisher, unit)

    base = validation_loss(model, [batches])
    points = []
    bar = tqdm(total=len(targets) * len(concentrations) * len(seeds), desc="perturbation sweep", disable=not progress)
    try:
        for target in targets:
            for c in concentrations:
                losses = []
                for s in seeds:
                    with _perturb_planned(model, scores, slices, unit, target, c, epsilon, s) as p:
                        losses.append(validation_loss(model, [batches]))
                    bar.update(1)
                mean = sum(losses) / len(losses)
                points.append(SweepPoint(target, c, len(p.units), seeds, tuple(losses), mean, mean - base))
    finally:
        bar.close()
    return SweepResult(unit, epsilon, base, concentrations, targets, seeds, points)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("perturb", perturb)
    register("perturbation_sweep", perturbation_sweep)
