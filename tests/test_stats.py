"""Welford / Chan / EMA accumulators against independent numpy and closed-form references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file, save_file

from hf_fisher.collection.collector import _MomentsSink
from hf_fisher.collection.stats import (
    EMA,
    Welford,
    Workspace,
    confidence_interval,
    make_accumulator,
    shifted_moments_,
)
from hf_fisher.errors import EmptyDataError, InvalidInputError, UnsupportedError


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


# ----------------------------------------------------------------------------- fast param path
# shifted_moments_ (chunk summaries in the contributions' own precision), Welford.update_shifted_
# (in-place float64 Chan merge) and the collector's _MomentsSink, against float64 two-pass
# references computed from the very values the code under test sees.

EPS32 = float(torch.finfo(torch.float32).eps)


def _two_pass(y: torch.Tensor):
    """float64 two-pass mean and M2 over dim 0 (the reference)."""
    y = y.double()
    m = y.mean(0)
    return m, (y - m).square().sum(0)


def _summary_mean(shift, residual, b):
    m = shift.double()
    return m if residual is None else m + residual.double() / b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("corrected", [True, False])
def test_shifted_moments_match_two_pass(dtype, square, corrected):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 5, 6, generator=g, dtype=torch.float64) * 1e-2).to(dtype)
    y = x.square() if square else x  # the values the function sees (squares rounded in `dtype`)
    ref_m, ref_m2 = _two_pass(y)
    shift, m2, residual = shifted_moments_(x.clone(), square=square, corrected=corrected)
    assert shift.dtype == dtype and m2.dtype == dtype and shift.shape == (5, 6)
    assert (residual is None) == (not corrected)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    assert _rel(_summary_mean(shift, residual, 37), ref_m) < tol
    assert _rel(m2.double(), ref_m2) < tol
    assert bool((m2 >= 0).all())


def test_shifted_moments_overwrite_the_input_and_take_a_precomputed_sum():
    x = _data(n=9, shape=(4,)).float()
    keep = x.clone()
    shift, m2, _ = shifted_moments_(x, corrected=False)
    assert not torch.equal(x, keep)  # consumed
    shift2, m22, _ = shifted_moments_(keep.clone(), total=keep.sum(0), corrected=False)
    assert torch.equal(shift, shift2) and torch.equal(m2, m22)
    with pytest.raises(InvalidInputError):
        shifted_moments_(keep.clone(), square=True, total=keep.sum(0))
    one_shift, one_m2, one_r = shifted_moments_(keep[:1].clone())
    assert torch.equal(one_shift, keep[0]) and torch.equal(one_m2, torch.zeros(4)) and one_r is None


@pytest.mark.parametrize("cv", [1e-5, 1e-4, 1e-2])
def test_shifted_moments_large_mean_small_spread(cv):
    # values 1e3 · (1 + cv·z), given in float32 (cv = 1e-5: the spread is ~80 float32 ulps of the mean)
    g = torch.Generator().manual_seed(2)
    b = 32
    truth = 1e3 * (1 + cv * torch.randn(b, 2000, generator=g, dtype=torch.float64))
    y = truth.float()
    ref_m, ref_m2 = _two_pass(y)
    # corrected two-pass: a few float32 units whatever the mean/spread ratio; the mean beyond float32
    shift, m2, residual = shifted_moments_(y.clone(), corrected=True)
    assert _rel(m2.double(), ref_m2) < 20 * EPS32
    assert float((_summary_mean(shift, residual, b) - ref_m).abs().max()) < 1e-3 * EPS32 * 1e3
    # uncorrected (what the collector's sink uses, as the engine did before): M2 is taken around
    # the float32-rounded mean, so it is off by b·(mean − shift)² >= 0, at most b·(k·eps32·mean)²
    shift, m2, _ = shifted_moments_(y.clone(), corrected=False)
    err = m2.double() - ref_m2
    bound = b * ((np.log2(b) + 2) * EPS32 * ref_m.abs()) ** 2
    assert bool((err >= -8 * EPS32 * ref_m2).all()) and bool((err <= bound + 8 * EPS32 * ref_m2).all())
    # ... and below what the float32 rounding of the values themselves does to M2 (contributions
    # reach the sink rounded to the compute dtype, so that error is there whatever the algorithm)
    alg = float((err.abs() / ref_m2).max())
    _, truth_m2 = _two_pass(truth)
    from_rounding = float(((ref_m2 - truth_m2).abs() / truth_m2).max())
    assert alg < from_rounding
    if cv == 1e-5:
        assert alg > 20 * EPS32  # the correction does matter there (so the test can fail)
    if cv <= 1e-4:  # a float32 sum of squares, M2 = Σ y² − b·mean², loses every digit here
        naive = y.square().sum(0).double() - b * y.double().mean(0).square()
        assert _rel(naive, ref_m2) > 1.0


def test_update_shifted_equals_update_moments_in_place():
    x = _data(n=60, shape=(3, 4), offset=5.0)
    seq = Welford((3, 4)).update(x)
    ws = Workspace()
    acc = Welford((3, 4))
    mean_ref, m2_ref = acc.mean, acc.m2
    for chunk in torch.split(x, [1, 20, 39]):
        shift, m2, residual = shifted_moments_(chunk.clone())
        acc.update_shifted_(chunk.shape[0], shift, m2, residual, workspace=ws)
    assert acc.mean is mean_ref and acc.m2 is m2_ref  # updated in place, no new state tensors
    assert acc.count == 60
    assert _rel(acc.mean, seq.mean) < 1e-13 and _rel(acc.m2, seq.m2) < 1e-12
    # float32 summaries are converted, not merged with mixed-dtype arithmetic (same numbers)
    acc32 = Welford((3, 4))
    for chunk in torch.split(x.float(), [30, 30]):
        shift, m2, residual = shifted_moments_(chunk.clone())
        acc32.update_shifted_(30, shift, m2, residual, workspace=ws)
    ref_m, ref_m2 = _two_pass(x.float())
    assert acc32.mean.dtype == torch.float64
    assert _rel(acc32.mean, ref_m) < 1e-6 and _rel(acc32.m2, ref_m2) < 1e-5
    # update_moments(inplace=True) is the same merge; inplace=False leaves old tensors alone
    a = Welford((3, 4)).update(x[:10])
    b = Welford((3, 4)).update(x[:10])
    before = a.mean
    m, v = x[10:].mean(0), (x[10:] - x[10:].mean(0)).square().sum(0)
    a.update_moments(50, m, v)
    b.update_moments(50, m, v, inplace=True)
    assert a.mean is not before and _rel(a.mean, b.mean) < 1e-15 and _rel(a.m2, b.m2) < 1e-15
    with pytest.raises(InvalidInputError):
        b.update_shifted_(3, torch.zeros(3), torch.zeros(3, 4))
    assert b.update_shifted_(0, torch.zeros(3, 4), torch.zeros(3, 4)).count == 60


def test_welford_reset_keeps_the_state_tensors():
    acc = Welford((2,)).update(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    mean = acc.mean
    acc.reset()
    assert acc.count == 0 and acc.mean is mean and torch.equal(acc.mean, torch.zeros(2, dtype=torch.float64))
    acc.update_shifted_(1, torch.tensor([4.0, 4.0]), torch.zeros(2))
    assert torch.equal(acc.mean, torch.tensor([4.0, 4.0], dtype=torch.float64))


def test_workspace_reuses_and_grows():
    ws = Workspace()
    a = ws.get("d", (3, 4), torch.float64, "cpu")
    b = ws.get("d", (2, 2), torch.float64, "cpu")
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 2)
    c = ws.get("d", (100,), torch.float64, "cpu")
    assert c.numel() == 100 and ws.get("e", (3,), torch.float32, "cpu").dtype == torch.float32
    ws.clear()


def _commit_fresh(sink, shapes):
    acc = {n: Welford(s) for n, s in shapes.items()}
    sink.commit(acc)
    return acc


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_moments_sink_matches_two_pass_over_batches_and_chunks(fused, offset):
    """Several batches, parameters in one chunk or in several, float32 gradients: the task's
    mean and M2 are those of the float32 contributions C = fl(g*g), to float32 accuracy (the
    moments of each chunk are float32), merged exactly in float64."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (6, 5), "b": (7,)}
    sink = _MomentsSink(torch.float64)
    acc = {n: Welford(s) for n, s in shapes.items()}
    seen = {n: [] for n in shapes}
    for batch, chunks in enumerate([[16], [5, 5, 6], [1, 15], [16]]):
        sink.reset()
        for name, shape in shapes.items():
            for b in chunks:
                g = (offset + torch.randn(b, *shape, generator=gen, dtype=torch.float64) * (1 + batch)).float()
                seen[name].append(g.square())  # what the sink must summarise
                if fused:
                    assert sink.add_gradients(name, g.clone(), owned=True) == []
                else:
                    sink.add(name, g.square())
        sink.commit(acc)
    for name in shapes:
        ref_m, ref_m2 = _two_pass(torch.cat(seen[name]))
        assert acc[name].count == 64
        assert _rel(acc[name].mean, ref_m) < 4 * EPS32
        assert _rel(acc[name].m2, ref_m2) < 16 * EPS32
    assert sink.spare  # the multi-chunk batch Welfords are kept for the next batch


def test_moments_sink_large_mean_small_spread_across_batches():
    # contributions ~1e4 with a relative spread of 1e-4, in float64: batch means far from zero,
    # close to each other; the float64 Chan merge keeps M2 to ~1e-9 relative.
    gen = torch.Generator().manual_seed(4)
    sink = _MomentsSink(torch.float64)
    acc = {"p": Welford((50,))}
    seen = []
    for _ in range(6):
        sink.reset()
        g = 100.0 + 1e-2 * torch.randn(8, 50, generator=gen, dtype=torch.float64)
        seen.append(g.square())
        assert sink.add_gradients("p", g, owned=False) == []
        sink.commit(acc)
    ref_m, ref_m2 = _two_pass(torch.cat(seen))
    assert _rel(acc["p"].mean, ref_m) < 1e-14
    assert _rel(acc["p"].m2, ref_m2) < 1e-9
    assert _rel(acc["p"].variance(), ref_m2 / 47) < 1e-9


def test_moments_sink_gradients_not_owned_are_untouched():
    sink = _MomentsSink(torch.float64)
    g = torch.randn(4, 3)
    keep = g.clone()
    assert sink.add_gradients("p", g, owned=False) == []
    assert torch.equal(g, keep)
    acc = _commit_fresh(sink, {"p": (3,)})
    ref_m, ref_m2 = _two_pass(keep.square())
    assert _rel(acc["p"].mean, ref_m) < 4 * EPS32 and _rel(acc["p"].m2, ref_m2) < 16 * EPS32


def test_moments_sink_reports_nonfinite_rows_and_adds_nothing():
    sink = _MomentsSink(torch.float64)
    g = torch.randn(5, 4)
    g[1, 2] = float("nan")
    g[3, 0] = float("inf")
    assert sink.add_gradients("p", g.clone(), owned=True) == [1, 3]
    assert sink.pending == {} and sink.batch == {}
    big = torch.full((2, 4), 2e19)  # finite g whose square overflows float32: a non-finite contribution
    assert sink.add_gradients("p", big, owned=True) == [0, 1]


def test_moments_sink_float32_sum_overflow_falls_back_to_float64():
    sink = _MomentsSink(torch.float64)
    g = torch.full((8, 3), 1.5e19)  # squares 2.25e38: finite in float32, their sum is not
    g[0] = 1.4e19
    assert sink.add_gradients("p", g.clone(), owned=True) == []
    acc = _commit_fresh(sink, {"p": (3,)})
    ref_m, ref_m2 = _two_pass(g.double().square())
    assert bool(torch.isfinite(acc["p"].mean).all())
    assert _rel(acc["p"].mean, ref_m) < 1e-6 and _rel(acc["p"].m2, ref_m2) < 1e-5


def test_moments_sink_nothing_reaches_the_task_before_commit():
    sink = _MomentsSink(torch.float64)
    acc = {"p": Welford((3,))}
    acc["p"].update(torch.ones(2, 3, dtype=torch.float64))
    sink.add_gradients("p", torch.randn(4, 3), owned=True)
    sink.add_gradients("p", torch.randn(4, 3), owned=True)
    assert acc["p"].count == 2 and torch.equal(acc["p"].mean, torch.ones(3, dtype=torch.float64))
    sink.reset()  # the batch failed: redo it
    sink.add_moments("p", 3, torch.full((3,), 2.0), torch.zeros(3))
    sink.commit(acc)
    assert acc["p"].count == 5
    assert torch.allclose(acc["p"].mean, torch.full((3,), 1.6, dtype=torch.float64), rtol=1e-15)
    assert sink.pending == {} and sink.batch == {}  # commit clears the batch
