"""Welford / Chan / EMA accumulators against independent numpy and closed-form references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file, save_file

from hf_fisher.errors import EmptyDataError, InvalidInputError, UnsupportedError
from hf_fisher.stats import EMA, Welford, confidence_interval, make_accumulator


def _data(n=57, shape=(3, 4), seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    # Positive, heavy-tailed values like squared gradients, plus an offset to stress cancellation.
    return torch.randn((n, *shape), generator=g, dtype=torch.float64).square() * 1e-3 + offset


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _exact_var(col):
    """Exact (rational arithmetic) unbiased variance of float64 values."""
    from fractions import Fraction

    vals = [Fraction(float(v)) for v in col]
    mu = sum(vals) / len(vals)
    return float(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))


def test_welford_matches_numpy():
    x = _data()
    acc = Welford((3, 4))
    for chunk in torch.split(x, [5, 1, 20, 31]):
        acc.update(chunk)
    ref = x.numpy()
    assert acc.count == 57
    np.testing.assert_allclose(acc.mean.numpy(), ref.mean(0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(acc.variance().numpy(), ref.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(acc.variance(0).numpy(), ref.var(0, ddof=0), rtol=1e-12)
    np.testing.assert_allclose(acc.stderr().numpy(), np.sqrt(ref.var(0, ddof=1) / 57), rtol=1e-12)


def test_welford_is_stable_under_a_large_offset():
    # values 1e6 + O(1e-3): a naive sum-of-squares formula loses every digit here.
    x = _data(n=40, shape=(3,), offset=1e6)
    acc = Welford((3,))
    for chunk in torch.split(x, [9, 1, 30]):
        acc.update(chunk)
    exact = np.array([_exact_var(x[:, j].tolist()) for j in range(3)])
    # limit: the mean itself is only representable to ~1e-10 absolute at 1e6
    np.testing.assert_allclose(acc.variance().numpy(), exact, rtol=1e-6)
    naive = (x.square().sum(0) - x.sum(0).square() / 40) / 39
    assert float((naive.numpy() - exact).__abs__().max() / exact.max()) > 1e-2  # the test can fail


def test_welford_accumulates_in_float64_from_float32_input():
    x = _data(n=40).to(torch.float32)
    acc = Welford()  # shape inferred from the first batch
    acc.update(x[:17]).update(x[17:])
    assert acc.mean.dtype == torch.float64 and acc.shape == (3, 4)
    ref = x.double().numpy()
    np.testing.assert_allclose(acc.mean.numpy(), ref.mean(0), rtol=1e-12)
    assert acc.mean_as(torch.float16).dtype == torch.float16
    assert acc.variance_as(torch.float32).dtype == torch.float32


def test_shuffle_and_batch_split_invariance():
    x = _data(n=64)
    results = []
    for seed, sizes in [(0, [64]), (1, [1] * 64), (2, [7, 13, 44]), (3, [32, 32]), (4, [3, 60, 1])]:
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
        acc = Welford((3, 4))
        for chunk in torch.split(x[perm], sizes):
            acc.update(chunk)
        results.append((acc.mean, acc.m2))
    for mean, m2 in results[1:]:
        assert _rel(mean, results[0][0]) < 1e-12
        assert _rel(m2, results[0][1]) < 1e-12


def test_merge_equals_sequential_and_update_moments():
    x = _data(n=50)
    seq = Welford((3, 4)).update(x)
    a = Welford((3, 4)).update(x[:12])
    b = Welford((3, 4)).update(x[12:30]).update(x[30:])
    a.merge(b)
    assert a.count == 50
    assert _rel(a.mean, seq.mean) < 1e-12 and _rel(a.m2, seq.m2) < 1e-12
    # precomputed chunk moments (what the engine does)
    c = Welford((3, 4))
    for chunk in torch.split(x, [20, 30]):
        m = chunk.mean(0)
        c.update_moments(chunk.shape[0], m, (chunk - m).square().sum(0))
    assert _rel(c.mean, seq.mean) < 1e-12 and _rel(c.m2, seq.m2) < 1e-12
    # merging an empty accumulator changes nothing
    before = a.mean.clone()
    a.merge(Welford((3, 4)))
    assert torch.equal(a.mean, before) and a.count == 50


def test_welford_state_dict_round_trip(tmp_path):
    acc = Welford((3, 4)).update(_data(n=9))
    state = acc.state_dict()
    save_file(state, str(tmp_path / "acc.safetensors"))
    back = Welford.from_state_dict(load_file(str(tmp_path / "acc.safetensors")))
    assert back.count == 9
    assert torch.equal(back.mean, acc.mean) and torch.equal(back.m2, acc.m2)
    torch.save(state, tmp_path / "acc.pt")
    back2 = Welford.from_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert torch.equal(back2.variance(), acc.variance())
    # resuming after a checkpoint gives the same as never stopping
    more = _data(n=5, seed=3)
    back.update(more)
    acc.update(more)
    assert torch.equal(back.mean, acc.mean) and torch.equal(back.m2, acc.m2)


def test_constant_input_has_exactly_zero_variance():
    acc = Welford((5,))
    x = torch.full((7, 5), 0.1, dtype=torch.float64)
    acc.update(x[:3]).update(x[3:])
    assert torch.equal(acc.variance(), torch.zeros(5, dtype=torch.float64))
    assert torch.equal(acc.mean, torch.full((5,), 0.1, dtype=torch.float64))
    ema = EMA((5,), decay=0.9).update(x[:2]).update(x[2:])
    assert torch.equal(ema.variance(), torch.zeros(5, dtype=torch.float64))
    assert (ema.mean - 0.1).abs().max() < 1e-15


def test_single_sample_variance_is_zero_not_nan():
    acc = Welford((2,)).update(torch.tensor([[1.0, 2.0]]))
    assert torch.equal(acc.variance(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(acc.stderr(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(Welford((2,)).variance(), torch.zeros(2, dtype=torch.float64))
    ema = EMA((2,), decay=0.5).update(torch.tensor([[1.0, 2.0]]))
    assert torch.equal(ema.variance(), torch.zeros(2, dtype=torch.float64))


def test_no_shape_no_data_is_a_clear_error():
    with pytest.raises(EmptyDataError, match="no sample"):
        Welford().mean
    with pytest.raises(InvalidInputError, match="per-sample shape"):
        Welford((3,)).update(torch.zeros(2, 4))


def _ema_reference(x: np.ndarray, d: float):
    n = x.shape[0]
    w = (1 - d) * d ** (n - 1 - np.arange(n))  # weight of sample k (0-based) after n samples
    wn = w / w.sum()
    mu = np.tensordot(wn, x, axes=1)
    biased = np.tensordot(wn, (x - mu) ** 2, axes=1)
    return mu, biased / (1 - (wn**2).sum()), 1 / (wn**2).sum()


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_bias_correction_matches_closed_form(decay):
    x = _data(n=23, shape=(4,), seed=5)
    ema = EMA((4,), decay=decay)
    for chunk in torch.split(x, [1, 9, 13]):
        ema.update(chunk)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu, var, n_eff = _ema_reference(x.numpy(), decay)
    np.testing.assert_allclose(ema.mean.numpy(), mu, rtol=1e-12)
    assert ema.effective_count == pytest.approx(n_eff, rel=1e-12)
    if decay > 0:
        np.testing.assert_allclose(ema.variance().numpy(), var, rtol=1e-10)
    # the plain recursion m <- d m + (1-d) x, divided by 1 - d^n
    m = np.zeros(4)
    for row in x.numpy():
        m = decay * m + (1 - decay) * row
    np.testing.assert_allclose(ema.mean.numpy(), m / (1 - decay**23), rtol=1e-12)


def test_ema_is_order_dependent_and_not_mergeable():
    x = _data(n=10, shape=(2,))
    a = EMA((2,), decay=0.8).update(x)
    b = EMA((2,), decay=0.8).update(x.flip(0))
    assert not torch.allclose(a.mean, b.mean)
    with pytest.raises(UnsupportedError, match="Welford"):
        a.merge(b)
    with pytest.raises(UnsupportedError):
        a.update_moments(3, x[0], x[0])
    with pytest.raises(InvalidInputError):
        EMA((2,), decay=1.0)


def test_ema_state_dict_round_trip():
    x = _data(n=12, shape=(3,))
    a = EMA((3,), decay=0.7).update(x[:5])
    b = EMA.from_state_dict(a.state_dict())
    a.update(x[5:])
    b.update(x[5:])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance(), b.variance())


def test_make_accumulator():
    assert isinstance(make_accumulator((2,)), Welford)
    acc = make_accumulator((2,), ema_decay=0.9, dtype=torch.float32)
    assert isinstance(acc, EMA) and acc.decay == 0.9 and acc.mean.dtype == torch.float32


def test_confidence_interval_matches_scipy():
    x = _data(n=15, shape=(6,), seed=9)
    acc = Welford((6,)).update(x)
    lo, hi = confidence_interval(acc.mean, acc.variance(), acc.count, level=0.9)
    ref = x.numpy()
    for j in range(6):
        rlo, rhi = scipy.stats.t.interval(0.9, df=14, loc=ref[:, j].mean(), scale=scipy.stats.sem(ref[:, j]))
        assert float(lo[j]) == pytest.approx(rlo, rel=1e-10)
        assert float(hi[j]) == pytest.approx(rhi, rel=1e-10)
    lo1, hi1 = confidence_interval(torch.tensor([1.0]), torch.tensor([0.0]), 1)
    assert lo1.item() == -np.inf and hi1.item() == np.inf
    with pytest.raises(InvalidInputError):
        confidence_interval(acc.mean, acc.variance(), 15, level=1.5)
