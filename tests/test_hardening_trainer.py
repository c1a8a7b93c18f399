"""Issue 21 hardening of the Trainer callback and the estimator choice (CPU, tiny real models).

- Left-padded causal-LM batches from ``DataCollatorForLanguageModeling(mlm=False)`` with pad =
  eos (a non-zero pad embedding): the Trainer's loss also counts the first real token's label,
  predicted from a pad position. The Fisher's definition is the sample alone, without padding
  (DESIGN.md section 2): the callback's Fisher must equal ``collect``'s on the same batches.
- The estimator choice is honoured or refused, never swapped.
- Bad probe data and a bad ``base_model`` are refused at construction.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer, TrainingArguments

import hf_fisher
import reference as R
import tiny_models as tm
from hf_fisher.errors import InvalidInputError

EOS = 2  # pad = eos, as in most trained causal LMs: its embedding row is not zero


def eos_tokenizer(side="left"):
    vocab = {f"t{i}": i for i in range(tm.VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0", bos_token="t1", eos_token=f"t{EOS}", pad_token=f"t{EOS}",
    )
    tok.padding_side = side
    return tok


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def lm_samples(n=8, seed=0):
    """Token-id lists of different lengths, no eos inside (the collator would mask it as padding)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, tm.VOCAB, (2 + (5 * k + 3) % 7,), generator=g).tolist()} for k in range(n)]


def pad_is_eos(model):
    model.config.pad_token_id = EOS
    emb = model.get_input_embeddings().weight
    assert float(emb[EOS].detach().abs().sum()) > 0, "the pad (= eos) embedding must be non-zero for this test to mean anything"
    return model


def train_lm(model, samples, tmp_path, collator, *, callbacks=(), bs=4, ga=1):
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=0.0,
        max_steps=len(samples) // (bs * ga), report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(samples), data_collator=collator, callbacks=list(callbacks))
    trainer.train()
    return trainer


def trainer_batches(trainer):
    """The micro-batches the Trainer fed, in order (its dataloader replays them: same seed)."""
    return list(trainer.get_train_dataloader())


class Recording:
    """A collator that keeps every batch it gives the Trainer (the reference runs on exactly these)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, items):
        batch = self.collator(items)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def assert_fisher_close(f, ref, rtol):
    assert sorted(f.names()) == sorted(ref.names())
    assert (f.counts.samples, f.counts.tokens, f.counts.skipped) == (ref.counts.samples, ref.counts.tokens, ref.counts.skipped)
    floor = 1e-12 * max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        R.assert_close(f[name], ref[name], rtol=rtol, floor=floor, what=f"mean {name}")
        R.assert_close(f.variances[name], ref.variances[name], rtol=10 * rtol, floor=floor * floor + 1e-30, atol_rel=1e-6, what=f"variance {name}")


def first_label_from_padding(batch):
    """Label tokens predicted from a padding position (what the Trainer's loss counts and the sample alone lacks)."""
    return int(((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, :-1] == 0)).sum())


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("make", [tm.llama, tm.qwen2], ids=["llama", "qwen2"])
def test_left_padded_lm_collator_callback_equals_collect(tmp_path, caplog, make, dtype):
    """DataCollatorForLanguageModeling(mlm=False), left padding, pad = eos (non-zero embedding), Trainer at
    learning rate 0: the callback's Fisher is collect's on the same batches, which is the brute force of every
    sample alone (the first real token's label, predicted from padding, is not counted), and it says so."""
    model = pad_is_eos(make(dtype))
    collator = Recording(DataCollatorForLanguageModeling(eos_tokenizer("left"), mlm=False))
    cb = hf_fisher.FisherCallback(reduction="param")
    with caplog.at_level("WARNING", logger="hf_fisher"):
        train_lm(model, lm_samples(), tmp_path, collator, callbacks=[cb])
    batches = collator.batches
    assert len(batches) == 2 and all(first_label_from_padding(b) > 0 for b in batches), "the case under test: left padding labels the first token"
    assert all(bool((b["input_ids"][b["attention_mask"] == 0] == EOS).all()) for b in batches)
    fisher = cb.fisher()

    ref = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert_fisher_close(fisher, ref, rtol=TOL[dtype])
    # the definition: every sample alone, without its padding (brute force)
    mean, _, n_used, _ = R.reference_fisher(model, [s for b in batches for s in R.split_batch(b)])
    assert fisher.counts.samples == n_used == 8
    for name in mean:
        R.assert_close(fisher[name], mean[name], rtol=100 * TOL[dtype], floor=1e-12 * float(mean[name].abs().max()), what=name)

    # loud and recorded: one WARNING naming the cause, the count in the artifact (saved too)
    assert cb.collector.fallback_batches == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "left padding" in r.getMessage()]
    assert len(warnings) == 1 and "DataCollatorForLanguageModeling" in warnings[0].getMessage()
    training = hf_fisher.Fisher.from_pretrained(tmp_path / "fisher").metadata.extra["training"]
    assert training["extra_pass_batches"] == 2
    (reason, count), = training["extra_pass_reasons"].items()
    assert count == 2 and "padding_side='right'" in reason


def test_right_padded_lm_collator_stays_free_and_exact(tmp_path):
    """The same collator with right padding: no label comes from padding, the free path takes every
    micro-batch (no extra pass, nothing recorded) and equals collect."""
    model = pad_is_eos(tm.llama(torch.float32))
    collator = Recording(DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False))
    cb = hf_fisher.FisherCallback(reduction="group")
    train_lm(model, lm_samples(), tmp_path, collator, callbacks=[cb])
    assert cb.collector.fallback_batches == 0
    fisher = cb.fisher()
    assert "extra_pass_batches" not in fisher.metadata.extra["training"]
    assert_fisher_close(fisher, hf_fisher.collect(model, collator.batches, reduction="group", progress=False), rtol=2e-5)
