"""FisherCallback inside a real transformers.Trainer (CPU, tiny models built from configs).

"training" mode takes the contributions from the Trainer's own backward passes: with learning
rate 0 the parameters never change, so its Fisher must equal hf_fisher.collect over the same
samples, whatever the batch size, gradient accumulation, padding, checkpointing or autocast.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_fisher
from hf_fisher.errors import InvalidInputError

import reference as R
import tiny_models as tm
from tiny_models import ListDataset

N = 8


def collate(items):
    """Right padding, labels -100 on the padding (the reference's collate)."""
    return R.collate([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])


def make_samples(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(3, tm.VOCAB, (1, 2 + (5 * k + 3) % 7), generator=g)
        labels = ids.clone()
        if ids.shape[1] > 3:
            labels[0, 1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train(model, samples, tmp_path, *, callbacks=(), bs=2, ga=1, lr=0.0, steps=None, **extra):
    extra.setdefault("save_strategy", "steps" if "save_steps" in extra else "no")
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=lr,
        max_steps=steps or len(samples) // (bs * ga), report_to=[], logging_steps=1,
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(samples), data_collator=collate, callbacks=list(callbacks))
    trainer.train()
    return trainer


def assert_fisher_close(f, ref, rtol):
    assert sorted(f.names()) == sorted(ref.names())
    assert (f.counts.samples, f.counts.tokens, f.counts.skipped) == (ref.counts.samples, ref.counts.tokens, ref.counts.skipped)
    floor = 1e-9 * max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        R.assert_close(f[name], ref[name], rtol=rtol, floor=floor, what=f"mean {name}")
        R.assert_close(f.variances[name], ref.variances[name], rtol=10 * rtol, floor=floor * floor + 1e-30, atol_rel=1e-6, what=f"variance {name}")


def reference(model, samples, reduction):
    batches = [collate([s]) for s in samples]
    return hf_fisher.collect(model, batches, reduction=reduction, progress=False)


@pytest.mark.parametrize("bs,ga", [(2, 1), (2, 2), (1, 4)], ids=["bs2", "bs2-ga2", "bs1-ga4"])
@pytest.mark.parametrize("reduction", ["param", "group"])
def test_training_mode_equals_collect(tmp_path, bs, ga, reduction):
    model = tm.llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction=reduction)
    train(model, samples, tmp_path, callbacks=[cb], bs=bs, ga=ga)
    fisher = cb.fisher()
    assert cb.collector.fallback_batches == 0, "every micro-batch must come from the Trainer's own backward"
    assert fisher.metadata.extra["training"]["gradient_accumulation_steps"] == ga
    assert_fisher_close(fisher, reference(model, samples, reduction), rtol=2e-5)
    # saved at train end, loadable
    saved = hf_fisher.Fisher.from_pretrained(tmp_path / "fisher")
    assert saved.counts.samples == N


def test_training_mode_lora(tmp_path):
    model = tm.lora_llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="param")
    train(model, samples, tmp_path, callbacks=[cb], bs=2, ga=2)
    fisher = cb.fisher()
    assert all("lora_" in n for n in fisher.names())
    assert cb.collector.fallback_batches == 0
    assert_fisher_close(fisher, reference(model, samples, "param"), rtol=2e-5)


def test_training_mode_params_selection(tmp_path):
    model = tm.llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="param", params=r"self_attn\.(q|k)_proj")
    train(model, samples, tmp_path, callbacks=[cb])
    fisher = cb.fisher()
    assert sorted(fisher.names()) == sorted(n for n, _ in model.named_parameters() if "q_proj" in n or "k_proj" in n)
    full = reference(model, samples, "param")
    for name in fisher.names():
        R.assert_close(fisher[name], full[name], rtol=2e-5, atol_rel=1e-9, what=name)


def test_gradient_checkpointing_is_exact_through_the_extra_pass(tmp_path, caplog):
    model = tm.llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="param")
    train(model, samples, tmp_path, callbacks=[cb], bs=2, gradient_checkpointing=True)
    fisher = cb.fisher()
    assert cb.collector.fallback_batches == N // 2, "a recomputed forward must never be trusted"
    model.gradient_checkpointing_disable()
    assert_fisher_close(fisher, reference(model, samples, "param"), rtol=2e-5)


def test_bf16_autocast(tmp_path):
    """bf16 autocast: the Trainer's forward runs in bfloat16, the reference in float32; the
    contributions agree to bf16 rounding (relative error of the trace below 5%)."""
    model = tm.llama(torch.float32)
    samples = make_samples()
    cb = hf_fisher.FisherCallback(reduction="group")
    train(model, samples, tmp_path, callbacks=[cb], bf16=True)
    fisher = cb.fisher()
    ref = reference(model, samples, "group")
    assert fisher.counts.samples == ref.counts.samples
    assert abs(fisher.total() - ref.total()) <= 0.05 * ref.total()
    for name in ref.names():
        a, b = fisher[name].double(), ref[name].double()
        assert float((a - b).norm()) <= 0.1 * float(b.norm()) + 1e-12, name


def test_probe_mode_leaves_training_bit_identical(tmp_path):
    samples = make_samples()
    probe = [collate(samples[:3]), collate(samples[3:5])]
    plain = tm.llama(torch.float32)
    t_plain = train(plain, samples, tmp_path / "a", lr=1e-2, bs=2)
    probed = tm.llama(torch.float32)
    cb = hf_fisher.FisherCallback("probe", probe_data=probe, probe_every_n_steps=1, reduction="group")
    t_probed = train(probed, samples, tmp_path / "b", lr=1e-2, bs=2, callbacks=[cb])
    losses = [e["loss"] for e in t_plain.state.log_history if "loss" in e]
    assert losses == [e["loss"] for e in t_probed.state.log_history if "loss" in e]
    for (n, p), (_, q) in zip(plain.named_parameters(), probed.named_parameters()):
        assert torch.equal(p, q), n
    fisher = cb.fisher()  # the last probe: the model as it is at the end
    assert fisher.metadata.extra["probe_step"] == N // 2
    assert_fisher_close(fisher, hf_fisher.collect(probed, probe, reduction="group", progress=False), rtol=1e-6)
    assert probed.training, "the model's train/eval mode is left as it was"


def test_resume_equals_uninterrupted(tmp_path):
    samples = make_samples()
    whole = hf_fisher.FisherCallback(reduction="param")
    train(tm.llama(torch.float32), samples, tmp_path / "whole", callbacks=[whole], bs=2)
    # the same run, saved after 2 steps, then resumed from that checkpoint
    first = hf_fisher.FisherCallback(reduction="param")
    args = dict(bs=2, steps=N // 2)
    run = tmp_path / "run"
    trainer = train(tm.llama(torch.float32), samples, run, callbacks=[first], save_steps=2, **args)
    del trainer
    assert (run / "checkpoint-2" / "fisher" / "fisher_config.json").is_file()
    second = hf_fisher.FisherCallback(reduction="param")
    model = tm.llama(torch.float32)
    targs = TrainingArguments(
        str(run), per_device_train_batch_size=2, learning_rate=0.0, max_steps=N // 2, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
    )
    Trainer(model=model, args=targs, train_dataset=ListDataset(samples), data_collator=collate, callbacks=[second]).train(
        resume_from_checkpoint=str(run / "checkpoint-2")
    )
    a, b = whole.fisher(), second.fisher()
    assert b.counts.samples == N
    assert_fisher_close(b, a, rtol=1e-6)


def test_logs_contain_fisher_scalars(tmp_path):
    cb = hf_fisher.FisherCallback(reduction="group")
    trainer = train(tm.llama(torch.float32), make_samples(), tmp_path, callbacks=[cb])
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("fisher/trace" in e and "fisher/samples" in e for e in logged)
    assert [e["fisher/samples"] for e in logged] == [2.0, 4.0, 6.0, 8.0]
    assert logged[-1]["fisher/trace"] == pytest.approx(cb.fisher().total())


def test_bad_arguments_are_refused_before_training():
    with pytest.raises(InvalidInputError, match="probe_data"):
        hf_fisher.FisherCallback("probe")
    with pytest.raises(InvalidInputError, match="mode"):
        hf_fisher.FisherCallback("free")
    with pytest.raises(InvalidInputError, match="output_subdir"):
        hf_fisher.FisherCallback(output_subdir="../elsewhere")
    with pytest.raises(InvalidInputError, match="matches no trainable parameter"):
        hf_fisher.FisherCollector(tm.llama(torch.float32), params="no_such_thing")


def test_training_mode_reduces_each_parameter_inside_the_backward(tmp_path):
    """The free path reduces a parameter as soon as its gradient factors arrive, inside the
    Trainer's backward (so they are freed at once), not after it: every reduction of this model
    (single-output modules only) runs while autograd's graph task is active."""
    from transformers import TrainerCallback

    model = tm.llama(torch.float32)
    cb = hf_fisher.FisherCallback(reduction="group")
    where: list[int] = []

    class Spy(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            engine = cb.collector.engine
            reduce = engine._reduce

            def spy(pid):
                where.append(torch._C._current_graph_task_id())
                return reduce(pid)

            engine._reduce = spy

    train(model, make_samples(), tmp_path, callbacks=[cb, Spy()])
    assert cb.collector.fallback_batches == 0
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(where) == n_params * (N // 2)
    assert all(task != -1 for task in where), f"{sum(t == -1 for t in where)} reductions ran after the backward"
