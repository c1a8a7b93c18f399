"""Spherical linear interpolation of two models."""

from __future__ import annotations

from ..base import MergeMethod, Option, TensorInputs

SLERP_T = Option("t", 0.5, help="SLERP: 0 gives the first model, 1 the second")


class Slerp(MergeMethod):
    """SLERP of two models, tensor by tensor (mergekit's ``slerp``,
    :func:`~hf_fisher.consumers.merge.math.slerp`): ``θ* = sin((1 − t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1``,
    ``Ω`` the angle between the flattened tensors (linear interpolation when they are nearly
    collinear). A mergekit recipe's ``base_model`` is ``θ_0``; ``t`` may vary by layer (a gradient)
    or by tensor name (``filter``). The weights are not used."""

    name = "slerp"
    paper = "Shoemake 1985 (SLERP); mergekit's slerp"
    formula = "θ* = sin((1−t)Ω)/sin Ω θ_0 + sin(tΩ)/sin Ω θ_1"
    options = (SLERP_T,)
    lora_refusal = "interpolates whole weights; merge the merged-in models instead"

    def check_inputs(self, n, *, fishers, base_model, data) -> None:
        super().check_inputs(n, fishers=fishers, base_model=base_model, data=data)
        if n != 2:
            from hf_fisher.errors import InvalidInputError

            raise InvalidInputError(f"method 'slerp' interpolates exactly two models, got {n}")

    def merge(self, t: TensorInputs):
        from .. import math as mm

        return mm.slerp(self.t, t.thetas[0], t.thetas[1])
