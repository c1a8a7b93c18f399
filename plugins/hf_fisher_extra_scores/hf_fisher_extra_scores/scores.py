"""Pruning criteria this plugin registers (entry point ``extra_scores`` in the group ``hf_fisher``).

``"activation_rms"`` (:class:`ActivationRMSScore`): the activation-based importance of width
pruning in Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): a unit matters as much as the activation it writes into its output projection,
aggregated over the calibration tokens by the root mean square.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_fisher import hookimpl
from hf_fisher.consumers.prune.base import PruneScore, ScoreInputs
from hf_fisher.consumers.prune.statistics import activation_stats

__all__ = ["ActivationRMSScore", "hf_fisher_register_prune_scores"]


class ActivationRMSScore(PruneScore):
    """Activation RMS of a unit (Minitron-style activation importance, RMS over tokens)::

        score_u = sqrt( (1/n) Σ_t Σ_{j∈J_u} x_{t,j}² )

    ``J_u``: the input columns of the unit's output projection (a query head's O-projection
    columns, an MLP channel's down-projection column, a kv group's query heads' O columns);
    ``x_{t,j}``: that projection's input feature ``j`` at calibration token ``t`` (non-padding
    tokens of the calibration batches, unpruned model); ``n``: the number of those tokens. For a
    head it is the RMS over tokens of the norm of the head's attention output; for a channel the
    RMS of its gated activation. It reads no weights and no gradients (so, unlike Wanda-sp and
    FLAP, it ignores how strongly the projection reads the unit), and no labels. Structured units
    only; not for vocabulary rows (no output projection).
    """

    name = "activation_rms"
    needs_data = True
    needs_activations = True
    output_projection = True

    def score_units(self, model: torch.nn.Module, units: Sequence[Any], inputs: ScoreInputs) -> torch.Tensor:
        names = list(dict.fromkeys(s.param for u in units for s in u.out))
        stats = inputs.stats or activation_stats(model, names, inputs.batches, progress=inputs.progress)
        out = torch.zeros(len(units), dtype=torch.float64)
        for k, u in enumerate(units):
            total = 0.0
            for s in u.out:
                total += float(stats.sumsq[s.param][s.start : s.stop].sum()) / max(1, stats.n[s.param])
            out[k] = total
        return out.sqrt()


@hookimpl
def hf_fisher_register_prune_scores(register: Callable[[str, Any], None]) -> None:
    register(ActivationRMSScore.name, ActivationRMSScore)
