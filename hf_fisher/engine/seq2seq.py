"""Encoder-decoder (seq2seq) models: T5, BART, mBART, Marian, Pegasus, Whisper.

A seq2seq batch holds the encoder's input (``input_ids`` [B, S] with ``attention_mask``, or
Whisper's ``input_features`` [B, n_mels, frames]), ``labels`` [B, L] (-100 = ignored; L need
not equal S) and optionally ``decoder_input_ids`` / ``decoder_attention_mask`` [B, L]. Without
``decoder_input_ids`` they are the labels shifted right, as the model does itself
(``prepare_decoder_input_ids_from_labels`` / its module's ``shift_tokens_right``: the
``decoder_start_token_id`` first, -100 replaced by the pad token).

Sample i's loss is its decoder cross-entropy over its label tokens t in L_i (labels != -100
and decoder_attention_mask == 1)::

    S_i = sum_{t in L_i} CE(logits[i, t], labels[i, t]),   n_i = |L_i|

(no shift: the decoder input at t is label t-1), normalised like a causal LM (see
:mod:`.losses`). "Alone, without padding" (the padding check, the per-sample path) means the
encoder input trimmed to its ``attention_mask``'s real span and the decoder side trimmed after
its last label token (and to its ``decoder_attention_mask``'s real span). Whisper has no encoder
padding: its ``input_features`` are the log-mel frames of the audio padded with silence to the
model's fixed length, which the sample alone gets too (the model has no encoder attention mask),
so only its decoder side is ever trimmed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import InvalidInputError, UnsupportedError

TASK = "seq2seq"
IGNORE_INDEX = -100
#: keys of a seq2seq batch besides input_ids / attention_mask / labels
DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask")
ENCODER_INPUTS = ("input_ids", "input_features")
BATCH_KEYS = ("input_ids", "input_features", "attention_mask", "labels", *DECODER_KEYS)


def is_seq2seq(model: Any) -> bool:
    """Whether ``model`` (optionally PEFT-wrapped) is an encoder-decoder (``config.is_encoder_decoder``)."""
    base = _base(model)
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_input_name(model: Any) -> str:
    """``"input_ids"`` or ``"input_features"``; any other main input is refused."""
    base = _base(model)
    main = getattr(base, "main_input_name", "input_ids")
    if main not in ENCODER_INPUTS:
        raise UnsupportedError(
            f"{type(base).__name__} is an encoder-decoder taking {main!r}: hf_fisher supports seq2seq models whose "
            "encoder takes token ids ('input_ids': T5, BART, Marian, ...) or log-mel features ('input_features': Whisper)"
        )
    return main


def batch_size(batch: Mapping[str, Any]) -> int:
    return int(batch["labels"].shape[0])


def shift_labels(model: Any, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs the model itself builds from ``labels`` when none are given.

    A sample without any label token (it counts nothing) gets one non-pad token first, so that
    shifts which look for the last real token (mBART's language id) do not fail on it."""
    base = _base(model)
    empty = (labels == IGNORE_INDEX).all(dim=1)
    if bool(empty.any()):
        pad = getattr(base.config, "pad_token_id", None)
        labels = labels.clone()
        labels[empty, 0] = 1 if pad == 0 else 0
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    shift = getattr(sys.modules.get(type(base).__module__), "shift_tokens_right", None)
    config = base.config
    if shift is None or getattr(config, "decoder_start_token_id", None) is None:
        raise UnsupportedError(
            f"cannot tell how {type(base).__name__} builds its decoder inputs from the labels: pass "
            "'decoder_input_ids' in every batch"
        )
    return shift(labels, config.pad_token_id, config.decoder_start_token_id)


def prepare(engine: Any, batch: Mapping[str, Any], batch_index: int) -> dict[str, Any]:
    """Check a seq2seq batch before any work (shapes, id ranges, lengths) and move it to the
    model's device."""
    where = f"batch {batch_index}"
    if not isinstance(batch, Mapping):
        raise InvalidInputError(f"{where} must be a mapping with the encoder input and 'labels' (got {type(batch).__name__})")
    main = encoder_input_name(engine.model)
    if main not in batch or "labels" not in batch:
        keys = ", ".join(repr(k) for k in batch) or "none"
        raise InvalidInputError(
            f"{where} has keys {keys}; a seq2seq batch needs {main!r} (the encoder's input) and 'labels' (the target "
            "token ids, -100 = ignored), optionally 'attention_mask', 'decoder_input_ids', 'decoder_attention_mask'"
        )
    out = {k: (v.to(engine.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    x, labels = out[main], out["labels"]
    if main == "input_ids":
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point() or x.numel() == 0:
            raise InvalidInputError(f"{where}: input_ids must be a non-empty integer tensor [batch, source_len]")
        _in_range(x, engine.vocab_size, where, "token id", "the model's vocabulary", "check the tokenizer matches the model")
    else:
        expected = _feature_shape(engine.model)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point() or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidInputError(
                f"{where}: input_features has shape {shape}; the model takes float log-mel features [batch, "
                f"{expected[0]}, {expected[1]}] (num_mel_bins, 2 x max_source_positions; pad the audio to that length)"
            )
    B = int(x.shape[0])
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point() or labels.shape[0] != B:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(f"{where}: labels has shape {shape}; a seq2seq batch needs integer target ids [{B}, target_len]")
    L = int(labels.shape[1])
    mask = out.get("attention_mask")
    if main == "input_ids" and mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape)):
        raise InvalidInputError(f"{where}: attention_mask has shape {_shape(mask)} but input_ids has shape {tuple(x.shape)}; they must match")
    for key in DECODER_KEYS:
        v = out.get(key)
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, L)):
            raise InvalidInputError(f"{where}: {key} has shape {_shape(v)} but labels has shape {(B, L)}; they must match")
    _in_range(labels, engine.output_size, where, "label id", "the model's output vocabulary", "use -100 for tokens that must not count", ignore=True)
    if "decoder_input_ids" in out:
        _in_range(out["decoder_input_ids"], engine.vocab_size, where, "decoder input id", "the model's vocabulary", "check the tokenizer")
    src_limit, tgt_limit = _length_limits(engine.model)
    if main == "input_ids" and src_limit is not None and x.shape[1] > src_limit:
        raise InvalidInputError(f"{where}: source sequences of {x.shape[1]} tokens are longer than the model's {src_limit} positions; truncate them")
    if tgt_limit is not None and tgt_limit < L:
        raise InvalidInputError(f"{where}: target sequences of {L} tokens are longer than the model's {tgt_limit} decoder positions; truncate them")
    return out


def _shape(v: Any) -> Any:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _in_range(ids: torch.Tensor, size: int | None, where: str, what: str, space: str, fix: str, *, ignore: bool = False) -> None:
    if size is None:
        return
    bad = (ids < 0) | (ids >= size)
    if ignore:
        bad &= ids != IGNORE_INDEX
    if bad.any():
        i, t = (int(v) for v in bad.nonzero()[0])
        raise InvalidInputError(f"{where}: {what} {int(ids[i, t])} at (sample {i}, position {t}) is outside {space} [0, {size}); {fix}")


def _feature_shape(model: Any) -> tuple[int, int]:
    config = _base(model).config
    return int(config.num_mel_bins), 2 * int(config.max_source_positions)


def _length_limits(model: Any) -> tuple[int | None, int | None]:
    """(source, target) lengths a learned or fixed position table allows (None: no limit)."""
    config = _base(model).config
    if getattr(config, "relative_attention_num_buckets", None) is not None:  # T5: relative positions
        return None, None
    limit = getattr(config, "max_position_embeddings", None)
    target = getattr(config, "max_target_positions", None) or limit
    return limit, target


def model_inputs(engine: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments: encoder input and mask, decoder inputs (given, or the
    labels shifted as the model shifts them), decoder mask; never ``labels`` (the model's own
    loss is not needed)."""
    main = encoder_input_name(engine.model)
    inputs = {main: batch[main]}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    dec = batch.get("decoder_input_ids")
    inputs["decoder_input_ids"] = dec if dec is not None else shift_labels(engine.model, batch["labels"])
    if batch.get("decoder_attention_mask") is not None:
        inputs["decoder_attention_mask"] = batch["decoder_attention_mask"]
    if "use_cache" in engine.forward_params:
        inputs["use_cache"] = False
    return inputs


def _span(mask: torch.Tensor) -> tuple[int, int] | None:
    """``(lo, hi)`` of a 1-d mask's contiguous real span; None for none or holes."""
    real = mask.nonzero().flatten()
    if real.numel() and int(real[-1]) - int(real[0]) + 1 == real.numel():
        return int(real[0]), int(real[-1]) + 1
    return None


def _decoder_span(batch: Mapping[str, Any], i: int) -> tuple[int, int]:
    labels = batch["labels"][i]
    L = int(labels.shape[0])
    lo, hi = 0, L
    mask = batch.get("decoder_attention_mask")
    if mask is not None:
        lo, hi = _span(mask[i]) or (0, L)
    counted = (labels != IGNORE_INDEX).nonzero().flatten()
    if counted.numel():
        hi = max(lo + 1, min(hi, int(counted[-1]) + 1))
    return lo, hi


def alone(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sample ``i`` as a batch of one without its padding: the encoder input trimmed to its
    ``attention_mask``'s real span (token ids only), the decoder tensors to the span between
    the decoder mask's first real position and the last label token (positions after it do not
    reach any label through the causal decoder)."""
    B = batch_size(batch)
    lo, hi = 0, None
    mask = batch.get("attention_mask")
    if "input_ids" in batch and mask is not None:
        lo, hi = _span(mask[i]) or (0, None)
    dlo, dhi = _decoder_span(batch, i)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B:
            v = v[i : i + 1]
            if k in ("labels", *DECODER_KEYS):
                v = v[:, dlo:dhi]
            elif k in ("input_ids", "attention_mask", "token_type_ids") and "input_ids" in batch:
                v = v[:, lo:hi]
        out[k] = v
    return out


def padding_kind(batch: Mapping[str, Any], _padding_kind: Callable[[Mapping[str, Any]], str]) -> str:
    """"none", or ``"<encoder>+<decoder>"`` with each side's "none" / "right" / "left" /
    "other" as ``_padding_kind`` (:func:`hf_fisher.engine.per_sample._padding_kind`) tells it
    from a mask: the padding check runs once per kind."""
    enc = _padding_kind(batch) if "input_ids" in batch else "none"
    dmask = batch.get("decoder_attention_mask")
    if dmask is not None:
        dec = _padding_kind({"attention_mask": dmask})
    else:  # decoder padding: the positions after the last label token
        labels = batch["labels"]
        pos = torch.arange(labels.shape[1], device=labels.device)
        last = torch.where(labels != IGNORE_INDEX, pos, torch.full_like(pos, -1)).max(dim=1).values
        dec = _padding_kind({"attention_mask": (pos.unsqueeze(0) <= last.unsqueeze(1)).long()})
    return "none" if enc == dec == "none" else f"{enc}+{dec}"


def batch_shared_modules(model: Any) -> list[torch.nn.Module]:
    """Modules whose every call is shared by the batch although its output's leading dimension
    may equal the batch size: T5's ``relative_attention_bias`` (an embedding of the [q, k]
    relative-position buckets, output [q, k, heads]); its parameters always take the batched
    vector-Jacobian path, whatever the batch's shape."""
    return [m for name, m in _base(model).named_modules() if name.rsplit(".", 1)[-1] == "relative_attention_bias"]


def refuse_free_path() -> str:
    """Why a Trainer's seq2seq micro-batch takes the engine's own pass (see :mod:`.external`)."""
    return (
        "seq2seq models: the decoder's position tables / relative attention bias are calls shared by the batch, "
        "whose per-sample gradients need a backward of the per-sample losses"
    )
