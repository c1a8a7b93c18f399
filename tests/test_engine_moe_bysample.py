"""Fused MoE experts on a CPU: each sample's product over exactly its own run of routed rows
(no padding to ``max_i n_ie``, no compaction copies), in param mode (``materialize_rows``) and
group mode (``per_index_sq``: the Gram form or the materialised gradient per sample, whichever is
cheaper; the padded path where one sample's temporaries exceed the budget), and the first-batch
check through probe directions (``total_times``). Against a float64 brute force of per-token
outer products."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.engine.moe import ExpertsPart


def routed_part(B, T, E, R, C, seed=0):
    """An experts part over random top-1 routing, with sample 1 routing nothing to expert 0 and
    samples of very different run lengths (so the runs differ from the padded width)."""
    g = torch.Generator().manual_seed(seed)
    route = torch.randint(0, E, (B * T,), generator=g)
    route[T : 2 * T][route[T : 2 * T] == 0] = 1  # sample 1: no token to expert 0
    route[2 * T : 2 * T + T // 2] = 2  # sample 2: half its tokens to expert 2
    factors = []
    for e in range(E):
        tok = (route == e).nonzero().flatten()
        factors.append((tok, torch.randn(tok.numel(), R, generator=g, dtype=torch.float64),
                        torch.randn(tok.numel(), C, generator=g, dtype=torch.float64)))
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return ExpertsPart(torch.empty(E, R, C, dtype=torch.float64), factors, B, T, scale), factors, scale


def brute(factors, scale, B, T, E, R, C):
    G = torch.zeros(B, E, R, C, dtype=torch.float64)
    for e, (tok, U, V) in enumerate(factors):
        for k, t in enumerate(tok.tolist()):
            G[t // T, e] += torch.outer(U[k], V[k])
    return G * scale.view(-1, 1, 1, 1)


def _no_padding(part):
    def refuse(e):
        raise AssertionError(f"expert {e}: padded [B, T_e, .] factors formed on the by-sample path")

    part._expert = refuse


# (R, C): Gram form cheaper for every run / materialised gradient cheaper for all but the shortest runs
SHAPES = [(40, 50), (5, 6)]


@pytest.mark.parametrize("R,C", SHAPES)
def test_param_rows_per_sample_run_exact_without_padding(R, C):
    B, T, E = 4, 12, 3
    part, factors, scale = routed_part(B, T, E, R, C)
    G = brute(factors, scale, B, T, E, R, C)
    _no_padding(part)
    torch.testing.assert_close(part.materialize(slice(0, B)), G, rtol=1e-12, atol=0)
    torch.testing.assert_close(part.materialize_rows(torch.tensor([2, 1]), 0, 2), G[[2, 1], 0:2], rtol=1e-12, atol=0)
    out = torch.full((2, 1, R, C), float("nan"), dtype=torch.float64)  # every entry written (zeros included)
    got = part.materialize_rows(slice(1, 3), 0, 1, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, G[1:3, 0:1], rtol=1e-12, atol=0)
    assert float(out[0].abs().max()) == 0.0  # sample 1 routes nothing to expert 0


@pytest.mark.parametrize("R,C", SHAPES)
def test_group_sums_per_sample_run_exact(R, C):
    B, T, E = 4, 12, 3
    part, factors, scale = routed_part(B, T, E, R, C)
    sq = brute(factors, scale, B, T, E, R, C).square()
    n_max = max(int(torch.bincount(tok // T, minlength=B).max()) for tok, _, _ in factors)
    cases = [((0, 1), sq.sum(3).reshape(B, -1)), ((0, 2), sq.sum(2).reshape(B, -1)), (1, sq.sum((1, 3))),
             (2, sq.sum((1, 2))), (0, sq.sum((2, 3)))]
    # a budget that holds every sample's Gram temporaries but not one whole [R, C] product
    gram = n_max * (n_max + max(R, C))
    gram_only = gram if gram < R * C else None
    assert (gram_only is None) == ((R, C) == (5, 6))
    for budget in (10**6, gram_only):
        if budget is None:
            continue
        _no_padding(part)
        for axes, ref in cases:
            torch.testing.assert_close(part.per_index_sq(axes, slice(0, B), budget), ref, rtol=1e-10, atol=0)
            torch.testing.assert_close(part.per_index_sq(axes, torch.tensor([3, 1]), budget), ref[[3, 1]], rtol=1e-10, atol=0)
    # past the budget for one sample's temporaries: the padded path, in blocks, still exact
    part, factors, scale = routed_part(B, T, E, R, C)
    for axes, ref in cases:
        torch.testing.assert_close(part.per_index_sq(axes, slice(0, B), 7), ref, rtol=1e-10, atol=0)


def test_total_times_is_the_batch_gradient_through_the_probe():
    B, T, E, R, C = 4, 12, 3, 7, 20
    part, factors, _ = routed_part(B, T, E, R, C)
    factors[1] = (factors[1][0][:0], factors[1][1][:0], factors[1][2][:0])  # an expert nobody routes to
    part = ExpertsPart(part.param, factors, B, T, part.scale)
    probe = torch.randn(C, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    total = torch.zeros(E, R, C, dtype=torch.float64)
    for e, (tok, U, V) in enumerate(factors):
        for k in range(tok.numel()):
            total[e] += torch.outer(U[k], V[k])
    got = part.total_times(probe)
    assert got.shape == (E, R, 5)
    torch.testing.assert_close(got, total @ probe, rtol=1e-12, atol=1e-12)
    assert float(got[1].abs().max()) == 0.0
