"""Structured Optimal Brain Surgeon under the KFAC quadratic: ``prune(..., score="kfac")``.

For one output projection (attention O, MLP down) with weight ``W`` (as ``[out, in]``), units
``u`` owning input columns ``J_u``, calibration inputs ``x'_t`` of the model as pruned so far,
``x_t`` those of the unpruned model on the same tokens, and the KFAC output factor ``G =
E[∂L/∂y ∂L/∂yᵀ]`` of the projection (the Fisher of its output), the loss increase of replacing
the unpruned output ``y_t = Σ_u W_{J_u} x_{t,J_u}`` by ``Σ_{u∈K} s_u W_{J_u} x'_{t,J_u}`` is, to
second order (KFAC: ``F ≈ G ⊗ A``),

    ΔL(K, s) ≈ ½ Σ_t δy_tᵀ G δy_t = ½ sᵀ H s − bᵀ s + const    over all units (s_u = 0 removed),
    H = Pᵀ (A ⊙ WᵀGW) P,   b = Pᵀ ((C ⊙ WᵀGW) 1),   A = Σ_t x'_t x'_tᵀ,   C = Σ_t x'_t x_tᵀ,

``P`` the column-to-unit indicator (in the first layer ``x' = x``: ``b = H 1``, ``ΔL = ½ (s −
1)ᵀ H (s − 1)``). The scales start at the optimum ``s = H⁻¹ b`` of all units; units are removed
greedily, each time the one whose removal — with every kept unit's scale re-optimised — raises
ΔL least: with ``H⁻¹`` over the kept units and the current optimal scales ``s``, removing ``k`` costs ``½ (s_k)² / [H⁻¹]_kk`` (the OBS formula, here on unit scales), after
which ``s ← s − s_k H⁻¹_{:,k} / H⁻¹_kk`` and ``H⁻¹`` is downdated (Schur complement). The final
``s`` of the kept units are folded into their columns (the Fisher-weighted counterpart of the
least-squares rescale, which is the case ``G = I``). Removal counts per kv group / layer are the
``scope="layer"`` counts.

Shrunk update. Only a fraction ``γ`` (``update``; ``prune(obs_update=γ)``) of the
reconstruction is folded in: the kept units' scales become ``1 + γ (s − 1)`` (``θ_kept + γ δ``
on the scales, ``δ = s − 1`` the OBS update; ``γ = 1`` the full OBS update, ``γ = 0`` selection
alone, the kept weights unchanged). The selection is the same for every ``γ`` within a stage;
later stages see the model as shrunk. Reason: the update reconstructs the calibration text, and
models that fit their training text far better than new text (the prose models of
``benchmarks/bench_prune_quality.py``) generalise worse after a full reconstruction
(:data:`~hf_fisher.consumers.prune.core.OBS_UPDATE`).

Target (``prune(obs_target=)``). ``"unpruned"`` (the default): ``x`` are the unpruned model's
inputs and the residual-stream difference enters ``b`` (``gap``), so the update reconstructs the
unpruned model's output of the layer and also compensates what earlier layers lost (Kwon et al.'s
target). ``"layer"``: ``x = x'`` and no residual term (``cross`` and ``gap`` None, ``b = H 1``,
``s₀ = 1``), so the update reconstructs the layer's own output on the current inputs and
compensates only the units removed here (OBS / OBC / SparseGPT's target):
``s_K = H_KK⁻¹ (H 1)_K``, the weighted least squares of ``Σ_t ‖G^½ (Σ_{u∈K} s_u y_u(x'_t) −
y(x'_t))‖²``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_fisher.consumers.prune.units import Unit

__all__ = ["obs_select"]


def _unit_matrix(weight: torch.Tensor, axis: int, units: Sequence[Unit], name: str, gram: torch.Tensor,
                 G: torch.Tensor, g_diagonal: bool, cross: torch.Tensor | None,
                 gap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, b)``: ``H = Pᵀ (A ⊙ WᵀGW) P`` and ``b = Pᵀ ((C ⊙ WᵀGW) 1)`` (``C = A`` when None)."""
    w = weight.detach().to("cpu", torch.float64)
    w = w if axis == 1 else w.T  # [out, in]
    Gw = (G.double().unsqueeze(1) * w) if g_diagonal else G.double() @ w
    WGW = w.T @ Gw  # [in, in]
    M = gram * WGW
    P = torch.zeros(M.shape[0], len(units), dtype=torch.float64)
    for k, u in enumerate(units):
        for s in u.out:
            if s.param == name:
                P[s.start : s.stop, k] = 1.0
    v = (M if cross is None else cross * WGW).sum(1)
    return P.T @ M @ P, P.T @ (v if gap is None else v - gap)


def obs_select(weight: torch.Tensor, axis: int, name: str, units: Sequence[Unit], quota: Mapping[tuple, int],
               key_of, gram: torch.Tensor, G: torch.Tensor, g_diagonal: bool,
               cross: torch.Tensor | None = None, gap: torch.Tensor | None = None,
               update: float = 1.0) -> tuple[list[int], torch.Tensor, float]:
    """``(removed positions, scales of the kept positions in order, ΔL estimate)`` for one stage
    (module docstring). ``quota[key_of(unit)]``: how many units of each key to remove. ``cross``:
    ``C = Σ_t x'_t x_tᵀ`` with ``x`` the unpruned model's inputs (None: ``x = x'``, ``s₀ = 1``);
    ``gap``: per input feature ``e_j = Σ_o (GW)_{oj} D_{jo}`` of the residual-stream difference
    (:func:`~hf_fisher.consumers.prune.rescale.residual_term`), subtracted from ``Pᵀ`` of ``b``;
    ``update``: the fraction ``γ`` of the OBS update applied, returned scales ``1 + γ (s − 1)``."""
    H, b = _unit_matrix(weight, axis, units, name, gram, G, g_diagonal, cross, gap)
    n = H.shape[0]
    ridge = 1e-10 * float(H.diagonal().mean()) if n else 0.0
    Hinv = torch.linalg.inv(H + ridge * torch.eye(n, dtype=torch.float64))
    s = torch.ones(n, dtype=torch.float64) if cross is None and gap is None else Hinv @ b
    alive = list(range(n))
    left = dict(quota)
    removed: list[int] = []
    cost = 0.0
    while True:
        cands = [i for i, k in enumerate(alive) if left.get(key_of(units[k]), 0) > 0]
        if not cands:
            break
        d = Hinv.diagonal()
        deltas = torch.tensor([0.5 * float(s[i]) ** 2 / max(float(d[i]), 1e-300) for i in cands])
        j = cands[int(torch.argmin(deltas))]
        cost += float(deltas.min())
        col = Hinv[:, j].clone()
        s = s - s[j] * col / col[j]
        Hinv = Hinv - torch.outer(col, col) / col[j]
        keep = [i for i in range(len(alive)) if i != j]
        s, Hinv = s[keep], Hinv[keep][:, keep]
        k = alive.pop(j)
        removed.append(k)
        left[key_of(units[k])] -= 1
    return sorted(removed), 1.0 + update * (s - 1.0), cost
