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


ROW_WISE = Option("nuslerp_row_wise", False, kind="bool", help="NuSLERP: interpolate columns separately (rows when false)")
FLATTEN = Option("nuslerp_flatten", True, kind="bool", help="NuSLERP: interpolate whole flattened tensors")


class NuSlerp(MergeMethod):
    """mergekit's ``nuslerp`` (:func:`~hf_fisher.consumers.merge.math.nuslerp`) of two models with weights
    ``λ_0, λ_1``: ``t = λ_1 / (λ_0 + λ_1)`` (0.5 when the sum is below 1e−6); with a ``base_model``
    the task vectors are interpolated, ``θ* = θ_base + nuslerp(t, τ_0, τ_1)``, else the models."""

    name = "nuslerp"
    paper = "mergekit's nuslerp (SLERP by weights, of task vectors when a base is given)"
    formula = "θ* = θ_base + slerp(λ_1/(λ_0+λ_1), τ_0, τ_1)"
    task_vectors = True
    options = (ROW_WISE, FLATTEN)
    lora_refusal = "interpolates whole weights; merge the merged-in models instead"

    @property
    def uses_base(self) -> bool:  # the base is read when one is given
        return True

    def check_inputs(self, n, *, fishers, base_model, data) -> None:
        super().check_inputs(n, fishers=fishers, base_model=base_model, data=data)
        if n != 2:
            from hf_fisher.errors import InvalidInputError

            raise InvalidInputError(f"method 'nuslerp' interpolates exactly two models, got {n}")

    def merge(self, t: TensorInputs):
        from .. import math as mm

        w = [float(x) for x in t.weights]
        total = sum(w)
        frac = 0.5 if abs(total) < 1e-6 else w[1] / total
        return mm.nuslerp(frac, t.thetas[0], t.thetas[1], base=t.base, row_wise=self.nuslerp_row_wise,
                          flatten=self.nuslerp_flatten)
