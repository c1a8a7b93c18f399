"""Capture hooks: record every call of a module with trainable parameters, and the gradient that
reaches its output during a backward pass the engine (or anyone else) runs.

The hooks never touch ``.grad``: they only read module inputs (forward hooks) and output
gradients (tensor hooks on the outputs). They are attachable and detachable, so the same capture
serves a backward that the library runs itself and one that a Trainer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from .rules import ModuleCall

log = logging.getLogger(__name__)


def modules_with_trainable_params(model: nn.Module) -> list[nn.Module]:
    """Every module owning at least one trainable *direct* parameter."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


class Capture:
    """Records module calls during forward and dispatches output gradients during backward.

    ``on_grad(call)`` is invoked once per call whose output receives a gradient, with
    ``call.grad_output`` set. A call with several differentiable outputs (a tuple, a ModelOutput)
    cannot know which of them will receive a gradient: its gradients are gathered (a list aligned
    with the flattened outputs, None where none arrived) and it is dispatched by
    :meth:`flush_deferred` once the backward has ended. ``recomputed`` becomes True when a
    forward hook fires during the backward pass (activation checkpointing re-running forwards):
    the caller must not trust the recorded calls then.
    """

    def __init__(self, modules: list[nn.Module], on_grad: Callable[[ModuleCall], None], taps: Callable[[nn.Module], object | None] | None = None):
        self.modules = modules
        self.on_grad = on_grad
        #: ``taps(module)``: None, or a probe (see :meth:`~hf_fisher.engine.rules.GradRule.tap`) whose
        #: ``start()`` runs before each recorded forward of the module and whose ``stop()`` (a dict)
        #: ends it and goes into the call's ``extra``
        self.taps = taps
        self._taps: dict[int, object] = {}
        self.calls: list[ModuleCall] = []
        self.handles: list = []
        self.in_backward = False
        self.recomputed = False
        self.suspended = False  # True while a rule runs a module's forward itself (torch.func)
        self.batch_size = 0
        self.compute_dtype = torch.float32
        self.scale: torch.Tensor | None = None
        self.seq_len = 0
        self.deferred: list[ModuleCall] = []
        self.muted = False  # True while the graph is back-propagated again (hooks stay silent)

    def attach(self) -> Capture:
        if not self.handles:
            for m in self.modules:
                tap = self.taps(m) if self.taps is not None else None
                if tap is not None:
                    self._taps[id(m)] = tap
                    self.handles.append(m.register_forward_pre_hook(self._tap_hook))
                self.handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        for tap in self._taps.values():
            tap.stop()
        self._taps = {}
        self.handles = []
        self.calls = []

    def _tap_hook(self, module, args):
        if not (self.suspended or self.in_backward) and torch.is_grad_enabled():
            self._taps[id(module)].start()

    def __enter__(self) -> Capture:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def start(self, batch_size: int, compute_dtype: torch.dtype, scale: torch.Tensor | None, seq_len: int = 0) -> None:
        """Begin a new forward: forget previous calls."""
        self.calls = []
        self.deferred = []
        self.muted = False
        self.in_backward = False
        self.recomputed = False
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.compute_dtype = compute_dtype
        self.scale = scale

    def _forward_hook(self, module, args, kwargs, output):
        tap = self._taps.get(id(module))
        tapped = tap.stop() if tap is not None else {}
        if self.suspended:
            return None
        if self.in_backward:
            self.recomputed = True
            return None
        if not torch.is_grad_enabled():
            return None
        call = ModuleCall(
            module=module, args=args, kwargs=kwargs, output=output,
            batch_size=self.batch_size, compute_dtype=self.compute_dtype, scale=self.scale, seq_len=self.seq_len,
        )
        # the parameters as this forward used them: under FSDP2 the unsharded tensors, which stay
        # the module's only between its unshard and reshard (a rule reading values in the backward
        # must not meet the sharded DTensors registered by then)
        call.extra["params"] = dict(module.named_parameters(recurse=False))
        call.extra.update(tapped)
        self.calls.append(call)
        if isinstance(output, torch.Tensor):
            call.tensors = [output] if output.requires_grad else []
            if output.requires_grad:
                inner = call.extra.get("inner")
                waits = isinstance(inner, torch.Tensor) and inner.requires_grad
                output.register_hook(self._make_grad_hook(call, waits))
                if waits:
                    inner.register_hook(self._make_inner_hook(call))
            return None
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten(output)
        if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
            return None
        # One output may be computed from another inside the module (a router's scores from its
        # logits): a hook on the output itself would see the gradient arriving through the other
        # output too. Handing the caller aliases (view_as: no copy) makes each hook see only the
        # gradient from outside the module, which is what the module's vjp needs.
        leaves = [x.view_as(x) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in leaves]
        call.tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        call.grad_output = [None] * len(leaves)
        for k, x in enumerate(leaves):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(self._make_leaf_hook(call, k))
        new = tree_unflatten(leaves, spec)
        call.output = new
        return new

    def _dispatch(self, call: ModuleCall) -> None:
        call.scale = self.scale
        self.suspended = True
        try:
            self.on_grad(call)
        finally:
            self.suspended = False

    def _make_grad_hook(self, call: ModuleCall, waits: bool = False):
        def hook(grad):
            if not self.muted:
                call.grad_output = grad
                if waits:  # dispatched by the inner hook below, or by flush_deferred if none comes
                    self.deferred.append(call)
                else:
                    self._dispatch(call)
            return None

        return hook

    def _make_inner_hook(self, call: ModuleCall):
        """A tap's ``extra["inner"]``: a tensor inside the module's forward whose gradient its
        rule uses (the backward reaches it after the module's output): the call is dispatched
        when it arrives, with ``extra["inner_grad"]`` set."""

        def hook(grad):
            if self.muted or call.grad_output is None:
                return None
            k = next((k for k, c in enumerate(self.deferred) if c is call), None)
            if k is not None:
                del self.deferred[k]
                call.extra["inner_grad"] = grad
                self._dispatch(call)
            return None

        return hook

    def _make_leaf_hook(self, call: ModuleCall, k: int):
        def hook(grad):
            if self.muted:
                return None
            if all(g is None for g in call.grad_output):
                self.deferred.append(call)
            call.grad_output[k] = grad
            return None

        return hook

    def flush_deferred(self) -> None:
        """Dispatch the multi-output calls gathered during the backward (see class docstring) and
        the calls whose tap's inner gradient never came (the backward stopped above it), without
        grad mode, as the backward's own hooks run: a rule's per-sample gradients never
        join a graph (a module whose submodules' parameters require grad would otherwise give
        parts that do)."""
        deferred, self.deferred = self.deferred, []
        with torch.no_grad():
            for call in deferred:
                self._dispatch(call)


def bottom_outputs(calls: list[ModuleCall], loss: torch.Tensor) -> list[int]:
    """Indices of calls with no other recorded call below them in the autograd graph.

    Asking autograd for the gradients of these outputs only (not of the parameters) makes the
    backward traverse every recorded call on a path to the loss while skipping the weight-
    gradient products a normal backward computes.
    """
    node_of = {}
    for i, c in enumerate(calls):
        for t in c.tensors:
            if t.grad_fn is not None:
                node_of[t.grad_fn] = i
    if loss.grad_fn is None:
        return []
    # iterative post-order over the graph reachable from the loss
    below: dict = {}
    stack = [(loss.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        if node in below:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in below)
        else:
            below[node] = any((c in node_of) or below.get(c, False) for c in children)
    return sorted({i for node, i in node_of.items() if node in below and not below[node]})
