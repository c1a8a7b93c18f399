"""Brute-force per-sample Fisher: the shared reference for hf_fisher's tests and plugin authors.

Use it to check an adapter, a rule or an estimator against the definition (DESIGN.md section 2)::

    from hf_fisher.testing import per_sample_fisher, assert_fisher_close

    ref = per_sample_fisher(model, batches, groups=hf_fisher.plugins.model_layout(model).groups)
    assert_fisher_close(hf_fisher.collect(model, batches, reduction="group"), ref)

Everything here is deliberately naive: one sample at a time, cut out of its padded batch
(``attention_mask == 1`` positions only), plain ``torch.autograd.grad``, float64 statistics. It
shares no code with the engine (only :class:`~hf_fisher.layout.ParamGroups` ``.reduce`` for group
values) so the engine can be checked against it.

For sample i with label tokens ``n_i`` and per-token cross-entropies ``l_it``:

- ``"mean"``:  g_i = d(sum_t l_it / n_i)/dθ,  C_i = g_i²
- ``"sum"``:   g_i = d(sum_t l_it)/dθ,        C_i = g_i²
- ``"token"``: g_i = d(sum_t l_it)/dθ,        C_i = g_i² / n_i

F = mean_i C_i and Var = unbiased (ddof=1) sample variance of C_i over the used samples; samples
with ``n_i == 0`` are skipped (and counted). Group values are ``groups[name].reduce(C_i)`` (square
first, then sum), their mean and variance taken over samples the same way. The gradient is taken
with ``torch.autograd.grad`` over ``model.named_parameters()`` (which lists a tied parameter once,
so a tied embedding/lm_head gets the summed gradient of both uses, as it must).

Tolerance (:func:`assert_fisher_close`): a float64 model collected with float64 accumulation
matches to ``rtol=1e-6`` with ``atol = 1e-9 * max|reference|`` per tensor, plus a floor of
``1e-20 * max`` over the whole model for entries that are zero in exact arithmetic (rounding noise,
squared). A float32 model or float32 accumulation needs a looser ``rtol``, chosen for the test.

The module is importable without pytest; it is not imported by ``hf_fisher`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
TASK_TYPES = (
    "causal_lm", "masked_lm", "classification", "sequence_classification",  # the last two: the same
    "seq2seq", "image_classification", "audio_classification",
)
CLASS_TASKS = ("classification", "sequence_classification", "image_classification", "audio_classification")
#: a sample's model input, by task (token tasks and seq2seq: ``input_ids``, or Whisper's ``input_features``)
INPUT_KEYS = ("input_ids", "input_features", "pixel_values", "input_values")
NORMALIZATIONS = ("mean", "sum", "token")
REDUCTIONS = ("param", "group")
RTOL = 1e-6  # float64 model, float64 accumulation vs this float64 reference
ATOL_REL = 1e-9  # absolute tolerance as a fraction of the tensor's largest reference value
FLOOR_FRACTION = 1e-20  # absolute floor as a fraction of the largest value over the model

__all__ = [
    "ATOL_REL", "FLOOR_FRACTION", "IGNORE", "NORMALIZATIONS", "REDUCTIONS", "RTOL", "TASK_TYPES",
    "ReferenceFisher", "assert_close", "assert_fisher_close", "collate", "global_floor", "label_tokens",
    "mean_and_variance", "per_sample_contributions", "per_sample_fisher", "reference_fisher",
    "reference_group", "reference_group_variance", "split_batch", "trainable",
]


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
    """Sum of per-token cross-entropies of ONE sample and its number of label tokens (seq2seq:
    the decoder's logits against its labels, position by position: the decoder inputs are the
    labels shifted right by the model, so logit t predicts label t)."""
    if task_type in CLASS_TASKS:
        return F.cross_entropy(logits.reshape(1, -1).double(), labels.reshape(1), reduction="sum"), 1
    if task_type == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif task_type not in ("masked_lm", "seq2seq"):
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
    if task_type in CLASS_TASKS:
        return int(sample["labels"].reshape(-1)[0] != IGNORE) if "labels" in sample else 1
    labels = sample.get("labels", sample.get("input_ids"))
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

    ``samples`` are single and unpadded (``input_ids`` [1, T_i]; see :func:`split_batch`). The
    model is run in eval mode (restored afterwards); ``.grad`` is never touched.
    """
    return list(_iter_contributions(model, samples, normalization=normalization, task_type=task_type))


def _iter_contributions(
    model: torch.nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    *,
    normalization: str,
    task_type: str,
) -> Iterator[dict[str, torch.Tensor] | None]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task_type {task_type!r}; expected one of {TASK_TYPES}")
    named = trainable(model)
    params = [p for _, p in named]
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for s in samples:
            key = next((k for k in INPUT_KEYS if k in s), None)
            if key is None:
                raise ValueError(f"a reference sample needs one of {INPUT_KEYS}; got {sorted(s)}")
            x = s[key]
            if x.shape[0] != 1 or (key == "input_ids" and x.dim() != 2):
                raise ValueError(f"reference samples are single and unpadded ([1, ...]); got {key} {tuple(x.shape)}")
            labels = s.get("labels", x)
            if label_tokens({"labels": labels}, task_type) == 0:  # nothing to differentiate: skipped, as the engine does
                yield None
                continue
            inputs = {key: x}
            if task_type == "seq2seq":  # the decoder's inputs: the labels shifted by the model itself
                inputs["labels"] = labels
                inputs["use_cache"] = False
            with torch.enable_grad():
                logits = _logits(model(**inputs))
                total, n = _token_losses(logits, labels, task_type)
                if n == 0:
                    yield None
                    continue
                loss = total / n if normalization == "mean" else total
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            c = {}
            for (name, p), g in zip(named, grads):
                g = torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                c[name] = g * g / n if normalization == "token" else g * g
            yield c
    finally:
        for m, flag in was_training.items():
            m.training = flag


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


def split_batch(batch: Mapping[str, torch.Tensor], task_type: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Per-sample unpadded dicts (``input_ids`` [1, T_i], ``labels`` [1, T_i] or [1]) of a batch.

    Works for right or left padding: the kept positions are those with ``attention_mask == 1``
    (all positions when there is no mask). Labels of shape [B] (classification) become [1].
    Images (``pixel_values``) are taken whole; audio (``input_values``) is cut by its mask;
    ``task_type="seq2seq"`` batches keep each source by its mask and each target up to its last
    label (``decoder_attention_mask`` == 0 positions ignored), and Whisper's ``input_features``
    whole (its padding is silence the sample alone gets too).
    """
    if "pixel_values" in batch or "input_features" in batch:
        key = "pixel_values" if "pixel_values" in batch else "input_features"
        out = []
        for i in range(batch[key].shape[0]):
            s = {key: batch[key][i : i + 1].clone()}
            if "labels" in batch:
                s["labels"] = _target_of(batch, i)
            out.append(s)
        return out
    key = "input_values" if "input_values" in batch else "input_ids"
    ids = batch[key]
    labels = batch.get("labels")
    if task_type == "seq2seq":
        mask = batch.get("attention_mask")
        return [{key: ids[i : i + 1, mask[i].bool()].clone() if mask is not None else ids[i : i + 1].clone(),
                 "labels": _target_of(batch, i)} for i in range(ids.shape[0])]
    if key == "input_values":
        mask = batch.get("attention_mask")
        return [{key: ids[i : i + 1, mask[i].bool()].clone() if mask is not None else ids[i : i + 1].clone(),
                 **({"labels": labels[i : i + 1].clone()} if labels is not None else {})} for i in range(ids.shape[0])]
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


def _target_of(batch: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    """Sample ``i``'s labels: [1] for one class label, else its target up to its last counted
    label (positions hidden by ``decoder_attention_mask`` set to -100)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels[i : i + 1].clone()
    row = labels[i].clone()
    dmask = batch.get("decoder_attention_mask")
    if dmask is not None:
        row[dmask[i] == 0] = IGNORE
    valid = (row != IGNORE).nonzero().flatten()
    n = int(valid[-1]) + 1 if valid.numel() else 0
    return row[:n].unsqueeze(0)


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


def global_floor(tensors: Mapping[str, torch.Tensor], fraction: float = FLOOR_FRACTION) -> float:
    """``fraction * max|t|`` over all tensors: an absolute tolerance for structurally-zero entries.

    Rounding noise in a gradient that is exactly zero is ~1e-16 of the typical gradient, so its
    square is ~1e-32 of the typical Fisher value; 1e-20 leaves a wide margin and is still far
    below any real value.
    """
    return fraction * max(float(t.detach().abs().max()) for t in tensors.values() if t.numel())


# ----------------------------------------------------------------------------- one-call API


@dataclass
class ReferenceFisher:
    """What :func:`per_sample_fisher` returns: brute-force moments of the per-sample contributions.

    ``mean``/``variance``: parameter-shaped F = mean_i C_i and unbiased Var_i(C_i);
    ``group_mean``/``group_variance``: the same of ``groups[name].reduce(C_i)`` (``None`` without
    ``groups``); ``samples``/``skipped``: used samples and samples with no label token;
    ``contributions``: every used C_i (parameter-shaped), only with ``keep_contributions=True``.
    """

    mean: dict[str, torch.Tensor]
    variance: dict[str, torch.Tensor]
    samples: int
    skipped: int
    group_mean: dict[str, torch.Tensor] | None = None
    group_variance: dict[str, torch.Tensor] | None = None
    contributions: list[dict[str, torch.Tensor]] | None = None

    def moments(self, reduction: str = "param") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(mean, variance)`` at ``reduction`` ``"param"`` or ``"group"``."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        if reduction == "param":
            return self.mean, self.variance
        if self.group_mean is None or self.group_variance is None:
            raise ValueError("no group values: call per_sample_fisher(..., groups=layout.groups)")
        return self.group_mean, self.group_variance


class _Welford:
    """Streaming mean and unbiased variance of a sequence of equally-shaped tensors."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.n, self.mean, self.m2 = dtype, 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def variance(self) -> torch.Tensor:
        return self.m2 / (self.n - 1) if self.n > 1 else torch.full_like(self.mean, float("nan"))


def per_sample_fisher(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    groups: Mapping[str, Any] | None = None,
    normalization: str = "mean",
    task_type: str = "causal_lm",
    dtype: torch.dtype = torch.float64,
    keep_contributions: bool = False,
) -> ReferenceFisher:
    """The empirical Fisher of ``batches`` by brute force: each sample alone, without its padding.

    ``batches`` are what you pass to :func:`hf_fisher.collect` (dicts with ``input_ids``, optional
    ``attention_mask`` (right or left padding) and ``labels`` ([B, T], or [B] for classification;
    without labels, the inputs are the labels). Each row is cut to its ``attention_mask == 1``
    positions (:func:`split_batch`) and run alone in eval mode; its loss follows ``normalization``
    (``"mean"``, ``"sum"``, ``"token"``) and ``task_type`` (``"causal_lm"``: shifted labels,
    ``"masked_lm"``, ``"sequence_classification"`` alias ``"classification"``: one label per
    sample). C_i = g_i² is accumulated in ``dtype`` with Welford's update, so a large model's
    per-sample tensors are not all kept (``keep_contributions=True`` keeps them). ``groups`` (e.g.
    ``hf_fisher.plugins.model_layout(model).groups``) adds group moments from
    ``groups[name].reduce(C_i)``. ``model`` and ``.grad`` are left as they were.
    """
    param_acc: dict[str, _Welford] = {}
    group_acc: dict[str, _Welford] = {}
    kept: list[dict[str, torch.Tensor]] = []
    skipped = 0
    samples = (s for batch in batches for s in split_batch(batch, task_type))
    for c in _iter_contributions(model, samples, normalization=normalization, task_type=task_type):
        if c is None:
            skipped += 1
            continue
        for name, t in c.items():
            param_acc.setdefault(name, _Welford(dtype)).add(t)
            if groups is not None:
                group_acc.setdefault(name, _Welford(dtype)).add(groups[name].reduce(t))
        if keep_contributions:
            kept.append(c)
    n = next(iter(param_acc.values())).n if param_acc else 0
    return ReferenceFisher(
        mean={k: a.mean for k, a in param_acc.items()},
        variance={k: a.variance() for k, a in param_acc.items()},
        samples=n,
        skipped=skipped,
        group_mean={k: a.mean for k, a in group_acc.items()} if groups is not None else None,
        group_variance={k: a.variance() for k, a in group_acc.items()} if groups is not None else None,
        contributions=kept if keep_contributions else None,
    )


def assert_fisher_close(
    fisher: Any,
    reference: ReferenceFisher,
    *,
    reduction: str | None = None,
    rtol: float = RTOL,
    atol_rel: float = ATOL_REL,
    floor_fraction: float = FLOOR_FRACTION,
    variances: bool = True,
) -> None:
    """Assert that a collected :class:`~hf_fisher.Fisher` matches ``reference`` parameter by parameter.

    Checks the sample count, the parameter names, every value (``fisher[name]``) and, with
    ``variances=True``, every variance (``fisher.variances[name]``), each with
    :func:`assert_close` at ``rtol`` and ``atol = atol_rel * max|reference tensor| + floor``,
    ``floor = floor_fraction * max`` over all reference tensors (:func:`global_floor`). The defaults
    (:data:`RTOL`, :data:`ATOL_REL`, :data:`FLOOR_FRACTION`) are for a float64 model and float64
    accumulation. ``reduction`` defaults to ``fisher.reduction``.
    """
    reduction = reduction or getattr(fisher, "reduction", "param")
    mean, var = reference.moments(reduction)
    assert fisher.counts.samples == reference.samples, (
        f"samples: {fisher.counts.samples} collected != {reference.samples} in the reference"
    )
    assert sorted(fisher.names()) == sorted(mean), "parameter names differ from the reference"
    floor_m = global_floor(mean, floor_fraction)
    for name in mean:
        assert_close(
            fisher[name], mean[name], rtol=rtol, atol_rel=atol_rel, floor=floor_m, what=f"{reduction} mean {name}"
        )
    if variances:
        floor_v = global_floor(var, floor_fraction)
        for name in var:
            assert_close(
                fisher.variances[name], var[name], rtol=rtol, atol_rel=atol_rel, floor=floor_v,
                what=f"{reduction} variance {name}",
            )
