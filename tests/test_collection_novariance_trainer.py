"""``FisherCallback(variance=False)``: the option reaches the collector the callback builds (free
training mode); the Fisher is the mean kept with the variance, bit for bit, without variance;
refused with ``ema_decay`` at construction."""

from __future__ import annotations

import pytest
import torch
from test_hardening_trainer import Recording, eos_tokenizer, lm_samples, pad_is_eos, train_lm
from transformers import DataCollatorForLanguageModeling

import hf_fisher
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_callback_passes_variance_false_to_its_collector(tmp_path):
    fishers = {}
    for variance in (True, False):
        model = pad_is_eos(tm.llama(torch.float32))
        collator = Recording(DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False))
        cb = hf_fisher.FisherCallback(reduction="group", variance=variance)
        train_lm(model, lm_samples(), tmp_path / str(variance), collator, callbacks=[cb])
        assert cb.collector.keeps_variance is variance
        fishers[variance] = cb.fisher()
    ref, f = fishers[True], fishers[False]
    assert ref.has_variance and not f.has_variance and f.metadata.extra["variance"] is False
    for n in ref.names():
        assert torch.equal(ref[n], f[n]), n


def test_callback_refuses_variance_false_with_ema():
    with pytest.raises(InvalidInputError, match="variance=False cannot be combined with ema_decay"):
        hf_fisher.FisherCallback(variance=False, ema_decay=0.9)
