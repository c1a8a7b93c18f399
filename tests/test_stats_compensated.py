"""Compensated float32 Welford accumulation against float64 (stats.Welford, compensated=True).

The long stream is 10⁵ Chan merges of 4-sample batches whose values span eight decades across
elements; the reference is the float64 mean/variance of the same float32 values. Stated
tolerances (float32 unit roundoff u = 2⁻²⁴ ≈ 6e-8):

- compensated mean, rounded to float32 (``acc.mean``): within 2u relative of float64, every
  element; with its low-order part (``mean_as(float64)``): within 1e-8;
- the plain float32 mean (``compensated=False``) is more than 20x further off (so the test
  fails without the compensation);
- the variance (M2 not compensated, see the Welford docstring): within 2e-4 relative, below a
  tenth of the variance's own sampling error sqrt(2/(n-1)).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_fisher
from hf_fisher.collection.stats import AccumulatorState, Welford, Workspace, make_accumulator

import tiny_models as tm

U32 = 2.0**-24


def _stream(k=100_000, b=4, e=32, seed=0):
    """``k`` float32 batches ``[b, e]`` of squared-normal values, element scales 10^U(-4, 4)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(e, generator=g, dtype=torch.float64) * 8 - 4)
    return (scale * torch.randn(k, b, e, generator=g, dtype=torch.float64).square()).to(torch.float32)


def _rel(a, ref):
    return float(((a.double() - ref).abs() / ref.abs()).max())


@pytest.mark.slow
def test_compensated_float32_matches_float64_on_a_long_stream():
    x = _stream()
    k, b, e = x.shape
    shift = x.mean(1)
    m2 = (x - shift[:, None]).square().sum(1)
    ws = Workspace()
    comp = Welford((e,), dtype=torch.float32)
    plain = Welford((e,), dtype=torch.float32, compensated=False)
    assert comp.compensated and not plain.compensated
    for i in range(k):
        comp.update_shifted_(b, shift[i], m2[i], workspace=ws)
        plain.update_shifted_(b, shift[i], m2[i], workspace=ws)
    xd = x.double().reshape(-1, e)
    ref_mean, ref_var = xd.mean(0), xd.var(0)
    err_comp, err_comp64, err_plain = _rel(comp.mean, ref_mean), _rel(comp.mean_as(torch.float64), ref_mean), _rel(plain.mean, ref_mean)
    assert comp.mean.dtype == torch.float32 and comp.count == plain.count == k * b
    assert err_comp <= 2 * U32, err_comp
    assert err_comp64 <= 1e-8, err_comp64
    assert err_plain > 20 * err_comp, (err_plain, err_comp)  # measured: 1e-5 against 5e-8
    sampling = math.sqrt(2.0 / (k * b - 1))
    for acc in (comp, plain):
        err_var = _rel(acc.variance(), ref_var)
        assert err_var <= 2e-4 and err_var <= 0.1 * sampling, err_var


def test_compensated_paths_agree_and_beat_plain():
    """update(), update_moments() (non in-place) and update_shifted_() give the compensated
    mean; merge() carries the other side's low-order part; shorter stream, same bounds."""
    x = _stream(k=4000, b=3, e=8, seed=1)
    k, b, e = x.shape
    ref = x.double().reshape(-1, e).mean(0)
    a = Welford((e,), dtype=torch.float32)
    c = Welford((e,), dtype=torch.float32)
    p = Welford((e,), dtype=torch.float32, compensated=False)
    halves = [Welford((e,), dtype=torch.float32), Welford((e,), dtype=torch.float32)]
    for i in range(k):
        a.update(x[i])
        s = x[i].mean(0)
        m2 = (x[i] - s).square().sum(0)
        c.update_moments(b, s, m2)
        p.update(x[i])
        halves[i % 2].update(x[i])
    merged = halves[0].merge(halves[1])
    for acc in (a, c, merged):
        assert _rel(acc.mean, ref) <= 2 * U32
        assert _rel(acc.mean_as(torch.float64), ref) <= 1e-8
    assert _rel(p.mean, ref) > 5 * _rel(a.mean, ref)


def test_compensated_bytes_per_element():
    """hi + lo + M2 in float32: 12 bytes per element, against float64's mean + M2: 16."""
    def nbytes(acc):
        s = acc.state()
        return sum(t.numel() * t.element_size() for t in (s.mean, s.m2, s.mean_lo) if t is not None)

    n = 1000
    assert nbytes(make_accumulator((n,))) == 16 * n
    assert nbytes(make_accumulator((n,), dtype=torch.float32)) == 12 * n
    assert nbytes(make_accumulator((n,), dtype=torch.float32, compensated=False)) == 8 * n


def test_compensated_state_dict_round_trip_is_bitwise(tmp_path):
    """state_dict keeps ``mean_lo``: a restored accumulator continues bit for bit like the
    uninterrupted one (what a checkpoint of the accumulators needs); a float64 accumulator
    built from it adds ``lo`` to the mean; ``from_state`` carries it too."""
    x = _stream(k=300, b=2, e=5, seed=2)
    whole = Welford((5,), dtype=torch.float32)
    first = Welford((5,), dtype=torch.float32)
    for i in range(300):
        whole.update(x[i])
        if i < 150:
            first.update(x[i])
    state = first.state_dict()
    assert set(state) == {"count", "mean", "m2", "mean_lo"} and bool(state["mean_lo"].ne(0).any())
    save_file(state, str(tmp_path / "acc.safetensors"))
    back = Welford.from_state_dict(load_file(str(tmp_path / "acc.safetensors")), dtype=torch.float32)
    again = Welford.from_state(first.state(), dtype=torch.float32)
    for acc in (back, again):
        for i in range(150, 300):
            acc.update(x[i])
        assert torch.equal(acc.mean, whole.mean) and torch.equal(acc.state().mean_lo, whole.state().mean_lo)
        assert torch.equal(acc.m2, whole.m2)
    wide = Welford.from_state_dict(state)  # float64, not compensated: mean = hi + lo
    assert not wide.compensated
    assert torch.equal(wide.mean, state["mean"].double() + state["mean_lo"].double())
    assert AccumulatorState(1, None, None).as_dict() == {"count": 1}


def test_compensated_reset_and_first_merge_with_residual():
    acc = Welford((3,), dtype=torch.float32)
    acc.update(torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]]))
    acc.reset()
    assert acc.count == 0 and not bool(acc.state().mean_lo.any())
    # shift 1, residual 1e-8 · 3: the mean 1 + 1e-8 is below float32's resolution at 1, kept in lo
    acc.update_shifted_(3, torch.ones(3), torch.zeros(3), torch.full((3,), 3e-8))
    assert torch.equal(acc.mean, torch.ones(3))
    torch.testing.assert_close(acc.mean_as(torch.float64), torch.full((3,), 1 + 1e-8, dtype=torch.float64), rtol=1e-12, atol=0)


def test_collector_float32_accumulation_matches_float64():
    """The engine's real contribution stream (tiny Llama, 16 one-sample batches, float32
    model): float32 accumulation (compensated automatically) gives the float64 accumulation's
    mean to float32 rounding and its variance to 1e-5, at 12 instead of 16 bytes per element."""
    model = tm.llama(torch.float32)
    batches = [tm.padded_batch([7], seed=s) for s in range(16)]
    out = {}
    for dtype in (torch.float64, torch.float32):
        col = hf_fisher.FisherCollector(model, accumulation_dtype=dtype)
        col.collect(batches, progress=False)
        accs = col.tasks["default"].accumulators
        out[dtype] = (col.fisher(dtype=torch.float64), sum(sum(t.nbytes for t in (s.mean, s.m2, s.mean_lo) if t is not None)
                                                          for s in (a.state() for a in accs.values())))
        col.close()
    f64, bytes64 = out[torch.float64]
    f32, bytes32 = out[torch.float32]
    assert bytes32 * 4 == bytes64 * 3
    for name in f64.names():
        ref, got = f64[name], f32[name]
        scale = ref.abs().max()
        assert float((got - ref).abs().max()) <= 4 * U32 * float(scale) + 1e-30
        torch.testing.assert_close(f32.variances[name], f64.variances[name], rtol=1e-5, atol=1e-5 * float(f64.variances[name].abs().max()))


def test_collector_float32_resume_is_exact_to_float32():
    """A float32 collector checkpointed as the Trainer does (the artifact in the accumulation
    dtype) and restored continues to the uninterrupted run's Fisher within 2u relative (the
    restored mean is the float32 rounding of hi + lo: its low part starts again from 0)."""
    model = tm.llama(torch.float32)
    batches = [tm.padded_batch([5, 7], seed=s) for s in range(6)]
    whole = hf_fisher.FisherCollector(model, accumulation_dtype=torch.float32)
    whole.collect(batches, progress=False)
    first = hf_fisher.FisherCollector(model, accumulation_dtype=torch.float32)
    first.collect(batches[:3], progress=False)
    ckpt = first.fisher(dtype=first.accumulation_dtype)
    resumed = hf_fisher.FisherCollector(model, accumulation_dtype=torch.float32)
    resumed.restore("default", ckpt)
    assert all(a.compensated for a in resumed.tasks["default"].accumulators.values())
    resumed.collect(batches[3:], progress=False)
    a, b = whole.fisher(), resumed.fisher()
    assert a.counts == b.counts
    for name in a.names():
        scale = float(a[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= 2 * U32 * scale + 1e-30
        torch.testing.assert_close(b.variances[name], a.variances[name], rtol=1e-5, atol=1e-6 * float(a.variances[name].abs().max()))
    for col in (whole, first, resumed):
        col.close()
