"""Block-wise merge formulas (issue 23: the streaming merge's peak): the same bits as the
whole-tensor formulas, and a scratch bounded by the output plus O(block), not a multiple of the
tensor.

References (kept here, whole-tensor, as the code computed them before): TIES' trim by a full
sort of ``|τ|``. With ``stable=False`` it is the previous implementation (torch's unstable
``argsort``, mergekit's own call) and the block-wise trim must give its bits wherever the k-th
magnitude is not tied; with ``stable=True`` ties at the k-th magnitude go by position, which the
block-wise trim does everywhere (forced ties: repeated magnitudes, all zeros).
"""

from __future__ import annotations

import pytest
import torch
from test_collection_memory_param import LiveBytes

from hf_fisher.consumers.merge import math as mm
from hf_fisher.consumers.merge import registry
from hf_fisher.consumers.merge.base import TensorInputs


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.reshape(-1).view(ints), b.reshape(-1).view(ints))


# ---------------------------------------------------------------------------- whole-tensor references
def ref_keep(x: torch.Tensor, k: int, stable: bool) -> torch.Tensor:
    """Mask of the k largest |x| by a full sort (descending; NaN first)."""
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.argsort(x.abs().reshape(-1), descending=True, stable=stable)[:k]] = True
    return mask.reshape(x.shape)


def ref_trim(tau: torch.Tensor, density: float, stable: bool = True) -> torch.Tensor:
    k = round(density * tau.numel())
    if k >= tau.numel():
        return tau.clone()
    return torch.where(ref_keep(tau, k, stable), tau, torch.zeros_like(tau))


def ref_ties(base, thetas, weights, density, scaling, stable=True):
    dt = mm.compute_dtype(base, *thetas)
    b = base.to(dt)
    taus = [ref_trim((t.to(dt) - b).mul_(float(w)), density, stable) for w, t in zip(weights, thetas)]
    return mm._elect_and_mean(taus).mul_(float(scaling)).add_(b)


def ref_gta(base, thetas, weights, densities, consensus, normalize, scaling, stable=True, random=None):
    """mergekit's generalized task arithmetic with the magnitude trim (``random``: ``(generator,
    rescale)``: with DARE's random masks, by the whole-tensor :func:`mm.sparsify`), whole tensors."""
    dt = mm.compute_dtype(base, *thetas)
    b = base.to(dt)
    deltas = b.new_empty((len(thetas), *b.shape))
    for i, t in enumerate(thetas):
        delta = t.to(dt) - b
        if random is not None:
            delta = mm.sparsify(delta, densities[i], "random", rescale=random[1], generator=random[0])
        elif densities[i] < 1:
            k = max(1, int(densities[i] * delta.numel()))
            delta = delta * ref_keep(delta, k, stable).to(dt)
        deltas[i] = delta
    w = torch.tensor([float(x) for x in weights], dtype=dt)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = mm.consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return b + mixed * scaling if scaling != 1 else b + mixed


def ref_fisher(thetas, fishers, weights, floor):
    dt = mm.compute_dtype(*thetas, *fishers)
    num = torch.zeros(thetas[0].shape, dtype=dt)
    den = torch.zeros(thetas[0].shape, dtype=dt)
    for w, t, f in zip(weights, thetas, fishers):
        wf = f.to(dt).clamp_min(floor).mul_(float(w))
        num.addcmul_(wf, t.to(dt))
        den.add_(wf)
    return num.div_(den)


def ref_dare(base, thetas, weights, p, seeds, then, density, scaling):
    dt = mm.compute_dtype(base, *thetas)
    b = base.to(dt)
    dropped = []
    for t, seed in zip(thetas, seeds):
        keep = torch.rand(b.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) >= p
        tau = t.to(dt) - b
        dropped.append(b + torch.where(keep, tau / (1 - p), torch.zeros_like(tau)))
    if then == "ties":
        return ref_ties(b, dropped, weights, density, scaling)
    out = torch.zeros(b.shape, dtype=dt)
    for w, t in zip(weights, dropped):
        out.add_(t - b, alpha=float(w))
    return out.mul_(float(scaling)).add_(b)


# ---------------------------------------------------------------------------- inputs
def tensors(kind: str, shape=(300, 70), n=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if kind == "random":
        thetas = [base + (0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    elif kind == "ties":  # few distinct magnitudes, both signs: thousands of entries tied at the threshold
        thetas = [base + (torch.randint(-3, 4, shape, generator=g) * 0.25).to(dtype) for _ in range(n)]
    elif kind == "zeros":
        thetas = [base.clone() for _ in range(n)]
    else:
        raise ValueError(kind)
    return base, thetas


@pytest.fixture(params=[1 << 20, 997], ids=["default-blocks", "997-element-blocks"])
def blocks(request, monkeypatch):
    monkeypatch.setattr(mm, "BLOCK_ELEMENTS", request.param, raising=False)
    return request.param


# ---------------------------------------------------------------------------- the same bits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [1e-6, 1 / 21000, 0.2, 0.5, 0.999, 1.0])  # k = 0, 1, ..., n
def test_trim_is_the_full_sort_ties_by_position(blocks, dtype, density):
    for kind in ("random", "ties", "zeros"):
        base, thetas = tensors(kind, dtype=dtype)
        tau = thetas[0] - base
        got = mm.trim_to_density(tau, density)
        assert same_bits(got, ref_trim(tau, density)), kind
        assert int((got != 0).sum()) <= round(density * tau.numel())
    # and the previous (unstable full sort) result where the k-th magnitude is not tied
    base, thetas = tensors("random", dtype=dtype)
    tau = thetas[0] - base
    assert same_bits(mm.trim_to_density(tau, density), ref_trim(tau, density, stable=False))


def test_trim_keeps_exactly_k_with_nan_inf_and_ties_first_by_position(blocks):
    x = torch.tensor([0.5, -2.0, float("nan"), 2.0, float("-inf"), -0.5, 2.0, 0.0, -2.0, 1.0] * 30)
    for k in range(1, x.numel() + 1, 7):
        got = mm.trim_to_density(x, k / x.numel())
        want = ref_trim(x, k / x.numel())
        assert same_bits(got, want), k
    got = mm.trim_to_density(x, 0.2)  # 60 kept: 30 NaN, 30 inf
    assert int(got.isnan().sum()) == 30 and int(got.isinf().sum()) == 30
    got = mm.trim_to_density(x, 0.25)  # then the first 15 of the 120 entries with |x| = 2
    twos = (x.abs() == 2).nonzero().reshape(-1)
    assert (got[twos[:15]] != 0).all() and (got[twos[15:]] == 0).all()


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
@pytest.mark.parametrize("shape", [(), (5,), (300, 70), (40, 6, 9)])
def test_ties_both_conventions_bitwise(blocks, kind, shape):
    base, thetas = tensors(kind, shape=shape)
    w = [0.7, -0.4, 1.3]
    for d in (0.2, 0.5, 1.0):
        assert same_bits(mm.ties(base, thetas, w, density=d, scaling=0.9), ref_ties(base, thetas, w, d, 0.9))
        for cons in ("sum", "count", None):
            dens = [d, 0.3, 0.6]
            got = mm.generalized_task_arithmetic(base, thetas, w, sparsification="magnitude", consensus=cons,
                                                 densities=dens, normalize=True, scaling=1.1)
            assert same_bits(got, ref_gta(base, thetas, w, dens, cons, True, 1.1)), (d, cons)
            if kind == "random":  # no tie at any threshold: the previous implementation's bits (unstable sort)
                assert same_bits(got, ref_gta(base, thetas, w, dens, cons, True, 1.1, stable=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_methods_bitwise(blocks, dtype):
    base, thetas = tensors("random", shape=(301, 70), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    fishers = [torch.rand(base.shape, generator=g, dtype=dtype) * (i + 1) for i in range(3)]
    fishers[1][:5] = 0  # below the floor
    w = [0.2, 0.5, 0.3]
    assert same_bits(mm.fisher_weighted(thetas, fishers, w, floor=1e-6), ref_fisher(thetas, fishers, w, 1e-6))
    b = base.to(mm.compute_dtype(base))
    want = ref_fisher([t - b for t in thetas], fishers, w, 1e-6).add_(b)
    assert same_bits(mm.fisher_task_vector(base, thetas, fishers, w, floor=1e-6), want)
    expanded = [f[:1].expand(base.shape) for f in fishers]  # a group Fisher spread: a non-contiguous view
    assert same_bits(mm.fisher_weighted(thetas, expanded, w, floor=1e-6), ref_fisher(thetas, expanded, w, 1e-6))
    avg = torch.zeros(base.shape, dtype=dtype)
    for x, t in zip(w, thetas):
        avg.add_(t, alpha=x)
    assert same_bits(mm.weighted_average(thetas, w), avg.div_(sum(w)))
    got = mm.generalized_task_arithmetic(base, thetas, [1.0, -0.5, 2.0], sparsification=None, consensus=None,
                                         normalize=False, scaling=0.7)
    assert same_bits(got, ref_gta(base, thetas, [1.0, -0.5, 2.0], [1.0] * 3, None, False, 0.7))
    for then in ("task_arithmetic", "ties"):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
        got = mm.dare(base, thetas, [1.0, 0.5, 1.0], p=0.3, generators=gens, then=then, density=0.4, scaling=0.8)
        assert same_bits(got, ref_dare(base, thetas, [1.0, 0.5, 1.0], 0.3, (5, 6, 7), then, 0.4, 0.8)), then


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mergekit_dare_bitwise(blocks, dtype):
    """mergekit's random masks drawn block by block, model after model from one generator, the L1
    rescaling summed over the whole tensor: the whole-tensor bits (and the generator left in the
    same state)."""
    base, thetas = tensors("random", shape=(301, 70), dtype=dtype)
    w = [1.0, 0.5, -0.7]
    for rescale in (True, False):
        for cons, dens in (("sum", [0.3, 0.5, 0.9]), (None, [0.1, 1.0, 0.6])):
            g, g_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
            got = mm.generalized_task_arithmetic(base, thetas, w, sparsification="random", consensus=cons, densities=dens,
                                                 normalize=cons is not None, rescale=rescale, scaling=0.9, generator=g)
            want = ref_gta(base, thetas, w, dens, cons, cons is not None, 0.9, random=(g_ref, rescale))
            assert same_bits(got, want), (rescale, cons)
            assert torch.equal(g.get_state(), g_ref.get_state())
    inp = TensorInputs("layer.weight", thetas, w, base)
    for then in ("task_arithmetic", "ties"):
        got = registry.get("dare")(drop_p=0.6, dare_then=then, density=0.4).merge(inp)
        g = mm.tensor_generator(0, "layer.weight", 0)
        if then == "task_arithmetic":
            want = ref_gta(base, thetas, w, [0.4] * 3, None, False, 1.0, random=(g, True))
        else:
            dt = mm.compute_dtype(base)
            b = base.to(dt)
            dropped = [mm.sparsify(t.to(dt) - b, 0.4, "random", rescale=True, generator=g) for t in thetas]
            want = b + ref_gta(torch.zeros_like(b), dropped, w, [0.4] * 3, "sum", True, 1.0)
        assert same_bits(got, want), then


# ---------------------------------------------------------------------------- bounded scratch
ROWS, COLS = 2048, 2048  # 4M float32 entries: 16 MB, 64 blocks of 64k entries
METHODS = [
    ("fisher", {}),
    ("fisher_task_vector", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"convention": "hf_fisher"}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "convention": "hf_fisher"}),
    ("dare", {"drop_p": 0.5, "convention": "hf_fisher"}),
    ("dare", {"drop_p": 0.5, "dare_then": "ties", "convention": "hf_fisher"}),
    ("dare", {"drop_p": 0.5, "rescale": False}),
    ("dare_ties", {"density": 0.5}),
]


@pytest.mark.parametrize(("name", "options"), METHODS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in METHODS])
def test_merge_scratch_is_the_output_plus_blocks(monkeypatch, name, options):
    """Peak bytes allocated while merging one 16 MB tensor (inputs already in memory) <= 1.25 x the
    tensor: the output plus a few blocks (before: 3-9 x, a full-size sort in TIES); mergekit's
    DARE with L1 rescaling: <= 2.25 x (one whole-size buffer of |τ| for mergekit's norms)."""
    monkeypatch.setattr(mm, "BLOCK_ELEMENTS", 1 << 16, raising=False)
    base, thetas = tensors("random", shape=(ROWS, COLS), n=2)
    method = registry.get(name)(**options)
    g = torch.Generator().manual_seed(3)
    fishers = [torch.rand(base.shape, generator=g) for _ in thetas] if method.fishers else None
    inp = TensorInputs("model.embed_tokens.weight", thetas, [1.0, 1.0], base, fishers)
    track = LiveBytes()
    with track:
        out = method.merge(inp)
    size = base.numel() * base.element_size()
    assert out.shape == base.shape
    bound = 2.25 if name == "dare_ties" else 1.25
    assert track.peak <= bound * size, f"{name}: peak {track.peak / size:.2f} x the tensor"
