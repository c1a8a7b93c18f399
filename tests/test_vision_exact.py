"""Image classifiers (task "image_classification"): hf_fisher.collect against the brute force, float64.

Tiny ViT, DeiT, ConvNeXt (depthwise Conv2d + LayerNorm), Swin (windows, relative position bias)
and CLIP's vision tower with its classification head, built from configs. The reference runs
every image alone with plain autograd (tests/vision_models.py); the engine runs batches of 3 and 2.
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
from hf_fisher.errors import InvalidInputError, UnsupportedError


def _batches():
    return [vm.image_batch(3, seed=1), vm.image_batch(2, seed=2)]


def _collect(model, batches, **kw):
    return hf_fisher.collect(model, batches, accumulation_dtype=torch.float64, progress=False, **kw)


@pytest.mark.parametrize("family", sorted(vm.IMAGE_MODELS))
def test_image_classifier_param_mode_is_exact(family, caplog):
    model = vm.IMAGE_MODELS[family]()
    assert task_type_of(model) == "image_classification"
    batches = _batches()
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        fisher = _collect(model, batches)
    vm.assert_matches(fisher, *vm.reference(model, batches))
    extra = fisher.metadata.extra
    assert extra["task_type"] == "image_classification"
    assert extra["per_sample_path"] == "batched"
    # every Conv2d (patch embeddings, ConvNeXt's depthwise convolutions) is on the batched rule,
    # none moved to the vector-Jacobian fallback; CLIP looks its position table up with [1, P]
    # position ids shared by the batch: that one table alone takes the (exact) fallback, loudly;
    # Swin's window attention runs on [B * windows, ...] rows: its attention parameters too
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(rule_for(m, plugins.grad_rules()), ConvRule) for m in convs)
    vjp = set(extra.get("vjp_params", {}))
    if family == "swin":
        assert vjp and all(".attention." in n for n in vjp), vjp
    else:
        assert vjp == ({"vision_model.embeddings.position_embedding.weight"} if family == "clip" else set())
    assert "falling back" not in caplog.text


@pytest.mark.parametrize("family", ["vit", "convnext", "clip"])
def test_image_classifier_group_mode_is_exact(family):
    model = vm.IMAGE_MODELS[family]()
    layout = plugins.model_layout(model)
    batches = _batches()
    fisher = _collect(model, batches, reduction="group")
    vm.assert_matches(fisher, *vm.reference(model, batches, groups=layout.groups))
    if family in ("vit", "clip"):
        assert layout.adapter == "vit" and len(layout.attention) == 2 and len(layout.mlp) == 2
        q = next(n for n in layout.groups if n.endswith(("layers.0.attention.q_proj.weight", "layers.0.self_attn.q_proj.weight")))
        assert fisher.group_names(q) == [f"head_{h}" for h in range(4)]
    if family == "vit":  # the patch embedding's filters (the conv rule's Gram path over output channels)
        assert fisher.group_names("vit.embeddings.patch_embeddings.projection.weight") == [f"filter_{i}" for i in range(32)]


def test_image_batches_are_checked_before_any_work():
    model = vm.vit()
    good = vm.image_batch(2)
    bad = [
        ({"labels": good["labels"]}, "has no 'pixel_values'"),
        ({"pixel_values": good["pixel_values"][0], "labels": good["labels"]}, "floating tensor [batch, channels, height, width]"),
        ({"pixel_values": good["pixel_values"].long(), "labels": good["labels"]}, "floating tensor"),
        ({"pixel_values": good["pixel_values"]}, "needs 'labels'"),
        ({"pixel_values": good["pixel_values"], "labels": torch.tensor([0, 7])}, "class label 7 of sample 1 is outside [0, 3)"),
        ({"pixel_values": good["pixel_values"], "labels": torch.tensor([0])}, "one label per sample"),
        ({"pixel_values": good["pixel_values"].clone().fill_(float("nan")), "labels": good["labels"]}, "NaN"),
        ({**good, "attention_mask": torch.ones(2, 16)}, "takes no attention_mask"),
    ]
    for batch, message in bad:
        with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            _collect(model, [batch])


def test_batchnorm_in_train_mode_is_refused():
    """BatchNorm with batch statistics mixes the samples: refused before any work; eval mode is exact."""
    model = vm.vit()
    model.classifier = torch.nn.Sequential(torch.nn.BatchNorm1d(32, dtype=torch.float64), model.classifier)
    batches = _batches()
    with pytest.raises(InvalidInputError, match="BatchNorm1d in train mode"):
        _collect(model, batches, train_mode=True)
    fisher = _collect(model, batches)  # eval mode (the default): running statistics, per sample
    vm.assert_matches(fisher, *vm.reference(model, batches))


def test_task_type_must_fit_the_model():
    with pytest.raises(UnsupportedError, match="main input is 'input_values'"):
        _collect(vm.vit(), _batches(), task_type="audio_classification")


def test_a_model_without_a_classification_head_is_refused():
    """ViTModel returns hidden states, not class scores: refused, naming the head to use."""
    import transformers as tf

    model = tf.ViTModel(vm.vit().config).double().eval()
    with pytest.raises(InvalidInputError, match=r"class scores \[batch, num_labels\].*classification head"):
        _collect(model, _batches(), task_type="image_classification")


def test_lora_vit_is_exact():
    """A PEFT LoRA adapter on ViT's q/v projections: the task is read through the wrapper, the
    adapter's factors are exact against the brute force."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(vm.vit(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    batches = _batches()
    fisher = _collect(model, batches)
    assert len(fisher.names()) == 8 and all("lora_" in n for n in fisher.names())
    assert fisher.metadata.extra == {"task_type": "image_classification", "per_sample_path": "batched"}
    vm.assert_matches(fisher, *vm.reference(model, batches))
