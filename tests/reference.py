"""Brute-force reference for the per-sample Fisher (DESIGN.md section 2), independent of the engine.

Everything here is deliberately naive: one sample at a time, unpadded, plain autograd, float64
statistics. It shares no code with ``hf_fisher`` so the engine can be checked against it.

For sample i with label tokens ``n_i`` and per-token cross-entropies ``l_it``:

- ``"mean"``:  g_i = d(sum_t l_it / n_i)/dθ,  C_i = g_i²
- ``"sum"``:   g_i = d(sum_t l_it)/dθ,        C_i = g_i²
- ``"token"``: g_i = d(sum_t l_it)/dθ,        C_i = g_i² / n_i

F = mean_i C_i and Var = unbiased (ddof=1) sample variance of C_i over the used samples; samples
with ``n_i == 0`` are skipped (and counted). The gradient is taken with ``torch.autograd.grad``
over ``model.named_parameters()`` (which lists a tied parameter once, so a tied embedding/lm_head
gets the summed gradient of both uses, as it must).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

IGNORE = -100
TASK_TYPES = ("causal_lm", "masked_lm", "classification")
NORMALIZATIONS = ("mean", "sum", "token")


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` of every trainable parameter, tied parameters listed once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, task_type: str) -> tuple[torch.Tensor, int]:
    """Sum of per-token cross-entropies of ONE sample and its number of label tokens."""
    if task_type == "classification":
        return F.cross_entropy(logits.reshape(1, -1).double(), labels.reshape(1), reduction="sum"), 1
    if task_type == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif task_type != "masked_lm":
        raise ValueError(f"unknown task_type {task_type!r}; expected one of {TASK_TYPES}")
    logits = logits.reshape(-1, logits.shape[-1]).double()
    labels = labels.reshape(-1)
    keep = labels != IGNORE
    n = int(keep.sum())
    if n == 0:
        return logits.new_zeros(()), 0
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum"), n


def label_tokens(sample: Mapping[str, torch.Tensor], task_type: str = "causal_lm") -> int:
    """Number of label tokens that enter the loss of one unpadded sample (after the causal shift)."""
    if task_type == "classification":
        return 1
    labels = sample.get("labels", sample["input_ids"])
    if task_type == "causal_lm":
        labels = labels[:, 1:]
    return int((labels != IGNORE).sum())


def per_sample_contributions(
    model: torch.nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    *,
    normalization: str = "mean",
    task_type: str = "causal_lm",
) -> list[dict[str, torch.Tensor] | None]:
    """C_i (float64, parameter-shaped) for every sample, ``None`` for a sample with no label token.

    The model is run in eval mode (restored afterwards); ``.grad`` is never touched.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    named = trainable(model)
    params = [p for _, p in named]
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    out: list[dict[str, torch.Tensor] | None] = []
    try:
        for s in samples:
            ids = s["input_ids"]
            assert ids.dim() == 2 and ids.shape[0] == 1, "reference samples are single, unpadded"
            labels = s.get("labels", ids)
            with torch.enable_grad():
                logits = _logits(model(input_ids=ids))
                total, n = _token_losses(logits, labels, task_type)
                if n == 0:
                    out.append(None)
                    continue
                loss = total / n if normalization == "mean" else total
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            c = {}
            for (name, p), g in zip(named, grads):
                g = torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                c[name] = g * g / n if normalization == "token" else g * g
            out.append(c)
    finally:
        for m, flag in was_training.items():
            m.training = flag
    return out


def mean_and_variance(
    contributions: list[dict[str, torch.Tensor] | None],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """Two-pass mean and unbiased variance (ddof=1) over the non-None contributions."""
    used = [c for c in contributions if c is not None]
    skipped = len(contributions) - len(used)
    if not used:
        return {}, {}, 0, skipped
    mean, var = {}, {}
    for name in used[0]:
        stack = torch.stack([c[name] for c in used]).double()
        mean[name] = stack.mean(0)
        var[name] = stack.var(0, unbiased=True) if len(used) > 1 else torch.full_like(mean[name], float("nan"))
    return mean, var, len(used), skipped


def reference_fisher(
    model: torch.nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    *,
    normalization: str = "mean",
    task_type: str = "causal_lm",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """``(mean, variance, n_used, n_skipped)`` of the per-sample contributions, brute force."""
    contributions = per_sample_contributions(model, samples, normalization=normalization, task_type=task_type)
    return mean_and_variance(contributions)


def reference_group(mean_param: Mapping[str, torch.Tensor], groups: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Group values of a parameter-level tensor: ``groups[name].reduce(mean_param[name])``."""
    return {name: groups[name].reduce(t) for name, t in mean_param.items()}


def reference_group_variance(
    contributions: list[dict[str, torch.Tensor] | None], groups: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Unbiased variance over samples of the group-reduced contributions ``reduce(C_i)``."""
    used = [c for c in contributions if c is not None]
    return {
        name: torch.stack([groups[name].reduce(c[name]) for c in used]).var(0, unbiased=True)
        for name in used[0]
    }


def split_batch(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-sample unpadded dicts (``input_ids`` [1, T_i], ``labels`` [1, T_i] or [1]) of a batch.

    Works for right or left padding: the kept positions are those with ``attention_mask == 1``
    (all positions when there is no mask). Labels of shape [B] (classification) become [1].
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    out = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        s = {"input_ids": ids[i, keep].unsqueeze(0).clone()}
        if labels is not None:
            s["labels"] = labels[i : i + 1].clone() if labels.dim() == 1 else labels[i, keep].unsqueeze(0).clone()
        out.append(s)
    return out


def collate(
    samples: list[Mapping[str, torch.Tensor]],
    *,
    side: str = "right",
    extra: int = 0,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Pad single samples into one batch (to the longest sample plus ``extra`` columns).

    Padding positions get ``pad_id``, mask 0 and label -100. Inverse of :func:`split_batch`.
    """
    lengths = [s["input_ids"].shape[1] for s in samples]
    T = max(lengths) + extra
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    has_labels = "labels" in samples[0]
    seq_labels = has_labels and samples[0]["labels"].dim() == 2 and samples[0]["labels"].shape[1] == lengths[0]
    labels = torch.full((B, T), IGNORE, dtype=torch.long) if seq_labels else None
    cls = []
    for i, (s, n) in enumerate(zip(samples, lengths)):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = s["input_ids"][0]
        mask[i, sl] = 1
        if seq_labels:
            labels[i, sl] = s["labels"][0]
        elif has_labels:
            cls.append(s["labels"].reshape(()))
    out = {"input_ids": ids, "attention_mask": mask}
    if seq_labels:
        out["labels"] = labels
    elif has_labels:
        out["labels"] = torch.stack(cls)
    return out


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol_rel: float = 1e-9,
    floor: float = 0.0,
    what: str = "",
) -> None:
    """``torch.testing.assert_close`` in float64 with ``atol = atol_rel * max|expected| + floor``.

    The absolute tolerance only matters for entries that are (near) zero in the reference; it
    scales with the tensor so that a small parameter's Fisher is still compared to many digits.
    ``floor`` covers parameters whose gradient is zero in exact arithmetic (e.g. an attention key
    bias: softmax is invariant to it) and so is pure rounding noise in any implementation; pass
    a tiny fraction of the largest value over the whole model (see :func:`global_floor`).
    """
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + floor + 1e-300, msg=lambda m: f"{what}: {m}"
    )


def global_floor(tensors: Mapping[str, torch.Tensor], fraction: float = 1e-20) -> float:
    """``fraction * max|t|`` over all tensors: an absolute tolerance for structurally-zero entries.

    Rounding noise in a gradient that is exactly zero is ~1e-16 of the typical gradient, so its
    square is ~1e-32 of the typical Fisher value; 1e-20 leaves a wide margin and is still far
    below any real value.
    """
    return fraction * max(float(t.detach().abs().max()) for t in tensors.values() if t.numel())
