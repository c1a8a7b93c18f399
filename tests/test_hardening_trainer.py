"""Issue 21 hardening of the Trainer callback and the estimator choice (CPU, tiny real models).

- Left-padded causal-LM batches from ``DataCollatorForLanguageModeling(mlm=False)`` with pad =
  eos (a non-zero pad embedding): the Trainer's loss also counts the first real token's label,
  predicted from a pad position. The Fisher's definition is the sample alone, without padding
  (DESIGN.md section 2): the callback's Fisher must equal ``collect``'s on the same batches.
- The estimator choice is honoured or refused, never swapped.
- Bad probe data and a bad ``base_model`` are refused at construction.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Trainer, TrainingArguments

import hf_fisher
from hf_fisher.errors import InvalidInputError

import reference as R
import tiny_models as tm
from tiny_models import ListDataset

EOS = 2  # pad = eos, as in most trained causal LMs: its embedding row is not zero


def eos_tokenizer(side="left"):
    vocab = {f"t{i}": i for i in range(tm.VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0", bos_token="t1", eos_token=f"t{EOS}", pad_token=f"t{EOS}",
    )
    tok.padding_side = side
    return tok


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


# ---------------------------------------------------------------------------------- estimator choice
def probe_batches(model_dtype=torch.float32):
    s = lm_samples(6, seed=3)
    tok = eos_tokenizer("right")
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    return [collate(s[:3]), collate(s[3:])]


def test_probe_true_fisher_is_the_true_estimator(tmp_path):
    """estimator='true' in probe mode is the true-Fisher estimator with the same draws (seed, mc_samples):
    equal to hf_fisher.collect(..., estimator='true'), labelled so, and not the empirical Fisher."""
    model = tm.llama(torch.float32)
    probe = probe_batches()
    cb = hf_fisher.FisherCallback(
        "probe", estimator="true", estimator_options={"mc_samples": 2, "seed": 5}, probe_data=probe, reduction="group",
    )
    train_lm(model, lm_samples(), tmp_path, DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False), callbacks=[cb])
    fisher = cb.fisher()
    true = hf_fisher.collect(model, probe, estimator="true", mc_samples=2, seed=5, reduction="group", progress=False)
    assert fisher.metadata.estimator == "true" == true.metadata.estimator
    assert fisher.metadata.extra["true_fisher"] == {"mc_samples": 2, "exact": False, "temperature": 1.0, "seed": 5}
    assert fisher.metadata.extra["probe_step"] == 2
    assert_fisher_close(fisher, true, rtol=1e-9)
    empirical = hf_fisher.collect(model, probe, reduction="group", progress=False)
    differ = max(float((fisher[n] - empirical[n]).norm() / empirical[n].norm()) for n in empirical.names())
    assert differ > 0.05, "a true Fisher, not the empirical one"
    assert hf_fisher.Fisher.from_pretrained(tmp_path / "fisher").metadata.estimator == "true"


def test_estimator_choices_the_callback_cannot_honour_are_refused():
    probe = probe_batches()
    with pytest.raises(InvalidInputError, match="KFAC.*estimator='kfac'"):
        hf_fisher.FisherCallback("probe", estimator="kfac", probe_data=probe)
    with pytest.raises(InvalidInputError, match="KFAC"):
        hf_fisher.FisherCallback(estimator="kfac")
    with pytest.raises(InvalidInputError, match="mode='probe'"):
        hf_fisher.FisherCallback(estimator="true")
    with pytest.raises(InvalidInputError, match="unknown estimator 'fancy'.*'empirical' or 'true'"):
        hf_fisher.FisherCallback("probe", estimator="fancy", probe_data=probe)
    with pytest.raises(InvalidInputError, match="estimator_options apply to estimator='true'"):
        hf_fisher.FisherCallback("probe", probe_data=probe, estimator_options={"mc_samples": 4})
    with pytest.raises(InvalidInputError, match=r"\['reduction'\] is not an option"):
        hf_fisher.FisherCallback("probe", estimator="true", probe_data=probe, estimator_options={"reduction": "param"})
    with pytest.raises(InvalidInputError, match="mc_samples"):
        hf_fisher.FisherCallback("probe", estimator="true", probe_data=probe, estimator_options={"mc_samples": 0})


def test_true_fisher_exact_on_a_causal_lm_is_refused_before_training(tmp_path):
    model = tm.llama(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = hf_fisher.FisherCallback("probe", estimator="true", estimator_options={"exact": True}, probe_data=probe_batches())
    with pytest.raises(hf_fisher.errors.UnsupportedError, match="exact=True"):
        train_lm(model, lm_samples(), tmp_path, DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False), callbacks=[cb])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_collector_refuses_an_estimator_it_does_not_compute():
    model = tm.llama(torch.float32)
    with pytest.raises(InvalidInputError, match="empirical Fisher.*estimator='true'"):
        hf_fisher.FisherCollector(model, estimator="true")
    with pytest.raises(InvalidInputError, match="not estimator='kfac'"):
        hf_fisher.FisherCollector(model, estimator="kfac")
    # an estimator that adds its own contributions labels its collector; that collector never computes the empirical Fisher
    fed = hf_fisher.FisherCollector.for_estimator("true", model)
    with pytest.raises(InvalidInputError, match="labelled estimator='true'"):
        fed.update(probe_batches()[0])
    with pytest.raises(InvalidInputError, match="labelled estimator='true'"):
        fed.attach_training()
    # the true-Fisher estimator still labels what it computes
    true = hf_fisher.collect(model, probe_batches(), estimator="true", progress=False)
    assert true.metadata.estimator == "true"


# ---------------------------------------------------------------------------------- probe data, base_model
def test_probe_data_without_samples_is_refused_at_construction():
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="probe_data is empty"):
        hf_fisher.FisherCallback("probe", probe_data=[])
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="probe_data is empty"):
        hf_fisher.FisherCallback("probe", probe_data=ListDataset([]))
    pad = {"input_ids": torch.full((2, 4), EOS), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="no label token"):
        hf_fisher.FisherCallback("probe", probe_data=[pad])
    ignored = {"input_ids": torch.full((2, 4), 5), "labels": torch.full((2, 4), -100)}
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="no label token"):
        hf_fisher.FisherCallback("probe", probe_data=[ignored, pad])
    with pytest.raises(InvalidInputError, match="probe_data must be"):
        hf_fisher.FisherCallback("probe", probe_data={"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_probe_data_without_labels_for_the_model_is_refused_before_the_first_step(tmp_path):
    """One real token per sample: a causal LM has nothing to predict (known only with the model): refused at train
    begin, before any optimizer step; a generator that turns out empty says which probe failed."""
    one = {"input_ids": torch.tensor([[7], [9]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    model = tm.llama(torch.float32)
    collator = DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False)
    cb = hf_fisher.FisherCallback("probe", probe_data=[one])
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="no label token for this causal_lm model"):
        train_lm(model, lm_samples(), tmp_path / "a", collator, callbacks=[cb])
    cb = hf_fisher.FisherCallback("probe", probe_data=(b for b in []))
    with pytest.raises(hf_fisher.errors.EmptyDataError, match="probe at step 2: probe_data gave no usable sample"):
        train_lm(model, lm_samples(), tmp_path / "b", collator, callbacks=[cb])


def test_base_model_goes_into_the_artifact_and_card(tmp_path):
    with pytest.raises(InvalidInputError, match="base_model must be a Hugging Face Hub model id"):
        hf_fisher.FisherCallback(base_model="/data/models/base")
    with pytest.raises(InvalidInputError, match="base_model"):
        hf_fisher.FisherCallback(base_model="not a repo id")
    # a model loaded from a local folder: the card names the Hub id given, never the folder
    local = tmp_path / "base"
    tm.llama(torch.float32).save_pretrained(local)
    model = type(tm.llama(torch.float32)).from_pretrained(local)
    assert model.config._name_or_path == str(local)
    collator = DataCollatorForLanguageModeling(eos_tokenizer("right"), mlm=False)
    for mode, extra in (("training", {}), ("probe", {"probe_data": probe_batches()})):
        out = tmp_path / mode
        cb = hf_fisher.FisherCallback(mode, base_model="hf-internal-testing/tiny-random-LlamaForCausalLM", **extra)
        train_lm(model, lm_samples(), out, collator, callbacks=[cb])
        saved = hf_fisher.Fisher.from_pretrained(out / "fisher")
        assert saved.metadata.model_name_or_path == "hf-internal-testing/tiny-random-LlamaForCausalLM"
        card = (out / "fisher" / "README.md").read_text()
        assert "base_model: hf-internal-testing/tiny-random-LlamaForCausalLM" in card
        assert str(local) not in card


def test_collect_refuses_an_option_of_another_estimator():
    """mc_samples without estimator='true' is not silently dropped nor a raw TypeError: refused, naming the owner."""
    model = tm.llama(torch.float32)
    batch = [tm.padded_batch([3, 4])]
    with pytest.raises(InvalidInputError, match="estimator='empirical' has no option mc_samples.*estimator='true'"):
        hf_fisher.collect(model, batch, mc_samples=2, progress=False)
    with pytest.raises(InvalidInputError, match="estimator='true' has no option fisher_type.*estimator='kfac'"):
        hf_fisher.collect(model, batch, estimator="true", fisher_type="mc", progress=False)
    assert hf_fisher.collect(model, batch, estimator="true", mc_samples=2, seed=1, progress=False).metadata.estimator == "true"


def test_left_padding_on_a_learned_position_table_takes_the_exact_pass_and_names_why(tmp_path):
    """GPT-2 (learned positions) left-padded, first real token's label already -100: the Trainer's forward puts the
    real tokens at shifted positions, unlike each sample alone: extra pass, named as such, equal to collect."""
    model = tm.gpt2(torch.float32)
    for m in model.modules():  # eval-mode collect vs the Trainer's train-mode forward: no dropout to differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    base = DataCollatorForLanguageModeling(eos_tokenizer("left"), mlm=False)

    def first_unlabelled(items):
        b = base(items)
        b["labels"][(b["attention_mask"].cumsum(-1) == 1) & (b["attention_mask"] == 1)] = -100
        return b

    collator = Recording(first_unlabelled)
    cb = hf_fisher.FisherCallback(reduction="param")
    train_lm(model, lm_samples(), tmp_path, collator, callbacks=[cb])
    assert not any(first_label_from_padding(b) for b in collator.batches)
    reasons = cb.fisher().metadata.extra["training"]["extra_pass_reasons"]
    assert list(reasons) == [next(r for r in reasons if "learned position table" in r)] and sum(reasons.values()) == 2
    assert_fisher_close(cb.fisher(), hf_fisher.collect(model, collator.batches, reduction="param", progress=False), rtol=2e-5)
