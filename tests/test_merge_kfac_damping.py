"""The factor damping of the KFAC merge (``kfac_damping_mode="factor"``, the default) is balanced
per factor: ``G + √c·ḡ I`` and ``A + √c·ā I`` (Martens & Grosse's π-damping). The old uniform
``√δ`` on both factors depended on how the estimator splits the scale between G and A: on GPT-2
(input second moments of order 1, output-gradient moments of order 1e-3 and below) the larger
factor was barely damped and the merge was far worse than averaging (issue 26). Checked here:

- the merge depends on the Fisher ``G ⊗ A`` only, not on the split (``s G) ⊗ (A / s)``;
- a very large damping gives the λ-weighted average, whatever the scales of the factors;
- it equals a dense float64 solve of ``Σ λ_i (G_i + r_G I) ⊗ (A_i + r_A I) vec(M − M_i) = 0``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_kfac import _dense_block

import hf_fisher
from hf_fisher.consumers.merge.api import merge_with_fisher

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

TIED = ["transformer.wte.weight"]  # embedding + lm_head Kronecker terms
CONV = ["transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_fc.weight"]  # Conv1D + bias


@pytest.fixture(scope="module")
def pair():
    models = [tm.gpt2(seed=s) for s in (4, 9)]
    data = [[tm.padded_batch([6, 5, 4], seed=s, vocab=models[0].config.vocab_size)] for s in (0, 1)]
    kfacs = [hf_fisher.collect(m, d, estimator="kfac", progress=False) for m, d in zip(models, data)]
    return models, kfacs


def _resplit(k, s: float):
    """The same Kronecker-factored Fisher with the scale moved between the factors: every
    layer's ``(s G) ⊗ (A / s) = G ⊗ A``."""
    out = copy.copy(k)
    out.layers = {n: dataclasses.replace(L, G=L.G * s, A=L.A / s) for n, L in k.layers.items()}
    out._eigen = {}
    return out


def _params(model):
    return {n: p.detach().double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("s", [1e-3, 1e4])
def test_the_merge_depends_on_the_fisher_not_on_its_split_into_factors(pair, s):
    models, kfacs = pair
    kw = dict(method="kfac", weights=[0.7, 0.3], kfac_damping=1e-2, progress=False)
    want = _params(merge_with_fisher(models, kfacs, **kw))
    got = _params(merge_with_fisher(models, [_resplit(k, s) for k in kfacs], **kw))
    for name in CONV + TIED:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9)


def test_large_damping_gives_the_weighted_average_whatever_the_factor_scales(pair):
    models, kfacs = pair
    lam = [0.7, 0.3]
    unbalanced = [_resplit(k, 1e-4) for k in kfacs]  # G small, A large (as GPT-2's lm_head)
    merged = _params(merge_with_fisher(models, unbalanced, method="kfac", weights=lam, kfac_damping=1e8, progress=False))
    P = [_params(m) for m in models]
    for block in (CONV, TIED):  # relative to the largest difference between the models in the block
        gap = max(float((P[0][n] - P[1][n]).abs().max()) for n in block)
        for name in block:
            avg = lam[0] * P[0][name] + lam[1] * P[1][name]
            assert float((merged[name] - avg).abs().max()) < 1e-3 * gap, name


def _balanced_dense(kfacs, models, names, weights, damping):
    """Dense float64 reference: each layer's factors damped by √c times their λ-weighted mean
    diagonal, the block matrix built entry by entry (tests/test_kfac.py), solved directly."""
    lam = [w / sum(weights) for w in weights]
    damped = []
    for k in kfacs:
        layers = {}
        for n, L in k.layers.items():
            def mean_diag(attr, flag):
                return sum(l * float((getattr(kk.layers[n], attr) if getattr(kk.layers[n], flag)
                                      else torch.diagonal(getattr(kk.layers[n], attr))).double().mean())
                           for l, kk in zip(lam, kfacs))

            rg, ra = damping ** 0.5 * mean_diag("G", "g_diagonal"), damping ** 0.5 * mean_diag("A", "a_diagonal")

            def add(f, diag, r):
                return f.double() + r if diag else f.double() + r * torch.eye(f.shape[0], dtype=torch.float64)

            layers[n] = dataclasses.replace(L, G=add(L.G, L.g_diagonal, rg), A=add(L.A, L.a_diagonal, ra))
        damped.append(_with_layers(k, layers))
    Ds = [_dense_block(k, names)[0] for k in damped]
    P = [dict(m.named_parameters()) for m in models]
    thetas = [torch.cat([P[i][x].detach().double().reshape(-1) for x in names]) for i in range(len(models))]
    A = sum(l * D for l, D in zip(lam, Ds))
    b = sum(l * D @ t for l, D, t in zip(lam, Ds, thetas))
    x = torch.linalg.solve(A, b)
    out, off = {}, 0
    for name in names:
        n = P[0][name].numel()
        out[name] = x[off: off + n].reshape(P[0][name].shape)
        off += n
    return out


def _with_layers(k, layers):
    out = copy.copy(k)
    out.layers = layers
    return out


@pytest.mark.parametrize("block", [CONV, TIED])
@pytest.mark.parametrize("weights, damping", [([0.5, 0.5], 1e-3), ([0.7, 0.3], 1e-1)])
def test_factor_damped_merge_equals_the_dense_solve(pair, block, weights, damping):
    models, kfacs = pair
    merged = _params(merge_with_fisher(models, kfacs, method="kfac", weights=weights, kfac_damping=damping,
                                       progress=False))
    want = _balanced_dense(kfacs, models, block, weights, damping)
    for name in block:
        torch.testing.assert_close(merged[name], want[name], rtol=1e-6, atol=1e-8)
