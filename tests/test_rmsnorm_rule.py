"""The RMSNorm rule: used for the transformers RMSNorms whose forward is LLaMA's (never for one it
does not know), exact against per-sample autograd (the engine's exactness tests cover it too)."""

from __future__ import annotations

import torch
import transformers.models.gemma.modeling_gemma as gemma
import transformers.models.llama.modeling_llama as llama
import transformers.models.qwen3.modeling_qwen3 as qwen3

import hf_fisher
from hf_fisher import plugins
from hf_fisher.engine.rules import FuncRule, RMSNormRule, rule_for

import reference as ref
import tiny_models as tm


def test_rule_is_chosen_only_for_known_forwards():
    rules = plugins.grad_rules()
    assert isinstance(rule_for(llama.LlamaRMSNorm(8), rules), RMSNormRule)
    assert isinstance(rule_for(qwen3.Qwen3RMSNorm(8), rules), RMSNormRule)
    assert isinstance(rule_for(gemma.GemmaRMSNorm(8), rules), FuncRule)  # w ⊙ (1 + ...) is not LLaMA's

    class Scaled(llama.LlamaRMSNorm):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    assert isinstance(rule_for(Scaled(8), rules), FuncRule)


def test_norm_weights_exact_including_qwen3_per_head_norms():
    for model in (tm.llama(), tm.qwen3()):
        batch = tm.padded_batch([7, 4, 6], seed=3)
        F = hf_fisher.collect(model, [batch], reduction="param", progress=False)
        want = ref.reference_fisher(model, ref.split_batch(batch))[0]
        norms = [n for n in F.names() if "norm" in n]
        assert any("q_norm" in n for n in norms) or model.config.model_type == "llama"
        for n in norms:
            torch.testing.assert_close(F[n], want[n], rtol=1e-9, atol=1e-18)
        assert not [n for n in F.metadata.extra.get("vjp_params", []) if "norm" in n]


def test_norm_weights_of_a_float32_model_match_per_sample_autograd():
    """float32 activations take the rule's fused form Σ_t δ_t ⊙ x_t·r_t: equal to per-sample
    autograd through HF's forward up to float32 rounding (rtol 1e-4; a wrong normaliser or a
    missing position is an error of order one)."""
    for model in (tm.llama(torch.float32), tm.qwen3(torch.float32)):
        batch = tm.padded_batch([7, 4, 6], seed=3)
        F = hf_fisher.collect(model, [batch], reduction="param", progress=False)
        want = ref.reference_fisher(model, ref.split_batch(batch))[0]
        for n in (n for n in F.names() if "norm" in n):
            scale = float(want[n].abs().max())
            torch.testing.assert_close(F[n].double(), want[n].double(), rtol=1e-4, atol=1e-6 * scale)
        # from the rule itself: a wrong rule would fail the first-batch check and be replaced
        assert not [n for n in F.metadata.extra.get("vjp_params", []) if "norm" in n]
