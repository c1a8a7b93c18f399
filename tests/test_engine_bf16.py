"""Issue 23 item 3: bfloat16 and float16 models, batched, exact to the dtype's rounding.

The engine runs a half-precision model as it is (its forward and backward in the model's dtype)
and builds the per-sample gradients from the captured factors in float32, accumulating in float64;
the first batch's checks judge each parameter against the rounding of the model's dtype. It never
falls back to the loop or the vector-Jacobian path because of the dtype.

The reference: the brute force (tests/reference.py, each sample alone, without padding) run in
float64 on a float64 copy of the SAME half-precision weights, i.e. the exact Fisher of the model
the user holds. What the half-precision model itself can give differs from it by its rounding:

Tolerance (derived, not fitted). With unit roundoff ``u`` (bfloat16 2^-8, float16 2^-11), every
operation of the forward and backward rounds its result to a relative ``|δ| <= u``. Along the path
of a per-sample gradient of these tiny models there are about n = 72 such roundings (per decoder
layer ~16 rounded results forward: norm, q/k/v, rotary, scores, softmax, weighted sum, o_proj,
residual, norm, gate, up, activation, product, down, residual; as many backward; two layers, plus
embedding, final norm, head and loss, ~8). First-order errors of independent roundings add in
quadrature: ``|δg| / |g| ~ sqrt(n) u``, and the contribution ``C = g ⊙ g`` doubles it:
``RTOL = 2 sqrt(72) u ~ 17 u`` (bfloat16 0.066, float16 0.0083), per parameter (Frobenius norms),
plus the model-wide rounding term ``RTOL G sqrt(n_p / N)`` for a parameter whose exact Fisher is
(near) zero (measured: at most 1.7 u, a tenth of it). Sharper, and independent of that count: the
engine's error may not exceed twice the error of the half-precision model's own per-sample
autograd (the same brute force run in the model's dtype), worst parameter against worst
parameter: the engine adds nothing to the rounding the dtype itself makes.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_architectures import make_batches, path_of
from test_engine_first_batch import _no_positions_gpt2, _with_rule
from test_hardening_engine import DoubledRule, MissingRule, _tiny_gradient_llama

import hf_fisher

import reference as R
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROUNDINGS = 72  # rounded results along one per-sample gradient's path (see the module docstring)
MODELS = {"llama": tm.llama, "gpt2": tm.gpt2, "qwen2": tm.qwen2}


def rtol_of(dtype: torch.dtype) -> float:
    return 2 * math.sqrt(ROUNDINGS) * UNIT_ROUNDOFF[dtype]


def float64_copy(make, model):
    """The same architecture in float64 holding exactly the half-precision model's weights."""
    copy = make(torch.float64)
    copy.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    return copy.eval()


def relative_errors(actual: dict, expected: dict, rtol: float) -> dict[str, float]:
    """``name -> ‖a - e‖ / (‖e‖ + G sqrt(n_p / N))`` (float64 Frobenius norms, G the norm of the
    whole expected Fisher over its N elements)."""
    total = math.sqrt(sum(float(e.double().norm()) ** 2 for e in expected.values()))
    count = sum(e.numel() for e in expected.values())
    out = {}
    for name, e in expected.items():
        a = actual[name].double()
        out[name] = float((a - e.double()).norm()) / (float(e.double().norm()) + total * math.sqrt(e.numel() / count))
    return out


@pytest.mark.parametrize("reduction", ["param", "group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_half_precision_model_exact_to_its_rounding(name, dtype, reduction, caplog):
    make = MODELS[name]
    model = make(dtype)
    batches = make_batches(model, "causal_lm", "left")  # left padding: the padding check and positions too
    samples = [s for b in batches for s in R.split_batch(b)]
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        fisher = hf_fisher.collect(model, batches, reduction=reduction, progress=False)
    # batched, nothing moved to the vjp path, no warning: the dtype alone changes nothing
    assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    assert not fisher.metadata.extra.get("vjp_params")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("hf_fisher.engine")]
    assert fisher.counts.samples == len(samples)
    assert all(fisher[n].dtype in (torch.float32, torch.float64) for n in fisher.names())  # accumulated wide

    exact, _, _, _ = R.reference_fisher(float64_copy(make, model), samples, task_type="causal_lm")
    own, _, _, _ = R.reference_fisher(model, samples, task_type="causal_lm")  # the dtype's own autograd
    if reduction == "group":
        exact = R.reference_group(exact, fisher.groups)
        own = R.reference_group(own, fisher.groups)
    rtol = rtol_of(dtype)
    mine = relative_errors({n: fisher[n] for n in exact}, exact, rtol)
    theirs = relative_errors(own, exact, rtol)
    worst = max(mine, key=mine.get)
    assert mine[worst] <= rtol, (worst, mine[worst] / UNIT_ROUNDOFF[dtype])
    # the two compute the same numbers with different roundings (batched against alone): their
    # worst errors are alike (measured ratios 0.7 to 1.5): the engine adds no rounding of its own
    assert mine[worst] <= 2 * max(theirs.values()), (worst, mine[worst], max(theirs.values()))


def test_bf16_padding_check_catches_left_padding_dependence():
    """The padding check in bfloat16: the GPT-2 that cannot take position ids, left padded, is
    caught (per-sample path, to bfloat16's rounding), right padded stays batched."""
    model = _no_positions_gpt2().to(torch.bfloat16)
    rtol = rtol_of(torch.bfloat16)
    for side, path in (("left", "loop"), ("right", "batched")):
        batches = make_batches(model, "causal_lm", side)
        samples = [s for b in batches for s in R.split_batch(b)]
        fisher = hf_fisher.collect(model, batches, reduction="param", task_type="causal_lm", progress=False)
        assert path_of(fisher) == path, (side, fisher.metadata.extra.get("loop_reason"))
        copy = _no_positions_gpt2()
        copy.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        exact, _, _, _ = R.reference_fisher(copy, samples, task_type="causal_lm")
        errors = relative_errors({n: fisher[n] for n in exact}, exact, rtol)
        assert max(errors.values()) <= rtol, (side, max(errors.items(), key=lambda kv: kv[1]))


@pytest.mark.parametrize("rule", [MissingRule(), DoubledRule()], ids=["missing", "doubled"])
def test_bf16_tiny_gradient_with_a_wrong_rule_is_caught(rule):
    """The LLaMA whose o_proj gradient is ~1e-4 of the others' (tests/test_hardening_engine.py),
    in bfloat16: the wrong rule is still judged on o_proj's own scale and caught."""
    model = _tiny_gradient_llama().to(torch.bfloat16)
    name = "model.layers.0.self_attn.o_proj.weight"
    batches = make_batches(model, "causal_lm", "right")
    fisher = _with_rule(rule, lambda: hf_fisher.collect(model, batches, reduction="param", progress=False))
    assert path_of(fisher) == "batched"
    assert set(fisher.metadata.extra.get("vjp_params") or {}) == {name}
    own, _, _, _ = R.reference_fisher(model, [s for b in batches for s in R.split_batch(b)], task_type="causal_lm")
    error = float((fisher[name].double() - own[name]).norm() / own[name].norm())
    assert error <= rtol_of(torch.bfloat16), error
