"""KFAC merging (``merge_with_fisher(..., method="kfac")``): the Fisher-weighted merge with each
model's Kronecker-factored Fisher instead of its diagonal.

For every block the factors couple (a layer's weight with its bias, in the canonical form ``M``
of :mod:`hf_fisher.artifacts.kfac`; a tied weight with all its layers), the merged ``M*`` minimises
``Σ_i λ_i vec(M − M_i)ᵀ (F_i + δ I) vec(M − M_i)`` with ``F_i ≈ G_i ⊗ A_i``, i.e. solves

    Σ_i λ_i (G_i ⊗ A_i + δ I) vec(M* − M_i) = 0
    ⇔  Σ_i λ_i (G_i M* A_i + δ M*) = Σ_i λ_i (G_i M_i A_i + δ M_i)

(λ normalised to sum 1; ``kfac_damping_mode="exact"``), or with factor damping
(``"factor"``, the default) ``F_i ≈ (G_i + r_G I) ⊗ (A_i + r_A I)``, each factor damped relative
to its own scale, ``r_G = √c·ḡ``, ``r_A = √c·ā`` (``c = kfac_damping``, ``ḡ``/``ā`` the λ-weighted
mean diagonals of the layer's factors; Martens & Grosse's π-balanced damping, so ``r_G r_A = δ``
of the layer and the merge depends on ``G ⊗ A`` only, not on how its scale is split between the
factors — a uniform ``√δ`` on both barely damped GPT-2's input factors, of order 1, and drowned
its output-gradient factors, of order 1e-3, and merged far worse than averaging), which for two models has an
exact closed form per layer (simultaneous diagonalisation of the factor pairs); otherwise by
preconditioned conjugate gradients in float64 from the λ-weighted average, to a relative
residual of ``1e-10`` (:func:`kfac_merge_block`). The damping is relative: ``δ = kfac_damping · d̄`` with ``d̄``
the λ-weighted mean diagonal of the ``F_i`` over the block (so the merge does not depend on the
Fishers' scale); ``δ → ∞`` gives the weighted average, ``δ → 0`` the undamped KFAC merge. Equal
Fishers give the weighted average exactly. Tensors no KFAC block covers follow the merge's
``no_fisher_rule``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_fisher.errors import InvalidInputError, ModelMismatchError

__all__ = ["KFACMerge", "factor_dampings", "kfac_merge_block", "load_kfac"]

logger = logging.getLogger(__name__)


def load_kfac(obj: Any, *, hub_options: dict | None = None):
    """A :class:`~hf_fisher.artifacts.kfac.KFACFisher` from itself, an artifact folder or a Hub reference."""
    from hf_fisher.artifacts.kfac import KFAC_CONFIG_NAME, KFACFisher
    from hf_fisher.consumers.merge import io as _io

    if isinstance(obj, KFACFisher):
        obj.check_values()  # finite factors with non-negative diagonals, before any work
        return obj
    if isinstance(obj, (str, os.PathLike)):
        text = os.fspath(obj)
        folder = Path(text) if os.path.exists(text) else _io.resolve_hub(text, what="KFAC artifact", hub_options=hub_options)
        if not (Path(folder) / KFAC_CONFIG_NAME).is_file():
            raise InvalidInputError(
                f"{text} is not a KFAC artifact (no {KFAC_CONFIG_NAME}); method='kfac' needs KFAC Fishers "
                "(hf_fisher.collect(model, batches, estimator='kfac')), not diagonal ones"
            )
        return KFACFisher.from_pretrained(folder)
    raise InvalidInputError(f"{obj!r} ({type(obj).__name__}) is not a KFACFisher, a KFAC artifact folder or a Hub id; "
                            "method='kfac' needs KFAC Fishers (hf_fisher.collect(..., estimator='kfac'))")


def _layers_of(kfac, names: Sequence[str]) -> list:
    return [L for L in kfac.layers.values() if L.weight in names]


def _cg(op, precond, b, x, dot, axpy, tol: float, limit: int, what: str):
    """Preconditioned conjugate gradients for ``op(x) = b`` from ``x`` (vectors in any form that
    ``dot`` / ``axpy(y, a, x) = y + a x`` understand)."""
    r = axpy(b, -1.0, op(x))
    z = precond(r)
    p = z
    rz = dot(r, z)
    bb = math.sqrt(dot(b, b)) or 1.0
    it = 0
    while math.sqrt(dot(r, r)) > tol * bb and it < limit:
        q = op(p)
        alpha = rz / dot(p, q)
        x = axpy(x, alpha, p)
        r = axpy(r, -alpha, q)
        z = precond(r)
        new = dot(r, z)
        p = axpy(z, new / rz, p)
        rz = new
        it += 1
    res = math.sqrt(dot(r, r)) / bb
    if res > tol:
        logger.warning("KFAC merge of %s: CG stopped after %d iterations (relative residual %.2e)", what, it, res)
    return x


def _eig(f: torch.Tensor, diagonal: bool):
    if diagonal:
        return f.double().clamp(min=0), None
    w, q = torch.linalg.eigh(f.double())
    return w.clamp(min=0), q


def _mean_diagonal(f: torch.Tensor, diagonal: bool) -> float:
    return float((f if diagonal else torch.diagonal(f)).double().mean())


def factor_dampings(kfac_layers: Sequence[Any], lam: Sequence[float], damping: float) -> tuple[float, float]:
    """``(r_G, r_A)`` of one layer's factor damping over the models (``kfac_layers[i]`` model i's
    factors of the layer): ``r_G = √c · ḡ``, ``r_A = √c · ā`` with ``c = kfac_damping``,
    ``ḡ = Σ_i λ_i mean(diag G_i)`` and ``ā = Σ_i λ_i mean(diag A_i)`` (Martens & Grosse's π-balanced
    factored Tikhonov damping, ``r_G = √δ / π``, ``r_A = π √δ`` with ``δ = c ḡ ā`` the relative
    damping of the layer and ``π = √(ā / ḡ)``). Each factor is damped relative to its own scale,
    so the split of the scale between G and A (a convention of the estimator) does not change the
    merge; one uniform ``√δ`` on both factors would barely damp the larger factor and drown the
    smaller one. Zero factors (all-zero Fishers): ``(1, 1)``, i.e. the λ-weighted average."""
    g = sum(l * _mean_diagonal(L.G, L.g_diagonal) for l, L in zip(lam, kfac_layers))
    a = sum(l * _mean_diagonal(L.A, L.a_diagonal) for l, L in zip(lam, kfac_layers))
    if not (g > 0 and a > 0):
        return 1.0, 1.0
    root = math.sqrt(damping)
    return root * g, root * a


def _damped(L, r_g: float, r_a: float):
    """The layer with factor damping: ``G + r_G I``, ``A + r_A I``."""
    from dataclasses import replace

    def add(f, diag, r):
        f = f.double()
        return f + r if diag else f + r * torch.eye(f.shape[0], dtype=torch.float64)

    return replace(L, G=add(L.G, L.g_diagonal, r_g), A=add(L.A, L.a_diagonal, r_a))


def _whitener(f1: torch.Tensor, f2: torch.Tensor, diagonal: bool):
    """``(T, p)`` with ``Tᵀ f1 T = I`` and ``Tᵀ f2 T = diag(p)`` (f1 positive definite); for
    diagonal factors ``T`` is the vector of the diagonal."""
    if diagonal:
        return 1.0 / f1.sqrt(), f2 / f1
    w, Q = torch.linalg.eigh(f1)
    S = Q / w.clamp(min=torch.finfo(torch.float64).tiny).sqrt()  # f1^{-1/2} up to rotation
    p, U = torch.linalg.eigh(S.T @ f2 @ S)
    return S @ U, p


def _two_model_closed_form(Ls, lam, C):
    """``X`` with ``λ1 G1 X A1 + λ2 G2 X A2 = C`` (simultaneous diagonalisation of each factor pair):
    ``X = T_G [(T_Gᵀ C T_A) / (λ1 + λ2 p qᵀ)] T_Aᵀ``."""
    (L1, L2), (l1, l2) = Ls, lam
    TG, p = _whitener(L1.G, L2.G, L1.g_diagonal)
    TA, q = _whitener(L1.A, L2.A, L1.a_diagonal)
    Y = (TG.unsqueeze(1) * C) if L1.g_diagonal else TG.T @ C
    Y = (Y * TA.unsqueeze(0)) if L1.a_diagonal else Y @ TA
    Y = Y / (l1 + l2 * torch.outer(p, q))
    X = (TG.unsqueeze(1) * Y) if L1.g_diagonal else TG @ Y
    return (X * TA.unsqueeze(0)) if L1.a_diagonal else X @ TA.T


def kfac_merge_block(kfacs: Sequence[Any], thetas: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                     damping: float, *, mode: str = "factor", tol: float = 1e-10,
                     max_iter: int | None = None) -> dict[str, torch.Tensor]:
    """``M*`` of one block (module docstring); ``thetas[i]`` holds model i's tensors of the block.

    ``mode="factor"`` (default) damps each factor relative to its scale, ``F_i ≈ (G_i + r_G I) ⊗
    (A_i + r_A I)`` (Martens & Grosse's π-balanced factor damping, :func:`factor_dampings`); with two models a one-layer block then has the closed form of
    :func:`_two_model_closed_form` (simultaneous diagonalisation), exact and O(d³). ``"exact"``
    adds ``δ I`` to each ``G_i ⊗ A_i``. Otherwise (several models, ``"exact"``, tied blocks) the
    system is solved by conjugate gradients to a relative residual ``tol``: one-layer blocks in
    their canonical form, preconditioned by the exact inverse of ``Ḡ ⊗ Ā`` (+ δI) with
    ``Ḡ = Σ λ_i G_i``, ``Ā = Σ λ_i A_i``; tied blocks on the parameter tensors with a Jacobi
    preconditioner."""
    names = sorted(thetas[0])
    total = float(sum(weights))
    lam = [float(w) / total for w in weights]
    th = [{n: t[n].detach().to("cpu", torch.float64) for n in names} for t in thetas]
    numel = sum(th[0][n].numel() for n in names)
    layers = [_layers_of(k, names) for k in kfacs]
    diag = sum(l * sum(float(L.diagonal().double().sum()) for L in Ls) / numel for l, Ls in zip(lam, layers))
    delta = damping * diag if diag > 0 else 1.0  # all-zero Fishers: the damping alone, the weighted average
    if mode == "factor":
        rs = [factor_dampings([Ls[j] for Ls in layers], lam, damping) for j in range(len(layers[0]))]
        layers = [[_damped(L, *r) for L, r in zip(Ls, rs)] for Ls in layers]
        shift = 0.0
    else:
        layers = [[replace_double(L) for L in Ls] for Ls in layers]
        shift = delta
    limit = max_iter or 10 * numel
    if len(layers[0]) == 1:
        Ls = [Ls[0] for Ls in layers]
        L0 = Ls[0]
        ms = [L.to_canonical(t[L.weight], t[L.bias] if L.bias else None) for L, t in zip(Ls, th)]
        b = sum(l * (L.apply(m) + shift * m) for l, L, m in zip(lam, Ls, ms))
        if mode == "factor" and len(Ls) == 2:
            m = _two_model_closed_form(Ls, lam, b)
        else:
            def op(m):
                out = shift * m
                for l, L in zip(lam, Ls):
                    out = out + l * L.apply(m)
                return out

            g, QG = _eig(sum(l * L.G for l, L in zip(lam, Ls)), L0.g_diagonal)
            a, QA = _eig(sum(l * L.A for l, L in zip(lam, Ls)), L0.a_diagonal)
            denom = torch.outer(g, a) + shift

            def precond(m):
                x = QG.T @ m if QG is not None else m
                x = x @ QA if QA is not None else x
                x = x / denom
                x = QG @ x if QG is not None else x
                return x @ QA.T if QA is not None else x

            x0 = sum(l * m for l, m in zip(lam, ms))
            m = _cg(op, precond, b, x0, lambda u, v: float((u * v).sum()), lambda y, c, x: y + c * x, tol, limit, names)
        w, bias = L0.from_canonical(m)
        return {L0.weight: w, **({L0.bias: bias} if L0.bias else {})}

    def apply(Ls, v):
        out = {n: shift * v[n] for n in names}
        for L in Ls:
            rw, rb = L.from_canonical(L.apply(L.to_canonical(v[L.weight], v[L.bias] if L.bias else None)))
            out[L.weight] = out[L.weight] + rw
            if L.bias:
                out[L.bias] = out[L.bias] + rb
        return out

    def op_d(v):
        out = {n: torch.zeros_like(v[n]) for n in names}
        for l, Ls in zip(lam, layers):
            fv = apply(Ls, v)
            for n in names:
                out[n] = out[n] + l * fv[n]
        return out

    b = {n: torch.zeros_like(th[0][n]) for n in names}
    for t, l, Ls in zip(th, lam, layers):
        ft = apply(Ls, t)
        for n in names:
            b[n] += l * ft[n]
    x0 = {n: sum(l * t[n] for t, l in zip(th, lam)) for n in names}
    jacobi = {n: torch.full_like(th[0][n], shift) for n in names}  # diag of the operator
    for l, Ls in zip(lam, layers):
        for L in Ls:
            dw, db = L.from_canonical(L.diagonal().double())
            jacobi[L.weight] += l * dw
            if L.bias:
                jacobi[L.bias] += l * db
    return _cg(op_d, lambda r: {n: r[n] / jacobi[n] for n in names}, b, x0,
               lambda u, v: sum(float((u[n] * v[n]).sum()) for n in names),
               lambda y, c, x: {n: y[n] + c * x[n] for n in names}, tol, limit, names)


def replace_double(L):
    """The layer with float64 factors."""
    from dataclasses import replace

    return replace(L, G=L.G.double(), A=L.A.double())


class KFACMerge:
    """The KFAC blocks of a merge: which tensor belongs to which block, the merged blocks computed
    on first use and handed out tensor by tensor (a block is held only until all its tensors
    are written, so the merge stays streaming)."""

    def __init__(self, kfacs: Sequence[Any], shapes: Sequence[dict[str, tuple[int, ...]]], labels: Sequence[str]):
        first = kfacs[0]
        blocks = first.blocks()
        for kf, shp, label in zip(kfacs, shapes, labels):
            if kf.blocks() != blocks:
                raise ModelMismatchError(f"the KFAC of {label} covers other layers than the KFAC of {labels[0]}; collect both the same way")
            for name, shape in kf.param_shapes.items():
                if name not in shp:
                    raise ModelMismatchError(f"the KFAC of {label} covers {name!r}, which {label} does not have")
                if tuple(shp[name]) != tuple(shape):
                    raise ModelMismatchError(f"the KFAC of {label} has {name!r} of shape {tuple(shape)}, the model {tuple(shp[name])}")
        self.kfacs = list(kfacs)
        self.blocks = blocks
        self.block_of = {n: i for i, b in enumerate(blocks) for n in b}
        self._ready: dict[tuple, dict[str, torch.Tensor]] = {}

    def covered(self) -> set[str]:
        return set(self.block_of)

    def merged(self, name: str, read: Callable[[str], Sequence[torch.Tensor]], weights: Sequence[float], damping: float,
               mode: str = "factor") -> torch.Tensor:
        """The merged tensor ``name``; ``read(n)`` gives every model's tensor ``n``."""
        i = self.block_of[name]
        key = (i, tuple(weights), float(damping), mode)
        if key not in self._ready:
            names = self.blocks[i]
            per_model = [dict() for _ in self.kfacs]
            for n in names:
                for m, t in enumerate(read(n)):
                    per_model[m][n] = t
            self._ready[key] = kfac_merge_block(self.kfacs, per_model, weights, damping, mode=mode)
        block = self._ready[key]
        out = block.pop(name)
        if not block:
            del self._ready[key]
        return out
