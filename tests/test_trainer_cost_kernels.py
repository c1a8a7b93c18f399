"""The group reduction's cheaper kernels (issue 24 item 3: FisherCallback free mode cost) against
float64 brute force.

- ``_gram_quadratic``: ``r = Σ_t u_t ∘ (K u)_t`` over the lower block triangle of the symmetric
  Gram ``K`` (about 0.6x the products of ``K u``).
- ``tied_rows_per_index_sq``: a vocabulary table shared by lm_head and the input embedding, per
  row, from lm_head's Gram form plus the few rows of the sample's own tokens, never the table's
  per-sample gradients.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_trainer import collate, make_samples, train

import hf_fisher
import hf_fisher.engine.per_sample as per_sample
from hf_fisher import plugins
from hf_fisher.engine.rules import _gram_quadratic
from hf_fisher.testing import assert_fisher_close, per_sample_fisher

import tiny_models as tm


@pytest.mark.parametrize("T", [1, 7, 31, 32, 64, 100, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_quadratic_equals_float64_brute_force(T, dtype):
    g = torch.Generator().manual_seed(T)
    b, C, R = 3, 24, 40
    v = torch.randn(b, T, C, generator=g, dtype=torch.float64)
    u = torch.randn(b, T, R, generator=g, dtype=torch.float64) * torch.rand(b, T, 1, generator=g, dtype=torch.float64)
    K64 = v @ v.transpose(1, 2)
    want = torch.einsum("btr,bts,bsr->br", u, K64, u)  # Σ_{t,s} K_ts u_tr u_sr
    got = _gram_quadratic((v.to(dtype) @ v.to(dtype).transpose(1, 2)), u.to(dtype))
    assert got.dtype == dtype and got.shape == (b, R)
    # the rounding of the sum is bounded by Σ_{t,s} |K_ts| |u_tr| |u_sr| (times T eps)
    scale = torch.einsum("btr,bts,bsr->br", u.abs(), K64.abs(), u.abs())
    eps = torch.finfo(dtype).eps
    assert float(((got.double() - want).abs() / scale).max()) < 4 * (T + C) * eps


def tied_llama(dtype=torch.float64, seed=0, *, hidden=32, vocab=tm.VOCAB):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden + 8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tied_batches():
    b1 = tm.padded_batch([5, 3, 7], seed=11)
    b1["input_ids"][0, :3] = 7  # a token repeated: its row gets several positions' gradients
    b2 = tm.padded_batch([4, 6, 1, 8, 2], seed=12)
    return [b1, b2]


def test_long_tied_group_fisher_equals_float64_brute_force():
    """T = 40 at hidden 128: the Gram form (cheaper than forming the gradients when
    T (R + C) < R C) over blocks of tokens, in every projection and the tied table."""
    model = tied_llama(hidden=128, vocab=300)
    batches = [tm.padded_batch([40, 33, 38], seed=13, vocab=300)]
    ref = per_sample_fisher(model, batches, groups=plugins.model_layout(model).groups)
    assert_fisher_close(hf_fisher.collect(model, batches, reduction="group", progress=False), ref)


@pytest.mark.parametrize("budget_mb", [None, 1e-4], ids=["whole", "chunked"])
def test_tied_table_group_fisher_equals_float64_brute_force(budget_mb):
    model = tied_llama()
    batches = tied_batches()
    layout = plugins.model_layout(model)
    assert layout.groups["model.embed_tokens.weight"].axis == 0
    ref = per_sample_fisher(model, batches, groups=layout.groups)
    kwargs = {} if budget_mb is None else {"memory_budget_mb": budget_mb}
    group = hf_fisher.collect(model, batches, reduction="group", progress=False, **kwargs)
    assert_fisher_close(group, ref)


def test_tied_table_is_never_materialised(monkeypatch):
    """The tied table's per-sample gradients ([B, vocab, hidden]) are not formed: the group
    reduction never takes the materialising path for it."""
    calls = []
    original = per_sample.chunked_per_index_sq

    def spy(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(per_sample, "chunked_per_index_sq", spy)
    model = tied_llama()
    hf_fisher.collect(model, tied_batches(), reduction="group", progress=False)
    assert calls == []


def test_free_callback_on_a_tied_model_equals_collect(tmp_path):
    model = tied_llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="group")
    train(model, samples, tmp_path, callbacks=[cb], bs=4)
    assert cb.collector.fallback_batches == 0
    ref = hf_fisher.collect(model, [collate([s]) for s in samples], reduction="group", progress=False)
    fisher = cb.fisher()
    floor = 1e-9 * max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        torch.testing.assert_close(fisher[name], ref[name], rtol=2e-5, atol=floor)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_free_callback_one_sample_batches_take_the_parameters_own_gradients(tmp_path, monkeypatch, tied):
    """Micro-batches of one sample (per_device_train_batch_size=1, with gradient accumulation):
    the sample's gradients are the Trainer's own parameter gradients; no per-sample rule runs,
    and the Fisher equals collect's."""
    from hf_fisher.engine import rules

    calls = []
    for cls in (rules.LinearRule, rules.EmbeddingRule, rules.RMSNormRule):
        original = cls.parts
        monkeypatch.setattr(cls, "parts", lambda self, call, original=original: calls.append(call) or original(self, call))
    model = tied_llama(torch.float32) if tied else tm.llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="group")
    train(model, samples, tmp_path, callbacks=[cb], bs=1, ga=2)
    assert cb.collector.fallback_batches == 0
    assert calls == []
    monkeypatch.undo()
    ref = hf_fisher.collect(model, [collate([s]) for s in samples], reduction="group", progress=False)
    fisher = cb.fisher()
    assert fisher.counts.samples == ref.counts.samples == len(samples)
    floor = 1e-9 * max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        torch.testing.assert_close(fisher[name], ref[name], rtol=2e-5, atol=floor)
        torch.testing.assert_close(fisher.variances[name], ref.variances[name], rtol=2e-4, atol=floor * floor + 1e-30)
