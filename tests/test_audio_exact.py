"""Audio classifiers (task "audio_classification"): hf_fisher.collect against the brute force on
right-padded raw-audio batches, float64.

wav2vec2 and HuBERT sequence classifiers with ``feat_extract_norm="layer"`` (the variant that
takes an attention mask): the reference runs every clip alone, without its padding. The
feature encoder's Conv1d layers are on the batched conv rule; the positional convolution's
weight-norm parameters (a parametrisation computed once per batch, shared by the samples) take
the exact vector-Jacobian path (as do the projections whose outputs the model zeroes in place
at padded frames). wav2vec2 with ``feat_extract_norm="group"`` normalises each
channel over the whole padded clip: the padding check catches it and the engine computes it
per sample, loudly, still exact.
"""

from __future__ import annotations

import logging

import pytest
import torch
import vision_models as vm

import hf_fisher
from hf_fisher import plugins
from hf_fisher.engine.losses import task_type_of
from hf_fisher.engine.rules import ConvRule, rule_for
from hf_fisher.errors import InvalidInputError


def _batches():
    return [vm.audio_batch([200, 137, 96], seed=1), vm.audio_batch([150, 200], seed=2)]


def _collect(model, batches, **kw):
    return hf_fisher.collect(model, batches, accumulation_dtype=torch.float64, progress=False, **kw)


@pytest.mark.parametrize("family", sorted(vm.AUDIO_MODELS))
@pytest.mark.parametrize("reduction", ["param", "group"])
def test_audio_classifier_on_padded_batches_is_exact(family, reduction, caplog):
    model = vm.AUDIO_MODELS[family]()
    assert task_type_of(model) == "audio_classification"
    batches = _batches()
    layout = plugins.model_layout(model)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        fisher = _collect(model, batches, reduction=reduction)
    vm.assert_matches(fisher, *vm.reference(model, batches, groups=layout.groups if reduction == "group" else None))
    extra = fisher.metadata.extra
    assert extra["per_sample_path"] == "batched" and "falling back" not in caplog.text
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 3 and all(isinstance(rule_for(m, plugins.grad_rules()), ConvRule) for m in convs)
    # the weight norm's parameters, and the two projections whose outputs the model zeroes in
    # place at padded frames (the hooks on those outputs cannot see their gradient) take the
    # exact vector-Jacobian path; the feature encoder's convolutions and every layer stay batched
    weight_norm = {f"{family}.encoder.pos_conv_embed.conv.parametrizations.weight.original{k}" for k in (0, 1)}
    in_place = {f"{family}.feature_projection.projection.{p}" for p in ("weight", "bias")} | {"projector.weight", "projector.bias"}
    vjp = set(extra.get("vjp_params", {}))
    assert weight_norm <= vjp <= weight_norm | in_place, vjp
    assert layout.adapter == "vit" and len(layout.attention) == 2 and len(layout.mlp) == 2
    if reduction == "group":
        assert fisher.group_names(f"{family}.encoder.layers.1.attention.out_proj.weight") == [f"head_{h}" for h in range(4)]
        assert fisher.group_names(f"{family}.feature_extractor.conv_layers.1.conv.weight") == [f"filter_{i}" for i in range(8)]


def test_group_norm_wav2vec2_mixes_the_padding_in_and_is_computed_per_sample(caplog):
    """``feat_extract_norm="group"`` normalises over the padded clip: a sample's output depends on
    its padding. The padding check catches it; the per-sample path (each clip alone) is exact."""
    model = vm.wav2vec2(norm="group")
    batches = _batches()
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        fisher = _collect(model, batches)
    assert fisher.metadata.extra["per_sample_path"] == "loop"
    assert "depends on the padding" in fisher.metadata.extra["loop_reason"]
    assert "falling back to a per-sample loop" in caplog.text
    vm.assert_matches(fisher, *vm.reference(model, batches))


def test_audio_batches_are_checked_before_any_work():
    model = vm.hubert()
    good = vm.audio_batch([50, 40])
    bad = [
        ({"labels": good["labels"]}, "has no 'input_values'"),
        ({**good, "input_values": good["input_values"].unsqueeze(1)}, r"floating tensor \[batch, samples\]"),
        ({**good, "attention_mask": good["attention_mask"][:, :10]}, "attention_mask has shape"),
        ({**good, "attention_mask": torch.zeros_like(good["attention_mask"])}, "sample 0 is all padding"),
        ({**good, "labels": torch.tensor([0, 3])}, r"class label 3 of sample 1 is outside \[0, 3\)"),
    ]
    for batch, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            _collect(model, [batch])


def test_unlabelled_clips_are_skipped_and_counted():
    model = vm.wav2vec2()
    batch = vm.audio_batch([120, 90, 100], seed=3)
    batch["labels"][1] = -100
    fisher = _collect(model, [batch])
    assert fisher.counts.samples == 2 and fisher.counts.skipped == 1
    kept = {k: v[[0, 2]] for k, v in batch.items()}
    vm.assert_matches(fisher, *vm.reference(model, [kept]))
