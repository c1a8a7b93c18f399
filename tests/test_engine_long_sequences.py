"""Long sequences within ``memory_budget_mb``: the per-sample reductions (group and param) and the
KFAC factor products keep their temporaries within the budget at any sequence length and width,
and give the same numbers as an unconstrained run and as the float64 brute force.

The largest temporary is measured, not timed: a ``TorchDispatchMode`` sees every tensor an
operation allocates (an output whose storage is none of the operation's inputs') while the
engine reduces a parameter (:meth:`PerSampleEngine._reduce`) or KFAC forms a factor product; the
sink's own moments (parameter-shaped accumulators, not per-sample state) are left out.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hf_fisher
from hf_fisher.collection.collector import FisherCollector, _MomentsSink
from hf_fisher.engine.per_sample import PerSampleEngine
from hf_fisher.engine.rules import EmbeddingPart, OuterProductPart
from hf_fisher.estimators import kfac as kfac_mod

import reference as R
import tiny_models as tm

MB = 2**20


class Allocations(TorchDispatchMode):
    """The largest storage (bytes) any operation allocates while active and not paused."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@contextlib.contextmanager
def engine_allocations(monkeypatch):
    """Measure the engine's reductions (the sink's accumulator updates excluded)."""
    track = Allocations()
    track.on = False
    reduce = PerSampleEngine._reduce

    def measured_reduce(self, pid):
        if not track.on:
            return reduce(self, pid)
        with track:
            return reduce(self, pid)

    def paused(method):
        def run(self, *a, **k):
            track.paused += 1
            try:
                return method(self, *a, **k)
            finally:
                track.paused -= 1
        return run

    monkeypatch.setattr(PerSampleEngine, "_reduce", measured_reduce)
    for name in ("add", "add_gradients", "add_moments"):
        monkeypatch.setattr(_MomentsSink, name, paused(getattr(_MomentsSink, name)))
    yield track


def frozen_embeddings(model):
    # an embedding table's segment sums hold one sample's [T, d] token gradients (the size of
    # its output gradient): outside the budget, so the tables are left out of the measurement
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def long_batches(T: int):
    return [tm.padded_batch([T, T - 37], seed=31), tm.padded_batch([T - 5, T], seed=32)]


def collect_measured(model, batches, reduction, budget_mb, monkeypatch):
    """Fisher over ``batches``; the largest engine temporary of the batches after the first (the
    first batch also runs the one-time exactness and padding checks, which form whole gradients)."""
    with engine_allocations(monkeypatch) as track:
        col = FisherCollector(model, reduction=reduction, memory_budget_mb=budget_mb)
        col.update(batches[0])
        track.on = True
        for b in batches[1:]:
            col.update(b)
        track.on = False
        return col.fisher(), track.largest


def wide_llama(T_limit=256):
    """One layer wide enough that q/k/v/o and gate/up take the Gram form at T = 64 (T (R + C) < R C)."""
    torch.manual_seed(41)
    cfg = tf.LlamaConfig(vocab_size=tm.VOCAB, hidden_size=192, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=T_limit,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tm._finish(tf.LlamaForCausalLM(cfg), torch.float64)


CASES = {
    # T = 512 with hidden 32: every Linear materialises its per-sample gradient, in blocks of rows
    "long-T": (lambda: frozen_embeddings(tm.llama()), long_batches(512), 0.004),
    # T = 64 with hidden 192: the Gram form, whose [T, T] and [T, R] terms exceed the budget: blocks of tokens
    "gram": (lambda: frozen_embeddings(wide_llama()), long_batches(64), 0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["group", "param"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_small_budget_gives_the_unconstrained_fisher_within_the_budget(case, reduction, monkeypatch):
    make, batches, budget_mb = CASES[case]
    small, largest = collect_measured(make(), batches, reduction, budget_mb, monkeypatch)
    free, largest_free = collect_measured(make(), batches, reduction, None, monkeypatch)
    # the budget binds: an unconstrained run holds more at once, the budgeted one stays within it
    assert largest_free > budget_mb * MB
    assert largest <= budget_mb * MB, f"largest temporary {largest} bytes > budget {budget_mb * MB:.0f}"
    assert small.metadata.extra["per_sample_path"] == "batched"
    for n in free.names():
        torch.testing.assert_close(small[n], free[n], rtol=1e-9, atol=1e-14 * float(free[n].abs().max()) + 1e-300)
        torch.testing.assert_close(small.variances[n], free.variances[n], rtol=1e-8,
                                   atol=1e-13 * float(free.variances[n].abs().max()) + 1e-300)
    mean, var, _, _ = R.reference_fisher(make(), [s for b in batches for s in R.split_batch(b)])
    for n in small.names():
        ref = mean[n] if reduction == "param" else small.groups[n].reduce(mean[n])
        torch.testing.assert_close(small[n], ref, rtol=1e-7, atol=1e-12 * float(ref.abs().max()) + 1e-300)


# --------------------------------------------------------------------------- the kernels alone


def _measure(fn):
    with Allocations() as track:
        out = fn()
    return out, track.largest


@pytest.mark.parametrize("shape", [(2, 64, 160, 200), (2, 300, 60, 80)], ids=["gram", "materialise"])
@pytest.mark.parametrize("axis", [0, 1])
def test_outer_product_per_index_sq_in_blocks_is_exact_and_bounded(shape, axis):
    B, T, Rr, C = shape
    g = torch.Generator().manual_seed(3)
    U = torch.randn(B, T, Rr, generator=g, dtype=torch.float64)
    V = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    part = OuterProductPart(torch.empty(Rr, C, dtype=torch.float64), U, V, scale)
    G = torch.einsum("btr,btc->brc", U, V) * scale.view(-1, 1, 1)
    ref = (G * G).sum(2 if axis == 0 else 1)
    budget = 2000  # elements: below one sample's T² + T·R (Gram) or R·C (materialisation)
    free, largest_free = _measure(lambda: part.per_index_sq(axis, slice(0, B), 10**9))
    out, largest = _measure(lambda: part.per_index_sq(axis, torch.tensor([1, 0]), budget))
    torch.testing.assert_close(free, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(out, ref[[1, 0]], rtol=1e-10, atol=0)
    assert largest_free > budget * 8
    assert largest <= budget * 8
    # the rows of a per-sample gradient, as param mode asks for them past the budget
    rows, largest = _measure(lambda: part.materialize_rows(slice(1, 2), 5, 5 + budget // C))
    torch.testing.assert_close(rows, G[1:2, 5 : 5 + budget // C], rtol=1e-12, atol=0)
    assert largest <= budget * 8


def test_embedding_rows_equal_the_whole_gradient():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 13, (3, 9), generator=g)
    grads = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    part = EmbeddingPart(torch.empty(13, 5, dtype=torch.float64), ids, grads, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), 0)
    whole = part.materialize(slice(0, 3))
    torch.testing.assert_close(part.materialize_rows(torch.tensor([2, 0]), 3, 8), whole[[2, 0], 3:8], rtol=0, atol=0)
    for axis in (0, 1):
        torch.testing.assert_close(part.per_index_sq(axis, slice(0, 3), 7), (whole * whole).sum(2 - axis), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- KFAC


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factor_products_within_the_budget(approx, monkeypatch):
    """The factor products of a padded batch at T = 256: the same factors with a tiny budget, and
    no temporary above it (the factors themselves are d x d and not counted: the budget is above them)."""
    track = Allocations()
    track.on = False

    def measured(fn):
        def run(*a, **k):
            if not track.on:
                return fn(*a, **k)
            with track:
                return fn(*a, **k)
        return run

    monkeypatch.setattr(kfac_mod, "_output_moment", measured(kfac_mod._output_moment))
    monkeypatch.setattr(kfac_mod.KFACEstimator, "_input_moment", staticmethod(measured(kfac_mod.KFACEstimator._input_moment)))
    batches = [tm.padded_batch([256, 200, 231], seed=33)]
    budget_mb = 0.03  # 30 KB: above a 61 x 61 float64 factor (30 KB), below a chunk of [B·T, d] rows
    track.on = True
    small = hf_fisher.collect(tm.llama(), batches, estimator="kfac", kfac_approx=approx, memory_budget_mb=budget_mb, progress=False)
    largest = track.largest
    track.largest = 0
    free = hf_fisher.collect(tm.llama(), batches, estimator="kfac", kfac_approx=approx, progress=False)
    largest_free = track.largest
    assert largest_free > budget_mb * MB
    assert largest <= budget_mb * MB, f"largest temporary {largest} bytes > budget {budget_mb * MB:.0f}"
    for name, layer in free.layers.items():
        torch.testing.assert_close(small.layers[name].A, layer.A, rtol=1e-10, atol=1e-14 * float(layer.A.abs().max()))
        torch.testing.assert_close(small.layers[name].G, layer.G, rtol=1e-10, atol=1e-14 * float(layer.G.abs().max()))
