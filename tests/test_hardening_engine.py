"""Issue 21, engine items: the first-batch check judges every parameter on its own scale (a tiny
gradient next to large ones cannot hide a wrong rule, in float32 too), Mamba exact with its
``dt_proj`` (used outside its module's forward), also in training mode (FisherCallback), GPT-OSS
exact (sinks, biased transposed experts), and the message for models that take no ``input_ids``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from test_architectures import check_exact, make_batches, path_of
from torch import nn

import hf_fisher
from hf_fisher import plugins
from hf_fisher.engine.rules import GradRule, LinearRule, OuterProductPart
from hf_fisher.hookspecs import hookimpl

import reference as R
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- 1. per-parameter check


class RuledLinear(nn.Linear):
    """nn.Linear's own forward; the test registers a deliberately wrong rule for this class."""


class MissingRule(GradRule):
    """No part at all: what the hooks give a weight used outside its module's forward."""

    def parts(self, call):
        return {}


class DoubledRule(LinearRule):
    """The Linear rule with the weight's part twice too large."""

    def parts(self, call):
        out = super().parts(call)
        w = out["weight"]
        out["weight"] = OuterProductPart(w.param, 2 * w.U, w.V, w.scale)
        return out


def _tiny_gradient_llama():
    """A float32 LLaMA whose layer-0 ``o_proj`` has a gradient ~1e-4 of the others': its input
    (the attention output, from ``v_proj``) is scaled down by 1e-5. ``o_proj`` becomes a
    :class:`RuledLinear` with the same weights."""
    model = tm.llama(torch.float32)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight.mul_(1e-5)
    old = attn.o_proj
    new = RuledLinear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    attn.o_proj = new
    return model.eval()


@pytest.mark.parametrize("rule", [MissingRule(), DoubledRule()], ids=["missing", "doubled"])
def test_tiny_gradient_with_a_wrong_rule_cannot_pass_the_first_batch_check_in_float32(rule, caplog):
    model = _tiny_gradient_llama()
    name = "model.layers.0.self_attn.o_proj.weight"
    batches = make_batches(model, "causal_lm", "right")
    samples = [s for b in batches for s in R.split_batch(b)]
    # the premise: o_proj's gradient is ~1e-4 of the typical parameter's (RMS per element)
    out = model(**batches[0])
    named = [(n, p) for n, p in model.named_parameters()]
    grads = torch.autograd.grad(out.loss, [p for _, p in named])
    rms = {n: float(g.norm() / g.numel() ** 0.5) for (n, _), g in zip(named, grads)}
    others = sorted(v for n, v in rms.items() if n != name)
    ratio = rms[name] / others[len(others) // 2]
    assert 3e-5 < ratio < 3e-4, ratio

    class Plugin:
        @hookimpl
        def hf_fisher_register_grad_rules(self, register):
            register(RuledLinear, rule)

    plugins.register(Plugin(), name="wrong-rule")
    try:
        with caplog.at_level(logging.WARNING, logger="hf_fisher.engine"):
            fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    finally:
        plugins.unregister("wrong-rule")
    mean = check_exact(fisher, model, "causal_lm", samples)
    assert float(mean[name].sum()) > 0  # the caught parameter's Fisher is compared, not zero
    # caught, moved to the exact vector-Jacobian path (recorded, loud), the rest stays batched
    assert path_of(fisher) == "batched"
    vjp = fisher.metadata.extra.get("vjp_params") or {}
    assert set(vjp) == {name}, vjp
    assert "do not add up to its batch gradient" in vjp[name]
    assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# --------------------------------------------------------------------------- 2. Mamba


def mamba(dtype=torch.float64, seed=40):
    torch.manual_seed(seed)
    cfg = tf.MambaConfig(
        vocab_size=tm.VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = tf.MambaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial biases and norms (several start at constants)
        g = torch.Generator().manual_seed(seed + 1000)
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_mamba_exact_including_dt_proj(dtype, side):
    """Mamba's mixer uses ``dt_proj.weight`` / ``conv1d`` outside their modules' forwards: the
    hooks see no call of them; the first-batch check must catch all of them (dt_proj's gradient
    is tiny next to the model's: float32's old model-wide scale let it through as 0) and move
    them to the vector-Jacobian path."""
    model = mamba(dtype)
    batches = make_batches(model, "causal_lm", side)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    mean = check_exact(fisher, model, "causal_lm", [s for b in batches for s in R.split_batch(b)])
    for layer in range(2):
        assert float(mean[f"backbone.layers.{layer}.mixer.dt_proj.weight"].sum()) > 0
    assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    vjp = set(fisher.metadata.extra.get("vjp_params") or {})
    for layer in range(2):
        for p in ("dt_proj.weight", "dt_proj.bias", "conv1d.weight", "conv1d.bias"):
            assert f"backbone.layers.{layer}.mixer.{p}" in vjp


# --------------------------------------------------------------------------- 3. GPT-OSS


def gpt_oss(dtype=torch.float64, seed=41):
    """Attention sinks (a direct parameter of the attention module, which has submodules),
    biased transposed experts, YaRN rotary embeddings passed as a (cos, sin) tuple."""
    torch.manual_seed(seed)
    cfg = tf.GptOssConfig(
        vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    model = tf.GptOssForCausalLM(cfg)
    with torch.no_grad():  # the router and sinks start at zero, biases at constants
        g = torch.Generator().manual_seed(seed + 1000)
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "sinks" in n or "router" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = model.to(dtype).eval()
    if dtype == torch.float64:  # the default grouped_mm experts kernel rejects float64
        model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpt_oss_exact(dtype, side, caplog):
    """``collect`` crashed on GPT-OSS in every dtype and padding: the attention module's generic
    rule (its ``sinks``) ran after the backward with grad mode on, so its per-sample gradients
    joined the graph (``mse_loss ... out=`` in the statistics), and with left padding it passed
    the per-sample rotary ``(cos, sin)`` tuple whole to every sample (a shape error). Its
    transposed, biased experts get the fused experts rule (factored parts, no per-sample loop)."""
    from hf_fisher.engine.moe import FusedExpertsRule
    from hf_fisher.engine.rules import rule_for

    model = gpt_oss(dtype)
    assert isinstance(rule_for(model.model.layers[0].mlp.experts, plugins.grad_rules()), FusedExpertsRule)
    batches = make_batches(model, "causal_lm", side)
    with caplog.at_level(logging.WARNING, logger="hf_fisher.engine"):
        fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert not [r for r in caplog.records if "per-sample loop" in r.getMessage()]
    mean = check_exact(fisher, model, "causal_lm", [s for b in batches for s in R.split_batch(b)])
    for name in ("self_attn.sinks", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"):
        assert float(mean[f"model.layers.0.{name}"].sum()) > 0
    assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    assert not fisher.metadata.extra.get("vjp_params"), fisher.metadata.extra["vjp_params"]


# --------------------------------------------------------------------------- 4. non-text models


def _vit():
    torch.manual_seed(0)
    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40, image_size=16,
                       patch_size=8, num_labels=3)
    return tf.ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}


def _whisper():
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(
        vocab_size=tm.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    batch = {"input_features": torch.randn(2, 8, 16), "labels": torch.tensor([[1, 5, 6], [1, 7, 8]])}
    return tf.WhisperForConditionalGeneration(cfg).eval(), batch


@pytest.mark.parametrize("task_type", [None, "sequence_classification", "causal_lm"])
@pytest.mark.parametrize("make,takes", [(_vit, "pixel_values"), (_whisper, "input_features")], ids=["vit", "whisper"])
def test_non_text_model_is_refused_naming_its_input_before_any_forward(make, takes, task_type):
    from hf_fisher.errors import UnsupportedError

    model, batch = make()
    if task_type is None:  # issue 25: detected as their own tasks now (tests/test_vision_exact.py, test_seq2seq_exact.py)
        expected = "image_classification" if make is _vit else "seq2seq"
        assert hf_fisher.collect(model, [batch], progress=False).metadata.extra["task_type"] == expected
        return
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedError, match=f"takes '{takes}' as its main input, not token ids.*not supported yet"):
        hf_fisher.collect(model, [batch], task_type=task_type, progress=False)
    assert calls == []


def test_batch_without_input_ids_names_its_keys():
    from hf_fisher.errors import InvalidInputError

    model = tm.llama(torch.float32)
    with pytest.raises(InvalidInputError, match=r"batch 0 has no 'input_ids' \(its keys: 'pixel_values', 'labels'\)"):
        hf_fisher.collect(model, [{"pixel_values": torch.randn(2, 3), "labels": torch.tensor([0, 1])}], progress=False)


def test_gpt_oss_group_reduction_exact():
    model = gpt_oss(torch.float64)
    batches = make_batches(model, "causal_lm", "left")
    samples = [s for b in batches for s in R.split_batch(b)]
    fisher = hf_fisher.collect(model, batches, reduction="group", progress=False)
    assert path_of(fisher) == "batched"
    contributions = R.per_sample_contributions(model, samples, task_type="causal_lm")
    mean, _, n_used, _ = R.mean_and_variance(contributions)
    assert fisher.counts.samples == n_used == len(samples)
    gmean = R.reference_group(mean, fisher.groups)
    gvar = R.reference_group_variance(contributions, fisher.groups)
    floor_m, floor_v = R.global_floor(gmean), R.global_floor(gvar)
    for name in mean:
        R.assert_close(fisher[name], gmean[name], rtol=1e-6, floor=floor_m, what=f"group mean {name}")
        R.assert_close(fisher.variances[name], gvar[name], rtol=1e-6, floor=floor_v, what=f"group variance {name}")


def test_trainer_callback_on_mamba_keeps_the_vjp_parameters(tmp_path, caplog):
    """In training mode the hooks see the Trainer's backward of the batch loss: a parameter that
    the first-batch check moved to the vector-Jacobian path (Mamba's dt_proj / conv1d) has no
    parts there. Every micro-batch must then come from the engine's own pass (loudly), never
    with those parameters left at zero."""
    from test_trainer import assert_fisher_close, make_samples, reference, train

    model = mamba(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="param")
    with caplog.at_level(logging.WARNING):
        train(model, samples, tmp_path, callbacks=[cb], bs=2, ga=1)
    fisher = cb.fisher()
    assert_fisher_close(fisher, reference(model, samples, "param"), rtol=2e-5)
    assert cb.collector.fallback_batches == len(samples) // 2
    assert any("vector-Jacobian product of the per-sample losses" in r.getMessage() for r in caplog.records)
