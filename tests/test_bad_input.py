"""Every bad input gets its own error from hf_fisher.errors, with a message naming the fact."""

from __future__ import annotations

import re

import pytest
import torch

import hf_fisher
from hf_fisher.errors import (
    EmptyDataError,
    HfFisherError,
    InvalidInputError,
    ModelMismatchError,
    NonFiniteError,
    NoTrainableParametersError,
)

import reference as R
import tiny_models as tm


def batches3():
    return [tm.padded_batch([5, 3], seed=81), tm.padded_batch([4, 6, 2], seed=82), tm.padded_batch([7, 5, 3, 6], seed=83)]


class EmbeddingSpy:
    """Forward pre-hook on the input embedding: counts calls and remembers the ids it saw."""

    def __init__(self, model):
        self.calls = 0
        self.seen: list[torch.Tensor] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.seen.append(args[0].detach().clone())


def _mentions(msg: str, *numbers: int) -> bool:
    return all(re.search(rf"(?<![\d.]){n}(?![\d.])", msg) for n in numbers)


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("bad_id", [tm.VOCAB, 999, -5], ids=["vocab", "large", "negative"])
def test_out_of_range_token_in_first_batch(collect, bad_id):
    model = tm.llama()
    batches = batches3()
    batches[0]["input_ids"][1, 2] = bad_id
    spy = EmbeddingSpy(model)
    with pytest.raises(InvalidInputError) as exc:
        collect(model, batches, progress=False)
    assert spy.calls == 0, "the bad batch must be rejected before any forward"
    msg = str(exc.value)
    assert re.search(r"batch\D{0,12}0(?!\d)", msg), msg
    assert _mentions(msg, 1, 2), f"position (1, 2) not named: {msg}"
    assert str(bad_id) in msg, msg


def test_out_of_range_token_in_later_batch(collect):
    """The offending batch (index 2, position (3, 4)) is named and never reaches the model."""
    model = tm.gpt2()
    batches = batches3()
    batches[2]["input_ids"][3, 4] = 4321
    spy = EmbeddingSpy(model)
    with pytest.raises(InvalidInputError) as exc:
        collect(model, iter(batches), progress=False)
    msg = str(exc.value)
    assert re.search(r"batch\D{0,12}2(?!\d)", msg), msg
    assert _mentions(msg, 3, 4), f"position (3, 4) not named: {msg}"
    assert "4321" in msg
    assert all(int(ids.max()) < tm.VOCAB for ids in spy.seen), "an out-of-range id reached the embedding"


# --------------------------------------------------------------------------- empty data / frozen model


@pytest.mark.parametrize("make", [list, lambda: iter([]), tuple], ids=["list", "iterator", "tuple"])
def test_no_batches(collect, make):
    with pytest.raises(EmptyDataError):
        collect(tm.llama(), make(), progress=False)


def test_no_label_tokens_anywhere(collect):
    batches = batches3()[:2]
    for b in batches:
        b["labels"][:] = -100
    batches.append({"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)})
    with pytest.raises(EmptyDataError) as exc:
        collect(tm.llama(), batches, progress=False)
    assert "label" in str(exc.value).lower(), f"should say that no sample has a label token: {exc.value}"


def test_all_parameters_frozen(collect):
    model = tm.llama()
    for p in model.parameters():
        p.requires_grad_(False)
    spy = EmbeddingSpy(model)
    with pytest.raises(NoTrainableParametersError):
        collect(model, batches3(), progress=False)
    assert spy.calls == 0


# --------------------------------------------------------------------------- non-finite values


def _nan_token_model():
    """llama (untied lm_head) whose embedding row for one token id is NaN, and two batches in
    which that id appears only in batch 1, sample 2, at its first position."""
    model = tm.llama()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    batches = [tm.padded_batch([5, 3, 6], seed=91), tm.padded_batch([4, 6, 5, 7], seed=92)]
    used = set(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
    bad = next(t for t in range(3, tm.VOCAB) if t not in used)
    batches[1]["input_ids"][2, 0] = bad
    batches[1]["labels"][2, 0] = bad
    with torch.no_grad():
        model.model.embed_tokens.weight[bad] = float("nan")
    return model, batches


def test_nonfinite_raises_naming_sample(collect):
    model, batches = _nan_token_model()
    with pytest.raises(NonFiniteError) as exc:
        collect(model, batches, progress=False)
    msg = str(exc.value)
    assert re.search(r"batch\D{0,12}1(?!\d)", msg) and _mentions(msg, 2), f"sample (batch 1, row 2) not named: {msg}"


def test_nonfinite_weight_raises(collect):
    model = tm.gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        collect(model, batches3(), progress=False)


def test_nonfinite_skip(collect):
    model, batches = _nan_token_model()
    samples = [s for b in batches for s in R.split_batch(b)]
    others = samples[:5] + samples[6:]  # sample 5 = batch 1, row 2
    mean, var, n_used, n_skipped = R.reference_fisher(model, others)
    fisher = collect(model, batches, on_nonfinite="skip", progress=False)
    assert fisher.counts.nonfinite == 1
    assert fisher.counts.samples == n_used == 6
    for p in mean:
        assert torch.isfinite(fisher[p]).all(), p
        R.assert_close(fisher[p], mean[p], rtol=1e-6, floor=R.global_floor(mean), what=p)
        R.assert_close(fisher.variances[p], var[p], rtol=1e-6, floor=R.global_floor(var), what=p)


# --------------------------------------------------------------------------- artifacts vs models


def test_from_pretrained_other_model(collect, tmp_path):
    from hf_fisher import Fisher

    model = tm.llama()
    fisher = collect(model, batches3()[:1], progress=False)
    fisher.save_pretrained(tmp_path / "f")
    Fisher.from_pretrained(tmp_path / "f", model=tm.llama(seed=3))  # same architecture: fine

    other = tm.gpt2()
    with pytest.raises(ModelMismatchError) as exc:
        Fisher.from_pretrained(tmp_path / "f", model=other)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in other.named_parameters()}
    assert any(n in str(exc.value) for n in names), f"no parameter named: {exc.value}"

    wider = tm.llama(vocab=tm.VOCAB + 6)
    with pytest.raises(ModelMismatchError) as exc:
        Fisher.from_pretrained(tmp_path / "f", model=wider)
    msg = str(exc.value)
    assert "embed_tokens" in msg or "lm_head" in msg, msg
    assert str(tm.VOCAB) in msg and str(tm.VOCAB + 6) in msg, f"shapes not shown: {msg}"


def test_failed_collect_writes_nothing(collect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batches = batches3()
    batches[1]["input_ids"][0, 0] = 10_000
    with pytest.raises(InvalidInputError):
        collect(tm.llama(), batches, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- option names


@pytest.mark.parametrize(
    "option,value,choices",
    [
        ("reduction", "layer", ["param", "group"]),
        ("normalization", "average", ["mean", "sum", "token"]),
        ("estimator", "fancy", ["empirical"]),
        ("on_nonfinite", "ignore", ["raise", "skip"]),
    ],
)
def test_unknown_option_names_choices(collect, option, value, choices):
    model = tm.llama()
    spy = EmbeddingSpy(model)
    with pytest.raises(InvalidInputError) as exc:
        collect(model, batches3(), progress=False, **{option: value})
    assert isinstance(exc.value, HfFisherError)
    msg = str(exc.value)
    assert value in msg, msg
    for c in choices:
        assert c in msg, f"valid choice {c!r} not listed: {msg}"
    assert spy.calls == 0


# --------------------------------------------------------------------------- batch shapes and labels (issue 11)


def _rejected_before_forward(model, batches, error=InvalidInputError):
    spy = EmbeddingSpy(model)
    with pytest.raises(error) as exc:
        hf_fisher.collect(model, batches, progress=False)
    assert spy.calls == 0, "the bad batch must be rejected before any forward"
    return str(exc.value)


def test_attention_mask_shape_mismatch():
    batches = batches3()
    batches[1]["attention_mask"] = batches[1]["attention_mask"][:, :-1]
    msg = _rejected_before_forward(tm.llama(), batches[1:])
    assert "attention_mask" in msg and "(3, 6)" in msg and "(3, 5)" in msg, msg


def test_labels_shape_mismatch_causal():
    batches = batches3()
    batches[0]["labels"] = batches[0]["labels"][:1]
    msg = _rejected_before_forward(tm.llama(), batches)
    assert "labels" in msg and "(1, 5)" in msg, msg


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_label_id_outside_vocabulary(kind):
    model = tm.llama() if kind == "causal" else tm.bert_mlm()
    batches = batches3()
    batches[1]["labels"][2, 1] = tm.VOCAB + 7
    msg = _rejected_before_forward(model, batches[1:])
    assert re.search(r"batch\D{0,12}0(?!\d)", msg) and _mentions(msg, 2, 1) and str(tm.VOCAB + 7) in msg, msg
    assert "-100" in msg, "should say how to ignore a token"


def test_class_label_outside_num_labels():
    model = tm.bert_classifier(num_labels=3)
    b = tm.padded_batch([4, 5, 3], seed=3)
    b["labels"] = torch.tensor([0, 3, 1])
    msg = _rejected_before_forward(model, [b])
    assert "class label 3" in msg and "sample 1" in msg and "num_labels=3" in msg, msg


def test_classifier_label_shape_mismatch():
    model = tm.bert_classifier()
    b = tm.padded_batch([4, 5, 3], seed=3)
    b["labels"] = torch.tensor([0, 1])
    msg = _rejected_before_forward(model, [b])
    assert "one label per sample" in msg, msg


def test_sequence_longer_than_learned_positions():
    """GPT-2 has 128 learned positions in the tiny config: 130 tokens cannot be embedded."""
    model = tm.gpt2()
    b = tm.padded_batch([130, 20], seed=4)
    msg = _rejected_before_forward(model, [b])
    assert "130" in msg and "128" in msg and "truncat" in msg, msg


def test_every_sample_nonfinite_says_so():
    """With on_nonfinite='skip' and a model that is NaN everywhere, the error says that samples
    were dropped as non-finite, not that there were no label tokens."""
    model = tm.llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(EmptyDataError) as exc:
        hf_fisher.collect(model, batches3()[:2], on_nonfinite="skip", progress=False)
    msg = str(exc.value)
    assert "not finite" in msg and "5 samples" in msg, msg
