"""Seq2seq (encoder-decoder) Fisher against a brute force, float64, padded batches.

The reference (tests/seq2seq_models.py) runs every sample alone, without padding, through the
model's own loss (the model shifts its labels itself) with plain autograd; hf_fisher runs padded
batches: right- and left-padded sources, targets padded with -100 and with / without a
decoder_attention_mask, several batch and target lengths. Exact to ~1e-6 relative means the
decoder inputs, the per-sample decoder cross-entropy, the label counts, the decoder-side padding
and the per-sample gradients of encoder, decoder and cross-attention parameters are all right.
"""

from __future__ import annotations

import logging

import pytest
import seq2seq_models as sm
import torch

from hf_fisher import collect
from hf_fisher.errors import InvalidInputError
from hf_fisher.plugins import model_layout

import reference as R

RTOL = 1e-6
MODELS = {**sm.TOKEN_MODELS, "whisper": sm.whisper}


def batches(model, side="right"):
    """Two padded batches (B=3, target length 7; B=4, target length 6 with a decoder mask); one
    sample of the second has no label token (skipped, counted)."""
    b1 = sm.batch(model, [5, 3, 7], [4, 2, 6], seed=1, side=side)
    b2 = sm.batch(model, [2, 6, 4, 3], [3, 5, 1, 4], seed=2, side=side, decoder_mask=True)
    b2["labels"][2] = -100
    return [b1, b2]


def check(fisher, mean, var, n):
    assert fisher.counts.samples == n
    floor_m, floor_v = R.global_floor(mean), R.global_floor(var)
    assert sorted(fisher.names()) == sorted(mean)
    for name in mean:
        R.assert_close(fisher[name], mean[name], rtol=RTOL, floor=floor_m, what=f"mean {name}")
        R.assert_close(fisher.variances[name], var[name], rtol=RTOL, floor=floor_v, what=f"variance {name}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seq2seq_matches_brute_force(name):
    model = MODELS[name]()
    bs = batches(model)
    fisher = collect(model, bs, progress=False)
    mean, var, n = sm.reference(model, bs)
    assert n == 6 and fisher.counts.skipped == 1
    assert fisher.metadata.extra["task_type"] == "seq2seq"
    check(fisher, mean, var, n)
    # cross-attention and encoder parameters are covered and non-zero
    assert any("encoder" in k and float(fisher[k].sum()) > 0 for k in mean)
    assert any(("EncDecAttention" in k or "encoder_attn" in k) and float(fisher[k].sum()) > 0 for k in mean)


@pytest.mark.parametrize("name", sorted(sm.TOKEN_MODELS))
def test_seq2seq_left_padded_sources(name, caplog):
    """Left-padded sources: T5 (relative positions) stays on the batched path; the BART family
    counts positions from the first column, so the padding check sends it (loudly) to the exact
    per-sample path."""
    model = MODELS[name]()
    bs = batches(model, side="left")
    with caplog.at_level(logging.WARNING):
        fisher = collect(model, bs, progress=False, normalization="sum")
    mean, var, n = sm.reference(model, bs, normalization="sum")
    check(fisher, mean, var, n)
    path = fisher.metadata.extra["per_sample_path"]
    if name == "t5":
        assert path == "batched"
        assert set(fisher.metadata.extra["vjp_params"]) == {
            n for n in mean if n.endswith("relative_attention_bias.weight")
        }
    else:
        assert path == "loop" and "without padding" in fisher.metadata.extra["loop_reason"]


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_right_padding_stays_batched(name):
    model = MODELS[name]()
    fisher = collect(model, batches(model), progress=False)
    assert fisher.metadata.extra["per_sample_path"] == "batched"


def test_t5_relative_bias_batch_of_query_length():
    """T5's relative bias embedding has output [q, k, heads]: with as many samples as decoder
    positions its leading dimension looks batched; it is a call shared by the batch all the same,
    on the vector-Jacobian path from the start (without that, the padding check finds the batch's
    gradient wrong and the whole collection falls back to the per-sample loop)."""
    model = sm.t5()
    b = sm.batch(model, [3, 4, 2], [3, 3, 2], seed=5, pad_extra=0)  # 3 samples, 3 target positions
    b["input_ids"] = b["input_ids"][:, :3]
    b["attention_mask"] = b["attention_mask"][:, :3]  # 3 source positions
    fisher = collect(model, [b], progress=False)
    mean, var, n = sm.reference(model, [b])
    check(fisher, mean, var, n)
    assert fisher.metadata.extra["per_sample_path"] == "batched"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seq2seq_groups_exact(name):
    model = MODELS[name]()
    layout = model_layout(model)
    assert layout.adapter == "encdec"
    bs = batches(model)
    fisher = collect(model, bs, progress=False, reduction="group")
    contributions = []
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    for b in bs:
        for s in sm.samples(b):
            if int((s["labels"] != -100).sum()) == 0:
                continue
            grads = torch.autograd.grad(model(**s, use_cache=False).loss, [p for _, p in named])
            contributions.append({k: g.double() ** 2 for (k, _), g in zip(named, grads)})
    groups = {k: layout.groups[k] for k, _ in named}
    mean = {k: torch.stack([groups[k].reduce(c[k]) for c in contributions]).mean(0) for k in groups}
    var = R.reference_group_variance(contributions, groups)
    check(fisher, mean, var, len(contributions))


def test_encdec_layout_heads_and_channels():
    t5 = sm.t5()
    g = model_layout(t5).groups
    H, ff = t5.config.num_heads, t5.config.d_ff
    assert g["decoder.block.1.layer.1.EncDecAttention.q.weight"].num_groups == H
    assert g["decoder.block.1.layer.1.EncDecAttention.o.weight"].axis == 1
    assert g["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].num_groups == H
    assert g["encoder.block.0.layer.1.DenseReluDense.wi.weight"].num_groups == ff
    bart = sm.bart()
    g = model_layout(bart).groups
    assert g["model.decoder.layers.0.encoder_attn.k_proj.bias"].num_groups == bart.config.decoder_attention_heads
    assert g["model.decoder.layers.0.encoder_attn.out_proj.weight"].axis == 1
    assert g["model.encoder.layers.0.fc2.weight"].num_groups == bart.config.encoder_ffn_dim
    wh = sm.whisper()
    g = model_layout(wh).groups
    assert g["model.encoder.conv1.weight"].num_groups == wh.config.d_model


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.pop("labels"), "needs 'input_ids'"),
        (lambda b: b.update(decoder_attention_mask=b["attention_mask"]), "decoder_attention_mask has shape"),
        (lambda b: b["labels"].__setitem__((0, 0), 10_000), "outside the model's output vocabulary"),
        (lambda b: b.update(labels=b["labels"][:2]), "labels has shape"),
        (lambda b: b.update(labels=torch.full((3, 70), 5)), "decoder positions"),
    ],
)
def test_seq2seq_bad_batch_refused_before_work(change, message):
    model = sm.bart()
    b = sm.batch(model, [5, 3, 7], [4, 2, 6], seed=1)
    change(b)
    with pytest.raises(InvalidInputError, match=message):
        collect(model, [b], progress=False)


def test_whisper_features_shape_refused():
    model = sm.whisper()
    b = sm.batch(model, [], [4, 2], seed=1)
    b["input_features"] = b["input_features"][:, :, :-1]
    with pytest.raises(InvalidInputError, match="input_features has shape"):
        collect(model, [b], progress=False)


def test_decoder_attention_mask_decides_which_labels_count():
    """A label on a position the decoder mask hides does not count (as padding): the Fisher
    equals the one with that label set to -100."""
    model = sm.bart()
    b = sm.batch(model, [5, 3, 7], [4, 2, 6], seed=1, decoder_mask=True)
    b["labels"] = b["labels"].masked_fill(b["decoder_attention_mask"] == 0, 7)  # labels under the mask
    b["decoder_attention_mask"][0, 3] = 0  # and sample 0's last label hidden too
    expected = dict(b, labels=b["labels"].masked_fill(b["decoder_attention_mask"] == 0, -100))
    fisher = collect(model, [b], progress=False)
    mean, var, n = sm.reference(model, [expected])
    assert fisher.counts.tokens == int((expected["labels"] != -100).sum()) == 4 - 1 + 2 + 6
    check(fisher, mean, var, n)
