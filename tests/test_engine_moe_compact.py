"""Fused MoE experts over only their routed tokens: each expert's per-sample factors are compacted
to ``[B, max_i n_ie, ·]`` (n_ie: the tokens sample i routes to expert e) instead of padded to all
T positions, and stay exact: against the per-token sums, and, end to end, against the float64
brute force with a budget small enough that param mode forms the experts' gradients in blocks."""

from __future__ import annotations

import pytest
import torch

import hf_fisher
from hf_fisher.engine.moe import ExpertsPart

import extra_models as em
import reference as R
import tiny_models as tm


def routed_part(B=3, T=10, E=4, R=5, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    route = torch.randint(0, E, (B * T,), generator=g)
    factors = []
    for e in range(E):
        tok = (route == e).nonzero().flatten()
        factors.append((tok, torch.randn(tok.numel(), R, generator=g, dtype=torch.float64),
                        torch.randn(tok.numel(), C, generator=g, dtype=torch.float64)))
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return ExpertsPart(torch.empty(E, R, C, dtype=torch.float64), factors, B, T, scale), route, factors, scale


def brute(route, factors, scale, B, T, E, R, C):
    G = torch.zeros(B, E, R, C, dtype=torch.float64)
    for e, (tok, U, V) in enumerate(factors):
        for k, t in enumerate(tok.tolist()):
            G[t // T, e] += torch.outer(U[k], V[k])
    return G * scale.view(-1, 1, 1, 1)


def test_each_expert_factors_cover_only_its_routed_tokens():
    B, T, E, R, C = 3, 10, 4, 5, 6
    part, route, factors, scale = routed_part(B, T, E, R, C)
    for e in range(E):
        counts = torch.bincount(torch.div(factors[e][0], T, rounding_mode="floor"), minlength=B)
        assert part._expert(e).U.shape[:2] == (B, int(counts.max())) < (B, T)
    G = brute(route, factors, scale, B, T, E, R, C)
    torch.testing.assert_close(part.materialize(slice(0, B)), G, rtol=1e-12, atol=0)
    torch.testing.assert_close(part.materialize_rows(torch.tensor([2, 0]), 1, 3), G[[2, 0], 1:3], rtol=1e-12, atol=0)
    sq = G * G
    for axes, ref in [((0, 1), sq.sum(3).reshape(B, -1)), ((0, 2), sq.sum(2).reshape(B, -1)), (1, sq.sum((1, 3))),
                      (2, sq.sum((1, 2))), (0, sq.sum((2, 3)))]:
        for budget in (10**6, 7):
            torch.testing.assert_close(part.per_index_sq(axes, slice(0, B), budget), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("reduction", ["param", "group"])
def test_mixtral_exact_with_a_small_budget(reduction):
    model, _, _ = em.mixtral()
    batches = [tm.padded_batch([9, 6, 8], seed=51), tm.padded_batch([7, 9], seed=52)]
    fisher = hf_fisher.collect(model, batches, reduction=reduction, memory_budget_mb=0.002, progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "batched"
    mean, _, _, _ = R.reference_fisher(model, [s for b in batches for s in R.split_batch(b)])
    for n in fisher.names():
        ref = mean[n] if reduction == "param" else fisher.groups[n].reduce(mean[n])
        torch.testing.assert_close(fisher[n], ref, rtol=1e-7, atol=1e-12 * float(ref.abs().max()) + 1e-300)
