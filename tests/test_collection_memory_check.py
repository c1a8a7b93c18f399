"""Memory of the first-batch exactness check in parameter mode (issue 23): autograd's batch
gradients, the check's reference, are reduced one parameter at a time (to the few directions the
check compares, their norm and finiteness) as autograd produces them, then dropped: the first
(checked) batch does not hold a gradient for every parameter of the model at once, which at the
1B config's real widths would be another 4.9 GB on top of the accumulators and the staged batch.

Measured, not timed, with the live-bytes ``TorchDispatchMode`` of test_collection_memory_param.
The check's verdicts and the collected numbers are unchanged (same bits as a collector whose
check is off, and a part made wrong still fails it)."""

from __future__ import annotations

import torch
import transformers as tf
from test_collection_memory_param import LiveBytes, assert_same_bits, numel, states

from hf_fisher.collection.collector import FisherCollector
from hf_fisher.engine import rules


def deep_model():
    """Eight decoder layers of equal size and a small untied vocabulary: no parameter is more
    than a few percent of the model (as in a 16-layer 1B model, whose layers are 79% of it)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(cfg).float().eval()


def data(count=3, seq=24):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 256, (1, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def peak_above_held(model, batch, **kw):
    """Live bytes at the peak of ``update(batch)`` above what the collector holds afterwards."""
    track = LiveBytes()
    with track:
        col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float32, **kw)
        col.update(batch)
    return track.peak - track.current, col


def test_first_batch_check_holds_one_reference_gradient_at_a_time():
    model = deep_model()
    n = numel(model)
    largest = max(p.numel() for p in model.parameters())
    batch = data()[0]
    checked, col = peak_above_held(model, batch)
    unchecked, twin = peak_above_held(model, batch, verify=False)
    assert col.engine.verify_next is False  # the check ran (and passed)
    # the check's own cost: old code 4.6 bytes per value of the model (every batch gradient
    # alive at once, 4 bytes each in float32); now 0.85 (a few of the largest parameter's
    # gradients, the directions' products, the small parameters checked whole)
    extra = checked - unchecked
    assert extra <= 4 * 4 * largest + 0.3 * n, (extra / n, largest / n)
    assert_same_bits(states(col), states(twin))


def test_the_check_still_fails_a_wrong_part_per_parameter(monkeypatch, caplog):
    """A rule made wrong by 1% for one matrix is still caught by the per-parameter reference (the
    parameter moves to the vector-Jacobian path, loudly) and the numbers stay exact."""
    model = deep_model()
    target = model.model.layers[3].mlp.down_proj.weight
    orig = rules.OuterProductPart.materialize_rows

    def wrong(self, samples, lo, hi, out=None):
        g = orig(self, samples, lo, hi, out=out)
        return g.mul_(1.01) if self.param is target else g

    def wrong_total(self, probe):
        t = orig_total(self, probe)
        return t * 1.01 if self.param is target else t

    orig_total = rules.OuterProductPart.total_times
    monkeypatch.setattr(rules.OuterProductPart, "materialize_rows", wrong)
    monkeypatch.setattr(rules.OuterProductPart, "total_times", wrong_total)
    col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float64)
    with caplog.at_level("WARNING"):
        col.update(data()[0])
    assert id(target) in col.engine.vjp_params
    monkeypatch.undo()
    ref = FisherCollector(model, reduction="param", accumulation_dtype=torch.float64, verify=False)
    ref.update(data()[0])
    name = next(k for k, p in model.named_parameters() if p is target)
    got, want = col.tasks["default"].accumulators[name].mean, ref.tasks["default"].accumulators[name].mean
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
