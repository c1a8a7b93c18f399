"""Data files for the CLI: .txt / .jsonl parsing, errors, padding, labels."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fisher.data import Sample, load_samples, make_batches, pad_token_id
from hf_fisher.demo import word_tokenizer
from hf_fisher.errors import EmptyDataError, InvalidInputError


@pytest.fixture(scope="module")
def tokenizer():
    # <pad> 0, <s> 1, </s> 2, <unk> 3, then the words from id 4; <s> is prepended to every text.
    return word_tokenizer(["a", "b", "c", "d"])


def test_txt_one_sample_per_non_empty_line(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("a b c\n\n   \nd a\r\nlast line without newline", encoding="utf-8")
    samples = load_samples(f)
    assert [s.text for s in samples] == ["a b c", "d a", "last line without newline"]
    assert all(s.input_ids is None and s.label is None for s in samples)


def test_jsonl_text_ids_and_labels(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "a b", "label": 1}) + "\n\n" + json.dumps({"input_ids": [5, 6, 7], "extra": 0}) + "\n",
        encoding="utf-8",
    )
    assert load_samples(f) == [Sample(text="a b", label=1), Sample(input_ids=(5, 6, 7))]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.csv", "a,b\n", r"\.txt .*\.jsonl"),
        ("d.jsonl", '{"text": "a"}\n{"text": "b"\n', r"d\.jsonl, line 2: malformed JSON"),
        ("d.jsonl", '{"text": "a"}\n\n{"content": "b"}\n', r"line 3: .*neither a 'text' nor an 'input_ids'.*content"),
        ("d.jsonl", "[1, 2]\n", r"line 1: expected a JSON object"),
        ("d.jsonl", '{"input_ids": [1, "x"]}\n', r"line 1: 'input_ids' must be"),
        ("d.jsonl", '{"input_ids": []}\n', r"line 1: 'input_ids' must be a non-empty"),
        ("d.jsonl", '{"text": 3}\n', r"line 1: 'text' must be a string"),
        ("d.jsonl", '{"text": "a", "label": "pos"}\n', r"line 1: 'label' must be an integer"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=match):
        load_samples(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_samples(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(EmptyDataError, match="no sample"):
        load_samples(tmp_path / "empty.txt")


def test_causal_batches_right_padded_with_ignored_labels(tokenizer):
    samples = [Sample(text="a b c"), Sample(text="d"), Sample(input_ids=(9, 8)), "c c"]
    batches = make_batches(tokenizer, samples, batch_size=3, max_length=16, task_type="causal_lm")
    assert len(batches) == 2
    b0, b1 = batches
    # "a b c" -> <s> a b c = 1 4 5 6; "d" -> 1 7; ids pass through untokenized; pad id is <pad> = 0.
    assert b0["input_ids"].tolist() == [[1, 4, 5, 6], [1, 7, 0, 0], [9, 8, 0, 0]]
    assert b0["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert b0["labels"].tolist() == [[1, 4, 5, 6], [1, 7, -100, -100], [9, 8, -100, -100]]
    assert b1["input_ids"].tolist() == [[1, 6, 6]]
    assert b1["labels"].tolist() == [[1, 6, 6]]
    assert all(v.dtype == torch.long for b in batches for v in b.values())


def test_truncation_to_max_length(tokenizer):
    (b,) = make_batches(tokenizer, ["a b c d a b", Sample(input_ids=(9, 9, 9, 9, 9))], batch_size=4, max_length=3)
    assert b["input_ids"].tolist() == [[1, 4, 5], [9, 9, 9]]


def test_sequence_classification_labels(tokenizer):
    samples = [Sample(text="a", label=2), Sample(text="b c", label=0)]
    (b,) = make_batches(tokenizer, samples, batch_size=8, max_length=8, task_type="sequence_classification")
    assert b["labels"].tolist() == [2, 0]
    assert b["input_ids"].tolist() == [[1, 4, 0], [1, 5, 6]]
    with pytest.raises(InvalidInputError, match="sample 1: no 'label'"):
        make_batches(tokenizer, [samples[0], Sample(text="a")], batch_size=2, max_length=8, task_type="sequence_classification")


def test_batch_errors(tokenizer):
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        make_batches(None, ["a"], batch_size=1, max_length=4)
    with pytest.raises(InvalidInputError, match="token id 61 .* 61 entries"):
        make_batches(None, [Sample(input_ids=(3, 61))], batch_size=1, max_length=4, vocab_size=61)
    with pytest.raises(InvalidInputError, match="unknown task_type"):
        make_batches(tokenizer, ["a"], batch_size=1, max_length=4, task_type="translation")
    with pytest.raises(InvalidInputError, match="batch_size"):
        make_batches(tokenizer, ["a"], batch_size=0, max_length=4)
    with pytest.raises(EmptyDataError):
        make_batches(tokenizer, [], batch_size=1, max_length=4)


class _Tok:
    def __init__(self, pad=None, eos=None):
        self.pad_token_id, self.eos_token_id = pad, eos


def test_pad_token_fallbacks(tokenizer):
    assert pad_token_id(tokenizer) == 0
    assert pad_token_id(_Tok(pad=None, eos=7)) == 7
    assert pad_token_id(_Tok(), _Tok(pad=None, eos=[5, 6])) == 5
    assert pad_token_id(None) == 0
    (b,) = make_batches(_Tok(eos=7), [Sample(input_ids=(3,)), Sample(input_ids=(3, 4))], batch_size=2, max_length=4)
    assert b["input_ids"].tolist() == [[3, 7], [3, 4]]
    assert b["labels"].tolist() == [[3, -100], [3, 4]]
