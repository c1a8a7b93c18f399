"""Per-sample gradient rule for transformers' fused Mixture-of-Experts modules.

transformers 5 keeps a layer's experts as two 3-D parameters (Mixtral, Qwen2-MoE, Qwen3-MoE,
GPT-OSS, ... ``@use_experts_implementation`` classes; GPT-OSS's transposed, biased form: see
:class:`FusedExpertsRule`) and calls them on token-flattened hidden states::

    experts(x [N, H], top_k_index [N, k], top_k_weights [N, k]) -> y [N, H],   N = B * T
    y_t = sum_j w_tj * down[e_tj] @ act_gate(gate_up[e_tj] @ x_t)

with ``gate_up_proj`` [E, 2I, H] (gate rows, then up rows), ``down_proj`` [E, H, I] and
``act_gate(u) = act(u[:I]) * u[I:]``. With ``δ_t = dL/dy_t`` (the captured output gradient),
for each expert e and its routed tokens t (those with ``e_tj = e``, weight ``w_tj``)::

    dL/d down[e]    = sum_t (w_tj δ_t) ⊗ h_t,          h_t = act_gate(gate_up[e] @ x_t)
    dL/d gate_up[e] = sum_t  d_t ⊗ x_t,                d_t = J_act_gate(u_t)^T (down[e]^T w_tj δ_t)

so sample i's gradient of each expert is a sum of outer products over *its* tokens routed to
that expert: one :class:`~hf_fisher.engine.rules.OuterProductPart` per expert (the Gram form
or materialisation, whichever is cheaper, as for nn.Linear). The routing weights' own gradient
flows on to the router through autograd (the router is an ordinary module with a tuple output,
handled by the generic rule). ``act_gate``'s Jacobian-vector product comes from autograd on the
module's own ``_apply_gate``, so any activation is exact.

Nothing of this is recomputed where the model's own passes formed it: the rule's
:meth:`~FusedExpertsRule.tap` records ``u_t = gate_up[e] @ x_t`` and ``h_t`` at the module's
``_apply_gate`` during the forward, and the capture hands the call over once the backward has
formed ``d_t = dL/du_t`` (the call's ``inner`` gradient). The grouped_mm and batched_mm kernels'
row orders are known (sorted expert ids / flattened pairs): the rows are mapped to the rule's
order and each is checked through a random direction (a mismatch is logged and everything
recomputed).
Eager experts (which never call ``_apply_gate``), another dtype in the forward (bf16), expert
parallelism, or a backward that stops above ``u`` recompute what is missing, as before.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from ..hookspecs import hookimpl
from .rules import (
    DensePart,
    GradRule,
    ModuleCall,
    OuterProductPart,
    Part,
    _each,
    _times,
    _times_sq,
    _trainable,
    num_samples,
)

log = logging.getLogger(__name__)

#: (module path, class name) of the fused experts modules this rule knows
EXPERTS_CLASSES = (
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
    ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
)


class ExpertsPart(Part):
    """Per-sample gradients of a 3-D experts parameter ``[E, R, C]``: one outer-product part
    per expert, over the tokens routed to it (zero rows elsewhere).

    ``factors[e] = (tokens, U, V)``: the routed token indices (into the B*T flattened tokens)
    and their factors ``U`` [n_e, R], ``V`` [n_e, C]; ``G_i[e] = sum_{t of sample i} U_t ⊗ V_t``.
    The tokens are in increasing order, so sample i's ``n_ie`` tokens are one run of rows: on a
    CPU each sample's product is formed over its own run (:meth:`_spans`); elsewhere over the
    factors compacted to ``[B, max_i n_ie, ·]`` (:meth:`_expert`, one batched product).
    Group axes: 0 (expert), 1 (rows), 2 (columns), or (0, 1) / (0, 2) flattened.
    """

    writes_out = True
    #: param mode forms the gradients one expert at a time (a contiguous [b, R, C] product each)
    row_block = 1

    def __init__(self, param, factors, batch_size: int, seq_len: int, scale):
        self.param = param
        self.factors = factors
        self.B, self.T = batch_size, seq_len
        self.scale = scale
        self._span_cache: dict[int, list[tuple[int, int]]] = {}

    def out_like(self):
        return torch.empty(0, dtype=self._dtype(), device=self.param.device)

    def _expert(self, e: int) -> OuterProductPart | None:
        """Expert ``e``'s factors over its routed tokens only, compacted per sample: ``[B, T_e, ·]``
        with ``T_e = max_i n_ie`` (the most tokens one sample routes to it), sample i's ``n_ie``
        tokens first (in order), zero rows after (they add nothing to ``G_i``). About ``k/E`` of the
        tokens, so about ``k/E`` of the work of factors padded to all ``T`` positions."""
        tokens, U, V = self.factors[e]
        if tokens.numel() == 0:
            return None
        sample = torch.div(tokens, self.T, rounding_mode="floor")
        counts = torch.bincount(sample, minlength=self.B)
        width = int(counts.max())
        # rank of each token among its sample's (the tokens are in increasing order, so a sample's are contiguous)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(tokens.numel(), device=tokens.device) - starts[sample]
        slot = sample * width + rank
        Uc = U.new_zeros(self.B * width, U.shape[1]).index_copy_(0, slot, U)
        Vc = V.new_zeros(self.B * width, V.shape[1]).index_copy_(0, slot, V)
        return OuterProductPart(self.param[e], Uc.view(self.B, width, -1), Vc.view(self.B, width, -1), self.scale)

    def _spans(self, e: int) -> list[tuple[int, int]]:
        """``(start, count)`` of each sample's run in expert ``e``'s factors (the routed tokens are
        in increasing order, so a sample's ``n_ie`` tokens are one contiguous run of rows)."""
        spans = self._span_cache.get(e)
        if spans is None:
            tokens = self.factors[e][0]
            counts = torch.bincount(torch.div(tokens, self.T, rounding_mode="floor"), minlength=self.B)
            starts = counts.cumsum(0) - counts
            spans = self._span_cache[e] = list(zip(starts.tolist(), counts.tolist()))
        return spans

    def _by_sample(self) -> bool:
        """Whether each sample's product is formed over its own run of rows (exactly its ``n_ie``
        tokens: no padding, no copies) rather than one batched product over the compacted
        ``[B, T_e, ·]`` factors of :meth:`_expert`: on a CPU, where a product per sample costs no
        kernel launch and the padding to ``T_e = max_i n_ie`` is about a quarter of the work."""
        return self.param.device.type == "cpu"

    def materialize(self, samples):
        return self.materialize_rows(samples, 0, self.param.shape[0])

    def materialize_rows(self, samples, lo, hi, out=None):
        """Experts ``lo:hi`` (dim 0) of the per-sample gradients, ``[b, hi - lo, R, C]`` (into
        ``out`` when given; a single expert's product is written there directly). On a CPU,
        sample i's ``G_i[e] = s_i U_{i,e}ᵀ V_{i,e}`` over its own rows of expert e's factors."""
        _, R, C = self.param.shape
        b = num_samples(samples)
        if out is None:
            out = torch.empty((b, hi - lo, R, C), dtype=self._dtype(), device=self.param.device)
        if self._by_sample():
            for e in range(lo, hi):
                _, U, V = self.factors[e]
                spans = self._spans(e) if U.numel() else None
                for j, one in enumerate(_each(samples)):
                    start, n = spans[one.start] if spans else (0, 0)
                    if n:
                        torch.mm(U[start : start + n].t(), V[start : start + n], out=out[j, e - lo])
                    else:
                        out[j, e - lo].zero_()
            return _times(out, self.scale, samples)
        for e in range(lo, hi):
            part = self._expert(e)
            if part is None:
                out[:, e - lo].zero_()
            elif hi - lo == 1:
                part.materialize_rows(samples, 0, R, out=out.view(b, R, C))
            else:
                out[:, e - lo] = part.materialize(samples)
        return out

    def _sample_sq(self, e: int, axis: int, samples, budget_elems: int) -> torch.Tensor | None:
        """``[b, R or C]``: ``Σ`` over the other axis of ``(U_{i,e}ᵀ V_{i,e})²`` (unscaled) per sample,
        each over its own run of rows: the Gram form ``Σ_t ((v vᵀ) u)_t ∘ u_t`` (``n_ie² (R + C)``
        products) or the materialised gradient (``n_ie R C``), whichever is cheaper, as
        :class:`~hf_fisher.engine.rules.OuterProductPart` chooses. None where one sample's
        temporaries would exceed ``budget_elems`` (the padded path then works in blocks)."""
        _, U, V = self.factors[e]
        U, V = (V, U) if axis == 1 else (U, V)
        R, C = U.shape[1], V.shape[1]
        spans = self._spans(e)
        n_max = max(n for _, n in spans)
        fits_product = budget_elems >= R * C
        if n_max * (n_max + R) > budget_elems and not fits_product:
            return None
        out = U.new_zeros(num_samples(samples), R)
        for j, one in enumerate(_each(samples)):
            start, n = spans[one.start]
            if not n:
                continue
            u, v = U[start : start + n], V[start : start + n]
            if n * (n + R) <= budget_elems and (n * (R + C) < R * C or not fits_product):
                torch.sum((v @ v.t() @ u).mul_(u), 0, out=out[j])
            else:
                G = u.t() @ v
                torch.sum(G.mul_(G), 1, out=out[j])
        return out

    def per_index_sq(self, axis, samples, budget_elems):
        axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
        E, R, C = self.param.shape
        b = num_samples(samples)
        inner = [a for a in axes if a != 0]
        if len(inner) > 1:
            return super().per_index_sq(axis, samples, budget_elems)
        size = (R if inner == [1] else C) if inner else 1
        per_expert = torch.zeros((b, E, size), dtype=self._dtype(), device=self.param.device)
        for e in range(E):
            sq = None
            if self._by_sample() and self.factors[e][0].numel():
                sq = self._sample_sq(e, inner[0] - 1 if inner else 0, samples, budget_elems)
                if sq is not None:
                    sq = _times_sq(sq, self.scale, samples)
            if sq is None:
                part = self._expert(e)
                if part is None:
                    continue
                sq = part.per_index_sq(inner[0] - 1 if inner else 0, samples, budget_elems)
            if inner:
                per_expert[:, e] = sq
            else:
                per_expert[:, e, 0] = sq.sum(1)
        if 0 in axes:
            return per_expert.reshape(b, -1)
        return per_expert.sum(1)

    def total(self):
        out = torch.zeros(self.param.shape, dtype=self._dtype(), device=self.param.device)
        for e, (tokens, U, V) in enumerate(self.factors):
            if tokens.numel():
                out[e] = U.t() @ V
        return out

    def total_times(self, probe):
        """``total() @ probe`` per expert as ``Uᵀ (V P) = ((Pᵀ Vᵀ) U)ᵀ`` (``[E, R, k]``): about
        ``n_e (R + C) k`` products per expert instead of the ``n_e R C`` of its batch gradient
        (the first batch's check, see :meth:`OuterProductPart.total_times`)."""
        E, R, _ = self.param.shape
        probe = probe.to(device=self.param.device)
        out = torch.zeros((E, R, probe.shape[1]), dtype=self._dtype(), device=self.param.device)
        for e, (tokens, U, V) in enumerate(self.factors):
            if tokens.numel():
                out[e] = ((probe.to(V.dtype).t() @ V.t()) @ U).t()
        return out

    def rounding_sq(self):
        return sum((torch.linalg.vector_norm(U, dim=-1).square() * torch.linalg.vector_norm(V, dim=-1).square()).sum() for _, U, V in self.factors)

    def _dtype(self):
        return next((U.dtype for _, U, _ in self.factors if U.numel()), torch.float32)


def _expert_bias_part(param, rows, batch_size: int, seq_len: int, scale) -> DensePart:
    """Per-sample gradients ``[B, E, C]`` of an experts bias ``[E, C]``: sample i's rows of expert
    e summed (``rows[e] = (tokens, D)``, ``D`` [n_e, C] the gradients at the bias's output)."""
    E, C = param.shape
    dtype = next((D.dtype for _, D in rows if D.numel()), torch.float32)
    out = torch.zeros((batch_size * E, C), dtype=dtype, device=param.device)
    for e, (tok, D) in enumerate(rows):
        if tok.numel():
            out.index_add_(0, (tok // seq_len) * E + e, D.to(dtype))
    terms = torch.cat([D.to(dtype) for _, D in rows]) if rows else out[:0]
    return DensePart(param, out.view(batch_size, E, C), scale, terms=terms)


class FusedExpertsRule(GradRule):
    """transformers' fused experts (see the module docstring): exact, batched, per expert.

    Also the transposed, biased form (GPT-OSS: ``gate_up_proj`` [E, H, 2I] applied as
    ``x @ W + b``, interleaved gate/up rows through the module's own ``_apply_gate``,
    ``down_proj`` [E, I, H] and its bias inside the routing weight:
    ``y_t = Σ_j w_tj (act_gate(x_t W_gu[e] + b_gu[e]) W_d[e] + b_d[e])``): the factors swap
    roles and each bias gets ``Σ_t`` of the gradient at its output per sample and expert.
    """

    def applies_to(self, module_type, registered):
        return module_type.forward is registered.forward

    def tap(self, module):
        """Records the input of the module's ``_apply_gate`` during a forward (see
        :class:`_GateTap`), so :meth:`parts` need not recompute the gate/up projection."""
        return _GateTap(module) if getattr(module, "has_gate", True) else None

    def parts(self, call: ModuleCall) -> dict[str, Part]:
        m = call.module
        params = _trainable(m)
        if not params:
            return {}
        if not getattr(m, "has_gate", True) or getattr(m, "has_post_expert_norm", False):
            raise UnsupportedError(f"{type(m).__name__}: only gated experts without a post-expert norm are handled")
        transposed = bool(getattr(m, "is_transposed", False))
        biased = bool(getattr(m, "has_bias", False))
        x = _arg(call, 0, "hidden_states")
        index = _arg(call, 1, "top_k_index")
        weights = _arg(call, 2, "top_k_weights")
        B, T, dt = call.batch_size, call.seq_len, call.compute_dtype
        for t in (x, index, weights, call.grad_output):
            if call.batch_axis_kind(t) != "tokens" and not (T == 1 and call.batch_axis_kind(t) == "batch"):
                raise UnsupportedError(f"{type(m).__name__}: expected token-flattened [B*T, ...] inputs")
        x = x.detach().to(dt)
        go = call.grad_output.to(dt)
        w = weights.detach().to(dt)
        W_gu = m.gate_up_proj.detach().to(dt)
        W_d = m.down_proj.detach().to(dt)
        b_gu = m.gate_up_proj_bias.detach().to(dt) if biased else None
        E = W_gu.shape[0]
        # every routed (token, slot) pair, grouped by expert (tokens in increasing order within
        # each, as the per-sample runs of ExpertsPart need), so the gate's vjp is one autograd
        # call over all of them (act_gate works row by row) and each expert's rows are a slice
        k = index.shape[-1]
        flat = index.reshape(-1)
        valid = ((flat >= 0) & (flat < E)).nonzero().flatten()
        pairs = valid[torch.sort(flat[valid], stable=True).indices]
        counts = torch.bincount(flat[pairs], minlength=E).tolist()
        tok = torch.div(pairs, k, rounding_mode="floor")
        x_r = x.index_select(0, tok)
        delta = go.index_select(0, tok).mul_(w.reshape(-1)[pairs].unsqueeze(1))  # w_tj δ_t
        bounds = [0]
        for n in counts:
            bounds.append(bounds[-1] + n)
        # the forward's own u = x W_gu[e]ᵀ (+ b) and h = act_gate(u), and the backward's own
        # d_u = dL/du, where the tap recorded them (rows mapped to this order); else recomputed
        rows = _recorded_rows(call, flat, pairs, x_r, W_gu, b_gu, transposed, dt)
        recorded = {k: call.extra.pop(k, None) for k in ("gate_inputs", "gate_outputs", "inner", "inner_grad")}
        d_u = recorded["inner_grad"]
        if rows is not None and d_u is not None and d_u.dtype == dt and d_u.shape == recorded["gate_inputs"][0].shape:
            d_u = d_u.index_select(0, rows)
            h = recorded["gate_outputs"][0].detach().index_select(0, rows)
        else:
            if rows is not None:
                u = recorded["gate_inputs"][0].detach().index_select(0, rows)
            else:
                u = x_r.new_empty(x_r.shape[0], W_gu.shape[2] if transposed else W_gu.shape[1])
                for e in range(E):
                    lo, hi = bounds[e], bounds[e + 1]
                    if hi > lo:
                        torch.mm(x_r[lo:hi], W_gu[e] if transposed else W_gu[e].t(), out=u[lo:hi])
                        if b_gu is not None:
                            u[lo:hi] += b_gu[e]
            dh = delta.new_empty(delta.shape[0], W_d.shape[1] if transposed else W_d.shape[2])
            for e in range(E):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    torch.mm(delta[lo:hi], W_d[e].t() if transposed else W_d[e], out=dh[lo:hi])
            with torch.enable_grad():
                u.requires_grad_(True)
                h = _apply_gate(m, u)
                (d_u,) = torch.autograd.grad(h, u, dh)
            h = h.detach()
        gu_factors, d_factors, gu_rows, d_rows = [], [], [], []
        for e in range(E):
            sl = slice(bounds[e], bounds[e + 1])
            t_e, x_e, du_e, h_e, dl_e = tok[sl], x_r[sl], d_u[sl], h[sl], delta[sl]
            gu_factors.append((t_e, x_e, du_e) if transposed else (t_e, du_e, x_e))
            d_factors.append((t_e, h_e, dl_e) if transposed else (t_e, dl_e, h_e))
            gu_rows.append((t_e, du_e))
            d_rows.append((t_e, dl_e))
        out = {}
        T1 = max(T, 1)
        if "gate_up_proj" in params:
            out["gate_up_proj"] = ExpertsPart(params["gate_up_proj"], gu_factors, B, T1, call.scale)
        if "down_proj" in params:
            out["down_proj"] = ExpertsPart(params["down_proj"], d_factors, B, T1, call.scale)
        if biased and "gate_up_proj_bias" in params:
            out["gate_up_proj_bias"] = _expert_bias_part(params["gate_up_proj_bias"], gu_rows, B, T1, call.scale)
        if biased and "down_proj_bias" in params:
            out["down_proj_bias"] = _expert_bias_part(params["down_proj_bias"], d_rows, B, T1, call.scale)
        return out


_MISSING = object()
#: experts implementations (``config._experts_implementation``) that call ``_apply_gate`` once per
#: forward on every (token, slot) pair, and the order of those rows: "grouped_mm" sorts the flattened
#: expert ids (``torch.sort``, not stable: the same call here gives the same order), "batched_mm"
#: keeps the flattened order
_GATE_ROW_ORDERS = ("grouped_mm", "batched_mm")
_WARNED: set = set()


class _GateTap:
    """Records ``u`` and ``h``, the input and output of an experts module's ``_apply_gate`` in one
    forward: the gate/up projection ``x_t W_gu[e]ᵀ (+ b)`` of every routed pair and its gated
    activation, as the forward computed them (tensors of the forward's graph; held, not copied),
    and hands ``u`` to the capture as the call's ``inner`` tensor, whose gradient ``d_u`` the
    backward then delivers with the call. Installed as an instance attribute for the forward only
    (:meth:`start` / :meth:`stop`), so the module's own ``_apply_gate`` still does the work."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.seen: list[torch.Tensor] | None = None
        self.saved = _MISSING

    def start(self) -> None:
        self.stop()
        m, seen = self.module, []
        self.saved = m.__dict__.get("_apply_gate", _MISSING)
        gate = m._apply_gate

        def recording_gate(u):
            h = gate(u)
            seen.append((u, h))
            return h

        m.__dict__["_apply_gate"] = recording_gate
        self.seen = seen

    def stop(self) -> dict:
        if self.seen is None:
            return {}
        if self.saved is _MISSING:
            self.module.__dict__.pop("_apply_gate", None)
        else:
            self.module.__dict__["_apply_gate"] = self.saved
        seen, self.seen, self.saved = self.seen, None, _MISSING
        out = {"gate_inputs": [u for u, _ in seen], "gate_outputs": [h for _, h in seen]}
        if len(seen) == 1:
            out["inner"] = seen[0][0]  # the capture hands its gradient to parts (see Capture)
        return out


def _recorded_rows(call: ModuleCall, flat, pairs, x_r, W_gu, b_gu, transposed: bool, dt) -> torch.Tensor | None:
    """Where the routed pairs ``pairs`` (in this order) sit among the rows the forward passed to
    ``_apply_gate`` (:class:`_GateTap`), or None where nothing was recorded, it was recorded in
    another dtype, or by an implementation whose row order is not known. Every row of the
    recorded ``u`` is checked first through a random direction (``u_t·r = x_t·(W_gu[e]ᵀ r)``): a
    mismatch is logged (WARNING) and gives None (the caller then recomputes every row)."""
    m = call.module
    seen = call.extra.get("gate_inputs")
    impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
    if not seen or len(seen) != 1 or impl not in _GATE_ROW_ORDERS or getattr(m, "_is_expert_parallel", False):
        return None
    u = seen[0].detach()
    width = W_gu.shape[2] if transposed else W_gu.shape[1]
    if u.dtype != dt or u.shape != (flat.numel(), width) or pairs.numel() == 0:
        return None
    if impl == "grouped_mm":
        perm = torch.sort(flat).indices  # the forward's row r is pair perm[r]
        row_of = torch.empty_like(perm)
        row_of[perm] = torch.arange(perm.numel(), device=perm.device)
        rows = row_of.index_select(0, pairs)
    else:
        rows = pairs
    # every row checked through one random direction r: u_t·r against x_t·(W_gu[e]ᵀ r) (+ b·r),
    # about S (H + 2I) products instead of the S H 2I of recomputing u; each row within its own
    # rounding scale |x_t| Σ_j |r_j| |W_gu[e]_j| (+ |b|·|r|)
    r = torch.randn(width, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device=u.device, dtype=dt)
    got = u.index_select(0, rows) @ r
    ref, scale = torch.empty_like(got), torch.linalg.vector_norm(x_r, dim=1)
    counts = torch.bincount(flat.index_select(0, pairs), minlength=W_gu.shape[0]).tolist()
    lo = 0
    for e, n in enumerate(counts):
        if n:
            W = W_gu[e] if transposed else W_gu[e].t()  # [H, 2I]
            ref[lo : lo + n] = x_r[lo : lo + n] @ (W @ r)
            bound = torch.linalg.vector_norm(W, dim=0) @ r.abs()
            scale[lo : lo + n] *= bound
            if b_gu is not None:
                ref[lo : lo + n] += b_gu[e] @ r
                scale[lo : lo + n] += b_gu[e].abs() @ r.abs()
        lo += n
    if not bool(((got - ref).abs() <= 1000 * torch.finfo(dt).eps * scale).all()):
        if type(m) not in _WARNED:
            _WARNED.add(type(m))
            log.warning("%s (%s experts): the recorded gate/up projection does not match its recomputation; "
                        "recomputing it", type(m).__name__, impl)
        return None
    return rows


def _arg(call: ModuleCall, position: int, name: str):
    if len(call.args) > position:
        return call.args[position]
    if name in call.kwargs:
        return call.kwargs[name]
    raise UnsupportedError(f"{type(call.module).__name__} called without {name}")


def _apply_gate(module: nn.Module, u: torch.Tensor) -> torch.Tensor:
    gate = getattr(module, "_apply_gate", None)
    if gate is not None:
        return gate(u)
    g, up = u.chunk(2, dim=-1)
    return module.act_fn(g) * up


def experts_types() -> list[type]:
    """The fused experts classes of the installed transformers (missing ones are skipped)."""
    import importlib

    out = []
    for mod, name in EXPERTS_CLASSES:
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        out.append(cls)
    return out


@hookimpl
def hf_fisher_register_grad_rules(register):
    rule = FusedExpertsRule()
    for cls in experts_types():
        register(cls, rule)


__all__ = ["ExpertsPart", "FusedExpertsRule", "experts_types"]
