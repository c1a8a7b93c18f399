"""The batched Conv1d / Conv2d rule (engine.rules.ConvRule) against per-sample autograd, float64.

For a random output gradient ``R`` the per-sample weight gradient of ``Σ conv(x_i) ⊙ R_i`` is
computed one sample at a time with plain autograd and compared with the rule's parts: the
materialised gradients, the per-index squared sums along each axis (group mode) and the total.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hf_fisher.engine.rules import ConvRule, ConvWeightPart, DensePart, FuncRule, ModuleCall, rule_for
from hf_fisher.plugins import grad_rules

B = 3
CASES = {
    "2d": (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3), (7, 6)),
    "2d_stride_pad_dil": (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (9, 8)),
    "2d_patch_no_bias": (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=4, stride=4, bias=False), (8, 8)),
    "2d_groups": (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), (5, 5)),
    "2d_depthwise": (nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1), (5, 6)),
    "1d": (nn.Conv1d, dict(in_channels=2, out_channels=5, kernel_size=4, stride=2), (17,)),
    "1d_groups_pad": (nn.Conv1d, dict(in_channels=6, out_channels=6, kernel_size=4, groups=3, padding=2), (11,)),
}


def _call(module, x):
    x = x.requires_grad_(False)
    y = module(x)
    R = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return ModuleCall(module, (x,), {}, y, grad_output=R, batch_size=x.shape[0], compute_dtype=torch.float64), R


def _per_sample(module, x, R):
    out = {n: [] for n, _ in module.named_parameters()}
    for i in range(x.shape[0]):
        y = module(x[i : i + 1])
        grads = torch.autograd.grad((y * R[i : i + 1]).sum(), list(module.parameters()))
        for (n, _), g in zip(module.named_parameters(), grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_rule_matches_per_sample_autograd(case):
    cls, kw, spatial = CASES[case]
    torch.manual_seed(0)
    module = cls(**kw).double()
    assert isinstance(rule_for(module, grad_rules()), ConvRule)
    x = torch.randn(B, kw["in_channels"], *spatial, dtype=torch.float64)
    call, R = _call(module, x)
    parts = ConvRule().parts(call)
    ref = _per_sample(module, x, R)
    assert sorted(parts) == sorted(ref)
    everyone = slice(0, B)
    for name, part in parts.items():
        if name == "weight":
            assert isinstance(part, ConvWeightPart if kw.get("groups", 1) == 1 else DensePart)
        torch.testing.assert_close(part.materialize(everyone), ref[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(part.materialize(torch.tensor([2, 0])), ref[name][[2, 0]], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(part.total(), ref[name].sum(0), rtol=1e-10, atol=1e-12)
        sq = ref[name] ** 2
        for axis in range(ref[name].dim() - 1):
            want = sq.transpose(1, axis + 1).reshape(B, sq.shape[axis + 1], -1).sum(-1)
            for budget in (10**6, 7):  # whole samples, and rows / tokens past a tiny budget
                torch.testing.assert_close(part.per_index_sq(axis, everyone, budget), want, rtol=1e-10, atol=1e-12)
        if name == "weight":
            rows = part.materialize_rows(everyone, 1, 3)
            torch.testing.assert_close(rows, ref[name][:, 1:3], rtol=1e-10, atol=1e-12)


def test_conv_rule_scales_each_sample():
    module = nn.Conv2d(2, 3, 2).double()
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    call, R = _call(module, x)
    call.scale = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    ref = _per_sample(module, x, R)
    for name, part in ConvRule().parts(call).items():
        torch.testing.assert_close(part.materialize(slice(0, B)), ref[name] * call.scale.view(-1, *[1] * (ref[name].dim() - 1)))


def test_other_padding_modes_take_the_generic_rule():
    """A circular padding or padding="same" is not an unfold: the exact generic rule computes it."""
    for module in (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double(), nn.Conv1d(2, 3, 3, padding="same").double()):
        x = torch.randn(B, 2, *([5, 5] if isinstance(module, nn.Conv2d) else [6]), dtype=torch.float64)
        call, R = _call(module, x)
        parts = ConvRule().parts(call)
        assert all(isinstance(p, DensePart) for p in parts.values())
        want = FuncRule().parts(_call(module, x)[0])
        ref = _per_sample(module, x, R)
        for name, part in parts.items():
            torch.testing.assert_close(part.materialize(slice(0, B)), ref[name])
            torch.testing.assert_close(want[name].materialize(slice(0, B)), ref[name])
