"""Least-squares rescaling after structured pruning (Kwon et al. 2022, "A Fast Post-Training
Pruning Framework for Transformers", its mask tuning by layer-wise reconstruction), folded into
the weights.

Per layer, in order, and per output projection (attention O, then MLP down): let ``x'`` be the
projection's inputs on the calibration tokens computed by the model as it is at that point (the
layers below already pruned and rescaled, this projection's units still intact), ``x`` the
inputs of the *given, unpruned* model on the same tokens, and ``y_u(x) = W_{:,J_u} x_{J_u}`` unit
``u``'s share of the output. The scales of the kept units ``K`` make the pruned layer, on the
inputs it now receives, reconstruct the unpruned layer's output::

    s* = argmin_s  Σ_tokens ‖ Σ_{u∈K} s_u y_u(x') − Σ_u y_u(x) ‖²

(Kwon et al.'s teacher target on the student's inputs: the rescale also undoes part of the error
the layers below left in ``x'``). The normal equations need only the Gram ``G = Σ x' x'ᵀ``, the
cross Gram ``C = Σ x' xᵀ`` and ``WᵀW`` (input features × input features, ``W`` as ``[out,
in]``): ``A = Pᵀ_K (G ⊙ WᵀW) P_K``, ``b = Pᵀ_K ((C ⊙ WᵀW) 1)`` with ``P`` the feature-to-unit
indicator (``C = G`` when ``x' = x``, e.g. in the first layer: then ``b = Pᵀ_K (G ⊙ WᵀW) 1``).
``s*`` comes from :func:`torch.linalg.lstsq` (float64) and multiplies the kept units' columns of
``W`` (the model then needs no extra parameter).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn as nn

from hf_fisher.consumers.prune.units import Unit, input_axis, owner

__all__ = ["Residual", "fold_scales", "least_squares_scales", "output_gram", "output_grams", "residual_blocks"]

logger = logging.getLogger(__name__)


def output_gram(model: nn.Module, weight: str, batches: Sequence[Mapping], *, progress: bool = False) -> torch.Tensor:
    """``G = Σ_t x_t x_tᵀ`` of the inputs of ``weight``'s module over the calibration tokens; the
    forward of each batch stops at that module."""
    from hf_fisher.collection.activations import StopForward, token_inputs

    acc: dict[str, torch.Tensor] = {}

    def add(name: str, xs: torch.Tensor) -> None:
        g = acc.get(name)
        if g is None:
            g = acc[name] = torch.zeros((xs.shape[1], xs.shape[1]), dtype=torch.float64, device=xs.device)
        g.addmm_(xs.T, xs)
        raise StopForward

    token_inputs(model, batches, {weight: owner(model, weight)[0]}, add, progress=progress, desc="rescale Gram")
    return acc[weight].cpu()


@dataclass(frozen=True)
class Residual:
    """Where a projection's output joins the residual stream of a pre-norm block whose output is
    ``h_out = h_in + y_attn + y_mlp`` (checked by :func:`residual_blocks`): ``block`` the block
    (decoder layer) module; ``first``: the attention output, added to the block input ``h_in``;
    else the MLP output, added to ``h_out − y_mlp``."""

    block: nn.Module
    first: bool


def _rows(model: nn.Module, batch: Mapping, module: nn.Module, residual: Residual | None):
    """One forward: ``(x, r)`` at the non-padding tokens — ``x`` the inputs of ``module``, ``r``
    the residual stream its output is added to (None without ``residual``)."""
    from hf_fisher.collection.activations import StopForward, accepted_kwargs, model_inputs, position_convention

    device = next(model.parameters()).device
    inputs = model_inputs(model, batch, 0, device, accepted_kwargs(model), position_convention(model))
    mask = inputs.get("attention_mask")
    got: dict[str, torch.Tensor] = {}

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if mask is not None:
            if tuple(t.shape[:-1]) != tuple(mask.shape):
                raise _Unaligned(tuple(t.shape))
            t = t[mask.bool()]
        return t.reshape(-1, t.shape[-1]).double()

    def on_block_in(mod, args, kwargs):
        got["h_in"] = rows(args[0] if args else kwargs["hidden_states"])

    def on_module(mod, args, output):
        got["x"] = rows(args[0])
        got["y"] = rows(output)
        if residual is None or residual.first:
            raise StopForward

    def on_block_out(mod, args, output):
        got["h_out"] = rows(output[0] if isinstance(output, (tuple, list)) else output)
        raise StopForward

    handles = [module.register_forward_hook(on_module)]
    if residual is not None:
        handles += [residual.block.register_forward_pre_hook(on_block_in, with_kwargs=True),
                    residual.block.register_forward_hook(on_block_out)]
    was = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), contextlib.suppress(StopForward):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was:
            m.training = flag
    if residual is None:
        return got["x"], None
    return got["x"], got["h_in"] if residual.first else got["h_out"] - got["y"]


class _Unaligned(Exception):
    pass


def output_grams(model: nn.Module, weight: str, batches: Sequence[Mapping],
                 teacher: Callable[[], AbstractContextManager] | None = None,
                 residual: Residual | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(G, C, D)``: ``G = Σ_t x'_t x'_tᵀ`` of the inputs of ``weight``'s module on the model as
    it is; ``C = Σ_t x'_t x_tᵀ`` with ``x_t`` the inputs on the same tokens of the model inside
    ``teacher()`` (a context that puts the unpruned weights in; None: ``C = G``); ``D = Σ_t x'_t
    (r'_t − r_t)ᵀ`` with ``r'``, ``r`` the residual stream the output is added to, pruned and
    unpruned (``residual`` given, else None)."""
    if teacher is None:
        G = output_gram(model, weight, batches)
        return G, G, None
    module = owner(model, weight)[0]
    G = C = D = None
    for batch in batches:
        with teacher():
            x, r = _rows(model, batch, module, residual)
        xp, rp = _rows(model, batch, module, residual)
        if x.shape != xp.shape:
            raise RuntimeError(f"rescale of {weight}: the unpruned and the pruned model read different tokens")
        if G is None:
            G = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float64, device=x.device)
            C = torch.zeros_like(G)
            D = None if r is None else torch.zeros((x.shape[1], r.shape[1]), dtype=torch.float64, device=x.device)
        G.addmm_(xp.T, xp)
        C.addmm_(xp.T, x)
        if D is not None:
            D.addmm_(xp.T, rp - r)
    return G.cpu(), C.cpu(), None if D is None else D.cpu()


def residual_blocks(model: nn.Module, pairs: Mapping[int, tuple[str, str]], batch: Mapping) -> dict[str, Residual]:
    """``{weight: Residual}`` for the output projections ``pairs[layer] = (attention output weight,
    MLP output weight)`` of the layers whose block (the module holding both) is a pre-norm
    residual block: on ``batch``, its output equals its input plus both projections' outputs
    (``‖h_out − h_in − y_attn − y_mlp‖ ≤ tol ‖h_out‖``, ``tol`` 1e-3 in float32 / 1e-6 in
    float64 / 3e-2 in half precision). Other layers (post-norm blocks, norms after the sublayers)
    are left out: their rescale reconstructs the projection's output alone."""
    from hf_fisher.collection.activations import accepted_kwargs, model_inputs, position_convention

    found: dict[str, tuple] = {}
    got: dict[tuple, torch.Tensor] = {}
    hooks = []

    def keep(key, value) -> None:
        got.setdefault(key, value[0] if isinstance(value, (tuple, list)) else value)

    try:
        for layer, (o_name, d_name) in pairs.items():
            a, b = o_name.split(".")[:-2], d_name.split(".")[:-2]
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            if k == 0:
                continue
            try:
                block = model.get_submodule(".".join(a[:k]))
                o, d = owner(model, o_name)[0], owner(model, d_name)[0]
            except AttributeError:
                continue
            found[layer] = (block, o_name, d_name)
            hooks += [block.register_forward_pre_hook(
                          lambda m, a, kw, L=layer: keep((L, "in"), a[0] if a else kw.get("hidden_states")), with_kwargs=True),
                      block.register_forward_hook(lambda m, a, out, L=layer: keep((L, "out"), out)),
                      o.register_forward_hook(lambda m, a, out, L=layer: keep((L, "o"), out)),
                      d.register_forward_hook(lambda m, a, out, L=layer: keep((L, "d"), out))]
        if found:
            inputs = model_inputs(model, batch, 0, next(model.parameters()).device, accepted_kwargs(model),
                                  position_convention(model))
            with torch.no_grad():
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Residual] = {}
    for layer, (block, o_name, d_name) in found.items():
        ts = [got.get((layer, n)) for n in ("in", "out", "o", "d")]
        if not all(isinstance(t, torch.Tensor) for t in ts) or len({tuple(t.shape) for t in ts}) != 1:
            continue
        h_in, h_out, y_o, y_d = (t.double() for t in ts)
        tol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(ts[1].dtype, 3e-2)
        if float((h_out - h_in - y_o - y_d).norm()) <= tol * float(h_out.norm()):
            out[o_name] = Residual(block, True)
            out[d_name] = Residual(block, False)
    return out


def _feature_matrix(model: nn.Module, weight: str) -> torch.Tensor:
    """``WᵀW`` over input features (``[in, in]``) of a Linear (``[out, in]``) or Conv1D (``[in, out]``) weight."""
    w = dict(model.named_parameters())[weight].detach().to("cpu", torch.float64)
    return w.T @ w if input_axis(model, weight) == 1 else w @ w.T


def residual_term(model: nn.Module, weight: str, gap: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
    """``e_j = Σ_o (G W)_{oj} D_{jo}`` per input feature ``j`` (``W`` as ``[out, in]``, ``D = Σ_t
    x'_t (r'_t − r_t)ᵀ``; ``G``: an output weighting, a vector for a diagonal one, default ``I``)."""
    w = dict(model.named_parameters())[weight].detach().to("cpu", torch.float64)
    w = w if input_axis(model, weight) == 1 else w.T
    if G is not None:
        w = G.double().unsqueeze(1) * w if G.dim() == 1 else G.double() @ w
    return (w * gap.T).sum(0)


def least_squares_scales(model: nn.Module, weight: str, units: Sequence[Unit], kept: Sequence[int], gram: torch.Tensor,
                         cross: torch.Tensor | None = None, gap: torch.Tensor | None = None) -> torch.Tensor:
    """Scales ``s*`` of the kept units ``[units[k] for k in kept]`` (module docstring; ``gram``
    = ``G``, ``cross`` = ``C``, default ``G``; ``gap`` = ``D``, default none)."""
    n_in = gram.shape[0]
    P = torch.zeros(n_in, len(units), dtype=torch.float64)
    for k, u in enumerate(units):
        for s in u.out:
            if s.param == weight:
                P[s.start : s.stop, k] = 1.0
    WtW = _feature_matrix(model, weight)
    M = gram * WtW
    PK = P[:, list(kept)]
    A = PK.T @ M @ PK
    v = (M if cross is None else cross * WtW).sum(1)
    if gap is not None:
        v = v - residual_term(model, weight, gap)
    b = PK.T @ v
    s = torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    if not bool(torch.isfinite(s).all()):
        logger.warning("rescale of %s: least squares gave non-finite scales; keeping scale 1", weight)
        return torch.ones(len(kept), dtype=torch.float64)
    return s


def fold_scales(model: nn.Module, weight: str, units: Sequence[Unit], scales: torch.Tensor, touch: Callable[[str], None]) -> None:
    """Multiply each unit's columns (input features) of ``weight`` by its scale, in place
    (``touch(weight)`` first, so the caller can keep the original)."""
    p = dict(model.named_parameters())[weight]
    touch(weight)
    axis = input_axis(model, weight)
    with torch.no_grad():
        for u, s in zip(units, scales.tolist()):
            for sl in u.out:
                if sl.param == weight:
                    idx = (slice(None),) * axis + (slice(sl.start, sl.stop),)
                    p[idx] *= s
