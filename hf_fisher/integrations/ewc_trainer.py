"""Elastic weight consolidation inside a ``transformers.Trainer``.

:class:`EWCMixin` turns any Trainer subclass into an EWC trainer
(``class MyTrainer(EWCMixin, Seq2SeqTrainer)``); :class:`EWCTrainer` is
``EWCMixin + transformers.Trainer``. The training objective of each optimizer step is

    L(θ) = task loss of the step's micro-batches (as the Trainer computes it)
           + λ Σ_k F_k (θ_k − θ*_k)²                          (hf_fisher.EWCPenalty)

with the penalty counted exactly once per optimizer step, whatever the gradient accumulation.
The Trainer scales the loss of each micro-batch before its backward: it divides it by the
number ``K`` of micro-batches in the step unless the loss is already normalised over the whole
accumulated batch (``num_items_in_batch`` reached the model or a ``compute_loss_func``, or
``loss_is_scaled_for_ga`` says so). The parameters do not change within a step, so the
penalty is added to the first micro-batch's loss only, multiplied by ``K`` when the Trainer
will divide by ``K``: the gradient the optimizer sees is the task gradient plus
``2 λ F (θ − θ*)`` once. Several processes (DDP): every rank adds the penalty, the gradients
are averaged over ranks, so it still counts once. The penalty is added during training only
(evaluation losses are the task's); the logged ``loss`` is the training objective.

At each logging step the logs get ``ewc/penalty`` (``λ Σ F (θ − θ*)²`` at the parameters
after the step), ``ewc/forgetting_risk`` (``Σ F (θ − θ*)²``, :func:`hf_fisher.forgetting_risk`
of the change since θ*), ``ewc/forgetting_risk_normalized``, per-layer
``ewc/forgetting_risk_layer_<i>`` and ``ewc/forgetting_risk_outside_layers`` (embeddings, final
norm, head); they are added in :meth:`EWCMixin.log`, before the
callbacks run, so every ``report_to`` integration and ``state.log_history`` records them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import Trainer

from ..consumers.ewc import EWCPenalty
from ..errors import InvalidInputError, UnsupportedError

log = logging.getLogger(__name__)


def ewc_scalars(penalty: EWCPenalty, model, *, top_layers: int = 64) -> dict[str, float]:
    """Scalars for the Trainer's logs (see the module docstring) from :meth:`EWCPenalty.risk`."""
    risk = penalty.risk(model)
    out = {
        "ewc/penalty": penalty.lam * risk["total"],
        "ewc/forgetting_risk": risk["total"],
        "ewc/forgetting_risk_normalized": risk["normalized"],
    }
    layers = sorted(k for k in risk["per_layer"] if k is not None)[:top_layers]
    for layer in layers:
        value = risk["per_layer"][layer]
        if math.isfinite(value):
            out[f"ewc/forgetting_risk_layer_{layer}"] = float(value)
    if None in risk["per_layer"]:  # embeddings, final norm, head: parameters outside numbered layers
        out["ewc/forgetting_risk_outside_layers"] = float(risk["per_layer"][None])
    return out


class EWCMixin:
    """Adds an :class:`~hf_fisher.EWCPenalty` to a Trainer's training loss (see the module docstring).

    Example::

        fisher_a = hf_fisher.collect(model, task_a_batches)          # after training on task A
        trainer = EWCTrainer(model=model, args=args, train_dataset=task_b, fisher=fisher_a, lam=100.0)
        trainer.train()                                              # task B, protecting task A

    Args (keywords, besides the Trainer's own arguments):
        ewc: a ready :class:`~hf_fisher.EWCPenalty` (its anchor θ* as given, or taken from the
            model at the first step when it has none).
        fisher, lam, online_decay: build the penalty instead: ``EWCPenalty(fisher, θ*, lam,
            online_decay)`` with θ* = the model's parameters now (with ``model_init``: those of
            each model the Trainer builds, before it is trained). Give either ``ewc`` or
            ``fisher`` + ``lam``.
        ewc_log: add the ``ewc/*`` scalars to the logs (default True).

    The logged ``loss`` is the training objective (task loss + penalty). Refused: FSDP and
    DeepSpeed (sharded parameters).

    The Fisher must belong to the model: same architecture, parameter names (a PEFT model's
    names include ``base_model.model.``: collect the Fisher on the PEFT model) and shapes;
    a mismatch raises :class:`~hf_fisher.errors.ModelMismatchError` at construction (with
    ``model_init``: before the first step). The penalty covers the Fisher's parameters only.
    """

    def __init__(
        self,
        *args: Any,
        ewc: EWCPenalty | None = None,
        fisher: Any = None,
        lam: float | None = None,
        online_decay: float | None = None,
        ewc_log: bool = True,
        **kwargs: Any,
    ):
        if ewc is not None and (fisher is not None or lam is not None or online_decay is not None):
            raise InvalidInputError(
                "give either ewc=EWCPenalty(...) or fisher= and lam= (to build one from the model), not both"
            )
        if ewc is None:
            if fisher is None or lam is None:
                raise InvalidInputError(
                    "EWC needs a penalty: pass ewc=hf_fisher.EWCPenalty(fisher, params_star, lam), or fisher=<the "
                    "task-A Fisher> and lam=<weight> to anchor it on the model's current parameters"
                )
            ewc = EWCPenalty(fisher, None, lam=lam, online_decay=online_decay)
            own_anchor = True
        elif not isinstance(ewc, EWCPenalty):
            raise InvalidInputError(f"ewc must be an hf_fisher.EWCPenalty, got {type(ewc).__name__}")
        else:
            own_anchor = False
        super().__init__(*args, **kwargs)
        if getattr(self.args, "fsdp", None) or getattr(self.args, "deepspeed", None):
            raise UnsupportedError(
                "EWCTrainer does not support FSDP or DeepSpeed yet (the parameters are sharded across ranks, the "
                "penalty would see shards); train without them, or add hf_fisher.EWCPenalty in your own compute_loss "
                "on gathered parameters"
            )
        self.ewc = ewc
        self.ewc_log = ewc_log
        self._ewc_own_anchor = own_anchor  # built here from fisher= and lam=: θ* = the model trained
        self._ewc_checked: int | None = None
        self._ewc_step: int | None = None
        if getattr(self, "model", None) is not None:
            self._ewc_check(self.model)

    # ------------------------------------------------------------------ checks
    def _ewc_check(self, model) -> None:
        """Validate the penalty against ``model`` once per model (before it is trained) and anchor
        θ* on it when the penalty has no anchor yet."""
        if self._ewc_checked == id(model):
            return
        self.ewc.validate(model)
        if self.ewc.params_star is None or (self._ewc_own_anchor and self._ewc_checked is not None):
            self.ewc.set_anchor(model)  # a new model (model_init): θ* = its parameters before training
        covered = set(self.ewc.names)
        frozen = [n for n, p in model.named_parameters() if n in covered and not p.requires_grad]
        if frozen:
            log.warning(
                "hf_fisher: %d of the EWC Fisher's %d parameters are frozen (e.g. %s): their penalty terms are "
                "constant and only add to the logged loss", len(frozen), len(self.ewc.names), frozen[0],
            )
        self._ewc_checked = id(model)

    def _ewc_model(self):
        """The unwrapped model (the parameter names the Fisher uses)."""
        return self.model

    # ------------------------------------------------------------------ loss
    def _ewc_trainer_divides(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` divides this loss by the micro-batches of the step (the
        Trainer's rule, ``Trainer.training_step``)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return not flag
        scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )
        return not scaled

    def ewc_loss_weight(self, num_items_in_batch=None) -> float:
        """The factor the penalty is multiplied by in the first micro-batch's loss, so that after
        the Trainer's scaling it counts once: ``K`` (micro-batches in this optimizer step) when
        the Trainer divides the loss by ``K``, else 1."""
        if self._ewc_trainer_divides(num_items_in_batch):
            return float(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)
        return 1.0

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)
        if not (model.training and torch.is_grad_enabled()):
            return out  # evaluation: the task loss
        target = self._ewc_model()
        self._ewc_check(target)
        step = self.state.global_step
        if self._ewc_step == step:
            return out  # a later micro-batch of this optimizer step: the penalty is already in
        self._ewc_step = step
        loss, outputs = out if return_outputs else (out, None)
        penalty = self.ewc(target)
        weight = self.ewc_loss_weight(num_items_in_batch)
        loss = loss + (penalty * weight).to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        self._ewc_step = None  # global_step restarts (or resumes) with each call
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ logs
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.ewc_log and "loss" in logs and getattr(self, "model", None) is not None:
            logs.update(ewc_scalars(self.ewc, self._ewc_model()))
        return super().log(logs, *args, **kwargs)


class EWCTrainer(EWCMixin, Trainer):
    """``transformers.Trainer`` with an EWC penalty (:class:`EWCMixin`): ``EWCTrainer(model=...,
    args=..., train_dataset=..., fisher=fisher_a, lam=100.0)`` or ``ewc=EWCPenalty(...)``."""


__all__ = ["EWCMixin", "EWCTrainer", "ewc_scalars"]
