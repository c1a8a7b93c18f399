"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer ``y = x W^T`` (nn.Linear, ``W`` ``[out, in]``) or ``y = x W`` (HF Conv1D,
``W`` ``[in, out]``), model i's inputs ``X_i`` (one row per non-padding token) define the Gram
``G_i = X_i^T X_i`` ``[in, in]``. The merged weight minimises ``Σ_i ||X_i W' − X_i W_i'||²``
(``W' = W^T`` for Linear, ``W`` for Conv1D), whose normal equations give

    W'* = (Σ_i G_i)^{-1} Σ_i G_i W_i'.

RegMean regularises the Grams by shrinking their off-diagonal entries:
``G̃_i = α G_i + (1 − α) diag(G_i)`` (``α = 1``: plain RegMean; ``α = 0``: each input feature
j's row of ``W'`` is the average of the models' rows weighted by ``G_i[j, j]``).

Two pieces live here:

- :func:`collect_input_grams` runs a model over batches (no backward, ``torch.no_grad``, eval
  mode, random streams and train/eval flags restored) and accumulates, for every nn.Linear /
  Conv1D weight, the Gram of its inputs over the non-padding token positions, summed over every
  call of the module (a module called twice per forward contributes both calls).
- :func:`regmean_tensor` is the per-tensor formula the merger (:mod:`hf_fisher.consumers.merge.api`)
  applies to one weight of every model.

Normalisation (``normalize=``): ``"mean"`` (default) divides each Gram by the number of token
rows that entered it, ``G_i = X_i^T X_i / N_i``, so every model counts equally whatever the size
of its data; ``"sum"`` keeps ``X_i^T X_i`` (the paper's form: a model seen on more tokens weighs
more).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.collection.activations import (
    linear_weights,
    select_weights,
    token_inputs,
)
from hf_fisher.errors import EmptyDataError, InvalidInputError

__all__ = ["NORMALIZE", "InputGrams", "collect_input_grams", "regmean_tensor"]

log = logging.getLogger(__name__)

NORMALIZE = ("mean", "sum")
KINDS = ("linear", "conv1d")


@dataclass
class InputGrams:
    """Input Grams of one model's Linear / Conv1D weights (see the module docstring).

    - ``grams``: weight parameter name -> ``G`` ``[in, in]`` float64 (on the CPU), normalised as
      ``normalize`` says;
    - ``kinds``: name -> ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (weight ``[in, out]``);
    - ``num_tokens``: name -> number of input rows (token positions × calls) in its Gram;
    - ``num_samples``: sequences seen;
    - ``skipped``: name -> why the weight has no Gram (tied to another module, a subclass with its
      own forward, never called, inputs not laid out per token); the merger uses its fallback
      rule for these.
    """

    grams: dict[str, torch.Tensor]
    kinds: dict[str, str]
    num_tokens: dict[str, int]
    num_samples: int
    normalize: str = "mean"
    skipped: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.grams


def collect_input_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    names: str | Iterable[str] | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    normalize: str = "mean",
    device: str | torch.device | None = None,
) -> InputGrams:
    """Input Grams of ``model``'s nn.Linear / Conv1D weights over ``batches``.

    For weight W of a module receiving inputs ``x_t`` (last dimension ``in``) at the token
    positions t with ``attention_mask == 1`` (every position without a mask), summed over all
    calls of the module::

        G = Σ_t x_t x_t^T / N        (normalize="mean", N = number of rows summed)
        G = Σ_t x_t x_t^T            (normalize="sum")

    accumulated in float64. Batches are dicts with ``input_ids`` ``[B, T]`` and optionally
    ``attention_mask`` (1 = token, 0 = padding), ``token_type_ids``, ``position_ids`` (``labels``
    are ignored: no loss is computed). ``names`` selects weights (a regular expression searched in
    the parameter name, or a list of names); ``max_samples`` stops after that many sequences;
    ``device`` is where the Grams are accumulated (default: the weight's device; pass ``"cpu"``
    for large models on a small GPU). The model runs under ``torch.no_grad`` in eval mode; its
    train/eval flags and the random streams are restored.

    Weights tied to another parameter name (an lm_head sharing the input embedding), weights of
    Linear subclasses with their own forward, modules never called and modules whose inputs are
    not laid out per token while the batch has padding are listed in ``.skipped`` with the reason.
    """
    if normalize not in NORMALIZE:
        raise InvalidInputError(f"unknown normalize {normalize!r}; choose 'mean' or 'sum'")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise InvalidInputError(f"max_samples must be a positive integer, got {max_samples!r}")
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found, skipped = select_weights(*linear_weights(model), names)
    if not found:
        raise InvalidInputError(
            "the model has no nn.Linear / Conv1D weight RegMean can use"
            + (f" (skipped: {dict(list(skipped.items())[:3])})" if skipped else "")
        )
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(found, 0)

    def add(name: str, xs: torch.Tensor) -> None:
        g = grams.get(name)
        if g is None:
            g = grams[name] = torch.zeros((xs.shape[1], xs.shape[1]), dtype=torch.float64, device=xs.device)
        g.addmm_(xs.T, xs)
        rows[name] += int(xs.shape[0])

    try:
        seen = token_inputs(
            model, batches, {n: m for n, (m, _) in found.items()}, add,
            max_samples=max_samples, progress=progress, desc="RegMean Grams", device=device,
        )
    except EmptyDataError:
        raise EmptyDataError("no batches: RegMean needs at least one batch of the model's inputs to form Grams") from None
    samples, unaligned = seen.samples, seen.unaligned
    out, kinds, tokens = {}, {}, {}
    for name, (_, kind) in found.items():
        if name in unaligned:
            skipped[name] = unaligned[name]
            continue
        if rows[name] == 0:
            skipped[name] = "the module was never called on a non-padding token during the forward passes"
            continue
        g = grams[name]
        if normalize == "mean":
            g = g / rows[name]
        out[name] = g.cpu()
        kinds[name] = kind
        tokens[name] = rows[name]
    for name, reason in skipped.items():
        log.info("RegMean: no Gram for %s: %s", name, reason)
    log.info("RegMean: Grams of %d weights from %d samples (%d skipped)", len(out), samples, len(skipped))
    return InputGrams(grams=out, kinds=kinds, num_tokens=tokens, num_samples=samples, normalize=normalize, skipped=skipped)


def _regularised(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``G̃ = α G + (1 − α) diag(G)`` (off-diagonal entries scaled by α)."""
    d = torch.diagonal(g)
    return (g * alpha).diagonal_scatter(d.clone())


def regmean_tensor(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float,
    kind: str,
    name: str | None = None,
    coefficients: Sequence[float] | None = None,
) -> torch.Tensor:
    """The RegMean merge of one weight::

        G̃_i = α G_i + (1 − α) diag(G_i)
        kind="linear" (W [out, in]):  W* = ((Σ_i c_i G̃_i)^{-1} Σ_i c_i G̃_i W_i^T)^T
        kind="conv1d" (W [in, out]):  W* = (Σ_i c_i G̃_i)^{-1} Σ_i c_i G̃_i W_i

    ``coefficients`` ``c_i`` (the merge's model weights λ_i; None: all equal, the paper's form)
    weigh each model's Gram: ``Σ_i c_i X_iᵀX_i`` is the Gram of the union of the inputs with model
    i's rows counted ``c_i`` times. Only their ratios matter (they are scaled to ``Σ c_i = n``);
    they must be non-negative with a positive sum.

    computed in float64 with :func:`torch.linalg.solve`; the result has ``weights[0]``'s dtype.
    When ``Σ_i G̃_i`` is singular (a Cholesky pivot at or below ``in · eps`` of its largest
    diagonal entry: an input feature no model ever used, fewer tokens than features with α = 1),
    a ridge ``λ I`` is added to every ``G̃_i`` — the smallest ``λ = 10^k · 1e-10 · mean diag``
    that makes the sum definite — so directions no input reaches get the plain average of the
    models' weights; the ridge is logged as a warning (``name`` identifies the tensor there).
    """
    if kind not in KINDS:
        raise InvalidInputError(f"unknown kind {kind!r}; choose 'linear' (weight [out, in]) or 'conv1d' (weight [in, out])")
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InvalidInputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if len(weights) == 0:
        raise InvalidInputError("nothing to merge: no weights")
    if len(grams) != len(weights):
        raise InvalidInputError(f"{len(grams)} Grams for {len(weights)} weights; give one Gram per model")
    what = f" of {name}" if name else ""
    shape = tuple(weights[0].shape)
    if len(shape) != 2:
        raise InvalidInputError(f"RegMean merges 2-D weights; weight 0{what} has shape {shape}")
    n_in = shape[1] if kind == "linear" else shape[0]
    for i, (w, g) in enumerate(zip(weights, grams)):
        if tuple(w.shape) != shape:
            raise InvalidInputError(f"weight {i}{what} has shape {tuple(w.shape)}, weight 0 has {shape}")
        if tuple(g.shape) != (n_in, n_in):
            raise InvalidInputError(
                f"Gram {i}{what} has shape {tuple(g.shape)}; a {kind} weight of shape {shape} needs [{n_in}, {n_in}] "
                f"(the input dimension is the weight's {'second' if kind == 'linear' else 'first'} axis)"
            )
        if not bool(torch.isfinite(g).all()):
            raise InvalidInputError(f"Gram {i}{what} has NaN or Inf entries")
    n = len(weights)
    if coefficients is None:
        coef = [1.0] * n
    else:
        if len(coefficients) != n or any(not math.isfinite(float(c)) or float(c) < 0 for c in coefficients) \
                or not sum(float(c) for c in coefficients) > 0:
            raise InvalidInputError(f"coefficients{what} must be {n} non-negative numbers with a positive sum, "
                                    f"got {list(coefficients)}")
        total = sum(float(c) for c in coefficients)
        coef = [n * float(c) / total for c in coefficients]
    dt = torch.float64
    a = float(alpha)
    A = torch.zeros((n_in, n_in), dtype=dt)
    R = torch.zeros((n_in, shape[0] if kind == "linear" else shape[1]), dtype=dt)
    S = torch.zeros_like(R)  # Σ_i c_i W_i', for the ridge
    for c, w, g in zip(coef, weights, grams):
        if c == 0.0:
            continue
        gt = _regularised(g.detach().to("cpu", dt), a)
        wt = w.detach().to("cpu", dt)
        wt = wt.T if kind == "linear" else wt
        if c != 1.0:
            gt = gt * c
            wt_c = wt * c
        else:
            wt_c = wt
        A.add_(gt)
        R.addmm_(gt, wt)
        S.add_(wt_c)
    tol = max(n_in, 1) * torch.finfo(dt).eps

    def definite(M: torch.Tensor) -> bool:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            return False
        piv = torch.diagonal(L) ** 2
        return bool(piv.min() > tol * torch.diagonal(M).max())

    if definite(A):
        X = torch.linalg.solve(A, R)
    else:
        scale = float(torch.diagonal(A).mean()) / len(weights)
        scale = scale if scale > 0 else 1.0
        lam = 1e-10 * scale
        eye = torch.eye(n_in, dtype=dt)
        while not definite(A + len(weights) * lam * eye):
            lam *= 10.0
        log.warning(
            "RegMean%s: the summed Gram (alpha=%g) is singular; adding a ridge %.3g·I to every model's Gram "
            "(%.1e of its mean diagonal): input directions no model's data reaches get the average weight",
            what, a, lam, lam / scale,
        )
        X = torch.linalg.solve(A + len(weights) * lam * eye, R + lam * S)
    out = X.T if kind == "linear" else X
    return out.contiguous().to(weights[0].dtype)
