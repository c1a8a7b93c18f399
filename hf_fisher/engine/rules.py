"""Per-sample gradient rules: from one recorded module call to exact per-sample gradients.

A :class:`GradRule` receives a :class:`ModuleCall` (the module, its inputs, and the gradient of
the back-propagated loss with respect to its output, one row per sample) and returns one
:class:`Part` per trainable *direct* parameter of the module. A part is the contribution of that
call to the per-sample gradient ``g_i`` of the parameter; when a parameter receives several parts
(tied embeddings / lm_head, a module called twice) the engine sums the parts per sample before
squaring.

Parts never materialise per-sample gradients unless asked:

- :class:`OuterProductPart` (Linear, Conv1D; Conv1d/Conv2d as :class:`ConvWeightPart`, the
  tokens being output positions and ``v`` the input patches): ``G_i = sum_t u_it ⊗ v_it`` with per-token factors
  ``U_i`` [T, R] and ``V_i`` [T, C]. Per-index squared sums along rows use the Gram form
  ``r_i = sum_{t,s} (v_it·v_is) u_itr u_isr``, whichever of Gram / materialisation is cheaper.
- :class:`EmbeddingPart`: ``G_i[r] = sum_{t: x_it = r} g_it`` (segment sums, padding_idx rows 0).
- :class:`DensePart`: per-sample gradients already materialised ``[B, *shape]`` (biases, the
  generic ``torch.func`` rule for norms and custom layers).

Built-in rules are registered through :func:`hf_fisher_register_grad_rules` like any plugin's.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from ..hookspecs import hookimpl

log = logging.getLogger(__name__)


@dataclass
class ModuleCall:
    """One forward call of a module, with the gradient that reached its output."""

    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any
    grad_output: Any = None
    batch_size: int = 0
    compute_dtype: torch.dtype = torch.float32
    # per-sample gradient scale s_i (see engine.losses.normalization_weights), shape [B]
    scale: torch.Tensor | None = None
    # T of the batch's [B, T] input_ids: a leading dimension B * T is a token-flattened batch
    seq_len: int = 0
    # the differentiable tensors among the outputs (capture sets it)
    tensors: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def input(self, name: str = "input", position: int = 0) -> Any:
        if len(self.args) > position:
            return self.args[position]
        return self.kwargs[name]

    def batch_axis_kind(self, x: Any) -> str | None:
        """How a tensor's leading dimension maps to samples: ``"batch"`` ([B, ...]),
        ``"tokens"`` ([B*T, ...], rows in sample-major order, as ``x.view(B*T, ...)`` of a
        [B, T, ...] tensor gives) or None (not batched: a broadcast or batch-shared tensor)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        if x.shape[0] == self.batch_size:
            return "batch"
        if self.seq_len > 1 and x.shape[0] == self.batch_size * self.seq_len:
            return "tokens"
        return None

    def per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the samples as leading axis: [B, ...] unchanged, [B*T, ...] -> [B, T, ...].

        Raises :class:`UnsupportedError` for a tensor whose leading dimension is neither.
        """
        kind = self.batch_axis_kind(x)
        if kind == "batch":
            return x
        if kind == "tokens":
            return x.reshape(self.batch_size, self.seq_len, *x.shape[1:])
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UnsupportedError(
            f"{type(self.module).__name__}: a tensor of shape {shape} is not batched over the "
            f"{self.batch_size} samples (nor token-flattened over {self.batch_size}x{self.seq_len})"
        )


class Part:
    """Contribution of one module call to the per-sample gradients of one parameter.

    ``samples`` index tensors select samples of the batch (rows of the call's batch dimension).
    Gradients are scaled per sample by the call's ``scale``; :meth:`total` is unscaled (it equals
    the parameter's batch gradient of the back-propagated loss, used for verification).
    """

    param: torch.Tensor
    #: whether :meth:`materialize_rows` takes ``out=`` (a buffer of :meth:`out_like`'s dtype and
    #: device, shaped ``[b, hi - lo, *param.shape[1:]]``) and writes its result there
    writes_out: ClassVar[bool] = False

    def out_like(self) -> torch.Tensor:
        """A tensor of the dtype and device of this part's gradients (for ``out=`` buffers)."""
        return self.param

    def materialize(self, samples: torch.Tensor) -> torch.Tensor:
        """Signed per-sample gradients ``[len(samples), *param.shape]`` (scaled)."""
        raise NotImplementedError

    def materialize_rows(self, samples, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` (dim 0 of the parameter) of the signed per-sample gradients:
        ``materialize(samples)[:, lo:hi]``, ``[len(samples), hi - lo, *param.shape[1:]]``. The
        engine asks for row blocks when one sample's whole gradient exceeds the memory budget.
        Default: the whole gradient, then the rows; parts that can form only the rows override it."""
        return self.materialize(samples)[:, lo:hi]

    def per_index_sq(self, axis: int, samples: torch.Tensor, budget_elems: int) -> torch.Tensor:
        """``sum over all axes but `axis` of g_i**2`` for each sample: ``[len(samples), size]``.

        Only valid when this part is the parameter's only part. Default: materialise in chunks
        (of samples, or of rows when one sample exceeds ``budget_elems``).
        """
        return chunked_per_index_sq(self.materialize, self.param.shape, axis, samples, budget_elems, self.materialize_rows)

    def total(self) -> torch.Tensor:
        """Unscaled sum over samples of the gradient (equals autograd's batch gradient)."""
        raise NotImplementedError

    def total_times(self, probe: torch.Tensor) -> torch.Tensor:
        """``total() @ probe`` (``probe`` [last dim, k]): the batch gradient seen through a few
        directions, for the engine's first-batch check. Default: from :meth:`total`; parts
        whose factors give it cheaper override it."""
        return self.total() @ probe.to(self.param.device)

    def rounding_sq(self) -> torch.Tensor | None:
        """``Σ ‖term‖²`` over the terms :meth:`total` adds up (per-token outer products, rows):
        the square of the scale of the rounding in the total, which the first-batch check
        allows a parameter judged on its own (see ``PerSampleEngine.check_totals``). A few
        passes over the factors, no product. None (the default): unknown, the parameter is then
        judged against its own total alone (fail closed: a parameter whose gradient is pure
        rounding moves to the exact vector-Jacobian path)."""
        return None


Samples = "slice | torch.Tensor"


def num_samples(samples) -> int:
    """Number of samples selected by a slice of the batch or an index tensor."""
    return samples.stop - samples.start if isinstance(samples, slice) else int(samples.numel())


def sub_samples(samples, lo: int, hi: int):
    """Samples ``lo:hi`` of a selection (slices stay slices: views, no copies)."""
    if isinstance(samples, slice):
        return slice(samples.start + lo, min(samples.start + hi, samples.stop))
    return samples[lo:hi]


def take(x: torch.Tensor, samples) -> torch.Tensor:
    """Rows ``samples`` of ``x`` (a view for a slice, a gather for an index tensor)."""
    return x[samples] if isinstance(samples, slice) else x.index_select(0, samples)


def _flat_over(sq: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``[b, *shape]`` -> ``[b, prod(shape[a] for a in axes)]``: summed over the other axes, the
    ``axes`` flattened in their given order (C order, outermost first)."""
    if sq.dim() == 1:  # a 0-d parameter: one position
        return sq.unsqueeze(-1)
    other = [d + 1 for d in range(sq.dim() - 1) if d not in axes]
    kept = sq.sum(dim=other) if other else sq
    ascending = sorted(axes)
    perm = [0] + [1 + ascending.index(a) for a in axes]
    if perm != list(range(kept.dim())):
        kept = kept.permute(perm)
    return kept.reshape(kept.shape[0], -1)


def rows_per_block(shape, budget_elems: int) -> int:
    """Rows (dim 0 of a parameter of ``shape``) of one sample's gradient that fit in ``budget_elems``
    (at least 1)."""
    row = max(1, math.prod(tuple(shape)[1:]))
    return max(1, budget_elems // row)


def chunked_per_index_sq(materialize, shape, axis, samples, budget_elems, materialize_rows=None) -> torch.Tensor:
    """``[b, size]`` per-index squared sums by materialising chunks of samples; ``axis`` may be a
    tuple of axes, whose indices are then flattened in C order (multi-axis groups).

    When one sample's gradient exceeds ``budget_elems`` and ``materialize_rows`` is given
    (``(samples, lo, hi) -> rows lo:hi`` of the gradients), each sample is formed in blocks of
    rows (dim 0) that fit: the squares of a block are its own per-index sums when the group
    index starts with dim 0 (C order: a block is a contiguous run of it), and add up over the
    blocks when dim 0 is not a group axis.
    """
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    shape = tuple(shape)
    numel = max(1, math.prod(shape))
    n = num_samples(samples)
    by_rows = materialize_rows is not None and numel > budget_elems and len(shape) > 0 and (axes[0] == 0 or 0 not in axes)
    outs = []
    if not by_rows:
        chunk = max(1, budget_elems // numel)
        for lo in range(0, n, chunk):
            g = materialize(sub_samples(samples, lo, lo + chunk))
            outs.append(_flat_over(g * g, axes))
        return torch.cat(outs)
    step = rows_per_block(shape, budget_elems)
    for i in range(n):
        one = sub_samples(samples, i, i + 1)
        pieces, acc = [], None
        for lo in range(0, shape[0], step):
            g = materialize_rows(one, lo, min(shape[0], lo + step))
            flat = _flat_over(g * g, axes)
            if 0 in axes:
                pieces.append(flat)
            else:
                acc = flat if acc is None else acc.add_(flat)
        outs.append(torch.cat(pieces, 1) if 0 in axes else acc)
    return torch.cat(outs)


def _scale_rows(x: torch.Tensor, scale: torch.Tensor | None, samples) -> torch.Tensor:
    x = take(x, samples)
    if scale is None:
        return x
    s = take(scale, samples).to(x.dtype)
    return x * s.view(-1, *([1] * (x.dim() - 1)))


def _times(x: torch.Tensor, scale: torch.Tensor | None, samples) -> torch.Tensor:
    """Rows of ``x`` (a fresh result) times ``s_i``, in place."""
    if scale is None:
        return x
    s = take(scale, samples).to(x.dtype)
    return x.mul_(s.view(-1, *([1] * (x.dim() - 1))))


def _each(samples):
    """The selection's samples one at a time, each as a slice of one (views, no gathers)."""
    for i in range(num_samples(samples)):
        j = samples.start + i if isinstance(samples, slice) else int(samples[i])
        yield slice(j, j + 1)


def _gram_blocks(u: torch.Tensor, v: torch.Tensor, budget_elems: int) -> torch.Tensor:
    """The Gram form ``r = Σ_{t,s} (v_t·v_s) u_t ∘ u_s`` of one sample (``u`` [1, T, R], ``v``
    [1, T, C]) over blocks of tokens, for a T whose ``[T, T]`` Gram exceeds the budget.

    ``K`` is symmetric, so only its lower block triangle is formed: for the block ``a = [lo, hi)``,
    ``K_a = v_a v_{<hi}^T`` [τ, hi] with its part left of the diagonal block doubled, and
    ``r += Σ_{t∈a} (K_a u_{<hi})_t ∘ u_t`` (the same sum; ``τ (T + R)`` elements per block, about
    half the products of the whole Gram)."""
    T, R = u.shape[1], u.shape[2]
    tau = max(1, budget_elems // max(1, T + R))
    out = u.new_zeros(1, R)
    for lo in range(0, T, tau):
        hi = min(T, lo + tau)
        K = torch.bmm(v[:, lo:hi], v[:, :hi].transpose(1, 2))
        K[:, :, :lo] *= 2
        out += torch.bmm(K, u[:, :hi]).mul_(u[:, lo:hi]).sum(dim=1)
    return out


def _gram_block_tokens(T: int) -> int:
    """Tokens per block of :func:`_gram_quadratic`: ``T / 4`` within [16, 256], all of them below 32."""
    return T if T < 32 else min(256, max(16, T // 4))


def _gram_quadratic(K: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``r = Σ_t u_t ∘ (K u)_t`` per sample (``K`` [b, T, T] symmetric, ``u`` [b, T, R]) -> [b, R].

    ``K`` is symmetric, so ``r = Σ_t u_t ∘ (K_tt u_t + 2 Σ_{s<t} K_ts u_s)``: over blocks
    ``a = [lo, hi)`` of ``τ`` tokens, ``P_a = K_aa u_a + 2 K_{a,<lo} u_{<lo}`` and
    ``r = Σ_a Σ_{t∈a} (P_a ∘ u_a)_t``, which multiplies only the lower block triangle of ``K``:
    ``T² R (n + 1) / 2n`` products for ``n`` blocks instead of ``T² R`` (0.625x at n = 4), the same
    sum up to float rounding. Blocks of ``T / 4`` tokens (16 to 256: smaller ones multiply too
    slowly); below 32 tokens one block, the whole ``K u``. The products go to the batch's reused
    buffer (:func:`_scratch`), ``[b, τ, R]``."""
    b, T, R = u.shape
    tau = _gram_block_tokens(T)
    out = None
    for lo in range(0, T, tau):
        hi = min(T, lo + tau)
        P = torch.bmm(K[:, lo:hi, lo:hi], u[:, lo:hi], out=_scratch((b, hi - lo, R), u))
        if lo:
            P.baddbmm_(K[:, lo:hi, :lo], u[:, :lo], alpha=2)
        r = P.mul_(u[:, lo:hi]).sum(dim=1)
        out = r if out is None else out.add_(r)
    return out


def _times_sq(x: torch.Tensor, scale: torch.Tensor | None, samples) -> torch.Tensor:
    """Rows of per-index squared sums times ``s_i^2`` (in place; ``x`` is a fresh result)."""
    if scale is None:
        return x
    s = take(scale, samples).to(x.dtype)
    return x.mul_((s * s).view(-1, *([1] * (x.dim() - 1))))


class DensePart(Part):
    """Per-sample gradients given as a dense tensor ``[B, *param.shape]`` (unscaled).

    ``terms``: optionally the finer terms the rows are sums of (``[B, T, ...]``: per-token
    gradients whose sum over dim 1 is ``per_sample``), for :meth:`rounding_sq`; without them the
    per-sample rows are the terms."""

    def __init__(self, param: torch.Tensor, per_sample: torch.Tensor, scale: torch.Tensor | None, terms: torch.Tensor | None = None):
        self.param = param
        self.per_sample = per_sample
        self.scale = scale
        self.terms = terms

    def materialize(self, samples):
        return _scale_rows(self.per_sample, self.scale, samples)

    def materialize_rows(self, samples, lo, hi):
        if self.per_sample.dim() < 2:
            return super().materialize_rows(samples, lo, hi)
        return _scale_rows(self.per_sample[:, lo:hi], self.scale, samples)

    def total(self):
        return self.per_sample.sum(0)

    def rounding_sq(self):
        return torch.linalg.vector_norm(self.per_sample if self.terms is None else self.terms).square()


# The most recent per-sample Gram and the buffer of the Gram-form products, each with the thread
# that made it: an entry is reused only by its own thread (two engines in two threads never
# share one), and released by whichever thread ends the batch (CUDA runs backward hooks in
# autograd's device thread, the engine ends the batch in the caller's).
_KEPT: dict = {"gram": None, "scratch": None}


def _gram(v: torch.Tensor) -> torch.Tensor:
    """``K = v vᵀ`` per sample ``[b, T, T]``. Weights reduced one after another often share their
    input (q/k/v projections, gate/up): the last Gram is reused when ``v`` is a view of the same
    memory with the same shape and strides (the entry keeps ``v`` alive, so its memory cannot be
    reused by another tensor meanwhile); only one Gram is ever kept."""
    key = (threading.get_ident(), v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype, v.device)
    last = _KEPT["gram"]
    if last is not None and last[0] == key:
        return last[2]
    K = torch.bmm(v, v.transpose(1, 2))
    _KEPT["gram"] = (key, v, K)
    return K


def _scratch(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A ``shape`` view of one buffer reused by every Gram-form product of a batch (each is
    consumed right away): a fresh multi-MB temporary per parameter would cost page faults."""
    n = math.prod(shape)
    kept = _KEPT["scratch"]
    me = threading.get_ident()
    if kept is None or kept[0] != me or kept[1].numel() < n or kept[1].dtype != like.dtype or kept[1].device != like.device:
        kept = _KEPT["scratch"] = (me, torch.empty(n, dtype=like.dtype, device=like.device))
    return kept[1][:n].view(shape)


def gradient_rows(parts: list[Part], samples, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, bool]:
    """``Σ_parts`` of the signed per-sample gradients of ``samples`` (rows ``lo:hi`` of dim 0 with
    ``rows``), and whether the result is the caller's to overwrite (not a view of a part's data).

    A part whose ``materialize_rows`` takes ``out=`` (:attr:`Part.writes_out`: outer products,
    experts) writes into the batch's reused buffer (:func:`_scratch`): a fresh multi-MB result per
    parameter and chunk would cost a page fault per page (about as much time as the product
    itself at hidden 1024). The result is only valid until the next use of that buffer: the
    caller consumes it (a sink must not keep it) before the next parameter."""
    first = parts[0]
    shape0 = tuple(first.param.shape)
    if first.writes_out and shape0:
        lo, hi = rows if rows is not None else (0, shape0[0])
        shape = (num_samples(samples), hi - lo, *shape0[1:])
        g = first.materialize_rows(samples, lo, hi, out=_scratch(shape, first.out_like()))
        owned = True
    else:
        g = first.materialize(samples) if rows is None else first.materialize_rows(samples, *rows)
        owned = g._base is None
    for p in parts[1:]:
        more = p.materialize(samples) if rows is None else p.materialize_rows(samples, *rows)
        g = g.add_(more) if owned else g + more
        owned = True
    return g, owned


def release_grams() -> None:
    """Drop the kept Gram and the products' buffer (the engine calls it when a batch's
    reductions are done)."""
    _KEPT["gram"] = _KEPT["scratch"] = None


class OuterProductPart(Part):
    """``G_i = U_i^T V_i`` with ``U`` [B, T, R] (rows of the parameter) and ``V`` [B, T, C].

    Per-index squared sums of rows, for one sample: ``r[r] = sum_c (sum_t U_tr V_tc)^2``. Two ways:
    materialise ``G_i`` (cost ~ T·R·C) or the Gram form ``r = sum_t ((V V^T) U)_tr U_tr`` (cost
    ~ T²·(R + C)); the cheaper one is taken. Either way the temporaries stay within the memory
    budget at any T and width: chunks of samples while a whole sample fits; beyond that, the
    Gram form runs over blocks of tokens (``K_a = V_a V^T``, ``r += Σ_{t∈a} (K_a U)_t ∘ U_t``:
    ``τ (T + R)`` elements per block of ``τ`` tokens) and materialisation over blocks of rows
    (``G_i[rows] = U_i[:, rows]^T V_i``: ``ρ C`` elements per block of ``ρ`` rows).
    """

    writes_out = True

    def __init__(self, param: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: torch.Tensor | None):
        self.param = param
        self.U, self.V, self.scale = U, V, scale

    def out_like(self):
        return self.U

    def materialize(self, samples):
        return self.materialize_rows(samples, 0, self.U.shape[-1])

    def materialize_rows(self, samples, lo, hi, out: torch.Tensor | None = None):
        """Rows ``lo:hi`` of ``G_i = s_i U_iᵀ V_i`` (into ``out`` [b, hi - lo, C] when given)."""
        # the scale applied to the [b, ρ, C] product, not to a [b, T, ρ] copy of U (bigger than
        # the product when T > C)
        U = take(self.U[..., lo:hi] if (lo, hi) != (0, self.U.shape[-1]) else self.U, samples)
        G = torch.bmm(U.transpose(1, 2), take(self.V, samples), out=out)
        return _times(G, self.scale, samples)

    def per_index_sq(self, axis, samples, budget_elems):
        if isinstance(axis, (tuple, list)):
            if len(axis) != 1:  # both axes: per element
                return super().per_index_sq(axis, samples, budget_elems)
            (axis,) = axis
        # the result is quadratic in the per-sample scale: apply s_i^2 to it, not s_i to U
        out = self._per_index_sq_unscaled(axis, samples, budget_elems)
        return _times_sq(out, self.scale, samples)

    def _per_index_sq_unscaled(self, axis, samples, budget_elems):
        U, V = (self.V, self.U) if axis == 1 else (self.U, self.V)
        b, T, R, C = num_samples(samples), U.shape[1], U.shape[2], V.shape[2]
        if T * T * (R + C) < T * R * C:
            tau = _gram_block_tokens(T)
            per_sample = T * T + tau * R  # the Gram [T, T] and one block's product [τ, R]
            if per_sample > budget_elems:
                rho = (budget_elems - T * T) // tau
                if rho < 64:  # not even the Gram and a few rows' product: over blocks of tokens
                    return torch.cat([_gram_blocks(take(U, s), take(V, s), budget_elems) for s in _each(samples)])
                # a wide U (lm_head's vocabulary): the sample's whole Gram, over slices of ρ rows
                # (each row's sum needs only its own column of U and K)
                outs = []
                for s in _each(samples):
                    u, K = take(U, s), _gram(take(V, s))
                    outs.append(torch.cat([_gram_quadratic(K, u[..., lo : lo + rho]) for lo in range(0, R, rho)], dim=1))
                return torch.cat(outs)
            # Gram form, chunked over samples so [b, T, T] + [b, τ, R] stay within budget.
            chunk = max(1, budget_elems // per_sample)
            outs = []
            for lo in range(0, b, chunk):
                idx = sub_samples(samples, lo, lo + chunk)
                u, v = take(U, idx), take(V, idx)
                outs.append(_gram_quadratic(_gram(v), u))
            return torch.cat(outs)
        if budget_elems < R * C:
            step = max(1, budget_elems // max(1, C))
            rows = []
            for s in _each(samples):
                u, v = take(U, s), take(V, s)
                out = u.new_empty(1, R)
                for lo in range(0, R, step):
                    G = torch.bmm(u[..., lo : lo + step].transpose(1, 2), v)
                    out[:, lo : lo + step] = G.mul_(G).sum(dim=2)
                rows.append(out)
            return torch.cat(rows)
        chunk = max(1, budget_elems // max(1, R * C))
        outs = []
        for lo in range(0, b, chunk):
            idx = sub_samples(samples, lo, lo + chunk)
            G = torch.bmm(take(U, idx).transpose(1, 2), take(V, idx))
            outs.append(G.mul_(G).sum(dim=2))
        return torch.cat(outs)

    def total(self):
        U = self.U.reshape(-1, self.U.shape[-1])
        V = self.V.reshape(-1, self.V.shape[-1])
        return U.t() @ V

    def total_times(self, probe):
        """``Uᵀ (V P) = ((Pᵀ Vᵀ) U)ᵀ``: ~T·(R + C)·k per sample instead of the T·R·C of the
        gradient itself. Formed as ``[k, ·]`` products (returned as a transposed view): a
        product with k = 8 columns whose other factor is read across its rows (``Uᵀ W``) runs
        several times slower on a CPU than the same product read along them."""
        U = self.U.reshape(-1, self.U.shape[-1])
        V = self.V.reshape(-1, self.V.shape[-1])
        return ((probe.to(V.dtype).t() @ V.t()) @ U).t()

    def rounding_sq(self):
        # Σ_t ‖u_t ⊗ v_t‖² = Σ_t ‖u_t‖² ‖v_t‖²
        return (torch.linalg.vector_norm(self.U, dim=-1).square() * torch.linalg.vector_norm(self.V, dim=-1).square()).sum()


class EmbeddingPart(Part):
    """``G_i[r] = sum_{t: ids_it = r} g_it`` for an embedding table [num_rows, dim]."""

    def __init__(self, param: torch.Tensor, ids: torch.Tensor, grads: torch.Tensor, scale: torch.Tensor | None, padding_idx: int | None):
        self.param = param
        B = ids.shape[0]
        self.ids = ids.reshape(B, -1)
        self.grads = grads.reshape(B, self.ids.shape[1], -1)
        if padding_idx is not None:
            keep = (self.ids != padding_idx).unsqueeze(-1)
            self.grads = self.grads * keep
        self.scale = scale
        self.num_rows = param.shape[0]

    def _keys(self, samples):
        ids = take(self.ids, samples)
        b = ids.shape[0]
        offsets = torch.arange(b, device=ids.device).unsqueeze(1) * self.num_rows
        return (ids + offsets).reshape(-1), b

    def materialize(self, samples):
        keys, b = self._keys(samples)
        g = _scale_rows(self.grads, self.scale, samples).reshape(keys.shape[0], -1)
        out = g.new_zeros(b * self.num_rows, g.shape[1])
        out.index_add_(0, keys, g)
        return out.view(b, *self.param.shape)

    def materialize_rows(self, samples, lo, hi):
        # only the tokens whose id is in [lo, hi): a [b, hi - lo, dim] block
        ids = take(self.ids, samples)
        b = ids.shape[0]
        hit = (ids >= lo) & (ids < hi)
        sample, token = hit.nonzero(as_tuple=True)
        keys = sample * (hi - lo) + (ids[sample, token] - lo)
        g = take(self.grads, samples)[sample, token]
        if self.scale is not None:
            g = g * take(self.scale, samples).to(g.dtype)[sample].unsqueeze(1)
        out = g.new_zeros(b * (hi - lo), g.shape[-1])
        out.index_add_(0, keys, g)
        return out.view(b, hi - lo, *self.param.shape[1:])

    def samples_per_chunk(self, budget_elems: int) -> int:
        """Samples whose token gradients (``[T, dim]`` each) fit in ``budget_elems`` (at least one)."""
        return max(1, budget_elems // max(1, self.grads.shape[1] * self.grads.shape[2]))

    def per_index_sq(self, axis, samples, budget_elems):
        if isinstance(axis, (tuple, list)) and len(axis) == 1:
            (axis,) = axis
        if axis != 0:
            return super().per_index_sq(axis, samples, budget_elems)
        step = self.samples_per_chunk(budget_elems)
        if num_samples(samples) > step:  # the segment sums of a chunk of samples at a time
            return torch.cat([self.per_index_sq(0, sub_samples(samples, lo, lo + step), budget_elems)
                              for lo in range(0, num_samples(samples), step)])
        keys, b = self._keys(samples)
        g = take(self.grads, samples).reshape(keys.shape[0], -1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(uniq.shape[0], g.shape[1]).index_add_(0, inverse, g)
        out = g.new_zeros(b * self.num_rows)
        out[uniq] = (sums * sums).sum(dim=1)
        return _times_sq(out.view(b, self.num_rows), self.scale, samples)

    def sparse_moments(self, samples) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Moments over the selected samples of ``C_i = G_i ⊙ G_i`` without dense ``[b, V, d]``.

        Sample i touches only the rows of its tokens; elsewhere ``C_i = 0``. With ``c_r`` the
        number of samples touching row r: ``mean_r = (1/b) sum_{i touches r} C_i[r]`` and
        ``M2_r = sum_{i touches r} (C_i[r] - mean_r)² + (b - c_r) mean_r²`` (exact).
        """
        keys, b = self._keys(samples)
        g = _scale_rows(self.grads, self.scale, samples).reshape(keys.shape[0], -1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(uniq.shape[0], g.shape[1]).index_add_(0, inverse, g)
        c = sums.mul_(sums)
        rows = uniq % self.num_rows
        mean = g.new_zeros(self.param.shape).index_add_(0, rows, c).div_(b)
        dev = c.sub_(mean.index_select(0, rows))
        m2 = g.new_zeros(self.param.shape).index_add_(0, rows, dev.mul_(dev))
        absent = (b - torch.bincount(rows, minlength=self.num_rows)).to(mean.dtype).unsqueeze(1)
        m2.addcmul_(absent, mean * mean)
        return b, mean, m2

    def total(self):
        g = self.grads.reshape(-1, self.grads.shape[-1])
        return g.new_zeros(self.param.shape).index_add_(0, self.ids.reshape(-1), g)

    def total_times(self, probe):
        g = self.grads.reshape(-1, self.grads.shape[-1]) @ probe.to(self.grads.dtype)
        return g.new_zeros(self.num_rows, g.shape[1]).index_add_(0, self.ids.reshape(-1), g)

    def rounding_sq(self):
        return torch.linalg.vector_norm(self.grads).square()


def tied_rows_per_index_sq(parts: list[Part], samples, budget_elems: int) -> torch.Tensor | None:
    """Per-row squared sums ``r_i[v] = ‖Σ_parts G_i[v]‖²`` ``[b, rows]`` of a table shared by one
    :class:`OuterProductPart` (a tied lm_head) and :class:`EmbeddingPart` s (the input embedding),
    without forming the table's per-sample gradients; None when the parts are not of that kind.

    Sample i's embedding gradient is zero outside the rows ``S_i`` of its token ids, so
    ``r_i[v] = ‖G^lm_i[v]‖²`` (the Gram form of :meth:`OuterProductPart.per_index_sq`) for
    ``v ∉ S_i``, and for the ``|S_i| <= T`` rows of ``S_i`` the rows themselves are formed,
    ``G_i[S_i] = s_i U_i[:, S_i]ᵀ V_i + E_i[S_i]`` (``T |S_i| C`` products), and squared: exact,
    where the materialised sum costs ``T · rows · C`` per sample."""
    lm = [p for p in parts if not isinstance(p, EmbeddingPart)]
    emb = [p for p in parts if isinstance(p, EmbeddingPart)]
    if len(lm) != 1 or not emb or type(lm[0]) is not OuterProductPart or lm[0].param.dim() != 2:
        return None
    (lm,) = lm
    out = lm.per_index_sq(0, samples, budget_elems)
    for k, one in enumerate(_each(samples)):
        rows = torch.unique(torch.cat([take(p.ids, one).reshape(-1) for p in emb]))
        g = _index_rows_outer(lm, one, rows)
        for p in emb:
            g += _index_rows_embedding(p, one, rows)
        out[k, rows] = g.mul_(g).sum(dim=1)
    return out


def _index_rows_outer(part: OuterProductPart, one: slice, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of sample ``one``'s gradient ``s_i U_iᵀ V_i``: ``[len(rows), C]``."""
    U = take(part.U, one)[0].index_select(1, rows)
    G = U.t() @ take(part.V, one)[0]
    return G if part.scale is None else G.mul_(take(part.scale, one).to(G.dtype))


def _index_rows_embedding(part: EmbeddingPart, one: slice, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted, holding every id of the sample) of sample ``one``'s gradient
    ``G_i[v] = s_i Σ_{t: x_t = v} g_t``: ``[len(rows), dim]``."""
    ids = take(part.ids, one)[0]
    g = take(part.grads, one)[0]
    G = g.new_zeros(rows.shape[0], g.shape[-1]).index_add_(0, torch.searchsorted(rows, ids), g)
    return G if part.scale is None else G.mul_(take(part.scale, one).to(G.dtype))


class GradRule:
    """Turns a :class:`ModuleCall` into one :class:`Part` per trainable direct parameter.

    Implementations must be exact: ``sum_i part.materialize(i)`` equals the batch gradient,
    and row i depends on sample i only. Raise :class:`UnsupportedError` when a call cannot be
    handled exactly; the engine then falls back to a per-sample loop, loudly.
    """

    def parts(self, call: ModuleCall) -> dict[str, Part]:  # local param name -> Part
        raise NotImplementedError

    def applies_to(self, module_type: type, registered: type) -> bool:
        """Whether this rule, registered for ``registered``, is exact for a module of
        ``module_type`` (a subclass found through the MRO). Default: only when the subclass
        keeps the registered class's ``forward``; a rule that knows other forwards says so here.
        """
        return module_type.forward is registered.forward

    def tap(self, module: nn.Module):
        """An optional probe of what a forward of ``module`` computes inside (None: none, the
        default). A probe has ``start()``, run before each recorded forward of the module, and
        ``stop() -> dict``, run after it (and when the capture detaches; a no-op when not
        started), whose items join the call's ``ModuleCall.extra`` for :meth:`parts`. An item
        ``"inner"`` (a tensor of the forward's graph, inside the module) makes the capture hold
        the call until the backward has formed that tensor's gradient (``extra["inner_grad"]``),
        or until the backward ends when it never does. It must leave the module as it found it and
        its results must not change a number: a rule uses them only to skip recomputing what the
        module's own forward and backward already formed."""
        return None


def _trainable(module: nn.Module, call: ModuleCall | None = None) -> dict[str, torch.Tensor]:
    """The module's direct trainable parameters; with ``call``, as that forward used them (see
    ``ModuleCall.extra["params"]``: FSDP2 registers other tensors between passes)."""
    params = call.extra.get("params") if call is not None else None
    items = params.items() if params is not None else module.named_parameters(recurse=False)
    return {n: p for n, p in items if p.requires_grad}


def _values(module: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
    """The values of parameter ``name`` that the forward used (``p``, detached). Under FSDP2 the
    module's unit may have been resharded before this backward hook runs (the unsharded storage is
    freed): then the values are gathered from the sharded parameter registered now (a collective;
    every rank runs the same hooks in the same order)."""
    if p.numel() and p.untyped_storage().size() == 0:
        now = module._parameters.get(name)
        if now is None or not hasattr(now, "full_tensor"):
            raise UnsupportedError(f"{type(module).__name__}.{name}: its values were freed before the backward reached it")
        return now.full_tensor().detach().to(p.dtype)
    return p.detach()


def _flat_tokens(call: ModuleCall, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[B, tokens, features]`` in the compute dtype ([B, ...] or token-flattened)."""
    x = call.per_sample(x)
    return x.reshape(call.batch_size, -1, x.shape[-1]).to(call.compute_dtype)


class AffineRule(GradRule):
    """A layer ``y = x W^T + b`` (or ``x W + b``): per-sample weight gradients are sums of outer
    products of per-token factors, the bias gradient is ``sum_t grad_output``."""

    input_name = "input"

    def factors(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with ``G_i = U_i^T V_i`` in the weight's own layout."""
        raise NotImplementedError

    def parts(self, call):
        params = _trainable(call.module)
        a = _flat_tokens(call, call.input(self.input_name))
        g = _flat_tokens(call, call.grad_output)
        out = {}
        if "weight" in params:
            out["weight"] = OuterProductPart(params["weight"], *self.factors(a, g), call.scale)
        if "bias" in params:
            out["bias"] = DensePart(params["bias"], g.sum(1), call.scale, terms=g)
        return out


class LinearRule(AffineRule):
    """nn.Linear, weight [out, in]: U = grad_output (rows = out), V = input."""

    def factors(self, a, g):
        return g, a


class Conv1DRule(AffineRule):
    """HF Conv1D (y = x W + b, W [in, out]): U = input (rows = in), V = grad_output."""

    input_name = "x"

    def factors(self, a, g):
        return a, g


class ConvWeightPart(OuterProductPart):
    """The weight ``[O, I, *k]`` of an ungrouped convolution: ``G_i = U_iᵀ V_i`` reshaped to the
    weight's shape, with ``U_i`` [L, O] the output gradient at the ``L`` output positions and
    ``V_i`` [L, I·prod(k)] the input patch each position reads (im2col, ``F.unfold``): the
    per-sample form of ``dW = Σ_l δ_l ⊗ patch_l``. Groups over output channels (dim 0) take the
    outer-product part's Gram / materialisation paths; other axes materialise."""

    def materialize_rows(self, samples, lo, hi, out: torch.Tensor | None = None):
        flat = None if out is None else out.view(out.shape[0], out.shape[1], -1)
        G = super().materialize_rows(samples, lo, hi, out=flat)
        return G.view(G.shape[0], hi - lo, *self.param.shape[1:])

    def per_index_sq(self, axis, samples, budget_elems):
        axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
        if axes == (0,):
            return super().per_index_sq(0, samples, budget_elems)
        return Part.per_index_sq(self, axis, samples, budget_elems)

    def total(self):
        return super().total().view(self.param.shape)

    def total_times(self, probe):
        return self.total() @ probe.to(self.param.device)


class ConvRule(GradRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, any stride, dilation and groups), batched.

    With the input patches ``P_i`` = ``unfold(x_i)`` [I·prod(k), L] (im2col; Conv1d as a Conv2d of
    height 1) and the output gradient ``δ_i`` [O, L] at the ``L`` output positions:

    - weight, ``groups = 1``: ``G_i = δ_i P_iᵀ`` (:class:`ConvWeightPart`, never formed unless asked);
    - weight, ``groups = g``: ``G_i[o] = δ_i[o] P_i[group(o)]ᵀ`` per group (depthwise included),
      materialised per sample (``[B, *weight.shape]``);
    - bias: ``b_i = Σ_l δ_i[:, l]``.

    A weight computed by a parametrisation (weight norm) is read from the module; its own
    parameters are not the module's (the engine's vector-Jacobian path covers them). Other
    padding modes and string paddings (``"same"``) go to the generic rule.
    """

    def parts(self, call):
        m = call.module
        params = _trainable(m)
        if not params:
            return {}
        x = call.input()
        nd = 2 if isinstance(m, nn.Conv2d) else 1
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or x.dim() != nd + 2 or call.batch_axis_kind(x) != "batch":
            return GENERIC_RULE.parts(call)
        dt = call.compute_dtype
        x = x.to(dt)
        g = call.grad_output.to(dt)
        B, O = g.shape[0], g.shape[1]
        if nd == 1:
            x, size = x.unsqueeze(2), (1, *m.kernel_size)
            conv = dict(dilation=(1, *m.dilation), padding=(0, *m.padding), stride=(1, *m.stride))
        else:
            size, conv = m.kernel_size, dict(dilation=m.dilation, padding=m.padding, stride=m.stride)
        patches = torch.nn.functional.unfold(x, size, **conv)  # [B, I·K, L]
        U = g.reshape(B, O, -1).transpose(1, 2)  # [B, L, O]
        out = {}
        if "weight" in params:
            w = params["weight"]
            if m.groups == 1:
                out["weight"] = ConvWeightPart(w, U, patches.transpose(1, 2), call.scale)
            else:
                G, L = m.groups, U.shape[1]
                per = torch.einsum("blgo,bgcl->bgoc", U.reshape(B, L, G, O // G), patches.reshape(B, G, -1, L))
                out["weight"] = DensePart(w, per.reshape(B, *w.shape), call.scale)
        if "bias" in params:
            out["bias"] = DensePart(params["bias"], U.sum(1), call.scale, terms=U)
        return out


class EmbeddingRule(GradRule):
    """nn.Embedding: per-sample segment sums of output gradients per token id.

    Also Gemma's ``...TextScaledWordEmbedding`` subclasses, whose forward is exactly
    ``return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)``: the rows'
    gradient is then ``embed_scale * grad_output`` (the forward is compared by its source, so a
    subclass doing anything else gets the generic rule).
    """

    SCALED_FORWARD = "return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)"

    def applies_to(self, module_type: type, registered: type) -> bool:
        return module_type.forward is registered.forward or forward_body(module_type) == self.SCALED_FORWARD

    def parts(self, call):
        m = call.module
        params = _trainable(m)
        if "weight" not in params:
            return {}
        if m.max_norm is not None or m.scale_grad_by_freq:
            raise UnsupportedError("nn.Embedding with max_norm or scale_grad_by_freq")
        ids = call.per_sample(call.input())
        B = call.batch_size
        g = call.per_sample(call.grad_output).reshape(B, -1, m.embedding_dim).to(call.compute_dtype)
        if type(m).forward is not nn.Embedding.forward:  # the scaled subclass (see applies_to)
            g = g * m.embed_scale.to(m.weight.dtype).to(g.dtype)
        return {"weight": EmbeddingPart(params["weight"], ids, g, call.scale, m.padding_idx)}


_BODIES: dict[type, str | None] = {}


class RMSNormRule(GradRule):
    """LLaMA-style RMSNorm ``y = w ⊙ x̂``, ``x̂ = (x / sqrt(mean(x²) + ε))`` computed in float32
    and cast back to the input dtype (HF's forward): the per-sample weight gradient is
    ``G_i = Σ_t δ_it ⊙ x̂_it`` over the sample's positions (and heads, for a per-head norm such as
    Qwen3's ``q_norm``). Registered for the transformers classes whose forward is that one
    (:func:`rmsnorm_classes`)."""

    def parts(self, call):
        params = _trainable(call.module)
        if "weight" not in params:
            return {}
        x = call.input("hidden_states")
        eps = call.module.variance_epsilon
        g = _flat_tokens(call, call.grad_output)
        if x.dtype == torch.float32 and g.dtype == torch.float32:
            # x̂ = x·r with r = 1/sqrt(mean(x²) + ε) per position: Σ_t δ_t ⊙ x_t · r_t, without
            # forming x̂ (two passes over the activations instead of five). Only in float32, the
            # precision HF computes x̂ in: other dtypes round x̂ as the forward does, below.
            xt = _flat_tokens(call, x)
            r = torch.linalg.vector_norm(xt, dim=-1, keepdim=True).square_().div_(xt.shape[-1]).add_(eps).rsqrt_()
            terms = (g * xt).mul_(r)
            return {"weight": DensePart(params["weight"], terms.sum(1), call.scale, terms=terms)}
        xf = x.to(torch.float32)
        xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        a = _flat_tokens(call, xhat)
        terms = g * a
        return {"weight": DensePart(params["weight"], terms.sum(1), call.scale, terms=terms)}


#: (module, class) of transformers RMSNorms the rule knows, when their forward is LLaMA's
_RMSNORMS = (
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("qwen3", "Qwen3RMSNorm"),
    ("mixtral", "MixtralRMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3_moe", "Qwen3MoeRMSNorm"),
)


def rmsnorm_classes() -> list[type]:
    """The installed transformers RMSNorm classes whose forward is exactly LlamaRMSNorm's."""
    import importlib

    out: list[type] = []
    ref = None
    for mod, name in _RMSNORMS:
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), name)
        except (ImportError, AttributeError):
            continue
        body = forward_body(cls)
        if ref is None:
            ref = body
        if body is not None and body == ref:
            out.append(cls)
    return out


def forward_body(cls: type) -> str | None:
    """The statements of ``cls.forward`` (docstring dropped), unparsed by :mod:`ast`, cached.

    Lets a rule recognise a subclass whose forward it knows by what the forward does."""
    if cls not in _BODIES:
        import ast
        import inspect
        import textwrap

        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
            body = tree.body[0].body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            _BODIES[cls] = "\n".join(ast.unparse(stmt) for stmt in body)
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
            _BODIES[cls] = None
    return _BODIES[cls]


class FuncRule(GradRule):
    """Any module: per-sample gradients of its direct parameters with torch.func.

    ``g_i = vjp_θ(module(θ, x_i))(grad_output_i)``, vectorised with ``vmap`` over the batch;
    a per-sample loop of the same vjp when the module cannot be vmapped (logged once). Inputs
    and outputs may be batched ([B, ...]: sample i sees ``x[i:i+1]``) or token-flattened
    ([B*T, ...]: sample i sees its T rows); other inputs are passed whole (shared). A module
    with several outputs (a tuple, a ModelOutput) is pulled back through every output that
    received a gradient.
    """

    _loop_logged: ClassVar[set] = set()

    def parts(self, call):
        params = _trainable(call.module, call)
        if not params:
            return {}
        per_sample = self._per_sample(call, params, call.batch_size)
        return {n: DensePart(p, per_sample[n].to(call.compute_dtype), call.scale) for n, p in params.items()}

    def _per_sample(self, call, params, B):
        from torch.func import functional_call, vjp, vmap
        from torch.utils._pytree import tree_flatten, tree_unflatten

        module = call.module
        grads = call.grad_output if isinstance(call.grad_output, (tuple, list)) else [call.grad_output]
        live = [k for k, g in enumerate(grads) if isinstance(g, torch.Tensor)]
        if not live:
            raise UnsupportedError(f"{type(module).__name__}: no output received a gradient")
        out_kinds = [call.batch_axis_kind(grads[k]) for k in live]
        if None in out_kinds:
            raise UnsupportedError(f"{type(module).__name__} output is not batched over the {B} samples")
        # tensors nested in the inputs (a (cos, sin) tuple of per-sample rotary embeddings) are
        # sliced per sample like top-level ones
        flat, in_spec = tree_flatten((tuple(call.args), dict(call.kwargs)))
        kinds = [call.batch_axis_kind(x) for x in flat]
        detached = {n: _values(module, n, p) for n, p in params.items()}
        multi = isinstance(call.grad_output, (tuple, list))

        def one(x, kind):  # the sample's slice as the module sees it alone
            return x.unsqueeze(0) if kind == "batch" else x

        def single(batched_vals, g_vals):
            vals = list(flat)
            it = iter(batched_vals)
            for k, kind in enumerate(kinds):
                if kind is not None:
                    vals[k] = one(next(it), kind)
            args, kwargs = tree_unflatten(vals, in_spec)

            def f(p):
                out = functional_call(module, p, tuple(args), kwargs)
                if not multi:
                    return out
                leaves = tree_flatten(out)[0]
                return tuple(leaves[k] for k in live)

            _, pullback = vjp(f, detached)
            cot = tuple(one(g, kind) for g, kind in zip(g_vals, out_kinds))
            return pullback(cot if multi else cot[0])[0]

        bvals = [call.per_sample(x.detach()) for x, kind in zip(flat, kinds) if kind is not None]
        gvals = [call.per_sample(grads[k]) for k in live]
        try:
            return vmap(single)(bvals, gvals)
        except Exception as e:  # vmap cannot handle every custom forward: loop, still exact
            key = type(module).__name__
            if key not in FuncRule._loop_logged:
                FuncRule._loop_logged.add(key)
                log.warning("per-sample gradients of %s: vmap failed (%s); using a per-sample loop", key, e)
            rows = [single([v[i] for v in bvals], [g[i] for g in gvals]) for i in range(B)]
            return {n: torch.stack([r[n] for r in rows]) for n in params}


def conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


@hookimpl
def hf_fisher_register_grad_rules(register):
    register(nn.Linear, LinearRule())
    register(nn.Embedding, EmbeddingRule())
    conv = ConvRule()
    register(nn.Conv1d, conv)
    register(nn.Conv2d, conv)
    rms = RMSNormRule()
    for cls in rmsnorm_classes():
        register(cls, rms)
    conv1d = conv1d_type()
    if conv1d is not None:
        register(conv1d, Conv1DRule())


GENERIC_RULE = FuncRule()


_OVERRIDE_LOGGED: set = set()


def rule_for(module: nn.Module, rules: dict[type, GradRule]) -> GradRule:
    """The most specific registered rule in the module's MRO that applies to the module's own
    ``forward`` (:meth:`GradRule.applies_to`), else the generic torch.func rule."""
    mtype = type(module)
    for cls in mtype.__mro__:
        if cls in rules:
            rule = rules[cls]
            if rule.applies_to(mtype, cls):
                return rule
            if mtype not in _OVERRIDE_LOGGED:
                _OVERRIDE_LOGGED.add(mtype)
                log.info("%s overrides the forward of %s: using the generic torch.func rule", mtype.__name__, cls.__name__)
            return GENERIC_RULE
    return GENERIC_RULE


__all__ = [
    "AffineRule",
    "Conv1DRule",
    "ConvRule",
    "ConvWeightPart",
    "DensePart",
    "EmbeddingPart",
    "EmbeddingRule",
    "FuncRule",
    "GradRule",
    "LinearRule",
    "ModuleCall",
    "OuterProductPart",
    "Part",
    "chunked_per_index_sq",
    "gradient_rows",
    "num_samples",
    "rows_per_block",
    "rule_for",
    "sub_samples",
    "take",
    "tied_rows_per_index_sq",
]
