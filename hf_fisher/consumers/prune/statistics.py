"""Scores of structured units (and of single weights) for pruning: hf_fisher's Fisher criteria and
the published baselines, in one place so they are compared on the same units.

A unit's score is its estimated cost of removal; pruning removes the lowest. For a unit ``u``
with parameter slices ``S_u`` (:mod:`hf_fisher.consumers.prune.units`), output-projection input
columns ``J_u`` (its O columns / down column), weights ``w``, diagonal Fisher ``F``, calibration
gradient ``g = ∂L/∂w`` (``L`` = mean loss over the calibration batches) and output-projection
inputs ``x_j`` over the calibration tokens (non-padding positions, unpruned model). The scores are
registered classes (:mod:`hf_fisher.consumers.prune.scores`, one :class:`PruneScore` each, with
these formulas); this module holds the statistics they read and :func:`score_units` /
:func:`score_weights`, which resolve a score name through the registry:

====================  ===========================================================================
``"fisher"``          ``Σ_{S_u} F`` — the Fisher of exactly what removing ``u`` removes (default)
``"mask_fisher"``     Kwon et al. 2022: ``mean_i (∂L_i/∂m_u)²`` for a multiplicative mask ``m_u``
                      on the unit's output; ``∂L_i/∂m_u = Σ_{J_u} ⟨W_{:,j}, g_{i,:,j}⟩`` (the
                      per-sample gradients ``g_i`` come from the batched engine)
``"kfac"``            structured Optimal Brain Surgeon under the KFAC quadratic (G ⊗ A of the
                      output projection): units removed greedily by the least loss increase
                      with the kept units' scales re-optimised (:mod:`~hf_fisher.consumers.prune.obs`)
``"obd"``             ``½ Σ_{S_u} F w²``: the loss increase of zeroing ``u`` under the diagonal
                      quadratic model (Optimal Brain Damage with the Fisher as the Hessian)
``"magnitude"``       ``‖w_{S_u}‖₂``
``"random"``          uniform in [0, 1) from ``seed``
``"wanda_sp"``        Wanda-sp (An et al. 2024): ``Σ_{j∈J_u} ‖x_j‖₂ Σ_i |W_ij|``
``"flap"``            FLAP's fluctuation metric (An et al. 2024): ``Σ_{j∈J_u} Var(x_j) ‖W_{:,j}‖²``
                      (sample variance over the calibration tokens); ``prune`` adds FLAP's bias
                      compensation ``b += Σ_{removed j} W_{:,j} E[x_j]``
``"taylor1"``         LLM-Pruner first order (Ma et al. 2023, element-wise): ``Σ_{S_u} |w g|``
``"taylor2"``         LLM-Pruner second order (its "param_mix" Element²):
                      ``Σ_{S_u} |−w g + ½ w² F|`` with ``F`` the exact per-sample diagonal Fisher
                      of the calibration batches (LLM-Pruner's ``acc_grad``, which it gets with
                      one backward per sample; here from the batched engine)
====================  ===========================================================================

All sums are in float64. Scores on whole weights (unstructured pruning) use the same formulas
per element (``"fisher"``: ``F``; ``"obd"``: ``½ F w²``; ``"magnitude"``: ``|w|``;
``"taylor1"``/``"taylor2"`` per element).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from hf_fisher import analysis
from hf_fisher.collection.gradients import only_trainable
from hf_fisher.consumers.prune.units import Unit, input_axis, owner
from hf_fisher.engine.per_sample import ContributionSink
from hf_fisher.errors import EmptyDataError, InvalidInputError, UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = [
    "ActivationStats",
    "activation_stats",
    "calibration_fisher",
    "calibration_gradient",
    "mask_fisher",
    "score_units",
    "score_weights",
    "slice_stderr",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- slice sums
def _slice_sums(units: Sequence[Unit], tensors: Mapping[str, torch.Tensor], *, out: bool = False) -> torch.Tensor:
    """``[n_units]``: ``Σ`` of ``tensors[param]`` over each unit's slices (``out=True``: over its
    output-projection slices), vectorised: one marginal and one cumulative sum per (param, axis)."""
    result = torch.zeros(len(units), dtype=torch.float64)
    by_key: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for k, u in enumerate(units):
        for s in u.out if out else u.slices:
            by_key.setdefault((s.param, s.axis), []).append((k, s.start, s.stop))
    for (name, axis), rows in by_key.items():
        t = tensors[name].detach().to("cpu", torch.float64)
        other = [d for d in range(t.dim()) if d != axis]
        marginal = t.sum(dim=other) if other else t
        cs = torch.cat([marginal.new_zeros(1), marginal.cumsum(0)])
        idx = torch.tensor(rows, dtype=torch.long)
        result.index_add_(0, idx[:, 0], cs[idx[:, 2]] - cs[idx[:, 1]])
    return result


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _unit_params(units: Iterable[Unit], out: bool = False) -> list[str]:
    return list(dict.fromkeys(s.param for u in units for s in (u.out if out else u.slices)))


def _fisher_sums(fisher: Fisher, units: Sequence[Unit], fn=None) -> torch.Tensor:
    names = _unit_params(units)
    missing = [n for n in names if n not in fisher]
    if missing:
        raise InvalidInputError(
            f"the Fisher does not cover {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which the "
            "units to prune contain; collect it with those parameters trainable (the default covers all)"
        )
    if fisher.reduction == "param":
        tensors = {n: fisher[n] for n in names} if fn is None else {n: fn(n, fisher[n]) for n in names}
        return _slice_sums(units, tensors)
    if fn is not None:
        raise InvalidInputError(
            "this score needs the Fisher of every weight (reduction='param'); the given Fisher is a group "
            "Fisher — collect with reduction='param', or use score='fisher'"
        )
    return torch.tensor([sum(analysis.slice_value(fisher, s) for s in u.slices) for u in units], dtype=torch.float64)


# ----------------------------------------------------------------------------- calibration
@dataclass
class ActivationStats:
    """Per input feature of each output-projection weight: token count ``n``, ``Σ x`` and
    ``Σ x²`` over the calibration tokens (float64)."""

    n: dict[str, int] = field(default_factory=dict)
    sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self, name: str) -> torch.Tensor:
        return self.sum[name] / max(1, self.n[name])

    def var(self, name: str) -> torch.Tensor:
        """Sample variance ``(Σx² − n x̄²) / (n − 1)``."""
        n = self.n[name]
        return ((self.sumsq[name] - n * self.mean(name) ** 2) / max(1, n - 1)).clamp_min(0)

    def norm(self, name: str) -> torch.Tensor:
        """``‖x_j‖₂`` over the calibration tokens."""
        return self.sumsq[name].sqrt()


def activation_stats(model: nn.Module, weights: Sequence[str], batches, *, progress: bool = True) -> ActivationStats:
    """Input moments of the modules owning ``weights`` over ``batches`` (no backward)."""
    from hf_fisher.collection.activations import token_inputs

    stats = ActivationStats()
    modules = {n: owner(model, n)[0] for n in weights}

    def add(name: str, xs: torch.Tensor) -> None:
        if name not in stats.n:
            stats.n[name] = 0
            stats.sum[name] = torch.zeros(xs.shape[1], dtype=torch.float64, device=xs.device)
            stats.sumsq[name] = torch.zeros_like(stats.sum[name])
        stats.n[name] += int(xs.shape[0])
        stats.sum[name] += xs.sum(0)
        stats.sumsq[name] += (xs * xs).sum(0)

    seen = token_inputs(model, batches, modules, add, progress=progress, desc="activation statistics")
    if seen.unaligned:
        name, why = next(iter(seen.unaligned.items()))
        raise UnsupportedError(f"cannot take activation statistics of {name}: {why}")
    never = [n for n in weights if n not in stats.n]
    if never:
        raise InvalidInputError(f"{never[0]}'s module was never called on a real token of the calibration batches")
    for d in (stats.sum, stats.sumsq):
        for k in d:
            d[k] = d[k].cpu()
    return stats


def _broadcast_in(model: nn.Module, name: str, per_input: torch.Tensor, shape) -> torch.Tensor:
    """A per-input-feature vector broadcast over weight ``name`` (of ``shape``)."""
    axis = input_axis(model, name)
    view = [1] * len(shape)
    view[axis] = -1
    return per_input.reshape(view).expand(shape)


def calibration_gradient(model: nn.Module, names: Sequence[str], batches) -> dict[str, torch.Tensor]:
    """``∂L/∂w`` for ``names``, ``L`` = mean over the batches of ``model(**batch).loss`` (labels
    default to the input ids with padding ignored), in eval mode; ``.grad`` is left as it was."""
    from hf_fisher.engine.losses import label_counts, model_loss, task_type_of

    task = task_type_of(model)
    if sum(int(label_counts(b, task).sum()) for b in batches) == 0:
        raise EmptyDataError(
            "no calibration sample has a label token (every label is -100 or padding): the gradient scores "
            "(taylor1 / taylor2) need labels"
        )
    params = _params(model)
    targets = [params[n] for n in names]
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0
    with only_trainable(model, names):
        for batch in batches:
            with torch.enable_grad():
                loss = model_loss(model, batch)
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += g.detach().to("cpu", torch.float64)
            count += 1
    if count == 0:
        raise InvalidInputError("no calibration batches: the Taylor scores need at least one batch")
    return {n: t / count for n, t in total.items()}


def calibration_fisher(model: nn.Module, names: Sequence[str], batches, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Exact diagonal empirical Fisher ``mean_i g_i ⊙ g_i`` of ``names`` on the batches
    (``hf_fisher.collect``, reduction "param", per-sample mean loss)."""
    import re

    from hf_fisher.api import collect

    with only_trainable(model, names):
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        fisher = collect(model, batches, reduction="param", params=pattern, progress=progress, task="calibration")
    return {n: fisher[n] for n in names}


class _MaskGradSink(ContributionSink):
    """Accumulates ``Σ_i (∂L_i/∂m_u)²`` from the engine's signed per-sample gradients of the
    output projections: ``∂L_i/∂m_u = Σ_{j∈J_u} ⟨W_{:,j}, g_{i,:,j}⟩``."""

    accepts_gradients = True

    def __init__(self, model: nn.Module, units: Sequence[Unit]):
        params = _params(model)
        self.weights: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}
        rows: dict[str, list[tuple[int, int, int]]] = {}
        for k, u in enumerate(units):
            for s in u.out:
                rows.setdefault(s.param, []).append((k, s.start, s.stop))
        for name, r in rows.items():
            idx = torch.tensor(r, dtype=torch.long)
            self.weights[name] = (params[name], input_axis(model, name), idx)
        self.total = torch.zeros(len(units), dtype=torch.float64)
        self.pending = torch.zeros_like(self.total)

    def reset(self) -> None:
        self.pending = torch.zeros_like(self.total)

    def add(self, name: str, contributions: torch.Tensor) -> None:  # a weight without gradient: zeros
        return None

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False) -> list[int]:
        w, axis, idx = self.weights[name]
        prod = (gradients * w.detach().to(gradients.dtype)).double()
        other = [d for d in range(1, prod.dim()) if d != axis + 1]
        marginal = prod.sum(dim=other)  # [b, in]
        cs = torch.cat([marginal.new_zeros(marginal.shape[0], 1), marginal.cumsum(1)], dim=1)
        per_slice = cs[:, idx[:, 2]] - cs[:, idx[:, 1]]  # [b, n_slices]
        m = torch.zeros(marginal.shape[0], len(self.total), dtype=torch.float64, device=marginal.device)
        m.index_add_(1, idx[:, 0].to(m.device), per_slice)
        bad = (~torch.isfinite(m)).any(dim=1)
        if bool(bad.any()):
            return bad.nonzero().flatten().tolist()
        self.pending += (m * m).sum(0).cpu()
        return []

    def commit(self) -> None:
        self.total += self.pending
        self.reset()


def mask_fisher(model: nn.Module, units: Sequence[Unit], batches, *, progress: bool = True) -> torch.Tensor:
    """Kwon et al.'s mask Fisher ``mean_i (∂L_i/∂m_u)²`` of every unit (per-sample mean loss)."""
    from tqdm.auto import tqdm

    from hf_fisher import plugins
    from hf_fisher.engine.losses import task_type_of
    from hf_fisher.engine.per_sample import PerSampleEngine, Target

    names = _unit_params(units, out=True)
    params = _params(model)
    sink = _MaskGradSink(model, units)
    n = 0
    with only_trainable(model, names):
        engine = PerSampleEngine(
            model, [Target(name, params[name], None) for name in names], plugins.grad_rules(),
            task_type=task_type_of(model), normalization="mean",
        )
        try:
            for i, batch in enumerate(tqdm(batches, desc="mask Fisher", unit="batch", disable=not progress)):
                report = engine.process(batch, sink, batch_index=i)
                sink.commit()
                n += report.used
        finally:
            engine.capture.detach()
    if n == 0:
        raise EmptyDataError("no calibration sample has a label token: the mask Fisher needs some")
    return sink.total / n


# ----------------------------------------------------------------------------- entry points
def score_units(
    model: nn.Module,
    units: Sequence[Unit],
    score: str,
    *,
    fisher: Fisher | None = None,
    batches: Sequence[Mapping[str, Any]] | None = None,
    stats: ActivationStats | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """``(scores [n_units] float64, seconds spent on the score's statistics)`` of the registered
    score ``score`` (:mod:`hf_fisher.consumers.prune.scores`); a score that is not finite is refused."""
    from hf_fisher.consumers.prune.base import ScoreInputs
    from hf_fisher.consumers.prune.registry import get_score

    t0 = time.perf_counter()
    cls = get_score(score)
    out = cls().score_units(model, units, ScoreInputs(fisher=fisher, batches=batches, stats=stats, seed=seed, progress=progress))
    out = _checked(out, (len(units),), score)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).nonzero()[0])
        raise InvalidInputError(f"score {score!r} of unit {units[bad].kind} {units[bad].index} (layer {units[bad].layer}) is not finite")
    return out, time.perf_counter() - t0


def _checked(out: Any, shape: tuple[int, ...], score: str) -> torch.Tensor:
    """A score's answer as CPU float64 of ``shape``; a plugin returning anything else is refused."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInputError(f"prune score {score!r} returned {got}, not a tensor of shape {shape}: a bug in the score")
    return out.detach().to("cpu", torch.float64)


def _taylor(w: torch.Tensor, g: torch.Tensor, F: torch.Tensor | None) -> torch.Tensor:
    """Element-wise LLM-Pruner salience: ``|w g|`` (first order) or ``|−w g + ½ w² F|``."""
    w = w.detach().double().cpu()
    g = g.double().cpu()
    if F is None:
        return (w * g).abs()
    return (-w * g + 0.5 * w * w * F.double().cpu()).abs()


def score_weights(
    model: nn.Module,
    names: Sequence[str],
    score: str,
    *,
    fisher: Fisher | None = None,
    batches=None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-element scores of the weights ``names`` (unstructured pruning) of the registered score
    ``score``; a score that is not finite is refused."""
    from hf_fisher.consumers.prune.base import ScoreInputs
    from hf_fisher.consumers.prune.registry import get_score

    params = _params(model)
    out = get_score(score)().score_weights(model, names, ScoreInputs(fisher=fisher, batches=batches, seed=seed, progress=progress))
    if not isinstance(out, Mapping) or set(out) != set(names):
        raise InvalidInputError(f"prune score {score!r} did not return one tensor per weight: a bug in the score")
    res = {n: _checked(out[n], tuple(params[n].shape), score) for n in names}
    for n, t in res.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"score {score!r} of {n} is not finite")
    return res


def slice_stderr(fisher: Fisher, units: Sequence[Unit]) -> torch.Tensor:
    """``Σ_{S_u} stderr(F)`` per unit: a conservative standard error of the unit's Fisher sum
    (the standard deviation of a sum is at most the sum of the standard deviations)."""
    names = _unit_params(units)
    tensors = {n: analysis.stderr(fisher, n) for n in names}
    if fisher.reduction == "param":
        return _slice_sums(units, tensors)
    out = []
    for u in units:
        total = 0.0
        for s in u.slices:
            pg = fisher.groups[s.param]
            g0, g1 = analysis.group_of(pg, s.start), analysis.group_of(pg, s.stop - 1)
            total += float(tensors[s.param][g0 : g1 + 1].sum())
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)
