"""The per-sample engine: exact per-sample contributions C_i = g_i ⊙ g_i from ONE batched
forward and backward.

How one batch is processed:

1. The batch is checked (token ids in range) and run forward once with capture hooks.
2. Per-sample summed losses S_i and label counts n_i come from :mod:`.losses`; the engine
   back-propagates ``sum_i w_i S_i`` (w_i from the normalisation) with ``torch.autograd.grad``
   with respect to the outputs of the lowest captured modules only, so ``.grad`` is never
   touched and weight-gradient products are never formed.
3. As the gradient reaches each captured module output, the module's rule
   (:mod:`.rules`) builds parts, and every parameter whose parts are all in is reduced at once:
   ``reduction="param"`` materialises per-sample gradients in chunks under the memory budget,
   ``reduction="group"`` takes per-index squared sums (Gram form or materialisation, whichever
   is cheaper) and sums them into the parameter's groups. Per-sample contributions go to a
   :class:`ContributionSink`.
4. On the first batch two checks fail closed: the sum over samples of every parameter's parts
   must equal autograd's batch gradient (finite, within the rounding of the model's dtype,
   judged against each parameter's own scale: a tiny gradient next to large ones cannot hide a
   missing or wrong part), and the most padded sample, run alone without its padding, must get
   the gradient it got inside the padded batch (the invariant the definitions demand:
   positions, padding, NaN at padded positions would all break it). Both are proportionate:
   the totals come from the same backward (autograd's parameter gradients next to the
   captured outputs' ones, each reduced as autograd produces it and dropped: never the whole
   model's gradients at once) and are compared through a few fixed random directions; the padding
   check costs one forward and backward of that one sample (the batch's shortest), none for a
   batch of one unpadded sample (which is its own run alone: the check then waits for the next
   batch of its padding kind). A parameter the hooks
   cannot give exactly (used outside its module's forward, a rule not exact for it, a module
   call shared by the batch) gets its per-sample gradients from a batched vector-Jacobian
   product instead, the rest of the model staying batched; anything else (activation
   checkpointing re-running forwards, a model that depends on the padding) switches the engine
   to the per-sample path — one forward/backward per sample, each without its padding. Both
   with a warning and the reason recorded; a batch whose batched pass gives a
   non-finite value for a sample with a finite loss is redone on that path. Never a silently
   wrong number.

Positions: the engine passes the model's own inputs. It adds ``position_ids`` only where the
model's default would number a sample's tokens differently than the sample alone gets them
(left padding of a model counting positions with ``arange``, or of a RoBERTa-style model whose
padding token differs from its ``padding_idx``), in the model's own convention.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import InvalidInputError, NonFiniteError, UnsupportedError
from ..layout import ParamGroups
from . import seq2seq, vision
from .capture import Capture, bottom_outputs
from .losses import (
    SampleLosses,
    label_counts,
    normalization_weights,
    per_sample_loss,
    require_token_inputs,
    token_labels,
)
from .rules import (
    DensePart,
    GradRule,
    ModuleCall,
    Part,
    chunked_per_index_sq,
    gradient_rows,
    num_samples,
    rows_per_block,
    rule_for,
    sub_samples,
    tied_rows_per_index_sq,
)

log = logging.getLogger(__name__)

_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", *vision.INPUT_KEYS)

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], SampleLosses]


@dataclass(frozen=True)
class ReferenceGradient:
    """What the first-batch check keeps of autograd's batch gradient ``g`` of one parameter (in
    the compute dtype): ``seen = g P`` (:meth:`PerSampleEngine.seen`: ``g`` through the check's
    random directions, or ``g`` itself for a small parameter), its Frobenius norm ``‖g‖_F`` (the
    model-wide rounding term, :func:`rounding_floors`) and whether ``g`` is finite."""

    seen: torch.Tensor
    norm: float
    finite: bool


@dataclass
class Target:
    """What to compute for one trainable parameter: its name, tensor and groups (None = param)."""

    name: str
    param: torch.Tensor
    groups: ParamGroups | None


class ContributionSink:
    """Receives per-sample contributions ``[b, ...]`` of each parameter for one batch.

    The engine calls :meth:`add` per chunk of samples (in increasing sample order for a given
    parameter). Nothing reaches the collector's accumulators until :meth:`commit`, so a batch
    that fails half-way (or is redone without some samples) leaves them untouched -- unless the
    sink streams (``FisherCollector(atomic_batches=False)``), merging each parameter at
    :meth:`complete`.
    """

    #: whether :meth:`add_moments` is available (order-independent statistics only)
    accepts_moments = False
    #: whether :meth:`add_gradients` is available (the sink squares signed gradients itself)
    accepts_gradients = False
    #: whether :meth:`add_gradients` takes blocks of rows of one sample's gradient (``rows=``)
    accepts_row_blocks = False

    def add(self, name: str, contributions: torch.Tensor) -> None:
        """Per-sample contributions ``[b, ...]`` of the next samples; the sink owns the tensor
        (it may modify it in place)."""
        raise NotImplementedError

    def add_moments(self, name: str, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Moments of the next ``n`` samples' contributions (``M2 = sum (C_i - mean)²``)."""
        raise NotImplementedError

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False, rows: tuple[int, int, int] | None = None) -> list[int]:
        """Signed per-sample gradients ``[b, ...]`` of the next samples (parameter reduction):
        the sink adds ``C_i = g_i ⊙ g_i`` (in place when ``owned``) and returns the rows whose
        contribution is not finite (nothing of such a chunk is added).

        ``rows=(lo, hi, n)`` (only where :attr:`accepts_row_blocks`): ``gradients`` are rows
        ``lo:hi`` of dim 0 (of ``n``) of the same samples' gradients; the blocks of those samples
        come in order, ``lo = 0`` first, ``hi = n`` last, before the next samples."""
        raise NotImplementedError

    def complete(self, name: str) -> None:
        """Every sample of this pass has been handed for ``name`` (the batched path, after its
        reduction; the per-sample loop never calls it). A sink may merge ``name``'s moments into
        its accumulators now, giving up the batch's all-or-nothing commit; by default a no-op."""

    def reset(self) -> None:
        raise NotImplementedError


@dataclass
class BatchReport:
    """What happened to one batch: samples used / skipped, label tokens of the used samples."""

    used: int = 0
    skipped: int = 0
    nonfinite: int = 0
    tokens: int = 0
    used_index: list[int] = field(default_factory=list)


class _NonFiniteSamples(Exception):
    def __init__(self, samples: set[int], where: str):
        super().__init__(where)
        self.samples = samples
        self.where = where


class _Redo(Exception):
    """The batch must be processed again (a parameter moved to the vector-Jacobian path)."""


class PerSampleEngine:
    """Exact per-sample Fisher contributions for every trainable parameter of a model.

    Args:
        model: any HF model (optionally PEFT-wrapped); its trainable parameters are covered.
        targets: one :class:`Target` per trainable parameter (groups None = per element).
        rules: module type -> :class:`GradRule` (from the plugin manager).
        task_type: "causal_lm" | "masked_lm" | "sequence_classification" | "seq2seq" (see :mod:`.seq2seq`) |
            "image_classification" | "audio_classification" (``pixel_values`` / ``input_values`` batches,
            :mod:`.vision`).
        normalization: "mean" | "sum" | "token" (see :mod:`.losses`).
        loss_fn: optional ``(model_output, batch) -> SampleLosses`` replacing the dataset-label
            loss (e.g. labels sampled from the model for the true Fisher).
        memory_budget_mb: bound on the temporaries of the per-sample reduction (materialised
            per-sample gradients, Gram products), at any sequence length and width: chunks of
            samples while one sample fits, else blocks of tokens (Gram form) or of rows (a
            per-sample gradient; param mode through a sink that takes row blocks). Not counted:
            the parameter-shaped moments a batch hands the accumulators, an embedding table's
            token gradients (group mode: chunks of samples within the budget, at least one
            sample's ``[T, d]``; param mode: the batch's, as its sparse moments take them at once:
            the size of the table's output gradient), and the first batch's checks (whole batch gradients, one
            sample's whole gradient). Default: 32 MB for group reductions (their
            peak memory stays at or below a training step's), 256 MB for param reductions (whose
            float64 accumulators dominate memory anyway, and bigger chunks are faster).
        on_nonfinite: "raise" (default) or "skip" (skip and count the sample).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        rules: dict[type, GradRule],
        *,
        task_type: str,
        normalization: str = "mean",
        loss_fn: LossFn | None = None,
        memory_budget_mb: float | None = None,
        on_nonfinite: str = "raise",
        verify: bool = True,
    ):
        if on_nonfinite not in ("raise", "skip"):
            raise InvalidInputError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
        normalization_weights(torch.ones(1, dtype=torch.long), normalization, torch.float32)  # validates
        if task_type == seq2seq.TASK:
            seq2seq.encoder_input_name(model)  # token ids or log-mel features, else refused
        elif task_type in vision.VISION_TASKS:  # pixel_values / input_values (engine.vision)
            vision.check_model(model, task_type)
        else:
            require_token_inputs(model)
        self.model = model
        self.targets = targets
        self.by_param = {id(t.param): t for t in targets}
        self.rules = rules
        self.task_type = task_type
        self.normalization = normalization
        self.loss_fn = loss_fn
        self.on_nonfinite = on_nonfinite
        #: whether the first batch is checked (the caller's choice); :attr:`verify_next`: whether the next one is
        self.verify = verify
        self.verify_next = verify
        self.loop_mode = False
        self.loop_reason = ""
        param0 = next(model.parameters())
        self.device = param0.device
        self.model_dtype = param0.dtype
        self.compute_dtype = torch.promote_types(param0.dtype, torch.float32)
        if memory_budget_mb is None:
            memory_budget_mb = 32.0 if any(t.groups is not None for t in targets) else 256.0
        elem = torch.empty((), dtype=self.compute_dtype).element_size()
        self.budget_elems = max(1, int(memory_budget_mb * 2**20 / (3 * elem)))
        wanted = set(self.by_param)
        self.owned = {m: ids & wanted for m, ids in owned_parameters(model).items() if ids & wanted}
        self.capture = Capture([m for m in model.modules() if id(m) in self.owned], self.on_grad, taps=self._tap)
        self._bottom_cache: dict = {}
        #: the keyword arguments the model's forward accepts
        self.forward_params = _accepted_kwargs(model)
        self.position_convention = _position_convention(model)
        self.explicit_positions = _has_position_table(model)
        self.vocab_size = _vocab_size(model)
        self.output_size = _output_size(model)
        self.num_labels = getattr(_config(model), "num_labels", None)
        self.position_limit = _position_limit(model, self.position_convention) if self.explicit_positions else None
        self.batches_seen = 0
        self.padding_checked: set[str] = set()  # padding kinds already checked (see _padding_kind)
        # parameters whose per-sample gradients come from the batched vjp (name -> reason)
        self.vjp_params: set[int] = set()
        self.vjp_reasons: dict[str, str] = {}
        self._vjp_reported: set[str] = set()
        self._shared: set[int] = set()
        self._probe: int | None = None
        self._probe_grads: dict = {}
        self._totals: dict = {}
        self._rounding: dict = {}  # id(param) -> rounding scale of its first-batch total, see check_totals
        self._verify_probes: dict = {}  # (last dim, dtype, device) -> directions, see _verify_probe
        #: set by a sharded (FSDP2) collector: ``agree(flag)`` is True on every rank when ``flag`` is
        #: on any rank (a collective), so the first-batch checks, which run extra passes, decide
        #: together; None in one process. With it, the per-sample loop (whose passes differ
        #: between ranks) is refused instead of taken.
        self.agree: Callable[[bool], bool] | None = None
        if _checkpointing(model):
            self._switch_to_loop("gradient checkpointing is enabled: recomputed forwards cannot be captured")
        if task_type == seq2seq.TASK:  # seq2seq: calls shared by the batch whatever its shape
            for m in seq2seq.batch_shared_modules(model):
                for p in m.parameters(recurse=False):
                    if id(p) in self.by_param:
                        self._use_vjp(p, f"{type(m).__name__} of relative positions is shared by the batch")

    # ------------------------------------------------------------------ public
    def process(self, batch: Mapping[str, Any], sink: ContributionSink, *, batch_index: int = 0, limit: int | None = None) -> BatchReport:
        """Compute the contributions of every sample of ``batch`` into ``sink``.

        ``limit`` caps the number of used samples (the first ones with label tokens).
        """
        batch = self.prepare(batch, batch_index)
        exclude: set[int] = set()
        nonfinite: set[int] = set()
        for _attempt in range(3 + len(self.targets)):
            sink.reset()
            try:
                report = self._process_batched_or_loop(batch, sink, batch_index, exclude, limit)
            except _NonFiniteSamples as e:
                if self.on_nonfinite == "raise":
                    i = min(e.samples)
                    raise NonFiniteError(
                        f"non-finite {e.where} for sample {i} of batch {batch_index} (also when the sample "
                        "runs alone, without padding); fix the data or the model, or pass "
                        "on_nonfinite='skip' to skip and count such samples"
                    ) from None
                exclude |= e.samples
                nonfinite |= e.samples
                continue
            except _Redo:
                continue
            report.nonfinite = len(nonfinite)
            return report
        raise NonFiniteError(f"batch {batch_index}: non-finite values persist after skipping samples {sorted(nonfinite)}")

    def _process_batched_or_loop(self, batch, sink, batch_index, exclude, limit) -> BatchReport:
        if not self.loop_mode and _checkpointing(self.model):  # may be switched on after set-up (a Trainer)
            self._switch_to_loop("gradient checkpointing is enabled: recomputed forwards cannot be captured")
        if self.loop_mode:
            return self._process_loop(batch, sink, batch_index, exclude, limit)
        try:
            return self._process_once(batch, sink, batch_index, exclude, limit)
        except _NonFiniteSamples as e:
            # Is the batched pass to blame (NaN/inf at padded positions) or the samples? The
            # per-sample path, each sample alone without its padding, decides; it raises
            # _NonFiniteSamples itself for a sample that is non-finite alone too.
            sink.reset()
            report = self._process_loop(batch, sink, batch_index, exclude, limit)
            self._switch_to_loop(
                f"batch {batch_index}: the batched pass gives a non-finite {e.where} for sample(s) "
                f"{sorted(e.samples)}, which are finite alone without padding (the model produces NaN/inf "
                "at padded positions, e.g. fully masked attention rows)"
            )
            return report

    # ------------------------------------------------------------------ batch set-up
    def prepare(self, batch: Mapping[str, Any], batch_index: int) -> dict[str, torch.Tensor]:
        if self.task_type == seq2seq.TASK:
            return seq2seq.prepare(self, batch, batch_index)
        if self.task_type in vision.VISION_TASKS:
            return self._prepare_vision(batch, batch_index)
        if not isinstance(batch, Mapping):
            raise InvalidInputError(f"batch {batch_index} must be a mapping with 'input_ids' (got {type(batch).__name__})")
        if "input_ids" not in batch:
            keys = ", ".join(repr(k) for k in batch) or "none"
            raise InvalidInputError(
                f"batch {batch_index} has no 'input_ids' (its keys: {keys}); every batch needs token ids "
                "(tokenizer output: input_ids, attention_mask, labels)"
            )
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        ids = out["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise InvalidInputError(f"batch {batch_index}: input_ids must be an integer tensor [batch, seq_len]")
        if ids.numel() == 0:
            raise InvalidInputError(f"batch {batch_index} is empty")
        if self.vocab_size is not None:
            bad = (ids < 0) | (ids >= self.vocab_size)
            if bad.any():
                i, t = (int(x) for x in bad.nonzero()[0])
                raise InvalidInputError(
                    f"batch {batch_index}: token id {int(ids[i, t])} at position (sample {i}, token {t}) is "
                    f"outside the model's vocabulary [0, {self.vocab_size}); check the tokenizer matches the model"
                )
        self._check_shapes_and_labels(out, batch_index)
        return out

    def _prepare_vision(self, batch: Mapping[str, Any], batch_index: int) -> dict[str, torch.Tensor]:
        """An image / audio batch on the model's device, checked (:func:`.vision.check_batch`)."""
        if not isinstance(batch, Mapping):
            key = vision.INPUT_OF[self.task_type]
            raise InvalidInputError(f"batch {batch_index} must be a mapping with {key!r} and 'labels' (got {type(batch).__name__})")
        vision.refuse_batchnorm_training(self.model)
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        vision.check_batch(out, self.task_type, batch_index, self.num_labels)
        return out

    def _check_shapes_and_labels(self, batch: dict[str, Any], batch_index: int) -> None:
        """attention_mask / labels against input_ids, label ids against the output space, the
        sequence length against a learned position table: before any forward."""
        ids = batch["input_ids"]
        B, T = ids.shape
        where = f"batch {batch_index}"
        for key in ("attention_mask", "token_type_ids", "position_ids"):
            v = batch.get(key)
            if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, T)):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise InvalidInputError(f"{where}: {key} has shape {shape} but input_ids has shape {(B, T)}; they must match")
        labels = batch.get("labels")
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise InvalidInputError(f"{where}: labels must be a tensor, not {type(labels).__name__}")
            if self.task_type == "sequence_classification":
                if labels.dim() == 0 or labels.shape[0] != B:
                    raise InvalidInputError(f"{where}: labels has shape {tuple(labels.shape)}; a classifier needs one label per sample ([{B}] or [{B}, num_labels])")
                if labels.dim() == 1 and not labels.is_floating_point() and self.num_labels is not None and self.num_labels > 1:
                    bad = (labels != -100) & ((labels < 0) | (labels >= self.num_labels))
                    if bad.any():
                        i = int(bad.nonzero()[0])
                        raise InvalidInputError(
                            f"{where}: class label {int(labels[i])} of sample {i} is outside [0, {self.num_labels}) "
                            f"(the model has num_labels={self.num_labels}); fix the labels or the model's num_labels"
                        )
            else:
                if tuple(labels.shape) != (B, T):
                    raise InvalidInputError(f"{where}: labels has shape {tuple(labels.shape)} but input_ids has shape {(B, T)}; they must match")
                if labels.is_floating_point():
                    raise InvalidInputError(f"{where}: labels must be integer token ids (-100 = ignored), not {labels.dtype}")
                if self.output_size is not None:
                    bad = (labels != -100) & ((labels < 0) | (labels >= self.output_size))
                    if bad.any():
                        i, t = (int(x) for x in bad.nonzero()[0])
                        raise InvalidInputError(
                            f"{where}: label id {int(labels[i, t])} at position (sample {i}, token {t}) is outside the "
                            f"model's output vocabulary [0, {self.output_size}); use -100 for tokens that must not count"
                        )
        if self.position_limit is not None and self.position_limit < T:
            raise InvalidInputError(
                f"{where}: sequences of {T} tokens are longer than the model's {self.position_limit} positions; "
                f"truncate them to at most {self.position_limit} tokens (e.g. tokenizer(..., truncation=True, "
                f"max_length={self.position_limit}))"
            )

    def model_inputs(self, batch: dict[str, torch.Tensor], *, alone: bool = False) -> dict[str, Any]:
        """The model's inputs for ``batch``; ``alone``: a single unpadded sample, run exactly as
        the model runs it by default (the reference the padding check compares against)."""
        if self.task_type == seq2seq.TASK:
            return seq2seq.model_inputs(self, batch)
        inputs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch and k in self.forward_params}
        if not alone and "position_ids" in self.forward_params and "position_ids" not in inputs:
            positions = self._positions(batch)
            if positions is not None:
                inputs["position_ids"] = positions
        if "use_cache" in self.forward_params:
            inputs["use_cache"] = False
        return inputs

    def _positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``position_ids`` to pass, or None where the model's default already gives every real
        token the position it has in its sample alone (see the module docstring)."""
        pair = self.position_pair(batch)
        if pair is None:
            return None
        own, wanted, real = pair
        if torch.equal(own[real], wanted[real]) and not self.explicit_positions:
            return None
        # a learned position table looked up with the model's default [1, T] positions would be
        # one call shared by the batch: the same positions as [B, T] keep it per sample
        return wanted

    def position_pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(own, wanted, real)``: the positions the model would use by default, the ones each
        real token has in its sample alone (both in the model's convention), and the mask of
        real tokens; None without an attention mask."""
        mask = batch.get("attention_mask")
        if mask is None:
            return None
        ids = batch["input_ids"]
        mask = mask.long()
        real = mask.bool()
        if self.position_convention is None:  # positions 0, 1, ... (arange) by default
            B, T = ids.shape
            own = torch.arange(T, device=ids.device).expand(B, T)
            wanted = (mask.cumsum(-1) - 1).clamp(min=0)
        else:  # RoBERTa style: padding_idx + 1, 2, ... over non-padding tokens
            pad = self.position_convention
            nonpad = ids.ne(pad).long()
            own = nonpad.cumsum(-1) * nonpad + pad
            wanted = mask.cumsum(-1) * mask + pad
        return own, wanted, real

    def sample_losses(self, output: Any, batch: dict[str, torch.Tensor]) -> SampleLosses:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        logits = output.logits if hasattr(output, "logits") else output[0]
        labels = token_labels(batch, self.task_type)
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        return per_sample_loss(self.task_type, logits, labels, problem_type=problem_type)

    # ------------------------------------------------------------------ one pass
    def _process_once(self, batch, sink, batch_index, exclude, limit) -> BatchReport:
        B, T = batch_dims(batch, self.task_type)
        self.capture.attach()
        try:
            # scale is filled in after the forward (it needs the label counts)
            self.capture.start(B, self.compute_dtype, None, seq_len=T)
            output = self.model(**self.model_inputs(batch))
            losses = self.sample_losses(output, batch)
            del output  # the logits live on in the graph only as long as autograd needs them
            keep, report = self._select(losses, exclude, limit, batch_index)
            w, s = normalization_weights(losses.n_tokens, self.normalization, self.compute_dtype)
            # all-ones scales (normalisations "mean" and "sum") cost nothing: leave them out
            self.capture.scale = None if bool((s == 1).all()) else s.to(self.device)
            calls = self.capture.calls
            shared = self._shared_calls(calls)
            verify = self.verify_next
            padding = seq2seq.padding_kind(batch, _padding_kind) if self.task_type == seq2seq.TASK else _padding_kind(batch)
            # a batch of one unpadded sample is its own "alone" run: no padding check to make
            need_probe = (verify or padding not in self.padding_checked) and not (B == 1 and padding == "none")
            if self.agree is not None:  # sharded: every rank runs the check (an extra pass) or none
                need_probe = self.agree(need_probe)
            probe = self._probe_sample(batch, losses.n_tokens, keep) if need_probe else None
            if probe is None and need_probe and self.agree is not None:  # no used sample here (limit): any with labels
                probe = self._probe_sample(batch, losses.n_tokens, [i for i, c in enumerate(losses.n_tokens.tolist()) if c > 0 and i not in exclude])
            self.begin_backward(keep, sink, shared, probe)
            weighted = losses.loss_sum * w.to(losses.loss_sum.dtype)
            loss = weighted.sum()
            for c in calls:
                c.scale = self.capture.scale
            bottom = self._bottom(calls, loss, batch)
            inputs = [t for i in bottom for t in calls[i].tensors]
            for c in calls:  # the hooks live on the autograd nodes: outputs need not stay alive
                c.output = None
                c.tensors = []
            params = [t.param for t in self.targets] if verify else []
            vjp = [t for t in self.targets if id(t.param) in self.vjp_params]
            self.capture.in_backward = True
            # the check's reference: each parameter's batch gradient reduced to what the check
            # compares as soon as autograd has it, then dropped (see _reference_hook)
            refs: dict[int, ReferenceGradient] = {}
            hooks = [p.register_hook(self._reference_hook(p, refs)) for p in params if p.requires_grad]
            try:
                grads = (
                    torch.autograd.grad(loss, inputs + params, allow_unused=True, retain_graph=bool(vjp))
                    if (inputs or params) else []
                )
            finally:
                for h in hooks:
                    h.remove()
            self.capture.flush_deferred()
            self.capture.in_backward = False
            if self.capture.recomputed:
                raise UnsupportedError("a module's forward ran again during backward (activation checkpointing)")
            if vjp:
                self.capture.muted = True
                self._vjp_parts(weighted, vjp)
            del grads
            self.finish_backward(verify_grads={id(p): refs.get(id(p)) for p in params} if verify else None)
            del refs, loss, weighted, losses
            self.capture.detach()
            if probe is not None:
                self._check_alone(batch, probe, batch_index)
                self.padding_checked.add(padding)
            if verify:
                self.verify_next = False
            self._report_vjp()
        except UnsupportedError as e:
            self._switch_to_loop(str(e))
            self.capture.detach()
            sink.reset()
            return self._process_loop(batch, sink, batch_index, exclude, limit)
        finally:
            self.capture.in_backward = False
            self.capture.detach()
            self._pending = {}
            self._probe_grads = {}
            self._totals = {}
            self._rounding = {}
        self.batches_seen += 1
        return report

    def _select(self, losses: SampleLosses, exclude: set[int], limit: int | None, batch_index: int):
        n = losses.n_tokens
        finite = torch.isfinite(losses.loss_sum.detach())
        bad = {int(i) for i in (~finite & (n > 0)).nonzero().flatten()} - exclude
        if bad:
            raise _NonFiniteSamples(bad, "loss")
        return _keep_and_report(n, exclude, limit)

    def _bottom(self, calls: list[ModuleCall], loss: torch.Tensor, batch) -> list[int]:
        key = (tuple(id(c.module) for c in calls), tuple(sorted(batch)))
        if key not in self._bottom_cache:
            self._bottom_cache[key] = bottom_outputs(calls, loss)
        return self._bottom_cache[key]

    def _shared_calls(self, calls: list[ModuleCall]) -> set[int]:
        """Modules with a call whose output is not batched over the samples (a batch-shared
        computation, e.g. DeBERTa's relative-position projections): their parameters get their
        per-sample gradients from the batched vector-Jacobian product (see :meth:`_vjp_parts`)."""
        shared = set()
        for c in calls:
            if any(c.batch_axis_kind(t) is None for t in c.tensors):
                shared.add(id(c.module))
                for p in c.module.parameters(recurse=False):
                    if id(p) in self.by_param and id(p) not in self.vjp_params:
                        self._use_vjp(p, f"{type(c.module).__name__} output of shape {tuple(c.tensors[0].shape)} is shared by the batch")
        return shared

    # ------------------------------------------------------------------ reduction
    # The backward step, public for a driver that runs the forward and backward itself
    # (:class:`hf_fisher.engine.external.ExternalBackward`): :meth:`begin_backward` after the
    # capture started, :meth:`on_grad` as the capture's callback (the default), then
    # :meth:`finish_backward` after the backward, or :meth:`discard_pending` to drop a failed one.
    def begin_backward(self, keep: list[int], sink: ContributionSink, shared: set[int], probe: int | None) -> None:
        """Start one backward: reduce the per-sample gradients of the samples ``keep`` (batch
        rows) into ``sink``; ``shared``: ids of modules whose calls are batch-shared (their
        parameters go through the vector-Jacobian path); ``probe``: a sample whose gradient is
        also kept for the exactness check (None: none)."""
        self._keep = _selection(keep, self.device)
        self._sink = sink
        self._shared = shared
        self._probe = probe
        self._pending: dict[int, list[Part]] = {}
        self._done: set[int] = set()
        self._totals: dict[int, torch.Tensor] = {}
        self._rounding: dict[int, float] = {}
        self._probe_grads: dict[int, torch.Tensor] = {}
        self.expect_recorded_calls()

    def expect_recorded_calls(self) -> None:
        """Count, per parameter, the recorded calls whose parts it receives: a parameter is
        reduced as soon as its last part arrives (during the backward, while its factors are
        fresh, and freeing them). Called after the forward that recorded the calls."""
        expected: dict[int, int] = {}
        for c in self.capture.calls:
            for pid in self.owned.get(id(c.module), ()):
                if pid in self.by_param and pid not in self.vjp_params:
                    expected[pid] = expected.get(pid, 0) + 1
        self._expected = expected

    def _tap(self, module: nn.Module):
        """The forward probe of the module's rule (:meth:`GradRule.tap`), or None."""
        tap = getattr(rule_for(module, self.rules), "tap", None)
        return tap(module) if tap is not None else None

    def on_grad(self, call: ModuleCall) -> None:
        """A recorded call's output gradient arrived: turn it into per-sample gradient parts of
        the parameters it owns (the module's rule) and reduce each parameter once its last
        part is in; frees what the call held."""
        owned = self.owned.get(id(call.module), set())
        if id(call.module) not in self._shared and any(pid not in self.vjp_params for pid in owned):
            rule = rule_for(call.module, self.rules)
            for part in rule.parts(call).values():
                pid = id(part.param)
                if pid not in self.by_param or pid not in owned or pid in self.vjp_params:
                    continue
                self._pending.setdefault(pid, []).append(part)
                if len(self._pending[pid]) == self._expected.get(pid, 0):
                    self._reduce(pid)
        # free what this call held (inputs, output, its gradient) as soon as it is reduced
        call.args, call.kwargs, call.grad_output, call.output = (), {}, None, None

    def on_whole_gradient(self, param: torch.Tensor, gradient: torch.Tensor) -> None:
        """A batch of one sample whose whole gradient of ``param`` is known from elsewhere (the
        Trainer's backward, every use summed): it is the sample's only part, reduced now (the
        per-sample scale set by :meth:`begin_backward` applies as to any part)."""
        pid = id(param)
        self._pending[pid] = [DensePart(param, gradient.detach().unsqueeze(0).to(self.compute_dtype), self.capture.scale)]
        self._reduce(pid)

    def discard_pending(self) -> None:
        """Drop the parts of a backward that will not be finished (its micro-batch failed)."""
        self._pending = {}

    def _vjp_parts(self, weighted: torch.Tensor, targets: list[Target]) -> None:
        """Per-sample gradients ``[B, *shape]`` of ``targets`` by one vectorised backward of the
        per-sample losses: ``torch.autograd.grad(L, θ, grad_outputs=I_B, is_grads_batched=True)``
        with ``L_i = w_i S_i`` (exact; chunked over samples under the memory budget)."""
        B = weighted.shape[0]
        params = [t.param for t in targets]
        numel = max(int(p.numel()) for p in params)
        chunk = max(1, min(B, self.budget_elems // max(1, numel)))
        eye = torch.eye(B, dtype=weighted.dtype, device=weighted.device)
        rows: list[list[torch.Tensor]] = [[] for _ in params]
        for lo in range(0, B, chunk):
            hi = min(B, lo + chunk)
            g = torch.autograd.grad(weighted, params, grad_outputs=eye[lo:hi], is_grads_batched=True, retain_graph=True, allow_unused=True)
            for k, (p, gk) in enumerate(zip(params, g)):
                rows[k].append(torch.zeros((hi - lo, *p.shape), dtype=self.compute_dtype, device=self.device) if gk is None else gk.to(self.compute_dtype))
        for t, r in zip(targets, rows):
            self._pending[id(t.param)] = [DensePart(t.param, torch.cat(r), self.capture.scale)]
            self._reduce(id(t.param))

    def finish_backward(self, verify_grads: dict[int, torch.Tensor | None] | None) -> None:
        """End one backward: reduce the parameters no call reached (zero contributions) and, with
        ``verify_grads`` (``{id(param): batch gradient}`` or its :class:`ReferenceGradient`), check the per-sample gradients
        against them (:class:`UnsupportedError` when they do not add up)."""
        from .rules import release_grams

        try:
            # after the backward, grad mode is back on: the parts' factors (activations) must
            # not make the reduced contributions part of a graph
            with torch.no_grad():
                for t in self.targets:
                    pid = id(t.param)
                    if pid not in self._done:
                        self._reduce(pid)
        finally:
            release_grams()
        if verify_grads is not None:
            self._verify(verify_grads)

    def _reduce(self, pid: int) -> None:
        """Reduce parameter ``pid``'s parts into the sink (:meth:`_reduce_parts`), then tell the
        sink that its contributions for this pass are complete (:meth:`ContributionSink.complete`)."""
        self._reduce_parts(pid)
        self._sink.complete(self.by_param[pid].name)

    def _reduce_parts(self, pid: int) -> None:
        target = self.by_param[pid]
        parts = self._pending.pop(pid, [])
        self._done.add(pid)
        if self.verify_next:
            probe = self._verify_probe(target.param)
            if probe is None:
                self._totals[pid] = sum(p.total() for p in parts) if parts else None
            else:
                self._totals[pid] = sum(p.total_times(probe) for p in parts) if parts else None
            self._rounding[pid] = _rounding_scale(parts)
        if self._probe is not None:  # kept through the check's directions only (see _check_alone)
            zeros = torch.zeros(target.param.shape, dtype=self.compute_dtype, device=self.device)
            one = slice(self._probe, self._probe + 1)
            self._probe_grads[pid] = self.seen(target.param, sum((p.materialize(one)[0] for p in parts), zeros))
        keep = self._keep
        shape = tuple(target.param.shape)
        n_keep = num_samples(keep)
        if n_keep == 0:
            return
        groups = target.groups
        if not parts:
            n_out = groups.num_groups if groups is not None else None
            zeros = torch.zeros((n_keep, n_out) if n_out is not None else (n_keep, *shape), dtype=self.compute_dtype, device=self.device)
            self._emit(target.name, zeros)
            return
        if groups is not None:
            axes = groups.axes if getattr(groups, "extra_axes", ()) else groups.axis
            if len(parts) == 1:
                per_index = parts[0].per_index_sq(axes, keep, self.budget_elems)
            else:  # tied weights: the parts' sum, squared per index (in row blocks past the budget)
                per_index = tied_rows_per_index_sq(parts, keep, self.budget_elems) if axes in (0, (0,)) else None
            if per_index is None:
                per_index = chunked_per_index_sq(
                    lambda s: sum(p.materialize(s) for p in parts), shape, axes, keep, self.budget_elems,
                    lambda s, lo, hi: sum(p.materialize_rows(s, lo, hi) for p in parts),
                )
            self._emit(target.name, groups.reduce_axis(per_index))
            return
        if groups is None and len(parts) == 1 and self._sink.accepts_moments and hasattr(parts[0], "sparse_moments"):
            n, mean, m2 = parts[0].sparse_moments(keep)
            if torch.isfinite(mean.sum()):
                self._sink.add_moments(target.name, n, mean, m2)
                return
            # non-finite: the dense path below finds and names the sample
        numel = max(1, target.param.numel())
        # a sink that squares the signed gradients itself (in place) holds one [chunk, *shape]
        # tensor instead of three: its chunks can be three times larger
        fused = groups is None and getattr(self._sink, "accepts_gradients", False)
        budget = (3 if fused else 1) * self.budget_elems
        prefer = getattr(parts[0], "row_block", None)
        blocks = fused and len(shape) > 0 and getattr(self._sink, "accepts_row_blocks", False)
        if blocks and not (numel > budget or prefer):
            prefer = self._cache_rows(parts, shape, n_keep)
        if blocks and (numel > budget or prefer):
            # blocks of rows (one sample's gradient exceeds the budget, the part forms its
            # gradient by blocks, e.g. one expert at a time, or a block of every sample's rows
            # stays in the CPU's cache, see _cache_rows), as many samples as fit per block
            step = min(rows_per_block(shape, budget), prefer or shape[0])
            per_sample = step * (numel // shape[0])
            chunk = max(1, budget // per_sample)
            for s0 in range(0, n_keep, chunk):
                idx = sub_samples(keep, s0, s0 + chunk)
                for lo in range(0, shape[0], step):
                    hi = min(shape[0], lo + step)
                    g, owned = gradient_rows(parts, idx, (lo, hi))
                    bad = self._sink.add_gradients(target.name, g, owned=owned, rows=(lo, hi, shape[0]))
                    if bad:
                        raise _NonFiniteSamples({_sample_at(idx, r) for r in bad}, f"gradient of {target.name}")
            return
        chunk = max(1, budget // numel)
        for lo in range(0, n_keep, chunk):
            idx = sub_samples(keep, lo, lo + chunk)
            g, owned = gradient_rows(parts, idx)
            if fused:
                bad = self._sink.add_gradients(target.name, g, owned=owned)
                if bad:
                    raise _NonFiniteSamples({_sample_at(idx, r) for r in bad}, f"gradient of {target.name}")
                continue
            c = g * g
            self._emit(target.name, groups.reduce(c, batch_dims=1) if groups is not None else c, idx)

    #: elements of one block of per-sample gradient rows formed at a time on a CPU (4 MB in
    #: float32): the product and the sink's passes over it (square, sums, centred squares) then
    #: run in the cache instead of streaming a [b, *shape] tensor from memory four more times
    CACHE_BLOCK_ELEMS = 2**20

    def _cache_rows(self, parts: list[Part], shape: tuple, n_keep: int) -> int | None:
        """Rows per block such that the ``n_keep`` samples' block of rows of a CPU outer-product
        gradient (``[n_keep, rows, *shape[1:]]``) holds about :attr:`CACHE_BLOCK_ELEMS` elements;
        None (the whole gradient at once) where that is already small, on other devices (a
        kernel launch per block), or for parts whose row blocks are not cheap to form."""
        if self.device.type != "cpu" or not all(p.writes_out or isinstance(p, DensePart) for p in parts):
            return None
        row = max(1, math.prod(shape[1:]))
        step = max(1, self.CACHE_BLOCK_ELEMS // max(1, n_keep * row))
        return step if step < shape[0] else None

    def _emit(self, name: str, contributions: torch.Tensor, samples=None) -> None:
        """Hand per-sample contributions of the samples ``samples`` (default: all kept ones) to
        the sink, naming the samples whose contribution is not finite."""
        flat = contributions.reshape(contributions.shape[0], -1)
        if not torch.isfinite(flat.sum()):
            rows = (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
            where = self._keep if samples is None else samples
            raise _NonFiniteSamples({_sample_at(where, r) for r in rows}, f"gradient of {name}")
        self._sink.add(name, contributions)

    # ------------------------------------------------------------------ checks
    def _tolerance(self) -> float:
        # rounding of a gradient computed in the model's dtype (bf16: eps 7.8e-3; float64 models
        # still run some ops in float32, e.g. Cohere's LayerNorm); a missing, double-counted or
        # misattributed part shows up as an error of order 1
        floor = 1e-6 if self.compute_dtype == torch.float64 else 1e-3
        return max(floor, 8 * torch.finfo(self.model_dtype).eps)

    def _reference_hook(self, param: torch.Tensor, refs: dict):
        """A tensor hook for ``param`` during the checked backward: stores ``refs[id(param)] =``
        :meth:`reference` of autograd's batch gradient and hands autograd back a broadcast zero
        (no memory) in its place, so the model's gradients are never all alive at once: the
        check holds one parameter's gradient at a time, not a parameter-sized copy of the model."""

        def hook(g: torch.Tensor) -> torch.Tensor:
            refs[id(param)] = self.reference(param, g)
            return g.new_zeros(()).expand(g.shape)

        return hook

    def reference(self, param: torch.Tensor, g: torch.Tensor | None) -> ReferenceGradient:
        """What the first-batch check keeps of autograd's batch gradient ``g`` of ``param`` (None:
        zeros), taken in the compute dtype: ``seen = g P`` (:meth:`seen`), ``‖g‖_F`` and whether
        ``g`` is finite."""
        r = torch.zeros_like(param, dtype=self.compute_dtype) if g is None else g.detach().to(self.compute_dtype)
        norm = _norm(r)
        return ReferenceGradient(self.seen(param, r), norm, math.isfinite(norm) or bool(torch.isfinite(r).all()))

    def reference_gradients(self, grads: Mapping[int, torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """``id(param) -> gradient`` in the compute dtype for every target (zeros where None)."""
        ref = {}
        for t in self.targets:
            g = grads.get(id(t.param))
            ref[id(t.param)] = torch.zeros_like(t.param, dtype=self.compute_dtype) if g is None else g.to(self.compute_dtype)
        return ref

    #: directions the first-batch check looks through (see :meth:`_verify_probe`)
    VERIFY_DIRECTIONS = 8

    def _verify_probe(self, param: torch.Tensor) -> torch.Tensor | None:
        """Gaussian directions ``P`` [last dim, k] (entries N(0, 1/k), a fixed seed, the global
        RNG untouched) for a matrix whose last dimension exceeds 2k, else None (checked whole).

        The first batch's check compares ``(Σ parts) P`` with ``grad P``: ``E‖E P‖² = ‖E‖²`` for any
        error ``E``, and a missing, double-counted or misattributed part leaves an error of order
        one, so it shows with probability one, at ~k/C of the cost of summing whole gradients
        (the factored parts never form ``Uᵀ V``)."""
        k = self.VERIFY_DIRECTIONS
        if param.dim() < 2 or param.shape[-1] <= 2 * k:
            return None
        key = (int(param.shape[-1]), self.compute_dtype, self.device)
        probes = self._verify_probes
        if key not in probes:
            g = torch.Generator().manual_seed(0)
            probes[key] = (torch.randn(key[0], k, generator=g, dtype=torch.float64) / k**0.5).to(self.compute_dtype).to(self.device)
        return probes[key]

    def seen(self, param: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g P`` (:meth:`_verify_probe`) for a matrix checked through directions, else ``g``
        itself: what the first-batch checks compare of a gradient of ``param``."""
        probe = self._verify_probe(param)
        g = g.to(self.compute_dtype)
        if probe is None:
            return g
        if g.dim() == 2:  # (Pᵀ gᵀ)ᵀ: a k-row product reads g along its rows (see OuterProductPart.total_times)
            return (probe.t() @ g.t()).t()
        return g @ probe

    def check_totals(self, grads: Mapping[int, torch.Tensor | None]):
        """Compare the first batch's summed parts (:attr:`_totals`) with autograd's batch
        gradients ``grads`` (seen through :meth:`_verify_probe`), EACH PARAMETER ON ITS OWN SCALE.

        A hook-path parameter passes when ``‖Δ‖ <= tol (‖mine‖ + ‖ref‖) + tol ρ``, with ``ρ`` the
        rounding scale of its own parts (:meth:`Part.rounding_sq`: ``sqrt(Σ_t ‖u_t‖²‖v_t‖²)`` of
        the terms its total adds up; 0 for a parameter without parts). A part missing or wrong
        by any fraction of the parameter's own gradient above ``tol`` fails, however small that
        gradient is next to the rest of the model's (a parameter used outside its module's
        forward has no parts: any non-zero autograd gradient fails it). Parameters already on
        the vector-Jacobian path get autograd's own per-sample gradients (nothing can be missed
        there): they are judged with the model-wide rounding term of :func:`mismatch`.

        ``grads`` values: gradients (None: zeros) or their :class:`ReferenceGradient` (what the
        engine's own checked backward keeps, one parameter at a time).

        Returns ``(bad, ref)``: the worst failing ``(id(param), relative error)`` or None, and
        ``id(param) ->`` :class:`ReferenceGradient`. Forgets the totals."""
        bad, ref = self._failing_totals(grads)
        return (bad[0] if bad else None), ref

    def _failing_totals(self, grads: Mapping[int, torch.Tensor | None]):
        """:meth:`check_totals` with every failing parameter, worst first."""
        ref = {}
        for t in self.targets:
            g = grads.get(id(t.param))
            ref[id(t.param)] = g if isinstance(g, ReferenceGradient) else self.reference(t.param, g)
        mine, self._totals = self._totals, {}
        rounding, self._rounding = self._rounding, {}
        seen = {}
        for pid, r in ref.items():
            seen[pid] = r.seen
            if mine.get(pid) is None:
                mine[pid] = torch.zeros_like(seen[pid])
        tol = self._tolerance()
        sizes = {pid: int(self.by_param[pid].param.numel()) for pid in ref}
        floors = rounding_floors({pid: r.norm for pid, r in ref.items()}, tol, sizes)
        for pid in ref:
            if pid not in self.vjp_params:
                floors[pid] = tol * rounding.get(pid, 0.0)
        return mismatches(mine, seen, tol, floors), ref

    def _verify(self, grads: dict[int, torch.Tensor | None]) -> None:
        """Every parameter's parts add up to autograd's batch gradient (see :meth:`check_totals`);
        the hook-path parameters that fail all move to the vector-Jacobian path at once (loudly,
        recorded) and the batch is redone."""
        bad, ref = self._failing_totals(grads)
        if self.agree is not None and self.agree(bool(bad)) and not bad:
            raise _Redo()  # sharded: another rank redoes the batch, so every rank does
        if not bad:
            return
        for pid, rel in bad:
            name = self.by_param[pid].name
            if not ref[pid].finite:
                raise UnsupportedError(
                    f"autograd's batch gradient of {name} is not finite although every used sample's loss is "
                    "(NaN/inf at padded positions)"
                )
            if pid in self.vjp_params:  # the vjp is plain autograd: nothing finer to fall back to
                raise UnsupportedError(f"the per-sample gradients of {name} do not add up to its batch gradient (relative error {rel:.2e})")
        for pid, rel in bad:
            self._use_vjp(
                self.by_param[pid].param,
                f"its captured per-sample gradients do not add up to its batch gradient (relative error {rel:.2e}): "
                "it is used outside its module's forward, or its module's rule is not exact for it",
            )
        raise _Redo()

    def _probe_sample(self, batch, n_tokens: torch.Tensor, keep: list[int]) -> int | None:
        """The used sample with the most padding (then the fewest label tokens): the one whose
        result would change most if padding leaked into real tokens."""
        if not keep:
            return None
        mask = batch.get("attention_mask")
        pads = (mask == 0).sum(dim=1).tolist() if mask is not None else [0] * n_tokens.shape[0]
        return min(keep, key=lambda i: (-int(pads[i]), int(n_tokens[i]), i))

    def _check_alone(self, batch, i: int, batch_index: int) -> None:
        """Sample ``i`` alone, without its padding, must get the gradient it got in the batch.

        Both gradients are compared through the first-batch check's directions (:meth:`seen`:
        ``g P`` for a matrix, ``E‖E P‖² = ‖E‖²``) with :func:`mismatch`'s model-wide rounding
        term over the parameters' own sizes. The cost: one forward and backward of sample ``i``
        alone (the batch's shortest, see :meth:`_probe_sample`)."""
        mine, self._probe_grads = self._probe_grads, {}
        ref = self.gradient_alone(batch, i)
        if ref is None:
            raise UnsupportedError(f"sample {i} of batch {batch_index} has a non-finite loss alone, without padding")
        sizes = {pid: int(self.by_param[pid].param.numel()) for pid in ref}
        ref = {pid: self.seen(self.by_param[pid].param, g) for pid, g in ref.items()}
        bad = mismatch(mine, ref, self._tolerance(), sizes)
        if bad is not None:
            pid, rel = bad
            raise UnsupportedError(
                f"sample {i} of batch {batch_index} alone, without padding, gets a different gradient of "
                f"{self.by_param[pid].name} than inside the padded batch (relative error {rel:.2e}): the "
                "model's output for a sample depends on the padding or on the other samples"
            )

    # ------------------------------------------------------------------ fallback
    def _use_vjp(self, param: torch.Tensor, reason: str) -> None:
        name = self.by_param[id(param)].name
        log.debug("per-sample gradients of %s from the batched vector-Jacobian product: %s", name, reason)
        self.vjp_params.add(id(param))
        self.vjp_reasons[name] = reason

    def _report_vjp(self) -> None:
        """One warning for the parameters that moved to the vjp path since the last one."""
        new = [n for n in self.vjp_reasons if n not in self._vjp_reported]
        if not new:
            return
        self._vjp_reported.update(new)
        shown = "; ".join(f"{n} ({self.vjp_reasons[n]})" for n in new[:3])
        more = f"; and {len(new) - 3} more" if len(new) > 3 else ""
        log.warning(
            "hf_fisher: %d parameter(s) get their per-sample gradients from a batched vector-Jacobian product "
            "instead of the hooks (exact, slower; the rest of the model stays batched): %s%s", len(new), shown, more,
        )

    def _switch_to_loop(self, reason: str) -> None:
        if self.agree is not None:
            raise UnsupportedError(
                f"the per-sample loop is not supported on an FSDP2-sharded model (its passes would differ between "
                f"ranks), and this model needs it: {reason}"
            )
        if not self.loop_mode:
            log.warning("hf_fisher: falling back to a per-sample loop (one forward/backward per sample; exact but slow): %s", reason)
        self.loop_mode = True
        self.loop_reason = reason

    def gradient_alone(self, batch, i: int) -> dict[int, torch.Tensor] | None:
        """``id(param) -> g_i`` (scaled, compute dtype) of sample ``i`` run alone, without its
        padding, exactly as the model runs it by default; None when its loss is not finite."""
        one = seq2seq.alone(batch, i) if self.task_type == seq2seq.TASK else alone(batch, i)
        li = self.sample_losses(self.model(**self.model_inputs(one, alone=True)), one)
        if not bool(torch.isfinite(li.loss_sum.detach()).all()):
            return None
        w, s = normalization_weights(li.n_tokens, self.normalization, self.compute_dtype)
        params = [t.param for t in self.targets]
        grads = torch.autograd.grad((li.loss_sum * w.to(li.loss_sum.dtype)).sum(), params, allow_unused=True)
        scaled = {id(p): g.to(self.compute_dtype) * s[0] for p, g in zip(params, grads) if g is not None}
        return self.reference_gradients(scaled)

    def _process_loop(self, batch, sink, batch_index, exclude, limit) -> BatchReport:
        """One forward/backward per sample, each sample alone without its padding: the exact but
        slow path."""
        n = label_counts(batch, self.task_type)
        keep, report = _keep_and_report(n, exclude, limit)
        self._sink = sink
        bad = set()
        for i in keep:
            grads = self.gradient_alone(batch, i)
            if grads is None:
                bad.add(i)
                continue
            self._keep = slice(i, i + 1)
            for t in self.targets:
                g = grads[id(t.param)]
                c = (g * g).unsqueeze(0)
                self._emit(t.name, t.groups.reduce(c, batch_dims=1) if t.groups is not None else c)
        if bad:
            raise _NonFiniteSamples(bad, "loss")
        self.batches_seen += 1
        return report


def mismatch(mine: dict, ref: dict, tol: float, sizes: dict | None = None) -> tuple[Any, float] | None:
    """The key whose tensors differ most beyond rounding, with its relative error; None if none.

    Per parameter p: ``|mine_p - ref_p| <= tol * (|mine_p| + |ref_p|) + tol * G * sqrt(n_p / N)``
    (Frobenius norms), G the norm of the whole reference gradient over N elements (see
    :func:`model_rounding`). Any non-finite value is a mismatch. ``sizes`` gives the element
    counts ``n_p`` when the tensors are norm-preserving projections of the parameters (default:
    their own sizes). The padding check compares whole forwards and backwards (batched against
    alone), whose rounding comes from the whole model: this model-wide term is its scale.
    """
    bad = mismatches(mine, ref, tol, model_rounding(ref, tol, sizes))
    return bad[0] if bad else None


def model_rounding(ref: dict, tol: float, sizes: dict | None = None) -> dict:
    """``key -> tol * G * sqrt(n_p / N)``: the rounding a parameter gets from the model's
    gradient scale (G the norm of the whole reference gradient over N elements): a parameter
    whose exact gradient is zero (an attention key bias: softmax is shift invariant) holds pure
    rounding noise of that size after a computation that rounds differently."""
    sizes = sizes if sizes is not None else {key: r.numel() for key, r in ref.items()}
    return rounding_floors({key: _norm(r) for key, r in ref.items()}, tol, sizes)


def rounding_floors(norms: dict, tol: float, sizes: dict) -> dict:
    """:func:`model_rounding` from the reference gradients' Frobenius norms ``norms`` and
    element counts ``sizes``: ``key -> tol * G * sqrt(n_p / N)``, ``G² = Σ_p norms[p]²``."""
    total = sum(n**2 for n in norms.values())
    count = sum(max(1, sizes[key]) for key in norms)
    return {key: tol * (total * max(1, sizes[key]) / max(1, count)) ** 0.5 for key in norms}


def _norm(t: torch.Tensor) -> float:
    """Frobenius norm as a float, computed in the tensor's own dtype (no float64 copy of a
    parameter-sized tensor); in float64 where that overflows."""
    n = float(torch.linalg.vector_norm(t))
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) if math.isinf(n) else n


def mismatches(mine: dict, ref: dict, tol: float, floors: dict) -> list[tuple[Any, float]]:
    """Every key whose tensors differ beyond ``tol * (|mine| + |ref|) + floors[key]`` (Frobenius
    norms; a missing ``mine`` counts as zeros; any non-finite value fails with error NaN), with
    its relative error, worst first."""
    out = []
    for key, r in ref.items():
        m = mine.get(key)
        m = torch.zeros_like(r) if m is None else m
        if not (torch.isfinite(r).all() and torch.isfinite(m).all()):
            out.append((key, float("nan")))
            continue
        err = float((m - r).double().norm())
        rn, mn = float(r.double().norm()), float(m.double().norm())
        if err > tol * (mn + rn) + floors.get(key, 0.0) and err > 1e-300:
            out.append((key, err / (rn + mn + 1e-300)))
    return sorted(out, key=lambda kv: -math.inf if math.isnan(kv[1]) else -kv[1])


def _rounding_scale(parts: list[Part]) -> float:
    """``sqrt(Σ rounding_sq)`` over a parameter's parts (:meth:`Part.rounding_sq`; a part that
    does not know its terms adds nothing, so the parameter is judged on its total alone; so is
    one whose scale overflows: an infinite allowance would pass anything)."""
    total = 0.0
    for p in parts:
        r = p.rounding_sq()
        if r is not None:
            total += float(r)
    return total**0.5 if math.isfinite(total) else 0.0


def owned_parameters(model: nn.Module) -> dict[int, set[int]]:
    """``id(module) -> ids of the trainable direct parameters its own calls account for``.

    A parameter registered directly on two modules where one contains the other (BERT's
    ``cls.predictions.bias``, tied into ``cls.predictions.decoder.bias``) is used through the
    inner module: only the innermost owner counts it, so its parts are not counted twice. A
    parameter registered on unrelated modules (tied embeddings) belongs to each of them: the
    engine sums their parts per sample before squaring.
    """
    direct = {
        id(m): {id(p) for p in m.parameters(recurse=False) if p.requires_grad} for m in model.modules()
    }
    owned: dict[int, set[int]] = {}
    for m in model.modules():
        mine = set(direct[id(m)])
        if not mine:
            continue
        for sub in m.modules():
            if sub is not m:
                mine -= direct[id(sub)]
        if mine:
            owned[id(m)] = mine
    return owned


def _position_convention(model: nn.Module) -> int | None:
    """None for models numbering positions 0, 1, ... by default; the ``padding_idx`` of a
    RoBERTa-style model (positions ``padding_idx + 1, ...`` derived from the input ids)."""
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return m.padding_idx
    return None


def _has_position_table(model: nn.Module) -> bool:
    """Whether the model looks absolute positions up in an embedding table (BERT's
    ``position_embeddings``, GPT-2's ``wpe``, OPT's ``embed_positions``)."""
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(m, nn.Embedding) and ("pos" in leaf or leaf == "wpe") and "rel" not in leaf:
            return True
    return False


def _padding_kind(batch: Mapping[str, torch.Tensor]) -> str:
    """"none", "right" (every sample's real tokens start at 0), "left" or "other" (holes, mixed):
    the padding check runs once for each kind a collection meets."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.bool().all()):
        return "none"
    m = mask.bool()
    T = m.shape[1]
    n = m.sum(dim=1)
    pos = torch.arange(T, device=m.device)
    right = (m == (pos < n.unsqueeze(1))).all()
    left = (m == (pos >= (T - n).unsqueeze(1))).all()
    return "right" if bool(right) else "left" if bool(left) else "other"


def batch_dims(batch: Mapping[str, Any], task_type: str) -> tuple[int, int]:
    """``(B, T)``: samples and token positions of a batch (``T = 0`` for image / audio inputs,
    which no module flattens to ``[B * T, ...]``, and for seq2seq, whose encoder and decoder
    lengths differ, so no token-flattened tensor is read as per sample)."""
    if task_type == seq2seq.TASK:
        return seq2seq.batch_size(batch), 0
    if task_type in vision.VISION_TASKS:
        return vision.batch_size_of(batch, task_type), 0
    B, T = batch["input_ids"].shape
    return int(B), int(T)


def alone(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sample ``i`` of a batch as a batch of one, without its leading and trailing padding
    (positions with ``attention_mask == 0`` at either end; a mask with holes is kept whole)."""
    ids = next(batch[k] for k in ("input_ids", *vision.INPUT_KEYS) if k in batch)  # the padded input
    B, T = ids.shape[:2]
    lo, hi = 0, T
    mask = batch.get("attention_mask")
    if mask is not None:
        real = mask[i].nonzero().flatten()
        if real.numel() and int(real[-1]) - int(real[0]) + 1 == real.numel():
            lo, hi = int(real[0]), int(real[-1]) + 1
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B:
            v = v[i : i + 1]
            if v.dim() > 1 and v.shape[1] == T:
                v = v[:, lo:hi]
        out[k] = v
    return out


def _keep_and_report(n: torch.Tensor, exclude: set[int], limit: int | None) -> tuple[list[int], BatchReport]:
    """The used samples (label tokens, not excluded, at most ``limit``) and the batch report."""
    counts = [int(x) for x in n]
    keep = [i for i, c in enumerate(counts) if c > 0 and i not in exclude]
    report = BatchReport(skipped=sum(1 for c in counts if c == 0))
    if limit is not None:
        keep = keep[: max(0, limit)]
    report.used = len(keep)
    report.used_index = keep
    report.tokens = sum(counts[i] for i in keep)
    return keep, report


def _checkpointing(model: nn.Module) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(getattr(model, "is_gradient_checkpointing", False))


def _selection(keep: list[int], device) -> slice | torch.Tensor:
    """A slice when the kept samples are contiguous (views instead of gathers), else indices."""
    if keep and keep == list(range(keep[0], keep[0] + len(keep))):
        return slice(keep[0], keep[0] + len(keep))
    if not keep:
        return slice(0, 0)
    return torch.tensor(keep, dtype=torch.long, device=device)


def _sample_at(selection, row: int) -> int:
    if isinstance(selection, slice):
        return selection.start + row
    return int(selection[row])


def _accepted_kwargs(model: nn.Module) -> set[str]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return set(_MODEL_INPUT_KEYS)
    names = set(sig.parameters)
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if base is not None and base is not model:
            names |= _accepted_kwargs(base)
        else:
            names |= {"input_ids", "attention_mask"}
    return names


def _config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def _output_size(model: nn.Module) -> int | None:
    """Size of the LM head's output (the label id range), or None when unknown."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None:
        size = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
        if size is None and isinstance(getattr(head, "weight", None), torch.Tensor):
            size = head.weight.shape[0]
        if isinstance(size, int):
            return size
    return getattr(_config(model), "vocab_size", None)


def _position_limit(model: nn.Module, convention: int | None) -> int | None:
    """Longest sequence a model with a learned position table can embed (config's
    ``max_position_embeddings`` / ``n_positions``; RoBERTa style: minus ``padding_idx + 1``)."""
    config = _config(model)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    if convention is not None:
        limit -= convention + 1
    return limit


def _vocab_size(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(emb, "num_embeddings", None)
