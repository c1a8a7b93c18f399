"""The free path's first-batch check stays on until a free micro-batch passes it. When the check
fails (here: Mixtral's router, whose per-sample gradients captured from the Trainer's backward do
not add up to its batch gradient), the micro-batch is redone by the engine's own pass, whose own
check passes; that pass must not turn the free path's check off, or every later micro-batch would
take the router's unchecked (wrong: up to 68% relative) contributions. Every micro-batch is then
checked and redone, and the callback's Fisher equals ``collect`` on the same batches."""

from __future__ import annotations

import pytest
import torch
from test_hardening_trainer import EOS, Recording, eos_tokenizer, lm_samples, train_lm
from transformers import DataCollatorForLanguageModeling

import hf_fisher

import extra_models as em

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_a_failed_free_check_keeps_every_later_micro_batch_checked(tmp_path, caplog):
    model, _, _ = em.mixtral()
    model.config.pad_token_id = EOS
    collator = Recording(DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False))
    cb = hf_fisher.FisherCallback(reduction="group")
    with caplog.at_level("WARNING", logger="hf_fisher"):
        train_lm(model, lm_samples(n=12), tmp_path, collator, callbacks=[cb])
    assert len(collator.batches) == 3
    assert "do not add up to the Trainer's batch gradient" in caplog.text
    assert cb.collector.fallback_batches == 3  # each micro-batch checked, found wrong, redone
    fisher = cb.fisher()
    ref = hf_fisher.collect(model, collator.batches, reduction="group", progress=False)
    assert fisher.counts.samples == ref.counts.samples == 12
    for name in ref.names():
        torch.testing.assert_close(fisher[name].double(), ref[name].double(), rtol=1e-6, atol=1e-12 * float(ref[name].abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
