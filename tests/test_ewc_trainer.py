"""EWCTrainer / EWCMixin inside a real transformers.Trainer (CPU, tiny models from configs).

- the penalty's gradient reaches the optimizer step exactly once per step: ``.grad`` (captured
  before each optimizer step, learning rate 0 so θ stays put) equals a plain Trainer's
  ``.grad`` plus the hand-computed ``2 λ F (θ − θ*)``, whatever the gradient accumulation and
  whichever way the Trainer scales the micro-batch losses;
- the continual fine-tuning example (smaller configuration): EWC forgets task A measurably
  less than plain fine-tuning while task B is still learned, and the logs carry the EWC scalars;
- a PEFT LoRA model; Fisher / model mismatches refused before training.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_fisher
from hf_fisher.consumers.ewc import EWCPenalty
from hf_fisher.errors import InvalidInputError, ModelMismatchError
from hf_fisher.integrations.ewc_trainer import EWCMixin, EWCTrainer

import tiny_models as tm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import continual_finetuning as cf

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = cf.Config(vocab=tm.VOCAB, seq_len=8)
LAM = 50.0


class GradCapture(TrainerCallback):
    """Copies of every trainable parameter's ``.grad`` just before each optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _args(tmp_path, *, bs=2, ga=1, steps=2, lr=0.0, logging_steps=1):
    return TrainingArguments(
        str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=lr,
        max_steps=steps, max_grad_norm=0.0, report_to=[], logging_steps=logging_steps, save_strategy="no",
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
    )


def _grads(model, samples, tmp_path, *, trainer_cls=Trainer, divides=False, **kw):
    cap = GradCapture()
    trainer = trainer_cls(model=model, args=_args(tmp_path, bs=kw.pop("bs", 2), ga=kw.pop("ga", 1), steps=kw.pop("steps", 2)),
                          train_dataset=cf.ListDataset(samples), callbacks=[cap], **kw)
    if divides:  # a model whose loss is a per-micro-batch mean: the Trainer divides it by the step's micro-batches
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return cap.steps, trainer


def _perturbed_anchor(model, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: (p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)) for n, p in model.named_parameters()}


def _expected_penalty_grad(fisher, model, star, lam):
    params = dict(model.named_parameters())
    return {n: (2 * lam * fisher[n].double() * (params[n].detach().double() - star[n].double())).float() for n in fisher.names()}


def _fisher(model, samples):
    return hf_fisher.collect(model, list(cf.batches(samples, 4)), reduction="param", progress=False)


@pytest.mark.parametrize(
    "ga,steps,divides",
    [(1, 2, False), (2, 2, False), (3, 2, False), (2, 2, True), (3, 2, True)],
    ids=["ga1", "ga2-num_items", "ga3-partial-num_items", "ga2-divided", "ga3-partial-divided"],
)
def test_penalty_gradient_counts_exactly_once_per_optimizer_step(tmp_path, ga, steps, divides):
    """8 samples, batch 2: ga=3 makes windows of 3 and 1 micro-batches (a partial last step)."""
    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.llama(torch.float32)
    fisher = _fisher(model, samples)
    star = _perturbed_anchor(model)
    plain, _ = _grads(model, samples, tmp_path / "plain", ga=ga, steps=steps, divides=divides)
    ewc = EWCPenalty(fisher, star, lam=LAM)
    got, _ = _grads(model, samples, tmp_path / "ewc", trainer_cls=EWCTrainer, ewc=ewc, ga=ga, steps=steps, divides=divides)
    want = _expected_penalty_grad(fisher, model, star, LAM)
    assert len(got) == len(plain) == steps
    pen_norm = sum(float(w.norm()) ** 2 for w in want.values()) ** 0.5
    data_norm = sum(float(g.norm()) ** 2 for g in plain[0].values()) ** 0.5
    assert pen_norm > 0.2 * data_norm, "the penalty gradient must be large enough to tell once from twice"
    for k in range(steps):
        assert sorted(got[k]) == sorted(plain[k])
        for n in got[k]:
            torch.testing.assert_close(got[k][n], plain[k][n] + want[n], rtol=1e-5, atol=1e-6 * max(1.0, float(want[n].abs().max())), msg=f"step {k} {n}")


def test_compute_loss_return_outputs_and_evaluation(tmp_path):
    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.llama(torch.float32)
    fisher = _fisher(model, samples)
    star = _perturbed_anchor(model)
    ewc = EWCPenalty(fisher, star, lam=LAM)
    trainer = EWCTrainer(model=model, args=_args(tmp_path), train_dataset=cf.ListDataset(samples), ewc=ewc)
    batch = next(cf.batches(samples, 4))
    with torch.no_grad():
        penalty = float(ewc(model))
    assert penalty > 0
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert loss.item() == pytest.approx(outputs.loss.item() + penalty, rel=1e-6)
    again = trainer.compute_loss(model, batch)  # the same optimizer step: the penalty is already in
    assert again.item() == pytest.approx(outputs.loss.item(), rel=1e-6)
    model.eval()
    trainer._ewc_step = None
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model, batch)
    assert eval_loss.item() == pytest.approx(outputs.loss.item(), rel=1e-6), "evaluation losses are the task's"


@pytest.fixture(scope="module")
def continual():
    """The example's pipeline, smaller (about 2 s)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = cf.Config(hidden=32, n_train=128, n_eval=64, steps_a=150, steps_b=60, lr=3e-3, lam=1000.0, logging_steps=20)
    return cf.run(cfg)


def test_ewc_forgets_task_a_less_than_plain_fine_tuning(continual):
    """Measured: task-A loss after A 0.99; after B plain +4.95, EWC +2.85 (0.58x); task B from
    7.06 to 0.97 (plain) / 1.01 (EWC); forgetting risk 0.0176 vs 0.0006."""
    r = continual
    assert r["a_loss_after_a"] < 0.5 * r["a_loss_init"], "task A must be learned first"
    plain, ewc = r["plain"], r["ewc"]
    assert plain["forgetting"] > 1.0
    assert ewc["forgetting"] < 0.7 * plain["forgetting"], (plain["forgetting"], ewc["forgetting"])
    for run in (plain, ewc):  # task B is still learned
        assert run["b_loss"] < 0.3 * r["b_loss_after_a"]
    assert ewc["b_loss"] < 1.5 * plain["b_loss"]
    assert ewc["forgetting_risk"] < 0.2 * plain["forgetting_risk"]


def test_logs_contain_the_ewc_scalars(continual):
    r = continual
    logged = [h for h in r["ewc_log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [20, 40, 60]
    for h in logged:
        assert {"ewc/penalty", "ewc/forgetting_risk", "ewc/forgetting_risk_normalized", "ewc/forgetting_risk_layer_0", "ewc/forgetting_risk_layer_1"} <= set(h)
        assert h["ewc/penalty"] == pytest.approx(1000.0 * h["ewc/forgetting_risk"], rel=1e-12)
        parts = [v for k, v in h.items() if k.startswith("ewc/forgetting_risk_layer_") or k == "ewc/forgetting_risk_outside_layers"]
        assert len(parts) == 3 and h["ewc/forgetting_risk"] == pytest.approx(sum(parts), rel=1e-9)
    # the last log is after the last step: the same number as hf_fisher.forgetting_risk on the final model
    assert logged[-1]["ewc/forgetting_risk"] == pytest.approx(r["ewc"]["forgetting_risk"], rel=1e-4)
    assert logged[-1]["ewc/forgetting_risk_normalized"] == pytest.approx(r["ewc"]["forgetting_risk_normalized"], rel=1e-4)
    per_layer = r["ewc"]["forgetting_risk_per_layer"]
    assert logged[-1]["ewc/forgetting_risk_layer_1"] == pytest.approx(per_layer[1], rel=1e-4)
    assert logged[-1]["ewc/forgetting_risk_outside_layers"] == pytest.approx(per_layer[None], rel=1e-4)
    assert not any("ewc/penalty" in h for h in r["ewc_log_history"] if "train_runtime" in h)


def test_lora_model(tmp_path):
    """The Fisher of a LoRA model covers its adapter weights: the penalty's gradient lands on them
    (exactly once), the frozen base weights get none."""
    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.lora_llama(torch.float32)
    fisher = _fisher(model, samples)
    assert fisher.names() and all("lora_" in n for n in fisher.names())
    star = _perturbed_anchor(model)
    plain, _ = _grads(model, samples, tmp_path / "plain", ga=2)
    got, trainer = _grads(model, samples, tmp_path / "ewc", trainer_cls=EWCTrainer, ewc=EWCPenalty(fisher, star, lam=LAM), ga=2)
    want = _expected_penalty_grad(fisher, model, star, LAM)
    assert sorted(got[0]) == sorted(fisher.names())  # only the adapters have gradients
    for k in range(2):
        for n in got[k]:
            torch.testing.assert_close(got[k][n], plain[k][n] + want[n], rtol=1e-5, atol=1e-6 * max(1.0, float(want[n].abs().max())))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("ewc/forgetting_risk" in h for h in logged)


def test_lam_and_fisher_anchor_on_the_model_at_construction(tmp_path):
    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.llama(torch.float32)
    fisher = _fisher(model, samples)
    trainer = EWCTrainer(model=model, args=_args(tmp_path, lr=1e-2, steps=2), train_dataset=cf.ListDataset(samples), fisher=fisher, lam=5.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.ewc(model).item() == 0.0
    trainer.train()
    for n in fisher.names():
        assert torch.equal(trainer.ewc.params_star[n], before[n])
    risk = hf_fisher.forgetting_risk(fisher, before, model)
    assert trainer.ewc(model).item() == pytest.approx(5.0 * risk["total"], rel=1e-4)
    assert trainer.ewc.risk(model)["per_layer"] == pytest.approx(risk["per_layer"], rel=1e-4)


def test_mixin_with_another_trainer_subclass(tmp_path):
    class LoggingTrainer(Trainer):
        seen = 0

        def training_step(self, *a, **k):
            LoggingTrainer.seen += 1
            return super().training_step(*a, **k)

    class MyTrainer(EWCMixin, LoggingTrainer):
        pass

    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.llama(torch.float32)
    fisher = _fisher(model, samples)
    star = _perturbed_anchor(model)
    plain, _ = _grads(model, samples, tmp_path / "plain")
    got, _ = _grads(model, samples, tmp_path / "ewc", trainer_cls=MyTrainer, ewc=EWCPenalty(fisher, star, lam=LAM))
    assert LoggingTrainer.seen == 2  # the subclass's own training_step ran (2 steps of 1 micro-batch)
    want = _expected_penalty_grad(fisher, model, star, LAM)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[1][name], plain[1][name] + want[name], rtol=1e-5, atol=1e-6)


def test_mismatches_are_refused_before_training(tmp_path):
    samples = cf.make_task(1, 8, DATA, seed=1)
    model = tm.llama(torch.float32)
    ds = cf.ListDataset(samples)
    other = tm.llama(torch.float32, layers=3)
    with pytest.raises(ModelMismatchError, match="does not match the model"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=ds, fisher=_fisher(other, samples), lam=1.0)
    # the Fisher of the base model used with its LoRA wrapping: names differ (base_model.model. prefix)
    lora = tm.lora_llama(torch.float32)
    with pytest.raises(ModelMismatchError, match="base_model.model."):
        EWCTrainer(model=lora, args=_args(tmp_path), train_dataset=ds, fisher=_fisher(tm.llama(torch.float32, seed=6), samples), lam=1.0)
    fisher = _fisher(model, samples)
    bad_star = {n: torch.zeros(3) for n in fisher.names()}
    with pytest.raises(ModelMismatchError, match="params_star"):
        EWCPenalty(fisher, bad_star, lam=1.0)
    with pytest.raises(ModelMismatchError, match="params_star lacks"):
        EWCPenalty(fisher, {}, lam=1.0)
    with pytest.raises(InvalidInputError, match="ewc=hf_fisher.EWCPenalty"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=ds)
    with pytest.raises(InvalidInputError, match="not both"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=ds, ewc=EWCPenalty(fisher, model), fisher=fisher, lam=1.0)
    with pytest.raises(InvalidInputError, match="must be an hf_fisher.EWCPenalty"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=ds, ewc=fisher)
    with pytest.raises(InvalidInputError, match="lam must be >= 0"):
        EWCTrainer(model=model, args=_args(tmp_path), train_dataset=ds, fisher=fisher, lam=-1.0)


def test_model_init_is_validated_and_anchored_before_training(tmp_path):
    samples = cf.make_task(1, 8, DATA, seed=1)
    source = tm.llama(torch.float32)
    fisher = _fisher(source, samples)

    calls = []

    def model_init(shift=None):
        calls.append(1)
        m = tm.llama(torch.float32)
        m.load_state_dict(source.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * len(calls) if shift is None else shift)  # each model differs from the last
        return m

    trainer = EWCTrainer(model_init=model_init, args=_args(tmp_path, lr=1e-2, steps=1), train_dataset=cf.ListDataset(samples), fisher=fisher, lam=1.0)
    trainer.train()  # the Trainer builds a fresh model: θ* must be that model's parameters before training
    assert len(calls) == 2
    expected = dict(model_init(shift=0.02).named_parameters())
    for n in fisher.names():
        torch.testing.assert_close(trainer.ewc.params_star[n], expected[n].detach(), rtol=0, atol=0)
    def wrong():
        return tm.llama(torch.float32, layers=3)

    with pytest.raises(ModelMismatchError):
        EWCTrainer(model_init=wrong, args=_args(tmp_path), train_dataset=cf.ListDataset(samples), fisher=fisher, lam=1.0)
