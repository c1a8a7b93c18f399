"""Per-sample losses: the pluggable piece that says what l_i is.

For sample i with label tokens t in L_i (labels != -100 and attention_mask == 1):

- causal LM:   l_it = CE(logits[i, t-1], labels[i, t])  (labels shifted by one)
- masked LM:   l_it = CE(logits[i, t], labels[i, t])
- seq2seq:     l_it = CE(decoder_logits[i, t], labels[i, t])  (the decoder inputs are the shifted labels)
- sequence classification: one "token" per sample, l_i1 = CE(logits[i], labels[i])
  (MSE for regression heads, summed BCE for multi-label heads).
- image / audio classification (:mod:`.vision`): the same, on ``pixel_values`` / ``input_values``.

:func:`per_sample_loss` returns ``S_i = sum_t l_it`` and ``n_i = |L_i|``. The normalisation
decides the per-sample gradient the Fisher squares (DESIGN.md section 2):

- ``"mean"`` (default): g_i = d(S_i / n_i)/dθ,       C_i = g_i²
- ``"sum"``:            g_i = d S_i/dθ,             C_i = g_i²
- ``"token"``:          g_i = d S_i/dθ,             C_i = g_i² / n_i   (the seeds' form)

:func:`normalization_weights` turns that into (backward weight w_i, contribution scale s_i): the
engine back-propagates ``sum_i w_i S_i`` and squares ``s_i * (captured gradient of sample i)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, UnsupportedError
from . import vision
from .seq2seq import TASK, is_seq2seq

NORMALIZATIONS = ("mean", "sum", "token")
TASK_TYPES = ("causal_lm", "masked_lm", "sequence_classification", "seq2seq", *vision.VISION_TASKS)
#: tasks with one label per sample (one "token": n_i = 1, or 0 for a label of -100)
CLASSIFICATION_TASKS = ("sequence_classification", *vision.VISION_TASKS)
IGNORE_INDEX = -100


@dataclass
class SampleLosses:
    """``loss_sum[i] = S_i`` (differentiable) and ``n_tokens[i] = n_i`` (int64)."""

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor


def require_token_inputs(model: Any) -> None:
    """Refuse a model whose main input is not token ids (ViT's ``pixel_values``, Whisper's
    ``input_features``, ...), naming what it takes: every task here is defined on token ids."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    main = getattr(base, "main_input_name", "input_ids")
    if isinstance(main, str) and main != "input_ids":
        raise UnsupportedError(
            f"{type(base).__name__} takes {main!r} as its main input, not token ids as 'input_ids': hf_fisher "
            "computes the Fisher of text models (token ids in, token or class labels out); models with image, "
            "audio or other non-text inputs are not supported yet"
        )


def task_type_of(model: Any) -> str:
    """Infer the task type from the model class (``...ForCausalLM``, ``...LMHeadModel``, ...);
    ``"seq2seq"`` for an encoder-decoder (``config.is_encoder_decoder``, see :mod:`.seq2seq`),
    image / audio classification for those classifiers (:mod:`.vision`)."""
    if is_seq2seq(model):
        return TASK
    task = vision.vision_task_of(model)  # image / audio classifiers (engine.vision)
    if task is not None:
        return task
    require_token_inputs(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    raise InvalidInputError(
        f"cannot tell the task of a {name}: pass task_type='causal_lm', 'masked_lm' or "
        "'sequence_classification' explicitly"
    )


def token_labels(batch: Mapping[str, torch.Tensor], task_type: str) -> torch.Tensor:
    """Labels with -100 wherever a token must not count (given -100s, and attention_mask == 0).

    Causal LM without ``labels`` uses ``input_ids``. Seq2seq: the decoder's mask
    (``decoder_attention_mask``) decides, not the encoder's.
    """
    if task_type in vision.VISION_TASKS:
        return vision.class_labels(batch, task_type)
    labels = batch.get("labels")
    if labels is None:
        if task_type != "causal_lm":
            raise InvalidInputError(f"a {task_type} batch needs 'labels'")
        labels = batch["input_ids"]
    labels = labels.clone()
    mask = batch.get("decoder_attention_mask" if task_type == "seq2seq" else "attention_mask")
    if mask is not None and task_type != "sequence_classification":
        labels[mask == 0] = IGNORE_INDEX
        if task_type == "causal_lm":
            # a token counts only when the position predicting it is a real token too
            # (with left padding the first real token is "predicted" from a pad position)
            labels[:, 1:][mask[:, :-1] == 0] = IGNORE_INDEX
    return labels


def label_counts(batch: Mapping[str, torch.Tensor], task_type: str) -> torch.Tensor:
    """``n_i``, the label tokens of every sample (int64 [B]), without running the model: the
    same count :func:`per_sample_loss` returns."""
    labels = token_labels(batch, task_type)
    B = labels.shape[0]
    if task_type in CLASSIFICATION_TASKS:
        if labels.dim() == 1 and not labels.is_floating_point():
            return (labels != IGNORE_INDEX).long()
        return torch.ones(B, dtype=torch.long, device=labels.device)
    if task_type == "causal_lm":
        labels = labels[:, 1:]
    return (labels != IGNORE_INDEX).sum(dim=1)


def per_sample_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None = None) -> SampleLosses:
    """Per-sample summed loss S_i and label-token count n_i (see module docstring)."""
    if task_type in vision.VISION_TASKS:
        vision.check_logits(logits, labels, task_type)
    if task_type in CLASSIFICATION_TASKS:
        return _classification_loss(logits, labels, problem_type)
    if task_type == "causal_lm":
        # shift the labels, not the logits (no copy of the [B, T, V] logits): position t
        # predicts token t + 1, the last position predicts nothing
        labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    elif task_type not in ("masked_lm", "seq2seq"):  # seq2seq: decoder input t is label t-1, no shift
        raise InvalidInputError(f"unknown task_type {task_type!r}; choose one of {TASK_TYPES}")
    B, T, V = logits.shape
    valid = labels != IGNORE_INDEX
    safe = labels.masked_fill(~valid, 0)
    logits32 = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    ce = F.cross_entropy(logits32.reshape(B * T, V), safe.reshape(B * T), reduction="none").view(B, T)
    if not bool(torch.isfinite(ce.detach()[~valid]).all()):
        # non-finite logits at positions without a label (padding of a model that produces NaN
        # there): their zero weight would still turn into NaN gradients (0 * NaN), so take the
        # cross-entropy of the label positions only (a copy of their logits)
        rows = valid.reshape(-1).nonzero().flatten()
        picked = F.cross_entropy(logits32.reshape(B * T, V).index_select(0, rows), safe.reshape(-1)[rows], reduction="none")
        ce = torch.zeros(B * T, dtype=picked.dtype, device=picked.device).index_put((rows,), picked).view(B, T)
        return SampleLosses(ce.sum(dim=1), valid.sum(dim=1))
    ce = ce.masked_fill(~valid, 0.0)
    return SampleLosses(ce.sum(dim=1), valid.sum(dim=1))


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> SampleLosses:
    logits32 = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    B = logits.shape[0]
    if problem_type == "regression" or (problem_type is None and logits.shape[-1] == 1 and labels.is_floating_point()):
        loss = (logits32.view(B, -1) - labels.view(B, -1).to(logits32.dtype)).pow(2).sum(dim=1)
        return SampleLosses(loss, torch.ones(B, dtype=torch.long, device=logits.device))
    if problem_type == "multi_label_classification":
        loss = F.binary_cross_entropy_with_logits(logits32, labels.to(logits32.dtype), reduction="none").sum(dim=1)
        return SampleLosses(loss, torch.ones(B, dtype=torch.long, device=logits.device))
    labels = labels.view(B)
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits32, labels.masked_fill(~valid, 0), reduction="none").masked_fill(~valid, 0.0)
    return SampleLosses(ce, valid.long())


def normalization_weights(n_tokens: torch.Tensor, normalization: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, s): back-propagate ``sum_i w_i S_i``; square ``s_i * captured_i``.

    Samples with n_i = 0 get w_i = 0 (they are skipped, never a NaN).
    """
    n = n_tokens.to(dtype)
    safe = n.clamp(min=1)
    ones = torch.ones_like(n)
    if normalization == "mean":
        w, s = 1.0 / safe, ones
    elif normalization == "sum":
        w, s = ones, ones
    elif normalization == "token":
        w, s = ones, 1.0 / safe.sqrt()
    else:
        raise InvalidInputError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    w = torch.where(n_tokens > 0, w, torch.zeros_like(w))
    return w, s


def model_loss(model: Any, batch: Mapping[str, Any]):
    """``model(**batch).loss`` (a tensor), with causal-LM labels defaulting to the input ids with
    padding (``attention_mask == 0``) set to -100; :class:`InvalidInputError` when the model
    returns no loss."""
    batch = dict(batch)
    if "labels" not in batch and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise InvalidInputError("the model returned no loss on a batch; give batches with 'labels'")
    return out.loss
