"""mergekit's ``passthrough``: one model's tensors copied (optionally scaled), the method of layer
slices (frankenmerges, :mod:`hf_fisher.consumers.merge.slices`)."""

from __future__ import annotations

from hf_fisher.errors import InvalidInputError

from ..base import MergeMethod, Option, TensorInputs

#: mergekit's per-model ``scale`` of ``passthrough`` (None: the tensor as it is)
SCALE = Option("scale", None, help="passthrough: the model's tensors times this number (None: unchanged)")


class Passthrough(MergeMethod):
    """``θ* = s θ_1`` with the model's ``scale`` ``s`` (none: ``θ* = θ_1``), bit for bit mergekit
    0.1.5's ``passthrough`` (one input per tensor). With a recipe's ``slices:`` it copies layer
    ranges of several models into one deeper or shallower model."""

    name = "passthrough"
    paper = "mergekit's passthrough (Goddard et al. 2024, *Arcee's MergeKit*, arXiv:2403.13257)"
    formula = "θ* = s θ_1"
    linear = True
    min_models = 1
    options = (SCALE,)

    def check_inputs(self, n: int, *, fishers, base_model, data) -> None:
        super().check_inputs(n, fishers=fishers, base_model=base_model, data=data)
        if n != 1:
            raise InvalidInputError(f"method 'passthrough' takes one model per tensor, got {n}; give one model, or "
                                    "one source per slice of slices:")

    def merge(self, t: TensorInputs):
        scale = t.model_values("scale", self.scale)[0]
        return t.thetas[0] if scale is None else t.thetas[0] * scale
