"""The base class of pruning criteria: one :class:`PruneScore` subclass per score, registered by
name through the hook ``hf_fisher_register_prune_scores`` (built-ins in
:mod:`hf_fisher.consumers.prune.registry`, plugins the same way).

A score is the estimated cost of removing a unit (or a weight); :func:`~hf_fisher.consumers.prune.core.prune`
removes the lowest. A subclass states its formula in its docstring, what it needs in class
attributes (read by :func:`~hf_fisher.consumers.prune.core.check_options` to refuse a run before
any work), and computes the scores in :meth:`PruneScore.score_units` (structured) and, when
:attr:`PruneScore.unstructured`, :meth:`PruneScore.score_weights` (one score per weight element).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from hf_fisher.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.consumers.prune.statistics import ActivationStats
    from hf_fisher.consumers.prune.units import Unit

__all__ = ["PruneScore", "ScoreInputs", "Stage"]


@dataclass
class ScoreInputs:
    """What a score may read besides the model and the units: ``fisher`` (the given artifact, or
    for sequential pruning the exact Fisher of the calibration batches on the model as pruned so
    far), ``batches`` (calibration batches, checked), ``stats`` (activation statistics of the
    units' output projections when :attr:`PruneScore.needs_activations`, shared with FLAP's bias
    compensation), ``seed`` and ``progress``."""

    fisher: Any = None
    batches: Sequence[Mapping[str, Any]] | None = None
    stats: ActivationStats | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class Stage:
    """One stage of layer-by-layer pruning (a layer's attention, then its MLP) for a
    :attr:`PruneScore.layer_by_layer` score: ``units`` (the stage's candidates), ``quota``
    (budget key :attr:`Unit.budget` -> how many units of it to remove; keys of other stages may
    be present), ``touch(name)``, to call before changing parameter ``name`` in place so that
    ``PruneResult.restore()`` puts it back, and ``teacher()``: a context inside which the model
    is the given, unpruned one (the target a stage reconstructs), and ``residual``: where the
    stage's output joins the residual stream (:class:`~hf_fisher.consumers.prune.rescale.Residual`,
    None when the block is not a pre-norm residual block)."""

    units: Sequence[Unit]
    quota: Mapping[tuple, int]
    touch: Callable[[str], None]
    teacher: Callable[[], AbstractContextManager] | None = None
    residual: Any = None


class PruneScore:
    """A pruning criterion. Subclasses put the formula in their docstring and set:

    - ``name``: the registry name (``prune(score=name)``, ``hf-fisher prune --score name``);
    - ``needs_fisher``: reads the given Fisher artifact (``fisher=`` / ``--fisher``);
    - ``fisher_reduction``: ``"param"`` when it needs every weight's Fisher even for structured
      units (a group Fisher is refused); per-element (unstructured) scores always need it;
    - ``needs_data``: computed on calibration batches; ``needs_labels``: on their label tokens
      (gradient-based; refused when no batch has one);
    - ``needs_activations``: reads the input statistics (:class:`ActivationStats`) of the units'
      output projections; ``output_projection``: defined through the output-projection columns
      a unit writes through, so not for vocabulary rows;
    - ``unstructured``: also scores single weights (:meth:`score_weights`);
    - ``confidence``: its standard error is known, so ``confidence=`` applies (:meth:`stderr`);
    - ``curvature``: a Fisher / gradient score, which vanishes on a saturated model (warned);
    - ``global_key``: how ``scope="global"`` ranks units of different kinds and layers:
      ``"per_param"`` (score / parameters) or ``"standardised"`` (z-score within kind and layer);
    - ``rescale_default`` / ``compensate_default``: whether the least-squares rescale (with
      rescale batches) and FLAP's bias compensation are on when not chosen;
    - ``layer_by_layer``: selects units greedily stage by stage instead of scoring them all at
      once (needs ``scope="layer"``, structured units, data, no confidence), as "kfac" does.

    Scores are float64, finite, one per unit (or per element), on the CPU.
    """

    name: ClassVar[str] = ""
    needs_fisher: ClassVar[bool] = False
    fisher_reduction: ClassVar[str | None] = None
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False
    output_projection: ClassVar[bool] = False
    unstructured: ClassVar[bool] = False
    confidence: ClassVar[bool] = False
    curvature: ClassVar[bool] = False
    global_key: ClassVar[str] = "per_param"
    rescale_default: ClassVar[bool] = True
    compensate_default: ClassVar[bool] = False
    layer_by_layer: ClassVar[bool] = False

    def score_units(self, model: nn.Module, units: Sequence[Unit], inputs: ScoreInputs) -> torch.Tensor:
        """``[len(units)]`` float64: the cost of removing each unit (lowest removed first)."""
        raise NotImplementedError(f"prune score {self.name!r} does not score structured units")

    def score_weights(self, model: nn.Module, names: Sequence[str], inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        """``{name: tensor of the weight's shape}``: the cost of zeroing each element."""
        raise UnsupportedError(f"prune score {self.name!r} is defined for structured units only")

    def prepare(self, model: nn.Module, units: Sequence[Unit], inputs: ScoreInputs) -> None:
        """Called once with every candidate unit before the first stage (``layer_by_layer`` scores):
        statistics of the unpruned model the stages read."""

    def prune_stage(self, model: nn.Module, stage: Stage, inputs: ScoreInputs) -> tuple[list[int], dict[str, Any] | None]:
        """``layer_by_layer`` scores: ``(positions in stage.units to remove — exactly the quota,
        a log entry or None)``, after changing the kept units' weights in place (through
        ``stage.touch``) where the method prescribes it; ``prune`` then zeroes the removed ones."""
        raise NotImplementedError(f"prune score {self.name!r} is not a layer-by-layer method")

    def stderr(self, model: nn.Module, units: Sequence[Unit], fisher: Any) -> torch.Tensor:
        """``[len(units)]``: a (conservative) standard error of each unit's score, for ``confidence=``."""
        raise UnsupportedError(f"prune score {self.name!r} has no standard error; confidence= does not apply")
