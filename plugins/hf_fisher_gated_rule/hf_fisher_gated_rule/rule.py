"""The exact, batched per-sample gradient rule of :class:`~hf_fisher_gated_rule.layers.GatedLinear`.

For one call with inputs ``x_it`` (sample ``i``, token ``t``), output gradients ``g_it =
dL/dy_it``, ``s = sigmoid(gate)`` and ``z_it = W x_it`` (so ``y_it = z_it ⊙ s``):

- weight ``[out, in]``: ``G_i = sum_t (g_it ⊙ s) ⊗ x_it`` -- an outer product of per-token
  factors, given to the engine as an :class:`~hf_fisher.engine.rules.OuterProductPart`
  (``U_i = g_i ⊙ s`` ``[T, out]``, ``V_i = x_i`` ``[T, in]``), exactly like the built-in
  ``nn.Linear`` rule: per-sample gradients are never materialised unless needed;
- gate ``[out]``: ``dL_i/dgate = sum_t g_it ⊙ z_it ⊙ s ⊙ (1 - s) = sum_t g_it ⊙ y_it ⊙ (1 - s)``,
  one row per sample, a :class:`~hf_fisher.engine.rules.DensePart` ``[B, out]``.

Inputs may be batched (``[B, ..., in]``) or token-flattened (``[B*T, in]``); the engine applies
the per-sample scale of the loss normalisation (``call.scale``) through the parts.
"""

from __future__ import annotations

import threading

import torch

from hf_fisher.engine.rules import DensePart, GradRule, ModuleCall, OuterProductPart, Part


class GatedLinearRule(GradRule):
    """Per-sample gradients of ``GatedLinear.weight`` (outer-product part) and ``.gate`` (dense).

    ``applies_to`` is the default: only ``GatedLinear`` itself and subclasses that keep its
    ``forward`` (a subclass computing something else gets the engine's generic rule).
    ``calls`` counts the module calls this rule turned into parts (for tests and diagnostics).
    """

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def parts(self, call: ModuleCall) -> dict[str, Part]:
        m = call.module
        params = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
        if not params:
            return {}
        B, dt = call.batch_size, call.compute_dtype
        x = call.per_sample(call.input("x"))
        x = x.reshape(B, -1, x.shape[-1]).to(dt)
        g = call.per_sample(call.grad_output)
        g = g.reshape(B, -1, g.shape[-1]).to(dt)
        s = torch.sigmoid(m.gate.detach().to(dt))
        out: dict[str, Part] = {}
        if "weight" in params:
            out["weight"] = OuterProductPart(params["weight"], g * s, x, call.scale)
        if "gate" in params:
            y = call.output
            if isinstance(y, torch.Tensor):
                y = call.per_sample(y.detach()).reshape(B, -1, y.shape[-1]).to(dt)
            else:  # the output was not kept: recompute it from the input
                y = (x @ m.weight.detach().to(dt).T) * s
            out["gate"] = DensePart(params["gate"], (g * y).sum(1) * (1 - s), call.scale)
        with self._lock:
            self.calls += 1
        return out
