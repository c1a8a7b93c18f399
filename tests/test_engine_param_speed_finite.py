"""The parameter-mode sink's finiteness check per block (issue 24, item 2), read off the
chunk's column sums instead of a separate pass: it must name every sample with a NaN, +inf or
-inf gradient (whole chunks and row blocks), add nothing of such a chunk, and redo in float64 a
chunk of finite gradients whose float32 sums overflow. Pins the behaviour any cheaper form of
the check (fewer aten calls per block) has to keep."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.collection.collector import _MomentsSink
from hf_fisher.collection.stats import Welford


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rows", [None, (2, 4, 5)])
def test_non_finite_samples_are_named_and_nothing_is_added(bad, rows):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(6, 2, 3, generator=gen)
    g[1, 0, 2] = bad
    g[4, 1, 0] = bad
    sink = _MomentsSink(torch.float64)
    assert sink.add_gradients("w", g.clone(), owned=True, rows=rows) == [1, 4]
    assert not sink.pending and not sink.batch  # nothing of the chunk reached the batch moments
    # the same samples without the bad ones: all added, moments exact to float32
    good = g[[0, 2, 3, 5]]
    assert sink.add_gradients("v", good.clone(), owned=True) == []
    acc = {"v": Welford((2, 3))}
    sink.commit(acc)
    y = good.double().square()
    assert acc["v"].count == 4
    torch.testing.assert_close(acc["v"].mean, y.mean(0), rtol=4e-7, atol=0)
    torch.testing.assert_close(acc["v"].m2, (y - y.mean(0)).square().sum(0), rtol=4e-6, atol=1e-30)


def test_finite_squares_whose_float32_total_overflows_are_redone_in_float64():
    """Squares ~1e38 in every element: each is finite, their float32 sums overflow; the chunk
    is summarised in float64 and the mean comes out finite and right (float64 reference)."""
    g = torch.full((4, 3), 1.5e19)
    g[2] = 1.2e19
    sink = _MomentsSink(torch.float64)
    assert sink.add_gradients("w", g.clone(), owned=True) == []
    acc = {"w": Welford((3,))}
    sink.commit(acc)
    y = g.double().square()
    assert bool(torch.isfinite(acc["w"].mean).all()) and bool(torch.isfinite(acc["w"].m2).all())
    torch.testing.assert_close(acc["w"].mean, y.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc["w"].m2, (y - y.mean(0)).square().sum(0), rtol=1e-5, atol=0)
