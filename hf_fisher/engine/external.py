"""Per-sample contributions from a backward pass somebody else runs (a ``transformers.Trainer``).

The capture hooks of :class:`~hf_fisher.engine.per_sample.PerSampleEngine` do not care who calls
``backward``. :class:`ExternalBackward` attaches them to the model, reads each training forward's
inputs (a forward pre-hook on the model), and derives the per-sample scale from the gradient
that reaches the logits:

The loss a Trainer back-propagates is, for the cross-entropy of causal / masked LMs and
classifiers, ``L = c * sum_i S_i`` with ``S_i`` sample i's summed token loss and one constant
``c`` for the micro-batch (``1 / num_items_in_batch``, or ``1 / (tokens * accumulation steps)``,
times a GradScaler's scale, ...). With ``D = dS/dlogits`` (``softmax - onehot`` at the label
positions) the gradient reaching the logits is ``G = c * D``, so ``c = <G, D> / <D, D>``, checked
on a sample of positions: a loss that is not of this form (label smoothing, a custom
``compute_loss``) fails the check and the micro-batch is reported as unsupported (the caller
then computes it with the engine's own pass), never silently mis-scaled. So is a micro-batch whose
Trainer forward or loss is not that of its samples alone (the Fisher's definition): a loss that
counts a label the sample alone does not have (the first real token after left padding,
predicted from a padding position, as ``DataCollatorForLanguageModeling`` labels it with
``padding_side="left"``; labels on padding), or left padding that moves the real tokens along a
learned position table. Every captured
per-sample gradient is then ``c * dS_i/dθ`` and the engine's scale is ``w_i s_i / c`` (see
:func:`~hf_fisher.engine.losses.normalization_weights`).

A micro-batch of one sample (``per_device_train_batch_size=1``, the usual setting at real scale,
with gradient accumulation) needs no rule at all: the gradient the backward computes for each
parameter (read by a tensor hook on the parameter, before it is accumulated into ``.grad``) is
``c * dS_1/dθ`` itself, every use of a tied weight included; its reduction is the only work left.
Only for plain float32/float64 parameters (a DTensor shard's hook sees a reduced gradient).

Gradient clipping happens after the backward, on ``.grad``: it never reaches the per-sample
gradients the hooks see, so it does not change the contributions. Nothing here touches ``.grad``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import HfFisherError, UnsupportedError
from . import seq2seq, vision
from .losses import CLASSIFICATION_TASKS, IGNORE_INDEX, label_counts, normalization_weights, token_labels
from .per_sample import BatchReport, ContributionSink, PerSampleEngine, _keep_and_report, batch_dims

log = logging.getLogger(__name__)

_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids", *vision.INPUT_KEYS)


@dataclass
class MicroBatch:
    """What the pre-hook saw of one training forward."""

    batch: dict
    report: BatchReport
    sink: ContributionSink
    verify: bool
    n_tokens: torch.Tensor
    failed: str | None = None
    scale_ready: bool = False
    #: one sample: its per-sample gradients are the backward's own parameter gradients
    #: (see :meth:`ExternalBackward._on_param_grad`), no rule runs
    whole: bool = False


class ExternalBackward:
    """Feed the contributions of every training micro-batch into a sink, from the Trainer's own
    forward and backward.

    ``make_sink()`` gives the sink of the next micro-batch; ``done(micro)`` is called by
    :meth:`finish` with the finished :class:`MicroBatch` (``micro.failed`` holds the reason when
    the free path could not be used: the caller redoes that batch with the engine's own pass).
    ``limit()`` returns how many more samples may be used (None: no limit).
    """

    def __init__(self, engine: PerSampleEngine, make_sink: Callable[[], ContributionSink], done: Callable[[MicroBatch], None],
                 limit: Callable[[], int | None] = lambda: None):
        self.engine = engine
        self.make_sink = make_sink
        self.done = done
        self.limit = limit
        self.handles: list = []
        self.current: MicroBatch | None = None
        self.queue: list = []
        self._grads: dict | None = None
        self._grad_handle = None
        self.paused = False
        self.param_queue: list = []
        #: whether the next free micro-batch is checked against the Trainer's batch gradient: until one
        #: passes. Its own flag, not the engine's: the engine's own pass (which redoes a micro-batch
        #: whose check failed) vouches for its own backward, not for what the Trainer's backward gives
        #: the rules, so a failed check keeps every later micro-batch checked (and redone) instead of
        #: letting the redo's passing check turn the free path's off
        self.verify_next = engine.verify

    # ------------------------------------------------------------------ attach
    def attach(self) -> ExternalBackward:
        if not self.handles:
            model = self.engine.model
            self.handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(model.register_forward_hook(self._post, with_kwargs=True))
            cap = self.engine.capture
            cap.on_grad = self._gated
            cap.attach()
            if _plain_parameters(self.engine):
                for t in self.engine.targets:
                    self.handles.append(t.param.register_hook(lambda g, t=t: self._on_param_grad(t, g)))
        return self

    @contextlib.contextmanager
    def paused_capture(self):
        """Let the engine run its own pass (its own hooks and dispatch) in the middle of training."""
        engine = self.engine
        self.paused = True
        engine.capture.detach()
        engine.capture.on_grad = engine.on_grad
        try:
            yield
        finally:
            self.paused = False
            engine.capture.detach()
            engine.capture.on_grad = self._gated
            engine.capture.attach()

    def detach(self) -> None:
        self.finish()
        for h in self.handles:
            h.remove()
        self.handles = []
        self.engine.capture.on_grad = self.engine.on_grad
        self.engine.capture.detach()

    # ------------------------------------------------------------------ forward
    def _pre(self, module, args, kwargs):
        if self.paused or not torch.is_grad_enabled():
            return None
        self.finish()  # a previous micro-batch whose end no callback reported
        engine = self.engine
        if engine.task_type == seq2seq.TASK:
            return self._pre_seq2seq(kwargs)
        batch = {k: kwargs[k] for k in _INPUT_KEYS if isinstance(kwargs.get(k), torch.Tensor)}
        main = vision.INPUT_OF.get(engine.task_type, "input_ids")  # pixel_values / input_values (engine.vision)
        if args and main not in batch and isinstance(args[0], torch.Tensor):
            batch[main] = args[0]
        if main not in batch:
            log.warning("hf_fisher: a training forward without %s (inputs_embeds?) is not captured", main)
            return None
        batch = {k: v.detach() for k, v in batch.items()}
        batch = engine.prepare(batch, engine.batches_seen)
        n = label_counts(batch, engine.task_type)
        keep, report = _keep_and_report(n, set(), self.limit())
        B, T = batch_dims(batch, engine.task_type)
        micro = MicroBatch(batch, report, self.make_sink(), self.verify_next, n)
        micro.whole = B == 1 and _plain_parameters(engine)
        self.current = micro
        self.queue = []
        self.param_queue = []
        cap = engine.capture
        cap.start(B, engine.compute_dtype, None, seq_len=T)
        engine.begin_backward(keep, micro.sink, set(), None)
        if engine.loop_mode:
            micro.failed = engine.loop_reason
        elif engine.vjp_params:
            # their per-sample gradients need a backward of the per-sample losses, which the
            # Trainer's backward of the batch loss cannot give: the hooks would leave them zero
            names = sorted(engine.vjp_reasons)
            micro.failed = (
                f"{len(names)} parameter(s) get their per-sample gradients from a vector-Jacobian product of the "
                f"per-sample losses, which the Trainer's backward cannot give ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''})"
            )
        if micro.failed is None and _counts_labels_beyond_samples(batch, engine.task_type):
            micro.failed = _BEYOND_SAMPLES
        if engine.explicit_positions and "position_ids" in engine.forward_params and "position_ids" not in kwargs:
            pair = engine.position_pair(batch)
            if pair is not None:
                own, wanted, real = pair
                if torch.equal(own[real], wanted[real]):
                    # the positions the model would use anyway, as [B, T]: a learned position
                    # table's lookup stays per sample; never a different number for a real token
                    return args, dict(kwargs, position_ids=wanted)
                # left padding moves the real tokens along a learned position table: the
                # Trainer's forward is not the samples' own; never a different number
                micro.failed = micro.failed or _MOVED_POSITIONS
        return None

    def _pre_seq2seq(self, kwargs):
        """A seq2seq micro-batch: recorded for the engine's own pass (see
        :func:`.seq2seq.refuse_free_path`), nothing captured from the Trainer's backward."""
        engine = self.engine
        batch = {k: kwargs[k].detach() for k in seq2seq.BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)}
        batch = engine.prepare(batch, engine.batches_seen)
        n = label_counts(batch, engine.task_type)
        _, report = _keep_and_report(n, set(), self.limit())
        self.current = MicroBatch(batch, report, self.make_sink(), engine.verify_next, n, failed=seq2seq.refuse_free_path())
        engine.capture.start(seq2seq.batch_size(batch), engine.compute_dtype, None)
        return None

    def _post(self, module, args, kwargs, output):
        micro = self.current
        if micro is None or self.paused or not torch.is_grad_enabled():
            return None
        engine = self.engine
        engine.expect_recorded_calls()  # the forward has recorded its calls now
        for c in engine.capture.calls:
            if any(c.batch_axis_kind(t) is None for t in c.tensors):
                micro.failed = micro.failed or f"{type(c.module).__name__} output is shared by the batch"
            # the hooks live on the autograd nodes: holding the outputs would keep every
            # activation alive until the end of the backward
            c.output = None
            c.tensors = []
        if engine.task_type == seq2seq.TASK:  # redone by the engine's own pass (see _pre_seq2seq)
            return None
        logits = output.logits if hasattr(output, "logits") else (output[0] if isinstance(output, (tuple, list)) else None)
        if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
            micro.failed = micro.failed or "the model's output has no logits that require grad"
            return None
        labels = token_labels(micro.batch, engine.task_type)
        probe = _probe_positions(labels, engine.task_type)
        picked = _picked_logits(logits.detach(), probe, engine.task_type)
        targets = _picked_labels(labels, probe, engine.task_type)
        hook = lambda g: self._on_logits(g, picked, targets, probe)  # noqa: E731
        node = logits.grad_fn
        if node is not None and type(node).__name__.startswith("ToCopyBackward"):
            # a wrapper converted the model's outputs (accelerate's autocast wrapper returns float32
            # copies): the loss was computed inside the forward from the original logits, whose
            # gradient arrives at the node that produced them
            inner = node.next_functions[0][0]
            if inner is not None:
                inner.register_prehook(lambda grad_outputs: hook(grad_outputs[0]))
                return None
        logits.register_hook(hook)
        if micro.verify:
            params = [t.param for t in engine.targets]
            self._grads = {}
            self._grad_handle = torch.autograd.graph.register_multi_grad_hook(params, self._keep_grads, mode="all")
        return None

    # ------------------------------------------------------------------ backward
    def _on_logits(self, grad, picked, targets, probe):
        micro = self.current
        if micro is None:
            return None
        try:
            c = _loss_scale(grad, picked, targets, probe, self.engine.task_type)
        except UnsupportedError as e:
            micro.failed = micro.failed or str(e)
            c = 1.0
        engine = self.engine
        w, s = normalization_weights(micro.n_tokens, engine.normalization, engine.compute_dtype)
        engine.capture.scale = (w * s / c).to(engine.device)
        micro.scale_ready = True
        queued, self.queue = self.queue, []
        for call in queued:
            engine.capture._dispatch(call)
        grads, self.param_queue = self.param_queue, []
        for target, g in grads:
            self._on_param_grad(target, g)
        return None

    def _on_param_grad(self, target, grad):
        """A micro-batch of one sample: the gradient this backward computes for a parameter (a
        tensor hook on the parameter: every use summed, tied weights included, before it is
        accumulated into ``.grad``) is ``c dS_1/dθ``, the sample's own gradient times the loss
        scale ``c``. It is that sample's part as it is (``g_1 = (w_1 s_1 / c) · grad``): no rule,
        no Gram product, only the reduction of a tensor the Trainer computed anyway."""
        micro = self.current
        if micro is None or not micro.whole or micro.failed or self.paused:
            return None
        if not micro.scale_ready:
            self.param_queue.append((target, grad))
            return None
        engine = self.engine
        try:
            with torch.no_grad():
                engine.on_whole_gradient(target.param, grad)
        except (UnsupportedError, HfFisherError) as e:
            micro.failed = micro.failed or str(e)
        except Exception as e:  # _NonFiniteSamples: the caller redoes the batch
            log.debug("free capture failed", exc_info=True)
            micro.failed = micro.failed or f"{type(e).__name__}: {e}"
        return None

    def _gated(self, call):
        micro = self.current
        if micro is None or micro.failed or micro.whole:  # whole: the parameters' own hooks do it
            call.args, call.kwargs, call.grad_output, call.output = (), {}, None, None
            return
        if not micro.scale_ready:
            self.queue.append(call)
            return
        call.scale = self.engine.capture.scale
        try:
            self.engine.on_grad(call)
        except (UnsupportedError, HfFisherError) as e:
            micro.failed = micro.failed or str(e)
        except Exception as e:  # _NonFiniteSamples and rule errors: the caller redoes the batch
            log.debug("free capture failed", exc_info=True)
            micro.failed = micro.failed or f"{type(e).__name__}: {e}"

    def _keep_grads(self, grads):
        if self._grads is not None:
            self._grads = {id(t.param): g for t, g in zip(self.engine.targets, grads)}

    # ------------------------------------------------------------------ end of a micro-batch
    def finish(self) -> None:
        """Close the current micro-batch (after its backward): reduce what is left, check the
        first one against the Trainer's batch gradient, hand it to ``done``."""
        micro, self.current = self.current, None
        if micro is None:
            return
        engine = self.engine
        cap = engine.capture
        try:
            with torch.no_grad():  # as inside the backward: nothing here is differentiated
                self._close(micro)
        except Exception as e:
            log.debug("free capture failed", exc_info=True)
            micro.failed = micro.failed or str(e)
        finally:
            cap.calls = []
            cap.recomputed = False
            self.param_queue = []
            engine.discard_pending()
            self._grads = None
            if self._grad_handle is not None:
                self._grad_handle.remove()
                self._grad_handle = None
        if not micro.failed:
            engine.batches_seen += 1
            if micro.verify:
                self.verify_next = engine.verify_next = False
        else:
            micro.sink.reset()
        self.done(micro)

    def _close(self, micro: MicroBatch) -> None:
        """Reduce what the backward left (deferred multi-output calls, unreached parameters) and
        check the first micro-batch; raises what makes the free path unusable."""
        engine = self.engine
        cap = engine.capture
        if micro.failed:
            return
        if not micro.scale_ready:
            raise UnsupportedError("no gradient reached the logits (was backward run?)")
        if cap.recomputed:
            raise UnsupportedError("a module's forward ran again during backward (activation checkpointing)")
        cap.flush_deferred()
        engine.finish_backward(None)
        if micro.verify:
            self._verify()

    def _verify(self) -> None:
        engine = self.engine
        bad, _ = engine.check_totals(self._grads or {})
        if bad is not None:
            pid, rel = bad
            raise UnsupportedError(
                f"the captured per-sample gradients of {engine.by_param[pid].name} do not add up to the "
                f"Trainer's batch gradient (relative error {rel:.2e})"
            )


#: reasons a micro-batch takes the engine's own pass: the Trainer's forward or loss is not that of
#: the samples alone (the Fisher's definition, DESIGN.md section 2)
_BEYOND_SAMPLES = (
    "the Trainer's loss counts label tokens that the samples alone do not have (the first real token after left "
    "padding, predicted from a padding position, as DataCollatorForLanguageModeling labels it with "
    "padding_side='left'; or labels on padding), which the Fisher of each sample alone excludes. Pad on the "
    "right (tokenizer.padding_side='right') or set those labels to -100 to keep the free path"
)
_MOVED_POSITIONS = (
    "left padding moves the real tokens along the model's learned position table in the Trainer's forward (its "
    "default positions 0, 1, ... count the padding), unlike each sample alone. Pad on the right "
    "(tokenizer.padding_side='right') to keep the free path"
)


def _plain_parameters(engine: PerSampleEngine) -> bool:
    """Whether every target is a plain float32/float64 tensor, whose hook sees this process's whole
    gradient (not a shard's reduced one, as a DTensor's would be; not rounded to a lower precision
    than the rules' float32 products)."""
    return all(type(t.param) in (torch.Tensor, torch.nn.Parameter) and t.param.dtype in (torch.float32, torch.float64)
               for t in engine.targets)


def _counts_labels_beyond_samples(batch: dict, task_type: str) -> bool:
    """Whether the model's own loss on ``batch`` (cross-entropy over every label != -100, shifted
    by one for a causal LM) counts a label that :func:`token_labels` excludes: a label on
    padding, or (causal LM) one predicted from a padding position."""
    labels = batch.get("labels")
    if labels is None or task_type in CLASSIFICATION_TASKS or labels.shape != batch["input_ids"].shape:
        return False
    beyond = (labels != IGNORE_INDEX) & (token_labels(batch, task_type) == IGNORE_INDEX)
    if task_type == "causal_lm":
        beyond = beyond[:, 1:]  # the first position's label is never predicted
    return bool(beyond.any())


def _probe_positions(labels: torch.Tensor, task_type: str, k: int = 16) -> torch.Tensor:
    """Up to ``k`` (sample, position) pairs with a label (spread over the batch)."""
    if task_type in CLASSIFICATION_TASKS:
        valid = (labels != IGNORE_INDEX) if labels.dim() == 1 and not labels.is_floating_point() else torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        idx = valid.nonzero().flatten()
        step = max(1, idx.numel() // k)
        return idx[::step][:k]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if task_type == "causal_lm" else labels
    idx = (shifted != IGNORE_INDEX).nonzero()
    step = max(1, idx.shape[0] // k)
    return idx[::step][:k]


def _picked_logits(logits: torch.Tensor, probe: torch.Tensor, task_type: str) -> torch.Tensor:
    if task_type in CLASSIFICATION_TASKS:
        return logits[probe].float() if logits.dtype not in (torch.float32, torch.float64) else logits[probe]
    out = logits[probe[:, 0], probe[:, 1]]
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def _picked_labels(labels: torch.Tensor, probe: torch.Tensor, task_type: str) -> torch.Tensor:
    if task_type in CLASSIFICATION_TASKS:
        return labels[probe]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if task_type == "causal_lm" else labels
    return shifted[probe[:, 0], probe[:, 1]]


def _loss_scale(grad: torch.Tensor, picked: torch.Tensor, targets: torch.Tensor, probe: torch.Tensor, task_type: str) -> float:
    """``c`` with ``dL/dlogits = c * dS/dlogits`` at the probed positions (least squares, checked)."""
    if probe.numel() == 0:
        raise UnsupportedError("no label token in the micro-batch")
    if task_type in CLASSIFICATION_TASKS:
        if targets.is_floating_point() or targets.dim() != 1:
            raise UnsupportedError("only single-label classification losses can be rescaled per sample")
        g = grad[probe]
    else:
        g = grad[probe[:, 0], probe[:, 1]]
    g = g.to(picked.dtype)
    d = torch.softmax(picked, dim=-1)
    d[torch.arange(d.shape[0], device=d.device), targets] -= 1.0
    dd = float((d * d).sum())
    if dd == 0.0:
        raise UnsupportedError("the cross-entropy gradient vanishes at the probed positions")
    c = float((g * d).sum()) / dd
    resid = float((g - c * d).norm())
    scale = float(g.norm()) + 1e-30
    tol = 1e-2 if picked.dtype == torch.float32 and grad.dtype != torch.float32 else 1e-4
    if not (c > 0) or resid > tol * scale:
        raise UnsupportedError(
            "the training loss is not a multiple of the summed cross-entropy of the labels (label smoothing, "
            f"a custom compute_loss, a loss over other outputs?): residual {resid / scale:.2e}"
        )
    return c


__all__ = ["ExternalBackward", "MicroBatch"]
