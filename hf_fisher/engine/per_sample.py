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
4. On the first batch, the sum over samples of every parameter's parts is checked against
   autograd's batch gradient. Anything the hooks cannot do exactly (a parameter used outside
   its module's forward, activation checkpointing re-running forwards, a module with a batch
   broadcast) switches the engine to a per-sample loop, with a warning — never a silently wrong
   number.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..errors import InvalidInputError, NonFiniteError, UnsupportedError
from ..layout import ParamGroups
from .capture import Capture, bottom_outputs, modules_with_trainable_params
from .losses import SampleLosses, normalization_weights, per_sample_loss, token_labels
from .rules import GradRule, ModuleCall, Part, num_samples, rule_for, sub_samples

log = logging.getLogger("hf_fisher.engine")

_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], SampleLosses]


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
    that fails half-way (or is redone without some samples) leaves them untouched.
    """

    #: whether :meth:`add_moments` is available (order-independent statistics only)
    accepts_moments = False

    def add(self, name: str, contributions: torch.Tensor) -> None:
        """Per-sample contributions ``[b, ...]`` of the next samples; the sink owns the tensor
        (it may modify it in place)."""
        raise NotImplementedError

    def add_moments(self, name: str, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Moments of the next ``n`` samples' contributions (``M2 = sum (C_i - mean)²``)."""
        raise NotImplementedError

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


class PerSampleEngine:
    """Exact per-sample Fisher contributions for every trainable parameter of a model.

    Args:
        model: any HF model (optionally PEFT-wrapped); its trainable parameters are covered.
        targets: one :class:`Target` per trainable parameter (groups None = per element).
        rules: module type -> :class:`GradRule` (from the plugin manager).
        task_type: "causal_lm" | "masked_lm" | "sequence_classification".
        normalization: "mean" | "sum" | "token" (see :mod:`.losses`).
        loss_fn: optional ``(model_output, batch) -> SampleLosses`` replacing the dataset-label
            loss (e.g. labels sampled from the model for the true Fisher).
        memory_budget_mb: bound on the temporaries of the per-sample reduction (materialised
            per-sample gradients, Gram products). Default: 32 MB for group reductions (their
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
        self.model = model
        self.targets = targets
        self.by_param = {id(t.param): t for t in targets}
        self.rules = rules
        self.task_type = task_type
        self.normalization = normalization
        self.loss_fn = loss_fn
        self.on_nonfinite = on_nonfinite
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
        self.capture = Capture(modules_with_trainable_params(model), self._on_grad)
        self._bottom_cache: dict = {}
        self._forward_params = _accepted_kwargs(model)
        self.vocab_size = _vocab_size(model)
        self.batches_seen = 0
        if _checkpointing(model):
            self._switch_to_loop("gradient checkpointing is enabled: recomputed forwards cannot be captured")

    # ------------------------------------------------------------------ public
    def process(self, batch: Mapping[str, Any], sink: ContributionSink, *, batch_index: int = 0, limit: int | None = None) -> BatchReport:
        """Compute the contributions of every sample of ``batch`` into ``sink``.

        ``limit`` caps the number of used samples (the first ones with label tokens).
        """
        batch = self._prepare(batch, batch_index)
        exclude: set[int] = set()
        nonfinite: set[int] = set()
        for _attempt in range(3):
            sink.reset()
            try:
                report = self._process_once(batch, sink, batch_index, exclude, limit)
            except _NonFiniteSamples as e:
                if self.on_nonfinite == "raise":
                    i = min(e.samples)
                    raise NonFiniteError(
                        f"non-finite {e.where} for sample {i} of batch {batch_index}; fix the data or the "
                        "model, or pass on_nonfinite='skip' to skip and count such samples"
                    ) from None
                exclude |= e.samples
                nonfinite |= e.samples
                continue
            report.nonfinite = len(nonfinite)
            return report
        raise NonFiniteError(f"batch {batch_index}: non-finite values persist after skipping samples {sorted(nonfinite)}")

    # ------------------------------------------------------------------ batch set-up
    def _prepare(self, batch: Mapping[str, Any], batch_index: int) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise InvalidInputError(f"batch {batch_index} must be a mapping with 'input_ids' (got {type(batch).__name__})")
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
        return out

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch and k in self._forward_params}
        B, T = batch["input_ids"].shape
        if "position_ids" in self._forward_params and "position_ids" not in inputs:
            # explicit [B, T] positions: per-sample rows (no broadcast) and left padding handled
            mask = batch.get("attention_mask")
            if mask is not None:
                inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                inputs["position_ids"] = torch.arange(T, device=self.device).expand(B, T)
        if "use_cache" in self._forward_params:
            inputs["use_cache"] = False
        return inputs

    def _losses(self, output: Any, batch: dict[str, torch.Tensor]) -> SampleLosses:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        logits = output.logits if hasattr(output, "logits") else output[0]
        labels = token_labels(batch, self.task_type)
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        return per_sample_loss(self.task_type, logits, labels, problem_type=problem_type)

    # ------------------------------------------------------------------ one pass
    def _process_once(self, batch, sink, batch_index, exclude, limit) -> BatchReport:
        if self.loop_mode:
            return self._process_loop(batch, sink, batch_index, exclude, limit)
        B = batch["input_ids"].shape[0]
        self.capture.attach()
        try:
            # scale is filled in after the forward (it needs the label counts)
            self.capture.start(B, self.compute_dtype, None)
            output = self.model(**self._model_inputs(batch))
            losses = self._losses(output, batch)
            del output  # the logits live on in the graph only as long as autograd needs them
            keep, report = self._select(losses, exclude, limit, batch_index)
            w, s = normalization_weights(losses.n_tokens, self.normalization, self.compute_dtype)
            # all-ones scales (normalisations "mean" and "sum") cost nothing: leave them out
            self.capture.scale = None if bool((s == 1).all()) else s.to(self.device)
            self._begin_backward(keep, sink)
            loss = (losses.loss_sum * w.to(losses.loss_sum.dtype)).sum()
            calls = self.capture.calls
            for c in calls:
                c.scale = self.capture.scale
                if isinstance(c.output, torch.Tensor) and c.output.dim() > 0 and c.output.shape[0] != B:
                    raise UnsupportedError(f"{type(c.module).__name__} output is broadcast over the batch")
            bottom = self._bottom(calls, loss, batch)
            verify = self.verify_next
            inputs = [calls[i].output for i in bottom]
            for c in calls:  # the hooks live on the autograd nodes: outputs need not stay alive
                c.output = None
            params = [t.param for t in self.targets] if verify else []
            self.capture.in_backward = True
            grads = torch.autograd.grad(loss, inputs + params, allow_unused=True) if (inputs or params) else []
            self.capture.in_backward = False
            if self.capture.recomputed:
                raise UnsupportedError("a module's forward ran again during backward (activation checkpointing)")
            self._finish(verify_grads=dict(zip(map(id, params), grads[len(inputs):])) if verify else None)
            if verify:
                self.verify_next = False
        except UnsupportedError as e:
            self._switch_to_loop(str(e))
            self.capture.detach()
            sink.reset()
            return self._process_loop(batch, sink, batch_index, exclude, limit)
        finally:
            self.capture.in_backward = False
            self.capture.detach()
            self._pending = {}
        self.batches_seen += 1
        return report

    def _select(self, losses: SampleLosses, exclude: set[int], limit: int | None, batch_index: int):
        n = losses.n_tokens
        finite = torch.isfinite(losses.loss_sum.detach())
        bad = {int(i) for i in (~finite & (n > 0)).nonzero().flatten()} - exclude
        if bad:
            raise _NonFiniteSamples(bad, "loss")
        keep = [i for i in range(n.shape[0]) if int(n[i]) > 0 and i not in exclude]
        report = BatchReport(skipped=sum(1 for i in range(n.shape[0]) if int(n[i]) == 0))
        if limit is not None:
            keep = keep[: max(0, limit)]
        report.used = len(keep)
        report.used_index = keep
        report.tokens = int(sum(int(n[i]) for i in keep))
        return keep, report

    def _bottom(self, calls: list[ModuleCall], loss: torch.Tensor, batch) -> list[int]:
        key = (tuple(id(c.module) for c in calls), tuple(sorted(batch)))
        if key not in self._bottom_cache:
            self._bottom_cache[key] = bottom_outputs(calls, loss)
        return self._bottom_cache[key]

    # ------------------------------------------------------------------ reduction
    def _begin_backward(self, keep: list[int], sink: ContributionSink) -> None:
        self._keep = _selection(keep, self.device)
        self._sink = sink
        expected: dict[int, int] = {}
        for c in self.capture.calls:
            for p in c.module.parameters(recurse=False):
                if id(p) in self.by_param:
                    expected[id(p)] = expected.get(id(p), 0) + 1
        self._expected = expected
        self._pending: dict[int, list[Part]] = {}
        self._done: set[int] = set()
        self._totals: dict[int, torch.Tensor] = {}

    def _on_grad(self, call: ModuleCall) -> None:
        rule = rule_for(call.module, self.rules)
        parts = rule.parts(call)
        for local, part in parts.items():
            pid = id(part.param)
            if pid not in self.by_param:
                continue
            self._pending.setdefault(pid, []).append(part)
            if len(self._pending[pid]) == self._expected.get(pid, 0):
                self._reduce(pid)
        # free what this call held (inputs, output, its gradient) as soon as it is reduced
        call.args, call.kwargs, call.grad_output, call.output = (), {}, None, None

    def _finish(self, verify_grads: dict[int, torch.Tensor | None] | None) -> None:
        for t in self.targets:
            pid = id(t.param)
            if pid not in self._done:
                self._reduce(pid)
        if verify_grads is not None:
            self._verify(verify_grads)

    def _reduce(self, pid: int) -> None:
        target = self.by_param[pid]
        parts = self._pending.pop(pid, [])
        self._done.add(pid)
        if self.verify_next:
            self._totals[pid] = sum((p.total() for p in parts), torch.zeros(target.param.shape, dtype=self.compute_dtype, device=self.device))
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
        if groups is not None and len(parts) == 1:
            per_index = parts[0].per_index_sq(groups.axis, keep, self.budget_elems)
            self._emit(target.name, groups.reduce_axis(per_index))
            return
        if groups is None and len(parts) == 1 and self._sink.accepts_moments and hasattr(parts[0], "sparse_moments"):
            n, mean, m2 = parts[0].sparse_moments(keep)
            if torch.isfinite(mean.sum()):
                self._sink.add_moments(target.name, n, mean, m2)
                return
            # non-finite: the dense path below finds and names the sample
        numel = max(1, target.param.numel())
        chunk = max(1, self.budget_elems // numel)
        for lo in range(0, n_keep, chunk):
            idx = sub_samples(keep, lo, lo + chunk)
            g = parts[0].materialize(idx)
            for p in parts[1:]:
                g = g + p.materialize(idx)
            c = g * g
            self._emit(target.name, groups.reduce(c, batch_dims=1) if groups is not None else c)

    def _emit(self, name: str, contributions: torch.Tensor) -> None:
        flat = contributions.reshape(contributions.shape[0], -1)
        if not torch.isfinite(flat.sum()):
            rows = (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
            raise _NonFiniteSamples({_sample_at(self._keep, r) for r in rows}, f"gradient of {name}")
        self._sink.add(name, contributions)

    def _verify(self, grads: dict[int, torch.Tensor | None]) -> None:
        # autograd's batch gradient is itself rounded in the model's dtype (bf16: eps 7.8e-3);
        # a missing or double-counted part shows up as an error of order 1
        floor = 1e-9 if self.compute_dtype == torch.float64 else 1e-3
        tol = max(floor, 8 * torch.finfo(self.model_dtype).eps)
        for t in self.targets:
            ref = grads.get(id(t.param))
            ref = torch.zeros_like(t.param) if ref is None else ref
            ref = ref.to(self.compute_dtype)
            mine = self._totals.get(id(t.param))
            err = (mine - ref).norm()
            scale = ref.norm() + mine.norm()
            if err > tol * scale + 1e-30 and err > 1e-12:
                raise UnsupportedError(
                    f"the captured per-sample gradients of {t.name} do not add up to its batch gradient "
                    f"(relative error {float(err / scale):.2e}); the parameter is probably used outside its module's forward"
                )
        self._totals = {}

    # ------------------------------------------------------------------ fallback
    def _switch_to_loop(self, reason: str) -> None:
        if not self.loop_mode:
            log.warning("hf_fisher: falling back to a per-sample loop (one forward/backward per sample; exact but slow): %s", reason)
        self.loop_mode = True
        self.loop_reason = reason

    def _process_loop(self, batch, sink, batch_index, exclude, limit) -> BatchReport:
        """One forward/backward per sample: the exact but slow path."""
        B = batch["input_ids"].shape[0]
        with torch.no_grad():
            losses = self._losses(self.model(**self._model_inputs(batch)), batch)
        keep, report = self._select(losses, exclude, limit, batch_index)
        self._sink = sink
        params = [t.param for t in self.targets]
        for row, i in enumerate(keep):
            one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v) for k, v in batch.items()}
            li = self._losses(self.model(**self._model_inputs(one)), one)
            w, s = normalization_weights(li.n_tokens, self.normalization, self.compute_dtype)
            grads = torch.autograd.grad((li.loss_sum * w.to(li.loss_sum.dtype)).sum(), params, allow_unused=True)
            self._keep = slice(i, i + 1)
            for t, g in zip(self.targets, grads):
                g = torch.zeros_like(t.param, dtype=self.compute_dtype) if g is None else g.to(self.compute_dtype) * s[0]
                c = (g * g).unsqueeze(0)
                self._emit(t.name, t.groups.reduce(c, batch_dims=1) if t.groups is not None else c)
        self.batches_seen += 1
        return report


def _checkpointing(model: nn.Module) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(getattr(model, "is_gradient_checkpointing", False))


def _selection(keep: list[int], device) -> "slice | torch.Tensor":
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


def _vocab_size(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(emb, "num_embeddings", None)
