"""A plain, independent implementation of Kwon et al. 2022's post-training structured pruning
("A Fast Post-Training Pruning Framework for Transformers"): mask Fisher, lowest units within
given per-layer counts, least-squares mask tuning layer by layer — written from the paper with
plain hooks on the model's modules, sharing no code with ``hf_fisher.consumers.prune``.

Masks. Every attention head ``h`` of layer ``l`` and every MLP channel ``c`` gets a scalar mask
``m_u`` multiplying its input columns ``J_u`` of the layer's output projection (attention
``o_proj`` / GPT-2 ``attn.c_proj``: the head's ``head_dim`` columns; MLP ``down_proj`` / GPT-2
``mlp.c_proj``: the channel's column). ``m = 1`` is the model; ``m_u = 0`` removes unit ``u``.

1. Mask Fisher: ``I_u = Σ_i (∂L_i/∂m_u)²`` at ``m = 1``, ``L_i`` the mean token loss of sequence
   ``i`` (one backward per sequence).
2. Selection: per layer, the ``counts[l] = (heads, channels)`` units of lowest ``I_u`` get
   ``m_u = 0`` (``balance_groups=True``: heads ``heads / n_groups`` per kv group).
3. Least-squares mask tuning, per layer in order, attention then MLP: with ``y_u(x) =
   W_{:,J_u} x_{J_u}`` (``W`` as ``[out, in]``), the kept masks ``s`` minimise

   - ``lsq="unpruned"``: ``Σ_t ‖Σ_{u∈K} s_u y_u(x_t) − Σ_u y_u(x_t)‖²`` with ``x_t`` the
     *unpruned* model's projection inputs (every layer fitted on the original model);
   - ``lsq="kwon"`` (the released code's ``get_mha_lstsq`` / ``get_ffn_lstsq``):
     ``Σ_t ‖r'_t + Σ_{u∈K} s_u y_u(x'_t) − (r_t + Σ_u y_u(x_t))‖²``, ``x'`` / ``r'`` the projection
     input and residual stream of the model pruned and tuned so far, ``x`` / ``r`` those of the
     unpruned model (the pruned layer reconstructs the unpruned layer's output).

Supports LLaMA-family (``model.model.layers[l].self_attn.o_proj``, ``.mlp.down_proj``,
``input_layernorm`` / ``post_attention_layernorm``) and GPT-2 (``transformer.h[l].attn.c_proj``,
``.mlp.c_proj``, ``ln_1`` / ``ln_2``). All statistics in float64.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Layer:
    attn_norm: nn.Module  # its input is the residual stream entering attention
    o_proj: nn.Module
    mlp_norm: nn.Module  # its input is the residual stream entering the MLP
    down: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    channels: int


def layers_of(model: nn.Module) -> list[Layer]:
    cfg = model.config
    if hasattr(model, "transformer"):  # GPT-2
        hd = cfg.n_embd // cfg.n_head
        return [Layer(b.ln_1, b.attn.c_proj, b.ln_2, b.mlp.c_proj, cfg.n_head, cfg.n_head, hd, b.mlp.c_fc.weight.shape[1])
                for b in model.transformer.h]
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return [Layer(b.input_layernorm, b.self_attn.o_proj, b.post_attention_layernorm, b.mlp.down_proj, heads, kv, hd,
                  b.mlp.down_proj.in_features) for b in model.model.layers]


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as ``[out, in]`` (nn.Linear as is, GPT-2 Conv1D transposed)."""
    w = module.weight.detach().double()
    return w if isinstance(module, nn.Linear) else w.T


class Masks:
    """Per layer ``head[l]`` ([heads]) and ``chan[l]`` ([channels]) mask values, applied by
    forward pre-hooks on the output projections while :meth:`applied` is active."""

    def __init__(self, layers: list[Layer], dtype=torch.float64, requires_grad=False):
        self.layers = layers
        self.head = [torch.ones(L.heads, dtype=dtype, requires_grad=requires_grad) for L in layers]
        self.chan = [torch.ones(L.channels, dtype=dtype, requires_grad=requires_grad) for L in layers]

    @contextlib.contextmanager
    def applied(self):
        handles = []
        for L, mh, mc in zip(self.layers, self.head, self.chan):
            def pre_o(mod, args, mh=mh, L=L):
                x = args[0]
                return (x * mh.to(x.dtype).repeat_interleave(L.head_dim),) + args[1:]

            def pre_d(mod, args, mc=mc):
                x = args[0]
                return (x * mc.to(x.dtype),) + args[1:]

            handles += [L.o_proj.register_forward_pre_hook(pre_o), L.down.register_forward_pre_hook(pre_d)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def mask_fisher(model: nn.Module, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``I_u = Σ_i (∂L_i/∂m_u)²`` for every head and channel (one backward per sequence)."""
    layers = layers_of(model)
    masks = Masks(layers, dtype=torch.float32, requires_grad=True)
    Ih = [torch.zeros(L.heads, dtype=torch.float64) for L in layers]
    Ic = [torch.zeros(L.channels, dtype=torch.float64) for L in layers]
    with masks.applied(), torch.enable_grad():
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                one = {k: v[i : i + 1] for k, v in b.items()}
                loss = model(**one).loss
                grads = torch.autograd.grad(loss, masks.head + masks.chan)
                for l in range(len(layers)):
                    Ih[l] += grads[l].double() ** 2
                    Ic[l] += grads[len(layers) + l].double() ** 2
    return Ih, Ic


def select(layers: list[Layer], Ih, Ic, counts: dict[int, tuple[int, int]], *, balance_groups: bool) -> Masks:
    """0/1 masks removing, per layer, the ``counts[l]`` lowest-Fisher heads and channels."""
    masks = Masks(layers)
    for l, (nh, nc) in counts.items():
        L = layers[l]
        if balance_groups and L.kv_heads < L.heads:  # GQA/MQA; multi-head attention: per layer
            g = L.heads // L.kv_heads
            per = nh // L.kv_heads
            assert per * L.kv_heads == nh, "balanced heads: the count must split evenly over the kv groups"
            for j in range(L.kv_heads):
                idx = torch.arange(j * g, (j + 1) * g)
                masks.head[l][idx[torch.argsort(Ih[l][idx], stable=True)[:per]]] = 0
        else:
            masks.head[l][torch.argsort(Ih[l], stable=True)[:nh]] = 0
        masks.chan[l][torch.argsort(Ic[l], stable=True)[:nc]] = 0
    return masks


def _capture(model, batches, module: nn.Module, norm: nn.Module, masks: Masks | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(projection inputs [tokens, in], residual stream [tokens, hidden]) over the batches, under
    ``masks`` (None: the unpruned model)."""
    xs, rs = [], []
    h1 = module.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().double().reshape(-1, a[0].shape[-1])))
    h2 = norm.register_forward_pre_hook(lambda m, a: rs.append(a[0].detach().double().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad(), (masks.applied() if masks is not None else contextlib.nullcontext()):
            for b in batches:
                model(**b)
    finally:
        h1.remove()
        h2.remove()
    # pre-hooks run in registration order: ours (registered first) sees the projection's input
    # before its own mask multiplies it; the masks of the layers below are in x already.
    return torch.cat(xs), torch.cat(rs)


def _unit_columns(L: Layer, which: str) -> list[torch.Tensor]:
    if which == "attn":
        return [torch.arange(h * L.head_dim, (h + 1) * L.head_dim) for h in range(L.heads)]
    return [torch.tensor([c]) for c in range(L.channels)]


def _solve(W, cols, kept, x_fit, x_target, residual_gap):
    """Kept masks minimising ``‖gap + Σ_K s_u W_{J_u} x_fit − W x_target‖²`` over the tokens:
    ``A s = b`` with ``A = Σ_t Y_Kᵀ Y_K``, ``b = Σ_t Y_Kᵀ (W x_target − gap)``, ``Y_u`` unit ``u``'s
    output. Units of one column (MLP channels): ``A_uv = (W_uᵀ W_v)(Σ_t x_u x_v)`` directly;
    wider units (heads): from the per-unit outputs, token-chunked."""
    target_all = x_target @ W.T
    if residual_gap is not None:
        target_all = target_all - residual_gap
    if all(len(cols[u]) == 1 for u in kept):
        idx = torch.tensor([int(cols[u][0]) for u in kept])
        Xk, Wk = x_fit[:, idx], W[:, idx]
        A = (Xk.T @ Xk) * (Wk.T @ Wk)
        b = ((target_all @ Wk) * Xk).sum(0)
    else:
        n = len(kept)
        A = torch.zeros(n, n, dtype=torch.float64)
        b = torch.zeros(n, dtype=torch.float64)
        for t0 in range(0, x_fit.shape[0], 512):
            xf = x_fit[t0 : t0 + 512]
            Y = torch.stack([xf[:, cols[u]] @ W[:, cols[u]].T for u in kept], dim=2)  # [t, out, n]
            A += torch.einsum("toa,tob->ab", Y, Y)
            b += torch.einsum("toa,to->a", Y, target_all[t0 : t0 + 512])
    return torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def tune(model, batches, masks: Masks, *, lsq: str) -> Masks:
    """Least-squares tuning of the kept mask values, layer by layer (module docstring)."""
    layers = masks.layers
    keep = Masks(layers)  # 0/1 pattern
    keep.head = [m.clone() for m in masks.head]
    keep.chan = [m.clone() for m in masks.chan]
    out = Masks(layers)
    out.head = [m.clone() for m in masks.head]
    out.chan = [m.clone() for m in masks.chan]
    for l, L in enumerate(layers):
        for which, module, norm, pattern, values in (("attn", L.o_proj, L.attn_norm, keep.head[l], out.head),
                                                      ("mlp", L.down, L.mlp_norm, keep.chan[l], out.chan)):
            kept = [int(u) for u in pattern.nonzero().flatten()]
            if len(kept) == len(pattern) or not kept:
                continue
            W = weight_out_in(module)
            x_t, r_t = _capture(model, batches, module, norm, None)
            if lsq == "unpruned":
                x_fit, gap = x_t, None
            elif lsq in ("kwon", "teacher"):
                # the pruned-so-far model; this sub-layer's own masks at 1 (its kept columns are what is fitted)
                cur = Masks(layers)
                cur.head = [m.clone() for m in out.head]
                cur.chan = [m.clone() for m in out.chan]
                (cur.head if which == "attn" else cur.chan)[l] = torch.ones_like(pattern)
                x_fit, r_s = _capture(model, batches, module, norm, cur)
                gap = r_s - r_t if lsq == "kwon" else None
            else:
                raise ValueError(lsq)
            s = _solve(W, _unit_columns(L, which), kept, x_fit, x_t, gap)
            v = torch.zeros_like(pattern)
            v[kept] = s
            values[l] = v
    return out


@torch.no_grad()
def loss_with(model, ids_batches, masks: Masks | None) -> float:
    """Mean token loss over batches of equal-length sequences (labels = inputs)."""
    total, n = 0.0, 0
    with masks.applied() if masks is not None else contextlib.nullcontext():
        for b in ids_batches:
            total += float(model(**b).loss) * b["input_ids"].shape[0]
            n += b["input_ids"].shape[0]
    return total / n


def kwon_prune(model, calib, counts: dict[int, tuple[int, int]], *, lsq: str = "unpruned", balance_groups: bool = True):
    """The whole procedure: ``(tuned masks, 0/1 masks, (head Fisher, channel Fisher))``."""
    Ih, Ic = mask_fisher(model, calib)
    layers = layers_of(model)
    masks = select(layers, Ih, Ic, counts, balance_groups=balance_groups)
    return tune(model, calib, masks, lsq=lsq), masks, (Ih, Ic)
