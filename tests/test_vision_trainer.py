"""FisherCallback inside a real transformers.Trainer on a tiny ViT classifier (learning rate 0):
the contributions come from the Trainer's own backward passes and must equal hf_fisher.collect
over the same images."""

from __future__ import annotations

import pytest
import torch
import vision_models as vm
from transformers import Trainer, TrainingArguments

import hf_fisher

from tiny_models import ListDataset

N = 8


def collate(items):
    return {"pixel_values": torch.cat([it["pixel_values"] for it in items]), "labels": torch.cat([it["labels"] for it in items])}


@pytest.mark.parametrize("reduction", ["param", "group"])
def test_vit_trainer_callback_equals_collect(tmp_path, reduction):
    model = vm.vit(torch.float32)
    samples = vm.samples(vm.image_batch(N, dtype=torch.float32, seed=5))
    cb = hf_fisher.FisherCallback(reduction=reduction)
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0,
        max_steps=N // 4, report_to=[], logging_steps=1, use_cpu=True, remove_unused_columns=False,
        disable_tqdm=True, seed=0, data_seed=0, save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=ListDataset(samples), data_collator=collate, callbacks=[cb]).train()
    fisher = cb.fisher()
    assert cb.collector.fallback_batches == 0, "every micro-batch must come from the Trainer's own backward"
    assert fisher.metadata.extra["task_type"] == "image_classification"
    ref = hf_fisher.collect(model, [collate([s]) for s in samples], reduction=reduction, progress=False)
    assert fisher.counts.samples == ref.counts.samples == N
    top = max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        torch.testing.assert_close(fisher[name], ref[name], rtol=2e-4, atol=1e-7 * top, msg=lambda m, n=name: f"{n}: {m}")
