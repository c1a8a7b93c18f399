"""The first-batch check's products through a few directions, against float64 brute force:
``OuterProductPart.total_times`` (``((Pᵀ Vᵀ) U)ᵀ``, formed as k-row products for speed) and
``PerSampleEngine.seen`` must equal ``(Σ_i U_iᵀ V_i) P`` and ``g P``."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.engine.per_sample import PerSampleEngine
from hf_fisher.engine.rules import OuterProductPart


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_total_times_equals_brute_force(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, R, C, k = 3, 5, 40, 24, 8
    U = torch.randn(B, T, R, generator=g, dtype=torch.float64)
    V = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    P = torch.randn(C, k, generator=g, dtype=torch.float64)
    part = OuterProductPart(torch.zeros(R, C, dtype=dtype), U.to(dtype), V.to(dtype), None)
    ref = sum(U[i].t() @ V[i] for i in range(B)) @ P
    got = part.total_times(P.to(dtype))
    assert got.shape == (R, k) and got.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_seen_equals_brute_force():
    engine = PerSampleEngine.__new__(PerSampleEngine)  # only the probe's state is used
    engine.compute_dtype, engine.device, engine._verify_probes = torch.float32, torch.device("cpu"), {}
    w = torch.zeros(7, 30)
    g = torch.randn(7, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P = engine._verify_probe(w)
    ref = g @ P.double()
    torch.testing.assert_close(engine.seen(w, g).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    b = torch.randn(30, dtype=torch.float64)  # a vector is compared whole
    torch.testing.assert_close(engine.seen(torch.zeros(30), b), b.float())
