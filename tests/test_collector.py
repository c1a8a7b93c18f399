"""Engine paths beyond the standard HF models, and the collector's accumulation modes.

Every number is checked against the brute-force reference (tests/reference.py): one autograd
call per sample alone, then square.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_fisher
from hf_fisher import FisherCollector

import tiny_models as tm
from reference import per_sample_contributions, reference_fisher


def split(batch):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        m = batch["attention_mask"][i].bool()
        out.append({"input_ids": batch["input_ids"][i][m][None], "labels": batch["labels"][i][m][None]})
    return out


def assert_matches(fisher, ref_mean, ref_var=None, rtol=1e-7):
    assert sorted(fisher.names()) == sorted(ref_mean)
    for n, ref in ref_mean.items():
        torch.testing.assert_close(fisher[n], ref, rtol=rtol, atol=1e-10 * float(ref.abs().max()) + 1e-30)
        if ref_var is not None:
            torch.testing.assert_close(fisher.variances[n], ref_var[n], rtol=rtol, atol=1e-10 * float(ref_var[n].abs().max()) + 1e-30)


class Out:
    def __init__(self, logits):
        self.logits = logits


class SharedLayerLM(nn.Module):
    """A causal LM whose middle Linear is called twice per forward (weight sharing in depth)."""

    def __init__(self, vocab=tm.VOCAB, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h)) + h  # second call of the same module
        return Out(self.head(self.norm(h)))


class FunctionalHeadLM(SharedLayerLM):
    """Uses ``head.weight`` outside ``head``'s forward: hooks cannot see it, the check must."""

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mid(self.emb(input_ids)))
        return Out(F.linear(self.norm(h), self.head.weight))


def _double(model):
    torch.manual_seed(0)
    return model.double().eval()


def test_module_called_twice_is_exact_in_one_batched_pass():
    model = _double(SharedLayerLM())
    batch = tm.padded_batch([5, 3, 7, 4], seed=3)
    fisher = hf_fisher.collect(model, [batch], task_type="causal_lm", progress=False)
    mean, var, n, _ = reference_fisher(model, split(batch))
    assert_matches(fisher, mean, var)
    assert fisher.counts.samples == n
    assert fisher.metadata.extra["per_sample_path"] == "batched"


def test_parameter_used_outside_its_module_falls_back_loudly_and_stays_exact(caplog):
    """The parameter alone moves to the batched vector-Jacobian path (recorded, logged); the rest
    of the model stays on the hooks."""
    model = _double(FunctionalHeadLM())
    batch = tm.padded_batch([5, 3, 7], seed=4)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        fisher = hf_fisher.collect(model, [batch, tm.padded_batch([4, 6], seed=5)], task_type="causal_lm", progress=False)
    assert any("vector-Jacobian" in r.getMessage() and "head.weight" in r.getMessage() for r in caplog.records)
    assert fisher.metadata.extra["per_sample_path"] == "batched"
    assert list(fisher.metadata.extra["vjp_params"]) == ["head.weight"]
    assert "outside its module's forward" in fisher.metadata.extra["vjp_params"]["head.weight"]
    mean, var, _, _ = reference_fisher(model, split(batch) + split(tm.padded_batch([4, 6], seed=5)))
    assert_matches(fisher, mean, var)


def test_gradient_checkpointing_falls_back_and_matches():
    model = tm.llama()
    model.gradient_checkpointing_enable()
    model.train()  # HF only checkpoints in train mode; dropout is 0 in the tiny config
    batch = tm.padded_batch([5, 3, 6], seed=6)
    fisher = hf_fisher.collect(model, [batch], train_mode=True, progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "loop"
    ref_model = tm.llama()
    mean, var, _, _ = reference_fisher(ref_model, split(batch))
    assert_matches(fisher, mean, var)


def test_ema_mode_equals_per_sample_ema_in_order():
    model = tm.llama()
    batches = [tm.padded_batch([5, 3, 6], seed=7), tm.padded_batch([4, 7], seed=8)]
    d = 0.8
    fisher = hf_fisher.collect(model, batches, ema_decay=d, progress=False)
    contribs = per_sample_contributions(model, split(batches[0]) + split(batches[1]))
    name = "model.layers.1.mlp.down_proj.weight"
    m = torch.zeros_like(contribs[0][name])
    for k, c in enumerate(contribs, start=1):
        m = d * m + (1 - d) * c[name]
    torch.testing.assert_close(fisher[name], m / (1 - d ** len(contribs)), rtol=1e-9, atol=0)
    assert fisher.metadata.ema_decay == d


def test_several_tasks_in_one_collector_are_independent():
    model = tm.llama()
    a, b = tm.padded_batch([5, 3], seed=9), tm.padded_batch([6, 4, 2], seed=10)
    collector = FisherCollector(model, reduction="group")
    collector.update(a, task="math")
    collector.update(b, task="code")
    fa, fb = collector.fisher("math"), collector.fisher("code")
    collector.close()
    alone = hf_fisher.collect(model, [b], reduction="group", progress=False)
    assert (fa.counts.samples, fb.counts.samples) == (2, 3)
    assert fb.metadata.task == "code"
    for n in alone.names():
        torch.testing.assert_close(fb[n], alone[n], rtol=1e-12, atol=0)
        assert not torch.equal(fa[n], fb[n]) or float(fa[n].abs().sum()) == 0.0


def test_storage_dtype_and_device_keep_accumulation_precision():
    model = tm.llama()
    batch = tm.padded_batch([5, 3, 6], seed=11)
    f64 = hf_fisher.collect(model, [batch], progress=False)
    f16 = hf_fisher.collect(model, [batch], storage_dtype=torch.float16, progress=False)
    for n in f64.names():
        assert f16[n].dtype == torch.float16 and f16[n].device.type == "cpu"
        torch.testing.assert_close(f16[n], f64[n].to(torch.float16), rtol=0, atol=0)
    assert f16.metadata.accumulation_dtype == "float64"


def test_float32_model_is_accurate_to_float32():
    model = tm.llama(torch.float32)
    batch = tm.padded_batch([5, 3, 6], seed=12)
    fisher = hf_fisher.collect(model, [batch], reduction="group", progress=False)
    mean, _, _, _ = reference_fisher(tm.llama(torch.float64), split(batch))
    for n in fisher.names():
        ref = fisher.groups[n].reduce(mean[n])
        torch.testing.assert_close(fisher[n], ref, rtol=2e-4, atol=1e-6 * float(ref.abs().max()))


def test_existing_grads_and_hooks_are_left_alone():
    model = tm.llama()
    sentinel = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    hf_fisher.collect(model, [tm.padded_batch([4, 5], seed=13)], progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n])
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks


def test_sequence_classification_token_normalisation_and_padding_rows():
    model = tm.bert_classifier()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]])
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    fisher = hf_fisher.collect(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], progress=False)
    # reference: each sample alone, unpadded
    samples = [{"input_ids": ids[i][mask[i].bool()][None], "labels": labels[i : i + 1]} for i in range(3)]
    mean, var, n, _ = reference_fisher(model, samples, task_type="classification")
    assert n == 3 and fisher.counts.tokens == 3
    assert_matches(fisher, mean, var)


@pytest.mark.parametrize("lengths", [[5, 3, 7], [48, 40, 45]], ids=["short-gram", "long-materialise"])
@pytest.mark.parametrize("budget", [None, 1e-4], ids=["default-budget", "one-sample-chunks"])
def test_group_strategies_and_chunking_agree_with_param_level(lengths, budget):
    """Short sequences take the Gram form (T²(R+C) < T·R·C), long ones materialise per-sample
    gradients; a tiny budget forces one-sample chunks. All must equal the reduced param Fisher."""
    model = tm.gpt2()  # Conv1D, fused c_attn, tied wte/lm_head (multi-part), wpe
    batch = tm.padded_batch(lengths, seed=14)
    param = hf_fisher.collect(model, [batch], progress=False, memory_budget_mb=budget)
    group = hf_fisher.collect(model, [batch], reduction="group", progress=False, memory_budget_mb=budget)
    mean, _, _, _ = reference_fisher(model, split(batch))
    for n in param.names():
        torch.testing.assert_close(param[n], mean[n], rtol=1e-7, atol=1e-12 * float(mean[n].abs().max()) + 1e-30)
        ref = param.groups[n].reduce(mean[n])
        torch.testing.assert_close(group[n], ref, rtol=1e-7, atol=1e-12 * float(ref.abs().max()) + 1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_stay_on_the_batched_path(dtype):
    """The first-batch check compares with autograd's gradient rounded in the model's dtype: it
    must not send a healthy half-precision model to the slow loop; accumulation stays float64."""
    batches = [tm.padded_batch([5, 3, 7], seed=15), tm.padded_batch([6, 4], seed=16)]
    fisher = hf_fisher.collect(tm.llama(dtype), batches, reduction="group", progress=False)
    ref = hf_fisher.collect(tm.llama(torch.float64), batches, reduction="group", progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "batched"
    for n in ref.names():
        assert fisher[n].dtype == torch.float64
        torch.testing.assert_close(fisher[n], ref[n], rtol=0.05, atol=0.02 * float(ref[n].abs().max()))


def test_two_engines_in_two_threads_give_what_each_gives_alone():
    """The group reduction keeps one Gram and one product buffer between parameters; two
    collectors running at once in two threads (torch releases the GIL inside its ops) must never
    read each other's: each gets exactly the Fisher it gets alone."""
    import threading

    models = [tm.llama(torch.float32, seed=s) for s in (0, 1)]
    batches = [[tm.padded_batch([7, 4, 6, 5], seed=10 * s + k) for k in range(6)] for s in (0, 1)]

    def run(k):
        return hf_fisher.collect(models[k], batches[k], reduction="group", progress=False)

    alone = [run(0), run(1)]
    together = [None, None]
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, run(k))) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        for name in alone[k].names():
            assert torch.equal(together[k][name], alone[k][name]), name
