"""Datasets for the command line: ``.txt`` / ``.jsonl`` files turned into padded batches.

File formats
------------
- ``.txt``: one sample per non-empty line (the line without its trailing newline).
- ``.jsonl``: one JSON object per non-empty line, with either ``"text"`` (a string, tokenized
  later) or ``"input_ids"`` (a list of ints, used as is). An optional integer ``"label"`` is the
  class of the sample for sequence classification.

Batches
-------
:func:`make_batches` produces the batches :func:`hf_fisher.collect` takes: dicts of
``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (1 = token, 0 = padding) and ``labels``.
Padding is on the right with the tokenizer's pad token (else its EOS token, else 0). For a causal
LM, ``labels = input_ids`` with padding positions set to ``-100`` (the model shifts them itself);
for sequence classification, ``labels`` is the ``[B]`` tensor of the samples' classes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hf_fisher.errors import EmptyDataError, InvalidInputError

__all__ = ["Sample", "load_samples", "make_batches", "pad_token_id", "TASK_TYPES"]

logger = logging.getLogger("hf_fisher.data")

TASK_TYPES = ("causal_lm", "sequence_classification")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One sample of a data file: ``text`` to tokenize, or ready ``input_ids``; optional ``label``."""

    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    label: int | None = None


def load_samples(path: str | Path) -> list[Sample]:
    """Read the samples of a ``.txt`` or ``.jsonl`` file (see the module docstring for formats).

    Raises :class:`InvalidInputError` for a missing file, an unknown extension, a malformed JSON
    line or a line without ``"text"``/``"input_ids"`` (naming the file and line number), and
    :class:`EmptyDataError` when the file holds no sample.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InvalidInputError(
            f"unsupported data file {str(path)!r}: expected a .txt file (one sample per line) or a "
            f".jsonl file (one JSON object per line with a 'text' or 'input_ids' key)"
        )
    if not path.is_file():
        raise InvalidInputError(f"data file {str(path)!r} does not exist (or is not a file)")
    samples: list[Sample] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if suffix == ".txt":
                samples.append(Sample(text=line.rstrip("\r\n")))
            else:
                samples.append(_parse_json_line(line, path, lineno))
    if not samples:
        raise EmptyDataError(f"data file {str(path)!r} contains no sample (every line is empty)")
    return samples


def _parse_json_line(line: str, path: Path, lineno: int) -> Sample:
    where = f"{path.name}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise InvalidInputError(f"{where}: 'label' must be an integer class id, got {label!r}")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise InvalidInputError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        return Sample(input_ids=tuple(ids), label=label)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise InvalidInputError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return Sample(text=obj["text"], label=label)
    raise InvalidInputError(f"{where}: the object has neither a 'text' nor an 'input_ids' key (keys: {sorted(obj)})")


def pad_token_id(tokenizer: Any | None, config: Any | None = None) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token, else the model
    config's ``pad_token_id`` / ``eos_token_id``, else 0. (Padded positions are masked and get
    label -100, so the choice never changes a number.)"""
    for owner in (tokenizer, config):
        if owner is None:
            continue
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(owner, attr, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value
    return 0


def make_batches(
    tokenizer: Any | None,
    samples: Sequence[Sample | str],
    *,
    batch_size: int,
    max_length: int,
    task_type: str = "causal_lm",
    pad_id: int | None = None,
    vocab_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``samples`` (strings or :class:`Sample`) and pad them into batches.

    Each sample becomes at most ``max_length`` tokens (texts via ``tokenizer(text,
    truncation=True, max_length=max_length)``, ready ids truncated). Batches hold
    ``batch_size`` consecutive samples, right-padded to their longest sample with ``pad_id``
    (default :func:`pad_token_id` of the tokenizer). With ``vocab_size``, every id must be below it.
    """
    if task_type not in TASK_TYPES:
        raise InvalidInputError(f"unknown task_type {task_type!r}; expected one of {TASK_TYPES}")
    if batch_size < 1 or max_length < 1:
        raise InvalidInputError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
    if not samples:
        raise EmptyDataError("no samples to batch")
    if pad_id is None:
        pad_id = pad_token_id(tokenizer)

    sequences: list[list[int]] = []
    labels: list[int | None] = []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            sample = Sample(text=sample)
        if sample.input_ids is not None:
            ids = list(sample.input_ids[:max_length])
        else:
            if tokenizer is None:
                raise InvalidInputError(f"sample {i} is text but no tokenizer was given; pass one or use 'input_ids'")
            ids = list(tokenizer(sample.text, truncation=True, max_length=max_length)["input_ids"])[:max_length]
        if not ids:
            raise InvalidInputError(f"sample {i} has no tokens (empty text?); remove it from the data")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise InvalidInputError(
                f"sample {i} has token id {max(ids)} but the model's vocabulary has {vocab_size} entries; "
                f"does the tokenizer belong to this model?"
            )
        if task_type == "sequence_classification" and sample.label is None:
            raise InvalidInputError(
                f"sample {i} has no 'label'; sequence classification needs a .jsonl file with an integer "
                f"'label' per line"
            )
        sequences.append(ids)
        labels.append(sample.label)

    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        if task_type == "causal_lm":
            batch_labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            batch_labels = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": batch_labels})
    logger.debug("made %d batches from %d samples", len(batches), len(sequences))
    return batches
