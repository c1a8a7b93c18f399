"""``FisherCallback``: the Fisher of a model collected inside a ``transformers.Trainer``.

Two modes:

- ``"training"`` (free): the contributions come from the Trainer's own forward and backward
  passes through the engine's capture hooks (:class:`hf_fisher.engine.external.ExternalBackward`):
  no extra forward or backward. Each micro-batch's per-sample gradients are rescaled exactly
  from the gradient that reaches the logits, whatever the Trainer's loss scaling (mean over the
  micro-batch, ``num_items_in_batch`` under gradient accumulation, a GradScaler). Gradient
  clipping acts on ``.grad`` after the backward and never on the per-sample gradients, so it
  does not change them. The parameters change at every optimizer step: the result is a running
  estimate along the training trajectory, ``F = mean_i C_i(θ_{step(i)})`` over the samples seen
  (``ema_decay`` weighs recent samples more). A micro-batch the free path cannot take exactly
  (activation checkpointing, a loss that is not the labels' cross-entropy, a loss that counts the
  first real token after left padding, which the Fisher of the sample alone does not) is computed
  with an extra pass of the engine on the same parameters, loudly (a WARNING, and the count in the
  artifact); never a silently wrong number.
- ``"probe"``: every ``probe_every_n_steps`` optimizer steps and at the end of training, the
  Fisher of the model as it is then, on ``probe_data``, in eval mode, leaving ``.grad``, the
  optimizer, the random streams and the train/eval mode exactly as they were.

At the end of training the artifact is saved to ``<output_dir>/<output_subdir>``; each Trainer
checkpoint gets the accumulator state as a loadable artifact (``checkpoint-N/<output_subdir>``),
which a resumed run restores, so an interrupted and resumed run ends with the Fisher of an
uninterrupted one.

Several processes (torchrun / ``accelerate launch``, DDP): each rank accumulates the samples
the Trainer's distributed sampler gives it (training mode) or every K-th probe batch (probe
mode: ``probe_data`` is the whole probe set, given identically to every rank, unless it is a
DataLoader that is already sharded); at each save, each log and at train end the ranks'
accumulators are merged exactly (:mod:`hf_fisher.collection.distributed`) on every rank,
and only the process that saves (``args.should_save``) writes. On resume, global rank 0
restores the merged state of the checkpoint and the other ranks start empty, so the next merge
counts every sample once. With ``ema_decay``, the merge keeps each sample's weight in its own
rank's EMA; a resumed EMA equals the uninterrupted one when every rank adds the same number of
samples after the checkpoint (DDP with equal per-device batches whose samples all have label
tokens), since rank 0's restored samples then decay exactly as they would have on their own
ranks.

FSDP2 (a model sharded with ``torch.distributed.fsdp.fully_shard``, or accelerate's
``fsdp_version=2``; :mod:`hf_fisher.collection.fsdp`): each rank computes its own samples'
contributions over the whole (unsharded) parameters during the Trainer's backward and keeps
only its block of rows of the accumulators (about 1/K of the whole); every checkpoint and the
final artifact are written by all ranks together as one sharded artifact, never gathered on
one rank; on resume every rank reads back its own rows. :meth:`FisherCallback.fisher` and the
logged summary gather the whole Fisher on every rank (a collective). ``ema_decay`` is refused
under FSDP2. DeepSpeed and FSDP1 (or FSDP asked for while the model is not sharded with FSDP2
at train begin, as accelerate does on CPU) are refused at train begin.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..artifacts.hub import looks_like_hub_id
from ..errors import EmptyDataError, InvalidInputError

log = logging.getLogger(__name__)

MODES = ("training", "probe")


class FisherCallback(TrainerCallback):
    """Collect the Fisher information of the model a ``transformers.Trainer`` trains.

    Example::

        trainer = Trainer(model, args, train_dataset=ds, callbacks=[hf_fisher.FisherCallback()])
        trainer.train()
        fisher = trainer.callback_handler.callbacks[-1].fisher()   # or keep a reference

    Args:
        mode: ``"training"`` (free, from the Trainer's backward passes) or ``"probe"``.
        estimator: ``"empirical"`` (both modes; the only one the free mode can take from
            training) or ``"true"`` (probe mode: labels drawn from the model, see
            :class:`hf_fisher.estimators.true_fisher.TrueFisherEstimator`). Anything else (``"kfac"``
            included) is refused at construction: compute it with :func:`hf_fisher.collect` on the
            trained model.
        estimator_options: probe mode with ``estimator="true"``: its ``mc_samples``,
            ``temperature``, ``exact`` and ``seed`` (checked at construction).
        reduction: ``"group"`` (heads, channels, ...) or ``"param"``.
        task: the artifact's task name.
        probe_data: probe mode: a DataLoader, an iterable of batch dicts, or a dataset whose
            items the Trainer's collator turns into batches.
        probe_every_n_steps: probe mode: probe every N optimizer steps (and at train end).
        params: a regular expression or a list of names selecting the parameters (default: all
            trainable ones; for a PEFT model, its trainable adapter weights).
        max_samples: training mode: stop adding samples after this many.
        storage_dtype, ema_decay: as for :func:`hf_fisher.collect`.
        variance: False keeps the mean only (no variance in the artifacts and checkpoints;
            accumulators 8 bytes per value instead of 12-16: see
            :class:`~hf_fisher.collection.collector.FisherCollector`); not with ``ema_decay``.
            A checkpoint collected with the other setting is refused on resume.
        output_subdir: folder name of the artifact inside ``output_dir`` and checkpoints.
        log_summary: add Fisher scalars (``fisher/trace``, ``fisher/samples``, per-layer traces)
            to the Trainer's logs.
        base_model: the Hub id of the model being trained (e.g. ``"meta-llama/Llama-3.2-1B"``),
            recorded in the artifact (``metadata.model_name_or_path``) and its card's
            ``base_model``; default: the model's ``config._name_or_path`` (a local folder when
            the model was loaded from one, which a card never names as ``base_model``).

    The Fisher is that of each sample alone, without its padding (the README's definition):
    in training mode, a micro-batch whose Trainer loss counts a label the sample alone does not
    have (the first real token after left padding, predicted from a padding position, as
    ``DataCollatorForLanguageModeling`` labels it with ``padding_side="left"``) is computed with
    an extra pass of the engine, with a WARNING; the artifact records how many micro-batches of
    the saving process did (``metadata.extra["training"]["extra_pass_batches"]`` and
    ``["extra_pass_reasons"]``). Right padding keeps the free path.
    """

    def __init__(
        self,
        mode: str = "training",
        *,
        estimator: str = "empirical",
        reduction: str = "group",
        task: str = "train",
        probe_data: Any = None,
        probe_every_n_steps: int | None = None,
        params: str | Iterable[str] | None = None,
        max_samples: int | None = None,
        storage_dtype: torch.dtype | None = None,
        ema_decay: float | None = None,
        output_subdir: str = "fisher",
        log_summary: bool = True,
        estimator_options: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        variance: bool = True,
    ):
        from ..collection.collector import _check_variance

        _check_variance(variance, ema_decay=ema_decay)
        if mode not in MODES:
            raise InvalidInputError(f"unknown mode {mode!r}; choose 'training' or 'probe'")
        estimator_options = _check_estimator(mode, estimator, estimator_options)
        if mode == "probe":
            _check_probe_data(probe_data)
            if probe_every_n_steps is not None and probe_every_n_steps < 1:
                raise InvalidInputError(f"probe_every_n_steps must be >= 1, got {probe_every_n_steps}")
        if base_model is not None and not looks_like_hub_id(base_model):
            raise InvalidInputError(
                f"base_model must be a Hugging Face Hub model id such as 'meta-llama/Llama-3.2-1B' (the model this "
                f"training starts from, named in the Fisher card), got {base_model!r}"
            )
        if max_samples is not None and max_samples < 1:
            raise InvalidInputError(f"max_samples must be >= 1, got {max_samples}")
        if not output_subdir or os.path.isabs(output_subdir) or ".." in Path(output_subdir).parts:
            raise InvalidInputError(f"output_subdir must be a relative folder name, got {output_subdir!r}")
        self.mode = mode
        self.estimator = estimator
        self.estimator_options = estimator_options
        self.base_model = base_model
        self.reduction = reduction
        self.task = task
        self.probe_data = probe_data
        self.probe_every_n_steps = probe_every_n_steps
        self.params = params
        self.max_samples = max_samples
        self.storage_dtype = storage_dtype
        self.ema_decay = ema_decay
        self.variance = variance
        self.output_subdir = output_subdir
        self.log_summary = log_summary
        self.collector = None
        self._external = None
        self._probe_fisher = None
        self._collate = None
        self._model_name = None
        self._args_summary: dict = {}
        self._final = None  # training mode: the merged Fisher at train end (no collective needed after)

    # ------------------------------------------------------------------ results
    def fisher(self):
        """The current :class:`hf_fisher.Fisher` (training mode: everything seen so far; probe
        mode: the last probe).

        Under several processes it holds every rank's samples. During training it is then a
        collective (every rank must call it); after training it is the result computed at train
        end, so rank 0 alone may call it."""
        if self.mode == "probe":
            if self._probe_fisher is None:
                raise InvalidInputError("no probe has run yet (probes run every probe_every_n_steps steps and at train end)")
            return self._probe_fisher
        if self.collector is None:
            raise InvalidInputError("the callback has not seen training yet: pass it to a Trainer and call train()")
        if self._final is not None:
            return self._final
        return self._collected()

    def _collected(self, dtype=None):
        """The training-mode Fisher so far (merged across ranks when several run: a collective)."""
        if self._external is not None:
            self._external.finish()
        training = dict(self._args_summary)
        reasons = getattr(self.collector, "fallback_reasons", None)
        if reasons:  # this process's micro-batches computed with the engine's own pass, per reason
            training.update(extra_pass_batches=sum(reasons.values()), extra_pass_reasons=dict(reasons))
        return self.collector.fisher(self.task, model_name_or_path=self._model_name, extra={"training": training}, dtype=dtype)

    def _sharded(self) -> bool:
        """Training mode on an FSDP2-sharded model: each rank holds its rows of the Fisher, which
        are written as one sharded artifact by every rank (never gathered for a save)."""
        return self.mode == "training" and self.collector is not None and self.collector._fsdp is not None

    def _save_sharded(self, folder: Path, dtype=None):
        """Every rank writes its share of the training-mode Fisher to ``folder`` (a collective);
        None when no rank has a sample yet."""
        if self._external is not None:
            self._external.finish()
        training = dict(self._args_summary)
        try:
            return self.collector.save_fisher(self.task, folder, model_name_or_path=self._model_name,
                                              extra={"training": training}, dtype=dtype)
        except EmptyDataError:
            return None

    # ------------------------------------------------------------------ set-up
    def _make_collector(self, model, *, train_mode: bool):
        from ..collection.collector import FisherCollector

        return FisherCollector(
            model, reduction=self.reduction, storage_dtype=self.storage_dtype, ema_decay=self.ema_decay,
            train_mode=train_mode, params=self.params, variance=self.variance,
        )

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        _run_first_in_on_log(self)
        if model is None:
            raise InvalidInputError("FisherCallback needs the model (the Trainer passes it to callbacks)")
        _refuse_sharded(model, args)
        self._final = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._model_name = self.base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or None
        self._collate = getattr(train_dataloader, "collate_fn", None)
        self._args_summary = _training_summary(args, self.mode)
        if self.mode == "probe":
            self._check_probe_against(model)
        if self.mode == "training":
            if self.collector is None:
                self.collector = self._make_collector(model, train_mode=True)
                self._restore(args, state)
            self._external = self.collector.attach_training(self.task, max_samples=self.max_samples)
        return control

    def _restore(self, args, state) -> None:
        """Resume: the accumulator state saved with the checkpoint the Trainer resumed from."""
        if not state.global_step:
            return
        from ..collection.distributed import is_distributed

        sharded = self.collector._fsdp is not None  # FSDP2: every rank restores its own rows
        if is_distributed() and _global_rank(args) != 0 and not sharded:
            log.info("hf_fisher: resuming at step %d: rank 0 restores the merged Fisher state, this rank starts empty", state.global_step)
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.output_subdir
        if not folder.is_dir():
            log.warning("hf_fisher: resuming at step %d without a Fisher state in %s: starting from zero", state.global_step, folder)
            return
        if sharded:  # every rank reads its own rows, one tensor at a time
            from ..collection.fsdp import restore_sharded

            restore_sharded(self.collector, self.task, folder)
            log.info("hf_fisher: resumed this rank's rows of the Fisher accumulators from %s", folder)
            return
        from ..artifacts.fisher import Fisher

        self.collector.restore(self.task, Fisher.from_pretrained(folder))
        log.info("hf_fisher: resumed the Fisher accumulators from %s", folder)

    # ------------------------------------------------------------------ training
    def on_substep_end(self, args, state, control, **kwargs):
        if self._external is not None:
            self._external.finish()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._external is not None:  # the last micro-batch, before the parameters change
            self._external.finish()
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._external is not None:
            self._external.finish()
        if self.mode == "probe" and self.probe_every_n_steps and state.global_step % self.probe_every_n_steps == 0:
            self._probe(model, state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        # every rank takes part in the merge (a collective), in the same order; only the saver writes
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.output_subdir
        fisher = None
        if self._sharded():  # FSDP2: every rank writes its rows, in the accumulation dtype (exact resume)
            self._save_sharded(folder, dtype=self.collector.accumulation_dtype)
        elif self.mode == "training" and self.collector is not None:
            try:
                # the accumulation dtype, so that resuming is exact
                fisher = self._collected(dtype=self.collector.accumulation_dtype)
            except EmptyDataError:  # nothing collected yet (on any rank)
                fisher = None
        elif self.mode == "probe":
            fisher = self._probe_fisher
        if fisher is not None and _is_main_process(args):
            fisher.save_pretrained(folder)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_summary or logs is None:
            return control
        fisher = self._current_or_none()
        if fisher is not None:
            scalars = fisher_scalars(fisher)
            logs.update(scalars)
            # the Trainer appended this log's copy to the history just before on_log
            if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k in state.log_history[-1]):
                state.log_history[-1].update(scalars)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.mode == "probe":
            self._probe(model, state.global_step)
        if self._external is not None:
            self._external.detach()
            self._external = None
        if self._sharded():  # FSDP2: written by every rank without gathering; fisher() stays a collective
            folder = self._save_sharded(Path(args.output_dir) / self.output_subdir)
            if folder is not None and _is_main_process(args) and getattr(args, "push_to_hub", False):
                self._push(args, folder)
            return control
        fisher = self._current_or_none()  # under several ranks: the merge, on every rank
        if self.mode == "training":
            self._final = fisher
        if fisher is not None and _is_main_process(args):
            folder = fisher.save_pretrained(Path(args.output_dir) / self.output_subdir)
            if getattr(args, "push_to_hub", False):
                self._push(args, folder)
        return control

    def _push(self, args, folder: Path) -> None:
        """The final artifact into the Trainer's Hub repo, under ``<output_subdir>/``, as one commit.

        The repository is the Trainer's own (``args.hub_model_id``, else the output folder's
        name in the token owner's namespace, as ``Trainer.init_hf_repo`` names it); the token
        is ``args.hub_token`` or huggingface_hub's usual sources. The Trainer's later pushes of
        ``output_dir`` (``trainer.push_to_hub()``) carry the same folder along unchanged.
        """
        from huggingface_hub import HfApi

        from ..artifacts.hub import push_folder

        repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
        if "/" not in repo_id:
            repo_id = f"{HfApi().whoami(token=args.hub_token)['name']}/{repo_id}"
        url = push_folder(
            folder, repo_id, path_in_repo=self.output_subdir, token=args.hub_token,
            private=bool(getattr(args, "hub_private_repo", None)),
            commit_message=f"Fisher information ({self.task}, {self.mode} mode) from hf_fisher",
        )
        log.info("hf_fisher: pushed the Fisher artifact to %s (%s/)", url, self.output_subdir)

    def _current_or_none(self):
        try:
            return self.fisher()
        except InvalidInputError:  # nothing collected yet (EmptyDataError, no probe): nothing to save or log
            return None

    # ------------------------------------------------------------------ probe
    def _probe_estimator(self):
        """The estimator a probe runs (``self.estimator``, with the callback's collection options)."""
        from .. import plugins

        return plugins.estimators()[self.estimator](
            reduction=self.reduction, storage_dtype=self.storage_dtype, ema_decay=self.ema_decay, train_mode=False,
            params=self.params, variance=self.variance, **self.estimator_options,
        )

    def _check_probe_against(self, model) -> None:
        """At train begin, before any step: the estimator must suit the model, and probe data given
        as batches must hold a label token for this model's task."""
        from ..engine.losses import label_counts, task_type_of

        task_type = task_type_of(model)
        estimator = self._probe_estimator()
        if hasattr(estimator, "check_model"):
            estimator.check_model(model, task_type)
        batches = _in_memory_batches(self.probe_data)
        if batches is not None and not any(int(label_counts(b, task_type).sum()) for b in batches):
            raise EmptyDataError(
                f"probe_data has no label token for this {task_type} model in any of its {len(batches)} batches (all "
                "padding, all labels -100, or, for a causal LM, no token after a sample's first): pass probe batches "
                "whose samples have at least two real tokens with labels"
            )

    def _probe(self, model, step: int) -> None:
        """The Fisher of the model as it is now, leaving training exactly as it was."""
        from ..collection.collector import _preserved_rng
        from ..collection.distributed import is_distributed, rank, world_size

        batches = _probe_batches(self.probe_data, self._collate)
        if is_distributed() and not _already_sharded(self.probe_data):
            # every rank is given the whole probe set: rank r takes batches r, r+K, ... (the merge adds them up)
            batches = itertools.islice(batches, rank(), None, world_size())
        with _preserved_rng(model):
            try:
                fisher = self._probe_estimator().collect(
                    model, batches, task=self.task, progress=False, model_name_or_path=self._model_name,
                )
            except EmptyDataError as e:
                raise EmptyDataError(f"FisherCallback probe at step {step}: probe_data gave no usable sample: {e}") from e
        fisher.metadata.extra.update(training=self._args_summary, probe_step=step)
        self._probe_fisher = fisher


def _run_first_in_on_log(callback) -> None:
    """Move ``callback`` to the front of the Trainer's callback list, so that the Fisher scalars
    it adds in ``on_log`` reach the reporting integrations (``report_to``), which are callbacks
    registered before any user callback. The Trainer is found on the call stack (callbacks are
    not handed the Trainer); without it, the scalars reach only the callbacks after this one."""
    import inspect

    frame = inspect.currentframe()
    try:
        while frame is not None:
            handler = getattr(frame.f_locals.get("self"), "callback_handler", None)
            callbacks = getattr(handler, "callbacks", None)
            if isinstance(callbacks, list) and any(c is callback for c in callbacks):
                callbacks.remove(callback)
                callbacks.insert(0, callback)
                return
            frame = frame.f_back
    finally:
        del frame


def fisher_scalars(fisher, *, top_layers: int = 64) -> dict[str, float]:
    """Scalars for the Trainer's logs: the trace, the samples seen, per-layer traces."""
    out = {"fisher/trace": float(fisher.total()), "fisher/samples": float(fisher.counts.samples)}
    for layer, value in sorted(fisher.per_layer().items(), key=lambda kv: (kv[0] is None, kv[0] or 0))[:top_layers]:
        if layer is not None and math.isfinite(value):
            out[f"fisher/layer_{layer}"] = float(value)
    return out


#: estimators the callback honours, per mode
ESTIMATORS = {"training": ("empirical",), "probe": ("empirical", "true")}
#: ``estimator_options`` of ``estimator="true"`` (the others are the callback's own arguments)
TRUE_FISHER_OPTIONS = ("mc_samples", "temperature", "exact", "seed")


def _check_estimator(mode: str, estimator: Any, options: Mapping[str, Any] | None) -> dict:
    """The estimator choice is honoured or refused here, at construction, never swapped."""
    if estimator not in ESTIMATORS[mode]:
        if estimator == "true":
            raise InvalidInputError(
                "estimator='true' draws labels from the model, which needs passes of its own: use mode='probe' with "
                "probe_data and estimator='true', or estimator='empirical' for the free training mode"
            )
        if estimator == "kfac":
            raise InvalidInputError(
                "FisherCallback does not collect KFAC factors (it saves, logs, checkpoints and merges diagonal Fishers); "
                "compute them on the trained model with hf_fisher.collect(model, batches, estimator='kfac'), or use "
                "estimator='empirical' (training or probe mode) or 'true' (probe mode) here"
            )
        raise InvalidInputError(
            f"unknown estimator {estimator!r} for FisherCallback(mode={mode!r}); choose "
            + " or ".join(repr(e) for e in ESTIMATORS[mode])
            + ("" if mode == "probe" else " (mode='probe' also takes 'true')")
        )
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidInputError(f"estimator_options must be a dict, got {type(options).__name__}")
    options = dict(options)
    if options and estimator != "true":
        raise InvalidInputError(
            f"estimator_options apply to estimator='true' ({', '.join(TRUE_FISHER_OPTIONS)}); the empirical Fisher's "
            f"options are the callback's own arguments; got {sorted(options)}"
        )
    unknown = sorted(set(options) - set(TRUE_FISHER_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"estimator_options: {unknown} {'is' if len(unknown) == 1 else 'are'} not an option of estimator='true' "
            f"(it takes {', '.join(TRUE_FISHER_OPTIONS)}; reduction, params, storage_dtype, ... are the callback's own arguments)"
        )
    from ..estimators.true_fisher import TrueFisherEstimator

    TrueFisherEstimator(**options)  # checks the values (InvalidInputError naming the option)
    return options


def _check_probe_data(data: Any) -> None:
    """Refuse, at construction, probe data that is missing or visibly empty: no batch (or
    example) at all, or batches with no label token (all padding, all labels -100)."""
    if data is None:
        raise InvalidInputError("mode='probe' needs probe_data (a DataLoader, batches, or a dataset)")
    if isinstance(data, (str, bytes, Mapping)):
        raise InvalidInputError(
            f"probe_data must be a DataLoader, a list of batch dicts or a dataset of examples, not a {type(data).__name__}"
        )
    if not isinstance(data, torch.utils.data.DataLoader) and hasattr(data, "__len__") and len(data) == 0:
        raise EmptyDataError("probe_data is empty: pass at least one probe batch (or example) with label tokens")
    batches = _in_memory_batches(data)
    if batches is not None and not any(_may_have_labels(b) for b in batches):
        raise EmptyDataError(
            f"probe_data has no label token in any of its {len(batches)} batches (attention_mask all 0 or labels all "
            "-100): pass probe batches with real tokens and labels"
        )


def _in_memory_batches(data: Any) -> list | None:
    """``data`` as a list when it is a list or tuple of batch dicts (``input_ids`` a 2-D tensor),
    which can be checked up front without reading anything; None otherwise (a DataLoader, a
    dataset, a generator: read only when probing)."""
    if not isinstance(data, (list, tuple)) or not data:
        return None
    ok = all(isinstance(b, Mapping) and isinstance(b.get("input_ids"), torch.Tensor) and b["input_ids"].dim() == 2 for b in data)
    return list(data) if ok else None


def _may_have_labels(batch: Mapping) -> bool:
    """False when ``batch`` visibly has no label token for any task (every token padding, or
    every label -100); the exact count needs the model's task (checked at train begin)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.bool().any()):
        return False
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and not bool((labels != -100).any()):
        return False
    return batch["input_ids"].numel() > 0


def _probe_batches(data: Any, collate) -> Iterable:
    """A DataLoader or an iterable of batch dicts as it is; a dataset of examples (a sequence
    whose items are dicts of unbatched values) through the Trainer's collator."""
    if isinstance(data, torch.utils.data.DataLoader) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data
    first = data[0] if len(data) else None
    ids = first.get("input_ids") if isinstance(first, dict) else None
    batched = isinstance(ids, torch.Tensor) and ids.dim() == 2
    if isinstance(first, dict) and not batched:
        if collate is None:
            from transformers import default_data_collator as collate
        return torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate)
    return data


def _training_summary(args, mode: str) -> dict:
    keys = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
            "num_train_epochs", "max_grad_norm", "bf16", "fp16", "seed", "gradient_checkpointing")
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    out["mode"] = mode
    return out


def _is_main_process(args) -> bool:
    """The process that writes (the Trainer's ``should_save``: global rank 0, or each node's
    local rank 0 with ``save_on_each_node``)."""
    should_save = getattr(args, "should_save", None)
    if isinstance(should_save, bool):
        return should_save
    return getattr(args, "process_index", 0) == 0


def _global_rank(args) -> int:
    from ..collection.distributed import is_distributed, rank

    return rank() if is_distributed() else getattr(args, "process_index", 0)


def _already_sharded(data) -> bool:
    """A DataLoader that already gives each rank its own share (a DistributedSampler, or one
    prepared by accelerate): probe mode then takes all of its batches on every rank."""
    from torch.utils.data.distributed import DistributedSampler

    samplers = [getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    if any(isinstance(s, DistributedSampler) for s in samplers):
        return True
    return type(data).__module__.startswith("accelerate")


def _refuse_sharded(model, args) -> None:
    """Refused at train begin: sharded parameters the capture hooks cannot see whole (DeepSpeed,
    FSDP1, FSDP asked for but the model not sharded with FSDP2 at train begin). A model sharded
    with FSDP2 (``fully_shard``; accelerate's ``fsdp_version=2``) is supported: see
    :mod:`hf_fisher.collection.fsdp`. Several DDP processes are fine: their accumulators are
    merged exactly."""
    from ..collection.fsdp import is_fsdp

    env = {k: os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}
    fsdp = bool(getattr(args, "fsdp", None)) or env["ACCELERATE_USE_FSDP"]
    deepspeed = bool(getattr(args, "deepspeed", None)) or env["ACCELERATE_USE_DEEPSPEED"]
    if deepspeed:
        raise InvalidInputError(
            "FisherCallback does not support DeepSpeed: ZeRO partitions the parameters and gradients outside the "
            "module hooks, so the per-sample gradients would be those of partitions. Shard with FSDP2 instead "
            "(TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2}) or torch.distributed.fsdp.fully_shard): "
            "each rank then keeps its rows of the Fisher, exactly; or train with plain data parallelism, or compute the "
            "Fisher after training with hf_fisher.collect on the saved model"
        )
    if is_fsdp(model):
        return
    if fsdp:
        raise InvalidInputError(
            "FisherCallback does not support this FSDP setup: the model is not sharded with FSDP2 at train begin "
            "(FSDP1 wraps the parameters in flat shards the per-sample hooks cannot see whole; on CPU accelerate "
            "does not shard at all). Use FSDP2: TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2}) on "
            "GPUs, or torch.distributed.fsdp.fully_shard; or train with plain data parallelism (torchrun / "
            "accelerate launch without FSDP: the Fisher of every rank is merged exactly), or compute the Fisher after "
            "training with hf_fisher.collect on the saved model"
        )


__all__ = ["FisherCallback", "fisher_scalars"]
