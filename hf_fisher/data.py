"""Datasets for the command line: ``.txt`` / ``.jsonl`` files turned into padded batches.

File formats
------------
- ``.txt``: one sample per non-empty line (the line without its trailing newline).
- ``.jsonl``: one JSON object per non-empty line, with either ``"text"`` (a string, tokenized
  later) or ``"input_ids"`` (a list of ints, used as is). An optional integer ``"label"`` is the
  class of the sample for sequence classification.
- seq2seq (encoder-decoder models): ``.tsv`` with two tab-separated columns per non-empty line
  (source, target), or ``.jsonl`` objects ``{"source": ..., "target": ...}`` (strings). See
  :func:`make_seq2seq_batches`.

Files are read as UTF-8 by default (a leading byte-order mark is skipped); ``encoding=`` (the
CLI's ``--encoding``) reads other encodings. A byte sequence that is not valid in the encoding is
reported with the file, the line and a suggested encoding.

Batches
-------
:func:`make_batches` produces the batches :func:`hf_fisher.collect` takes: dicts of
``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (1 = token, 0 = padding) and ``labels``.
Padding is on the right with the tokenizer's pad token (else its EOS token, else 0). For a causal
LM, ``labels = input_ids`` with padding positions set to ``-100`` (the model shifts them itself);
for sequence classification, ``labels`` is the ``[B]`` tensor of the samples' classes.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_fisher.errors import EmptyDataError, InvalidInputError

__all__ = ["TASK_TYPES", "Sample", "check_labels", "load_samples", "make_batches", "make_seq2seq_batches", "pad_token_id"]

logger = logging.getLogger(__name__)

TASK_TYPES = ("causal_lm", "sequence_classification", "seq2seq")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One sample of a data file: ``text`` to tokenize, or ready ``input_ids``; optional ``label``.

    ``where`` (``"train.jsonl, line 3"``) says where the sample came from, for error messages; it
    takes no part in comparisons.
    """

    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    label: int | None = None
    where: str | None = field(default=None, compare=False, repr=False)
    #: seq2seq: the target text (``text`` is then the source)
    target: str | None = None


def _where(sample: Sample, i: int) -> str:
    return sample.where or f"sample {i}"


def _read_text(path: Path, encoding: str) -> str:
    """The file decoded with ``encoding`` (BOM skipped for UTF-8); bad bytes name the line."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise InvalidInputError(f"unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    data = path.read_bytes()
    if codec == "utf-8":
        codec = "utf-8-sig"  # a UTF-8 byte-order mark (Windows editors) is not part of the text
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : min(e.end, e.start + 4)]
        raise InvalidInputError(
            f"{path.name}, line {lineno}: not valid {encoding} text (byte {bad.hex(' ')} at byte "
            f"{e.start - line_start + 1} of the line); re-save the file as UTF-8 or pass its encoding, "
            f"e.g. --encoding {_guess_encoding(data, codec)}"
        ) from None


def _guess_encoding(data: bytes, failed: str) -> str:
    """A plausible encoding for bytes that failed to decode as ``failed``."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    failed = "utf-8" if failed == "utf-8-sig" else failed
    for enc in ("utf-8", "cp1252"):
        if codecs.lookup(enc).name == failed:
            continue
        try:
            data.decode(enc)
        except UnicodeDecodeError:
            continue
        return enc
    return "latin-1"  # decodes any byte sequence


def load_samples(path: str | Path, *, encoding: str = "utf-8") -> list[Sample]:
    """Read the samples of a ``.txt`` or ``.jsonl`` file (see the module docstring for formats).

    Raises :class:`InvalidInputError` for a missing file, an unknown extension, bytes that are not
    valid in ``encoding``, a malformed JSON line or a line without ``"text"``/``"input_ids"``
    (naming the file and line number), and :class:`EmptyDataError` when the file holds no sample.
    Lines end at ``\n``, ``\r\n`` or ``\r``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".tsv"):
        raise InvalidInputError(
            f"unsupported data file {str(path)!r}: expected a .txt file (one sample per line), a "
            f".jsonl file (one JSON object per line with a 'text' or 'input_ids' key, or 'source' and 'target') "
            f"or a .tsv file (source<TAB>target per line, for seq2seq models)"
        )
    if not path.is_file():
        raise InvalidInputError(f"data file {str(path)!r} does not exist (or is not a file)")
    text = _read_text(path, encoding)
    samples: list[Sample] = []
    for lineno, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        if suffix == ".txt":
            samples.append(Sample(text=line, where=f"{path.name}, line {lineno}"))
        elif suffix == ".tsv":
            samples.append(_parse_tsv_line(line, path, lineno))
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
    if "source" in obj or "target" in obj:
        return _pair(obj.get("source"), obj.get("target"), where, "'source' and 'target' must both be strings")
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
        return Sample(input_ids=tuple(ids), label=label, where=where)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise InvalidInputError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return Sample(text=obj["text"], label=label, where=where)
    raise InvalidInputError(f"{where}: the object has neither a 'text' nor an 'input_ids' key (keys: {sorted(obj)})")


def _parse_tsv_line(line: str, path: Path, lineno: int) -> Sample:
    where = f"{path.name}, line {lineno}"
    cols = line.split("\t")
    if len(cols) != 2:
        raise InvalidInputError(f"{where}: expected two tab-separated columns (source, target), found {len(cols)}")
    return _pair(cols[0], cols[1], where, "both columns must be non-empty")


def _pair(source: Any, target: Any, where: str, rule: str) -> Sample:
    """A seq2seq sample (source text, target text), both non-empty strings."""
    if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
        raise InvalidInputError(f"{where}: a seq2seq sample needs a source and a target text; {rule}")
    return Sample(text=source, target=target, where=where)


def check_labels(samples: Sequence[Sample], task_type: str, num_labels: int | None = None) -> None:
    """Check the samples' labels for ``task_type`` before any model work.

    Sequence classification: every sample needs an integer ``label`` in ``[0, num_labels)``
    (``-100`` = ignored, as in transformers) when ``num_labels > 1`` is known. Raises
    :class:`InvalidInputError` naming the file and line of the first bad sample.
    """
    if task_type == "seq2seq" or any(s.target is not None for s in samples):
        _check_pairs(samples, task_type)
        return
    if task_type != "sequence_classification":
        return
    for i, sample in enumerate(samples):
        if sample.label is None:
            raise InvalidInputError(
                f"{_where(sample, i)}: no 'label'; sequence classification needs a .jsonl file with an "
                f"integer 'label' per line"
            )
        if isinstance(sample.label, bool) or not isinstance(sample.label, int):
            raise InvalidInputError(f"{_where(sample, i)}: 'label' must be an integer class id, got {sample.label!r}")
        if num_labels is not None and num_labels > 1 and sample.label != IGNORE_INDEX and not 0 <= sample.label < num_labels:
            raise InvalidInputError(
                f"{_where(sample, i)}: label {sample.label} is outside [0, {num_labels}) (the model has "
                f"num_labels={num_labels}); fix the label or the model's num_labels"
            )


def _check_pairs(samples: Sequence[Sample], task_type: str) -> None:
    """Seq2seq models need (source, target) pairs; other models refuse them."""
    for i, sample in enumerate(samples):
        if task_type == "seq2seq" and sample.target is None:
            raise InvalidInputError(
                f"{_where(sample, i)}: no target; an encoder-decoder model needs (source, target) pairs: a .tsv file "
                "(source<TAB>target per line) or a .jsonl file with 'source' and 'target'"
            )
        if task_type != "seq2seq" and sample.target is not None:
            raise InvalidInputError(
                f"{_where(sample, i)}: a (source, target) pair, but the model is a {task_type} model, not an "
                "encoder-decoder; give a .txt file or .jsonl with 'text' / 'input_ids'"
            )


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
    if task_type == "seq2seq":
        samples = [Sample(text=x) if isinstance(x, str) else x for x in samples]
        return make_seq2seq_batches(tokenizer, samples, batch_size=batch_size, max_length=max_length,
                                    pad_id=pad_token_id(tokenizer) if pad_id is None else pad_id, vocab_size=vocab_size)
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
                raise InvalidInputError(f"{_where(sample, i)}: the sample is text but no tokenizer was given; pass one or use 'input_ids'")
            ids = list(tokenizer(sample.text, truncation=True, max_length=max_length)["input_ids"])[:max_length]
        if not ids:
            raise InvalidInputError(f"{_where(sample, i)}: the sample has no tokens (empty text?); remove it from the data")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise InvalidInputError(
                f"{_where(sample, i)}: token id {max(ids)} but the model's vocabulary has {vocab_size} entries; "
                f"does the tokenizer belong to this model?"
            )
        if task_type == "sequence_classification" and sample.label is None:
            raise InvalidInputError(
                f"{_where(sample, i)}: no 'label'; sequence classification needs a .jsonl file with an "
                f"integer 'label' per line"
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


def make_seq2seq_batches(
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Seq2seq batches of (source, target) samples: ``input_ids`` / ``attention_mask`` of the
    sources (``tokenizer(source)``) and ``labels`` of the targets (``tokenizer(text_target=
    target)``), each at most ``max_length`` tokens, right-padded (labels with -100). The model
    builds its decoder inputs from the labels (see :mod:`hf_fisher.engine.seq2seq`)."""
    if batch_size < 1 or max_length < 1:
        raise InvalidInputError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
    if not samples:
        raise EmptyDataError("no samples to batch")
    pairs = []
    for i, sample in enumerate(samples):
        if sample.target is None or sample.text is None:
            raise InvalidInputError(f"{_where(sample, i)}: a seq2seq sample needs a source and a target text")
        src = list(tokenizer(sample.text, truncation=True, max_length=max_length)["input_ids"])[:max_length]
        tgt = list(tokenizer(text_target=sample.target, truncation=True, max_length=max_length)["input_ids"])[:max_length]
        for ids, what in ((src, "source"), (tgt, "target")):
            if not ids:
                raise InvalidInputError(f"{_where(sample, i)}: the {what} has no tokens; remove the sample from the data")
            if vocab_size is not None and max(ids) >= vocab_size:
                raise InvalidInputError(
                    f"{_where(sample, i)}: {what} token id {max(ids)} but the model's vocabulary has {vocab_size} entries; "
                    "does the tokenizer belong to this model?"
                )
        pairs.append((src, tgt))
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        S, L = max(len(s) for s, _ in chunk), max(len(t) for _, t in chunk)
        ids = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), S), dtype=torch.long)
        labels = torch.full((len(chunk), L), IGNORE_INDEX, dtype=torch.long)
        for row, (src, tgt) in enumerate(chunk):
            ids[row, : len(src)] = torch.tensor(src)
            mask[row, : len(src)] = 1
            labels[row, : len(tgt)] = torch.tensor(tgt)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
