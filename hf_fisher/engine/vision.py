"""Image and audio classifiers: the task types whose inputs are not token ids.

- ``"image_classification"``: ``pixel_values`` ``[B, C, H, W]`` (ViT, DeiT, Swin, ConvNeXt, CLIP's
  vision tower with a classification head, ...), ``labels`` ``[B]``.
- ``"audio_classification"``: ``input_values`` ``[B, T]`` raw audio, optional ``attention_mask``
  ``[B, T]`` (1 = sample, 0 = padding), ``labels`` ``[B]`` (wav2vec2, HuBERT, ...).

Each sample is one "token": ``S_i = CE(logits_i, labels_i)`` (MSE for a regression head, summed
BCE for a multi-label head: the conventions of sequence classification) and ``n_i = 1``
(0 for a label of -100: the sample is skipped and counted).

The task is read from the model: its ``main_input_name`` (``pixel_values`` / ``input_values``)
and its class (``...ForImageClassification``, ``...ForAudioClassification`` or an audio model's
``...ForSequenceClassification``). Padding of an audio batch is its ``attention_mask``: the
engine's padding check runs the most padded sample alone, without its padding, and a model
whose output depends on the padding (wav2vec2 with ``feat_extract_norm="group"`` normalises
over the whole padded clip) is caught there and computed per sample, loudly. BatchNorm in
train mode normalises with the batch's statistics (every sample's output depends on the
others): refused, with what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import InvalidInputError, UnsupportedError

IMAGE = "image_classification"
AUDIO = "audio_classification"
VISION_TASKS = (IMAGE, AUDIO)
#: the batch key holding each task's inputs
INPUT_OF = {IMAGE: "pixel_values", AUDIO: "input_values"}
#: model inputs of these tasks, besides ``attention_mask``
INPUT_KEYS = ("pixel_values", "input_values")
_DIMS = {IMAGE: (4, "[batch, channels, height, width]"), AUDIO: (2, "[batch, samples]")}


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def main_input_name(model: Any) -> str:
    """The model's ``main_input_name`` (``"input_ids"`` when it has none)."""
    main = getattr(_base(model), "main_input_name", "input_ids")
    return main if isinstance(main, str) else "input_ids"


def vision_task_of(model: Any) -> str | None:
    """``"image_classification"`` / ``"audio_classification"`` for a classifier of pixels or raw
    audio (by its main input and class name), None for any other model."""
    main, name = main_input_name(model), type(_base(model)).__name__
    if main == "pixel_values" and ("ForImageClassification" in name):
        return IMAGE
    if main == "input_values" and name.endswith(("ForAudioClassification", "ForSequenceClassification")):
        return AUDIO
    return None


def check_model(model: Any, task_type: str) -> None:
    """The model takes the task's input (``pixel_values`` / ``input_values``), else
    :class:`UnsupportedError` naming both."""
    want, main = INPUT_OF[task_type], main_input_name(model)
    if main != want:
        raise UnsupportedError(
            f"task_type={task_type!r} needs a model whose main input is {want!r}, but "
            f"{type(_base(model)).__name__} takes {main!r}"
        )


def refuse_batchnorm_training(model: nn.Module) -> None:
    """BatchNorm in train mode mixes the samples of a batch (batch statistics): refused."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise InvalidInputError(
                f"{name or type(m).__name__} is a {type(m).__name__} in train mode: it normalises with the batch's "
                "statistics, so every sample's gradient depends on the other samples and no per-sample Fisher "
                "exists; put the model (or its BatchNorm layers) in eval mode (model.eval(), collect(..., "
                "train_mode=False))"
            )


def batch_size_of(batch: Mapping[str, Any], task_type: str) -> int:
    return int(batch[INPUT_OF[task_type]].shape[0])


def check_batch(batch: dict[str, Any], task_type: str, batch_index: int, num_labels: int | None) -> None:
    """Inputs, padding mask and labels of an image / audio batch, before any forward.

    ``pixel_values`` a floating tensor ``[B, C, H, W]`` (audio: ``input_values`` ``[B, T]`` and an
    ``attention_mask`` of that shape with at least one 1 per sample), finite; ``labels`` one per
    sample (``[B]`` class ids in ``[0, num_labels)`` or -100, or ``[B, num_labels]`` floats)."""
    where = f"batch {batch_index}"
    key = INPUT_OF[task_type]
    x = batch.get(key)
    if x is None:
        keys = ", ".join(repr(k) for k in batch) or "none"
        raise InvalidInputError(
            f"{where} has no {key!r} (its keys: {keys}); an {task_type} batch needs {key!r} and 'labels' "
            f"(the model's processor output)"
        )
    dims, shape = _DIMS[task_type]
    if not isinstance(x, torch.Tensor) or x.dim() != dims or not x.is_floating_point():
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f"{where}: {key} must be a floating tensor {shape}, not a {got}")
    if x.numel() == 0:
        raise InvalidInputError(f"{where} is empty")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"{where}: {key} has NaN or infinite values; fix the data")
    B = x.shape[0]
    mask = batch.get("attention_mask")
    if mask is not None:
        if task_type != AUDIO:
            raise InvalidInputError(f"{where}: an {task_type} batch takes no attention_mask (images are not padded)")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidInputError(f"{where}: attention_mask has shape {got} but input_values has shape {tuple(x.shape)}; they must match")
        empty = (mask == 0).all(dim=1)
        if bool(empty.any()):
            raise InvalidInputError(f"{where}: sample {int(empty.nonzero()[0])} is all padding (attention_mask all 0)")
    labels = batch.get("labels")
    if labels is None:
        raise InvalidInputError(f"{where}: an {task_type} batch needs 'labels' (one class id per sample)")
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != B:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(f"{where}: labels has shape {got}; a classifier needs one label per sample ([{B}] or [{B}, num_labels])")
    if labels.dim() == 1 and not labels.is_floating_point() and num_labels is not None and num_labels > 1:
        bad = (labels != -100) & ((labels < 0) | (labels >= num_labels))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InvalidInputError(
                f"{where}: class label {int(labels[i])} of sample {i} is outside [0, {num_labels}) "
                f"(the model has num_labels={num_labels}); fix the labels or the model's num_labels"
            )


def check_logits(logits: torch.Tensor, labels: torch.Tensor, task_type: str) -> None:
    """Class scores ``[B, num_labels]``, one row per sample, else :class:`InvalidInputError` (a
    model without a classification head returns hidden states)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise InvalidInputError(
            f"{task_type} needs class scores [batch, num_labels] from the model, but its output has shape "
            f"{tuple(logits.shape)}: use a model with a classification head (e.g. AutoModelForImageClassification / "
            "AutoModelForAudioClassification)"
        )


def class_labels(batch: Mapping[str, torch.Tensor], task_type: str) -> torch.Tensor:
    """The batch's labels (a copy), one per sample."""
    labels = batch.get("labels")
    if labels is None:
        raise InvalidInputError(f"an {task_type} batch needs 'labels'")
    return labels.clone()


__all__ = [
    "AUDIO", "IMAGE", "INPUT_KEYS", "INPUT_OF", "VISION_TASKS", "batch_size_of", "check_batch", "check_logits", "check_model",
    "class_labels", "main_input_name", "refuse_batchnorm_training", "vision_task_of",
]
