"""The parameter-mode sink's passes over a block of per-sample gradients (issue 24, item 2):
sums over the samples as one matrix-vector product (:func:`sample_sum`), written straight into
the staged rows of the parameter's moments (no copy per block), checked against float64 sums;
and a row block redone in float64 (its float32 sums overflow) stays float64 when later blocks
of the same samples come in float32."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.collection.collector import _MomentsSink
from hf_fisher.collection.stats import Welford, sample_sum, shifted_moments_

EPS32 = float(torch.finfo(torch.float32).eps)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_sum_matches_float64_sums_into_rows_of_a_buffer(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 5, 7, generator=gen, dtype=torch.float64).square().to(dtype)
    ref = x.double().sum(0)
    tol = 8 * float(torch.finfo(dtype).eps)
    assert _rel(sample_sum(x), ref) < tol
    buf = torch.full((9, 7), -1.0, dtype=dtype)
    out = sample_sum(x, out=buf[2:7])  # rows 2:7 of a larger buffer, written in place
    assert out.data_ptr() == buf[2:7].data_ptr()
    assert _rel(buf[2:7], ref) < tol
    assert bool((buf[:2] == -1).all()) and bool((buf[7:] == -1).all())
    # a non-contiguous x (a transposed view) takes the strided reduction, same values
    xt = x.transpose(1, 2)
    assert _rel(sample_sum(xt), ref.t()) < tol
    assert _rel(sample_sum(xt, out=torch.empty(7, 5, dtype=dtype)), ref.t()) < tol


@pytest.mark.parametrize("corrected", [True, False])
def test_shifted_moments_m2_out_is_the_same_m2_in_the_given_rows(corrected):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, 6, generator=gen).square()
    shift, m2, residual = shifted_moments_(x.clone(), corrected=corrected)
    buf = torch.zeros(10, 6)
    shift2, m2b, residual2 = shifted_moments_(x.clone(), corrected=corrected, m2_out=buf[3:7])
    assert m2b.data_ptr() == buf[3:7].data_ptr()
    assert torch.equal(m2b, m2) and torch.equal(shift2, shift)
    assert bool((buf[:3] == 0).all()) and bool((buf[7:] == 0).all())
    # against float64 two-pass
    y = x.double()
    ref = (y - y.mean(0)).square().sum(0)
    assert _rel(m2b, ref) < 64 * EPS32


def test_row_blocks_give_the_whole_gradients_moments():
    """A [b, 6, 5] gradient given in row blocks 0:2, 2:5, 5:6 gives the moments of the whole
    (float64 reference), the blocks' sums written into the staged rows."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(9, 6, 5, generator=gen)
    sink = _MomentsSink(torch.float64)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        assert sink.add_gradients("w", g[:, lo:hi].clone(), owned=True, rows=(lo, hi, 6)) == []
    acc = {"w": Welford((6, 5))}
    sink.commit(acc)
    y = g.double().square()
    assert acc["w"].count == 9
    assert _rel(acc["w"].mean, y.mean(0)) < 4 * EPS32
    assert _rel(acc["w"].m2, (y - y.mean(0)).square().sum(0)) < 16 * EPS32


def test_a_block_redone_in_float64_is_not_rounded_back_to_float32_by_later_blocks():
    """Rows 0:1 have squares ~2e38 whose float32 sum overflows: that block is summarised in
    float64 (M2 ~1e75, beyond float32). The next block (rows 1:2, ordinary values) is float32;
    the staged moments must stay float64, so M2 of rows 0:1 stays finite and right."""
    g = torch.ones(2, 2, 3)
    g[0, 0] = 1.6e19
    g[1, 0] = 1.4e19
    sink = _MomentsSink(torch.float64)
    assert sink.add_gradients("w", g[:, 0:1].clone(), owned=True, rows=(0, 1, 2)) == []
    assert sink.add_gradients("w", g[:, 1:2].clone(), owned=True, rows=(1, 2, 2)) == []
    acc = {"w": Welford((2, 3))}
    sink.commit(acc)
    y = g.double().square()
    ref_m2 = (y - y.mean(0)).square().sum(0)
    assert bool(torch.isfinite(acc["w"].m2).all())
    assert _rel(acc["w"].mean, y.mean(0)) < 4 * EPS32
    assert _rel(acc["w"].m2, ref_m2) < 16 * EPS32
