"""The KFAC estimator (built-in plugin ``"kfac"``): Kronecker factors of the Fisher per layer.

Returns a :class:`hf_fisher.artifacts.kfac.KFACFisher`: for every ``nn.Linear``, HF ``Conv1D`` (GPT-2's
fused ``c_attn`` included: one layer with ``d_out = 3·hidden``) and ``nn.Embedding`` whose weight
is collected, ``F_layer ≈ G ⊗ A`` (canonical form in :mod:`hf_fisher.artifacts.kfac`).

**Coverage.** A subclass of ``nn.Linear`` / ``Conv1D`` with its own ``forward`` (Falcon's
``FalconLinear`` — fused ``query_key_value``, ``dense``, MLP — computes ``x @ W.T`` and adds the
bias in a second step) is covered once its forward, run in float64 on a few rows of its first
input, gives the layer's affine map to float64 rounding; otherwise the layer is left out (or
refused when ``params`` lists it). An ``nn.Embedding`` subclass with its own forward (e.g. a
scaled embedding) is left out. During the first forward a torch-function mode watches the
factored layers' parameters: one that enters a differentiable operation outside its layer's
forward (Mamba's ``dt_proj.weight @ x``, an embedding table read directly as the output
projection) has a use its factors would miss, so its layer is left out (or refused when
``params`` lists it). Every selected parameter no layer covers (norm weights, such layers, a
layer that never reaches the loss) is recorded in ``KFACFisher.uncovered`` with the
reason, and one log line says how many: a WARNING when a matrix is among them, INFO when only
vector parameters (norm scales) are, which KFAC leaves out by design (select only factored layers
with ``params=`` to have none). ``scripts/kfac_coverage.py`` lists, per architecture, the Linear / Conv1D layers left out.

**Non-finite padded batches.** The input products of a batch are added once its forward is
finite at every position of the counted samples (padding included). Some models give NaN at
padded positions — eager attention in a float64 model takes its softmax in float32, where the
mask value ``finfo(float64).min`` is ``-inf``, so the fully masked rows of left padding are NaN
and reach the real tokens through the next layer (0 x NaN). Such a padded batch adds nothing and
is redone one sample at a time without its padding (the definition, exact), and so are the
later padded batches: one WARNING, and ``metadata.extra["loop_reason"]`` says so. A non-finite
forward of an unpadded batch, or of a sample alone, is a :class:`~hf_fisher.errors.NonFiniteError`.

**Notation.** Sample i (a sequence) has label tokens ``n_i`` (labels != -100, padding excluded,
:func:`hf_fisher.engine.losses.label_counts`), summed loss ``S_i = Σ_t l_it`` and the core's
normalisation (:mod:`hf_fisher.engine.losses`) gives its Fisher weight

    c_i = (w_i s_i)²:   "mean" (default) 1/n_i²,   "sum" 1,   "token" 1/n_i

so that the core's Fisher is ``F = (1/N) Σ_i c_i ∇S_i ∇S_iᵀ``. Only samples with ``n_i > 0``
count (N of them). ``P_i`` are sample i's real tokens (attention_mask == 1), ``R_i = |P_i|``,
``M = Σ_i R_i``; ``a_it`` is the layer's input at token t, ``ã = [a, 1]`` when the bias is
covered; ``ĝ_it = ∂S_i/∂s_it`` the gradient of the summed loss w.r.t. the layer's output at t.
Padded tokens are masked out of every sum (a padded batch gives the factors of the same samples
unpadded).

**Factors** (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern
Neural Network Architectures"):

- expand:  ``A = (1/M) Σ_i Σ_{t∈P_i} ã_it ã_itᵀ``,
           ``G = (1/N) Σ_i c_i Σ_t ĝ_it ĝ_itᵀ``
- reduce:  ``A = (1/N) Σ_i ā_i ā_iᵀ`` with ``ā_i = [ (1/R_i) Σ_{t∈P_i} a_it , 1 ]``,
           ``G = (1/N) Σ_i c_i (Σ_t ĝ_it)(Σ_t ĝ_it)ᵀ``

Embeddings always use the expand form (their one-hot inputs make A exactly diagonal: the token
frequencies ``A_vv = #{(i, t∈P_i): x_it = v} / M``, 0 for ``padding_idx``; reduce would make it a
dense V x V matrix).

**Fisher types** (what ``ĝ ĝᵀ`` is):

- ``"empirical"``: ĝ from the dataset labels (one backward of ``Σ_i S_i``);
- ``"mc"``: labels drawn from the model, ``y_t ~ softmax(z_t)`` at every label position,
  ``mc_samples = K`` draws, each a backward, ``ĝĝᵀ`` averaged over the draws (weight 1/K). Draws
  use a ``torch.Generator`` seeded with ``seed`` once per ``collect``: per batch and draw one
  ``multinomial(softmax(z), 1)`` over the label rows in row-major order (the same stream as
  curvlinops' ``KFACLinearOperator`` for equal-length, fully labelled data). Under
  torch.distributed rank r seeds its generator with
  :func:`~hf_fisher.collection.distributed.rank_seed` (rank 0: ``seed`` itself, the others a
  stream of their own), so the summed factors are those of one process per rank (its batches,
  its seed) added together;
- ``"type-2"``: the exact expectation, through the symmetric square root of the cross-entropy
  Hessian w.r.t. the logits, ``H = diag(p) − p pᵀ = S Sᵀ`` with ``S = diag(√p) − √p pᵀ``: column
  c, ``S_c = √p_c (e_c − p)``, is back-propagated from all label positions at once, and
  ``Σ_c ĝ^c ĝ^cᵀ`` replaces ``ĝĝᵀ``. Cost: one backward per output class, V backward passes per
  batch (a 32k vocabulary is 32k backwards). Above ``max_type2_outputs`` (default 1024) the
  estimator refuses before any work and says to use ``"mc"`` (whose K draws estimate the same
  expectation) or raise the limit.

Every backward asks autograd only for the gradients of the lowest captured outputs (kept as
autograd edges, so no layer output is held longer than the model holds it; no weight gradient is
computed, ``.grad`` is never touched); A is accumulated in forward hooks (layers reading the same
input tensor — q/k/v, gate/up — share one product), G in tensor hooks on the layer outputs; one
batched forward per batch, no per-sample loop. Products run in the model's dtype promoted to
float32, in chunks of rows; the factors accumulate in ``accumulation_dtype`` (float64 by
default; float32 halves their memory).

**Large outputs.** A layer whose output dimension exceeds ``diagonal_g_above`` (default 4096;
None = never) keeps only ``diag G`` (an lm_head over a 50k vocabulary would need a 50k x 50k G);
each such layer is logged.

**Scale conventions vs curvlinops.** With data of equal-length, fully labelled sequences (``R``
label positions each, every token real), curvlinops' ``KFACLinearOperator`` (``loss_func =
CrossEntropyLoss(reduction=...)``, ``separate_weight_and_bias=False``, logits of the labelled
positions) gives:

- ``reduction="mean"``:  A and G equal ours with ``normalization="token"``;
- ``reduction="sum"``:   A equal, G = N x ours with ``normalization="sum"``;
- ours with the default ``normalization="mean"`` is 1/R x curvlinops' "mean" G.

The product G ⊗ A approximates the core's Fisher of the same normalisation; KFAC is exact for
a single sample with a single token position.

**FSDP2** (``fully_shard``, one 1-D mesh). The hooks see the unsharded weights FSDP2 gathers
for each pass, so each rank computes the whole factor sums ``Σ ã ãᵀ`` and ``Σ c ĝ ĝᵀ`` of its own
samples; at the end they are summed over the ranks with the row and sample counts (as under
DDP), then divided by the global counts: the factors of one process over every rank's samples.
Every forward and backward is a collective, so the ranks run the same passes: before each batch
they decide together (:meth:`~hf_fisher.collection.fsdp.FSDPSharding.replay_step`) whether any
rank still has a batch that counts a sample; a rank whose batch counts nothing (every label
-100, or past its ``max_samples``), or that has run out of batches, runs the same passes on its
batch (or a replay of its last one) with every row masked out, adding exact zeros (1, K or V
backward passes for empirical, mc and type-2, from a zero gradient, drawing nothing). The
finiteness checks are settled together (one rank's failure stops every rank, the others naming
it), and a batch one rank finds bad is refused on every rank before any pass. A padded batch whose
forward is not finite is redone one sample at a time on its rank exactly when one process over
that rank's batches would redo it, the other ranks running as many passes counting nothing; so
each rank's draws ("mc") are those of one process over its own batches with its
:func:`~hf_fisher.collection.distributed.rank_seed`. Refused: a rank without any batch while
others have one, and ``distributed=False``. Each rank holds the whole factors (they are per
layer, ``d_in² + d_out²``, not parameter-shaped).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..artifacts.fisher import Counts, FisherMetadata
from ..artifacts.kfac import FISHER_TYPES, KFAC_APPROXES, KFACFisher, KFACLayer
from ..collection.collector import select_parameters
from ..collection.distributed import all_gather_tensor, all_reduce_sum, is_distributed, rank_seed
from ..engine.capture import bottom_outputs
from ..engine.losses import (
    IGNORE_INDEX,
    NORMALIZATIONS,
    TASK_TYPES,
    label_counts,
    normalization_weights,
    task_type_of,
    token_labels,
)
from ..engine.rules import conv1d_type
from ..errors import (
    DistributedMismatchError,
    EmptyDataError,
    InvalidInputError,
    NonFiniteError,
    NoTrainableParametersError,
    UnsupportedError,
)
from ..hookspecs import hookimpl
from .base import refusal

__all__ = ["KFACEstimator"]

log = logging.getLogger(__name__)


class _Node:
    def __init__(self, node):
        self.grad_fn = node


class _Call:
    """One recorded output, kept as its autograd edge only (the output tensor itself is freed
    when the model no longer needs it): :func:`bottom_outputs` reads ``tensors[0].grad_fn``, the
    backward asks for the gradient at ``edge``."""

    def __init__(self, tensor: torch.Tensor):
        from torch.autograd.graph import get_gradient_edge

        self.edge = get_gradient_edge(tensor)
        self.tensors = [_Node(self.edge.node)]


_CHUNK_ELEMS = 1 << 20  # default bound on the temporaries of one second-moment product (elements)


def _second_moment(x: torch.Tensor, w: torch.Tensor | None, diagonal: bool, *, mask: torch.Tensor | None = None,
                   compute: torch.dtype | None = None, chunk_elems: int = _CHUNK_ELEMS) -> torch.Tensor:
    """``Σ_r w_r x_r x_rᵀ`` (or its diagonal ``Σ_r w_r x_r²``) over the rows of ``x`` [R, d] that
    ``mask`` [R] keeps (all without one), in ``compute`` (default: ``x``'s dtype).

    In chunks of rows: the selected, converted and weighted copies of a chunk stay below
    ``chunk_elems`` elements each, whatever the number of rows (tokens) — no copy of the whole
    ``x`` is made."""
    R, d = x.shape
    step = max(1, chunk_elems // max(1, d))
    out = None
    for lo in range(0, R, step):
        xs = x[lo : lo + step]
        ws = None if w is None else w[lo : lo + step]
        if mask is not None:
            keep = mask[lo : lo + step]
            xs = xs[keep]
            ws = None if ws is None else ws[keep]
        if compute is not None:
            xs = xs.to(compute)
        if diagonal:
            sq = xs * xs
            part = sq.sum(0) if ws is None else ws.to(sq.dtype) @ sq
        else:
            xw = xs if ws is None else xs * ws.to(xs.dtype).unsqueeze(1)
            part = xw.transpose(0, 1) @ xs
        out = part if out is None else out.add_(part)
    if out is None:
        dt = compute or x.dtype
        out = torch.zeros(d if diagonal else (d, d), dtype=dt, device=x.device)
    return out


def _masked_sums(x: torch.Tensor, pos: torch.Tensor, compute: torch.dtype, chunk_elems: int) -> torch.Tensor:
    """``Σ_{t: pos_it} x_it`` per sample, ``[B, d]`` in ``compute``, from ``x`` [B, T, d] and ``pos``
    [B, T], over chunks of token rows (masked positions are left out, not multiplied by zero: a
    NaN there does not count)."""
    B, T, d = x.shape
    flat, keep = x.reshape(-1, d), pos.reshape(-1)
    owner = torch.arange(B, device=x.device).repeat_interleave(T)
    out = torch.zeros(B, d, dtype=compute, device=x.device)
    step = max(1, chunk_elems // max(1, d))
    for lo in range(0, B * T, step):
        k = keep[lo : lo + step]
        out.index_add_(0, owner[lo : lo + step][k], flat[lo : lo + step][k].to(compute))
    return out


def _all_finite(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Whether every entry of ``x`` (of the samples ``rows`` [B] of its leading axis, when given)
    is finite, as a device flag: from per-sample minima and maxima (NaN propagates through them),
    without an ``x``-sized temporary."""
    flat = x.reshape(x.shape[0], -1) if rows is not None else x.reshape(1, -1)
    if flat.shape[1] == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(flat, dim=1)
    ok = torch.isfinite(lo) & torch.isfinite(hi)
    return (ok | ~rows.to(ok.device)).all() if rows is not None else ok.all()


class _Ctx:
    """What the hooks need to know about the batch being processed."""

    B = 0
    T = 0
    pos: torch.Tensor  # [B, T] bool: real tokens of samples with labels
    valid: torch.Tensor  # [B] bool
    weight: torch.Tensor  # [B] float64: c_i (x the draw's weight)
    in_backward = False
    index = 0  # the batch's index in the data
    all_real = True  # no padding in the batch (hooks may skip the position mask)
    all_valid = True  # every sample of the batch counts
    a_cache: dict  # this forward's input products, by input tensor identity
    # finiteness of this forward (device flags, read once after it): every layer input and the
    # logits, at every position of the counted samples, padding included; and of the G products
    checks: list
    g_checks: list


class _NonFiniteBatch(Exception):
    """A padded batch's forward is not finite: redo it sample by sample, without the padding."""


class _OutsideUses(TorchFunctionMode):
    """During one forward: the factored layers' parameters that enter a differentiable torch
    function while none of their layers is running its forward (Mamba's ``dt_proj.weight @ x``,
    a tied weight read directly as an output projection). The factors of such a layer miss that
    use of its weight, so it cannot be covered."""

    def __init__(self, owners: dict[int, list[_Acc]], active: dict[int, int]):
        super().__init__()
        self.owners, self.active = owners, active
        self.outside: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) in self.owners and id(t) not in self.outside:
                if not any(self.active.get(id(a.module)) for a in self.owners[id(t)]) and any(
                    isinstance(o, torch.Tensor) and o.requires_grad for o in tree_leaves(out)
                ):
                    self.outside.add(id(t))
        return out


class _Acc:
    """The accumulators of one layer."""

    def __init__(self, name: str, module: nn.Module, kind: str, weight: str, bias: str | None, g_diag: bool, form: str):
        self.name, self.module, self.kind = name, module, kind
        self.weight, self.bias = weight, bias
        self.g_diag, self.form = g_diag, form
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.a_count = 0
        self.calls = 0
        # this forward's input product, added once the forward is known finite (it may be shared
        # with the layers reading the same input: never modified in place)
        self.pA: torch.Tensor | None = None
        self.p_count = 0
        # an nn.Linear / Conv1D subclass with its own forward is covered once its output is
        # checked to be the layer's affine map (first call); a failed check leaves it out
        self.unverified = False
        self.dropped: str | None = None
        self.param_ids: dict[str, int] = {}  # "weight"/"bias" -> id of the parameter the forward uses

    def stage_a(self, x: torch.Tensor, n_rows: int) -> None:
        self.pA, self.p_count = x, n_rows

    def commit_a(self) -> None:
        """Add this forward's input product to A."""
        if self.pA is not None:
            self.A = self.pA.clone() if self.A is None else self.A.add_(self.pA)
            self.a_count += self.p_count
        self.discard()

    def discard(self) -> None:
        self.pA, self.p_count = None, 0

    def add_g(self, x: torch.Tensor) -> None:
        self.G = x if self.G is None else self.G.add_(x)


def _per_token(x: torch.Tensor, ctx: _Ctx, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as [B, T', d] with its position mask [B, T'] ([B, d]: one position per sample)."""
    B, T = ctx.B, ctx.T
    if x.dim() == 3 and x.shape[0] == B and x.shape[1] == T:
        return x, ctx.pos
    if x.dim() == 2 and x.shape[0] == B:
        return x.unsqueeze(1), ctx.valid.unsqueeze(1)
    if x.dim() == 2 and T > 1 and x.shape[0] == B * T:
        return x.view(B, T, -1), ctx.pos
    if x.dim() > 3 and x.shape[0] == B and math.prod(x.shape[1:-1]) == T and sum(s != 1 for s in x.shape[1:-1]) <= 1:
        return x.reshape(B, T, x.shape[-1]), ctx.pos  # [B, 1, T, d] (DeepSeek's kv_b_proj): one head axis of size 1
    raise UnsupportedError(
        f"KFAC: {what} has shape {tuple(x.shape)}, which is not [batch, seq, features] ({B}, {T}, ...) "
        f"nor [batch, features]; such a layer cannot be Kronecker-factored per token here — exclude it with params="
    )


def _chunked_matmul(w: torch.Tensor, x: torch.Tensor, compute: torch.dtype, chunk_elems: int) -> torch.Tensor:
    """``w @ x`` (``w`` [k, R] small, ``x`` [R, d]) over chunks of rows of ``x`` converted to ``compute``."""
    step = max(1, chunk_elems // max(1, x.shape[1]))
    out = None
    for lo in range(0, x.shape[0], step):
        part = w[:, lo : lo + step].to(compute) @ x[lo : lo + step].to(compute)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(w.shape[0], x.shape[1], dtype=compute, device=x.device)


def _output_moment(g: torch.Tensor, acc: _Acc, ctx: _Ctx, compute: torch.dtype, chunk_elems: int) -> torch.Tensor:
    """``Σ c_i ĝ ĝᵀ`` (or its diagonal) of one layer's output gradient ``g`` (module docstring:
    per token for expand, per-sample sums for reduce), with temporaries of at most
    ``chunk_elems`` elements each (no masked or converted copy of ``g``)."""
    x, pos = _per_token(g, ctx, f"the output gradient of {acc.name}")
    c = ctx.weight.to(device=x.device, dtype=compute)  # c_i (x the draw's weight)
    d = x.shape[-1]
    if acc.form == "expand":
        w = c.repeat_interleave(x.shape[1])
        full = ctx.all_real and pos.shape[1] == x.shape[1] and bool(ctx.valid.all())
        return _second_moment(x.reshape(-1, d), w, acc.g_diag, mask=None if full else pos.reshape(-1), compute=compute,
                              chunk_elems=chunk_elems)
    rows = _masked_sums(x, pos, compute, chunk_elems)[ctx.valid]
    return _second_moment(rows, c[ctx.valid], acc.g_diag, chunk_elems=chunk_elems)


class KFACEstimator:
    """KFAC: per layer ``F ≈ G ⊗ A`` (formulas and scale conventions in the module docstring).

    Options:
        fisher_type: "empirical" (default) | "mc" | "type-2".
        kfac_approx: "expand" (default) | "reduce".
        mc_samples: draws per label position for "mc" (>= 1; must stay 1 otherwise).
        seed: seed of the "mc" draws.
        diagonal_g_above: output size above which G is kept diagonal (default 4096; None: never).
        max_type2_outputs: largest output (vocabulary) size "type-2" accepts (default 1024).
        params: which parameters (None: every trainable weight of a supported layer; a regular
            expression; or a list of names, which must all belong to supported layers).
        normalization: "mean" | "sum" | "token" (the core's per-sample loss conventions).
        task_type: "causal_lm" | "masked_lm" | "sequence_classification" (inferred by default).
        train_mode: run the model in train mode (dropout on); default eval.
        accumulation_dtype: dtype of the factors, torch.float64 (default) or torch.float32 (half
            the memory; products are computed in the model's dtype promoted to float32 either way).
        distributed: None (default): under torch.distributed with several processes the factors
            are summed over the ranks (each rank's own batches; the result is the KFAC of all the
            samples, on every rank), else this process's; True: always merge (refused when
            torch.distributed is not initialised); False: this process's own factors. On a model
            sharded with FSDP2 the factors are always summed (False is refused; see the module
            docstring).
        memory_budget_mb: bound on the temporaries of the factor products (the selected, converted
            and weighted rows of one chunk of tokens: two chunks of ``memory_budget_mb / 2`` MB each,
            at any sequence length; the factors themselves are not counted). None: chunks of 2^20
            elements.

    The other :class:`~hf_fisher.estimators.base.CollectOptions` (``reduction``,
    ``storage_dtype``, ``ema_decay``, ...) concern a diagonal Fisher and are
    refused, naming them: take ``kfac.to_diagonal()`` (``.to_groups()``) where a diagonal is needed.
    """

    name: ClassVar[str] = "kfac"
    collect_options: ClassVar[frozenset[str]] = frozenset(
        {"normalization", "task_type", "train_mode", "accumulation_dtype", "distributed", "memory_budget_mb"}
    )
    own_options: ClassVar[frozenset[str]] = frozenset(
        {"fisher_type", "kfac_approx", "mc_samples", "seed", "diagonal_g_above", "max_type2_outputs", "params"}
    )
    refusal_hint: ClassVar[str] = (
        "KFAC factors are not a diagonal Fisher: leave the diagonal options at their defaults and convert the "
        "result with kfac.to_diagonal() (.to_groups()) where a diagonal is needed"
    )

    def __init__(
        self,
        *,
        fisher_type: str = "empirical",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        diagonal_g_above: int | None = 4096,
        max_type2_outputs: int = 1024,
        params: Any = None,
        normalization: str = "mean",
        task_type: str | None = None,
        train_mode: bool = False,
        accumulation_dtype: torch.dtype = torch.float64,
        distributed: bool | None = None,
        memory_budget_mb: float | None = None,
        **unused: Any,
    ):
        if unused:
            raise refusal(self.name, type(self), sorted(unused))
        if distributed not in (None, True, False):
            raise InvalidInputError(f"distributed must be None, True or False, got {distributed!r}")
        self.distributed = distributed

        def choice(what, value, choices):
            if value not in choices:
                raise InvalidInputError(f"{what} must be one of {list(choices)}, got {value!r}")

        choice("fisher_type", fisher_type, FISHER_TYPES)
        choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        choice("normalization", normalization, NORMALIZATIONS)
        if task_type is not None:
            choice("task_type", task_type, TASK_TYPES)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise InvalidInputError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise InvalidInputError(
                f"mc_samples={mc_samples} only applies to fisher_type='mc' (got {fisher_type!r}); drop it or use 'mc'"
            )
        if diagonal_g_above is not None and (isinstance(diagonal_g_above, bool) or not isinstance(diagonal_g_above, int) or diagonal_g_above < 0):
            raise InvalidInputError(f"diagonal_g_above must be None or an integer >= 0, got {diagonal_g_above!r}")
        if isinstance(max_type2_outputs, bool) or not isinstance(max_type2_outputs, int) or max_type2_outputs < 1:
            raise InvalidInputError(f"max_type2_outputs must be an integer >= 1, got {max_type2_outputs!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        if accumulation_dtype not in (torch.float32, torch.float64):
            raise InvalidInputError(f"accumulation_dtype must be torch.float32 or torch.float64, got {accumulation_dtype!r}")
        self.accumulation_dtype = accumulation_dtype
        if memory_budget_mb is not None and (
            isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0
        ):
            raise InvalidInputError(f"memory_budget_mb must be None or a positive number of MB, got {memory_budget_mb!r}")
        self.memory_budget_mb = memory_budget_mb
        self.chunk_elems = _CHUNK_ELEMS
        if not isinstance(train_mode, bool):
            raise InvalidInputError(f"train_mode must be True or False, got {train_mode!r}")
        self.fisher_type = fisher_type
        self.kfac_approx = kfac_approx
        self.mc_samples = mc_samples
        self.seed = seed
        self.diagonal_g_above = diagonal_g_above
        self.max_type2_outputs = max_type2_outputs
        self.params = params
        self.normalization = normalization
        self.task_type = task_type
        self.train_mode = train_mode

    # ------------------------------------------------------------------ set-up
    def _layers(self, model: nn.Module) -> tuple[dict[str, _Acc], dict[str, str]]:
        """The layers to factor, and the selected parameters left uncovered (name -> why)."""
        named = select_parameters(model, self.params)
        if not named:
            raise NoTrainableParametersError(f"{type(model).__name__} has no trainable parameter to collect KFAC factors for")
        selected = {id(p): n for n, p in named}
        conv1d = conv1d_type()
        out: dict[str, _Acc] = {}
        covered: set[int] = set()
        why: dict[int, str] = {}  # id(param) -> reason, for parameters of layers not factored
        for mname, m in model.named_modules():
            if isinstance(m, nn.Linear):
                kind, own = "linear", type(m).forward is nn.Linear.forward
            elif conv1d is not None and isinstance(m, conv1d):
                kind, own = "conv1d", type(m).forward is conv1d.forward
            elif isinstance(m, nn.Embedding):
                kind, own = "embedding", type(m).forward is nn.Embedding.forward
                if not own:  # e.g. a scaled embedding: not the plain lookup A and G describe
                    for p in m._parameters.values():
                        if p is not None:
                            why[id(p)] = f"{type(m).__name__} {mname} overrides nn.Embedding.forward"
                    continue
            else:
                continue
            w = m._parameters.get("weight")
            b = m._parameters.get("bias")
            if w is None or id(w) not in selected:
                if b is not None:
                    why[id(b)] = f"the weight of {mname} is not selected (a bias is factored with its weight)"
                continue
            if kind == "embedding" and (m.max_norm is not None or m.scale_grad_by_freq):
                raise UnsupportedError(f"KFAC: embedding {mname} uses max_norm or scale_grad_by_freq; exclude it with params=")
            bias = selected.get(id(b)) if b is not None else None
            d_out = m.embedding_dim if kind == "embedding" else (m.out_features if kind == "linear" else m.nf)
            g_diag = self.diagonal_g_above is not None and d_out > self.diagonal_g_above
            if g_diag:
                log.info("KFAC: %s has %d outputs (> diagonal_g_above=%d): its G is kept diagonal", mname, d_out, self.diagonal_g_above)
            form = "expand" if kind == "embedding" else self.kfac_approx
            acc = out[mname] = _Acc(mname, m, kind, selected[id(w)], bias, g_diag, form)
            acc.unverified = not own
            covered.add(id(w))
            if b is not None and id(b) in selected:
                covered.add(id(b))
        left = [(n, p) for n, p in named if id(p) not in covered]
        if left and self.params is not None and not isinstance(self.params, str):
            names = [n for n, _ in left]
            raise InvalidInputError(
                f"params: {names[:3]} {'is' if len(names) == 1 else 'are'} not the weight (or its bias) of an nn.Linear, "
                "HF Conv1D or nn.Embedding, which are the layers KFAC factors; drop them from params"
            )
        if not out:
            raise InvalidInputError(
                "KFAC: no selected parameter is the weight of an nn.Linear, HF Conv1D or nn.Embedding; select such layers with params="
            )
        owners = {id(p): (mn, type(mod).__name__) for mn, mod in model.named_modules() for p in mod._parameters.values() if p is not None}
        uncovered = {}
        for n, p in left:
            mn, tn = owners.get(id(p), ("", "?"))
            uncovered[n] = why.get(id(p)) or f"a parameter of {tn} {mn or '(the model)'}, not an nn.Linear, HF Conv1D or nn.Embedding layer"
        return out, uncovered

    def _output_size(self, model: nn.Module, task_type: str) -> int | None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if task_type == "sequence_classification":
            return getattr(getattr(base, "config", None), "num_labels", None)
        emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if emb is not None:
            return int(emb.weight.shape[0])
        return getattr(getattr(base, "config", None), "vocab_size", None)

    # ------------------------------------------------------------------ collect
    def collect(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        *,
        task: str = "default",
        max_samples: int | None = None,
        progress: bool = True,
        model_name_or_path: str | None = None,
        data_description: str | None = None,
    ) -> KFACFisher:
        """Accumulate the factors over ``batches`` (dicts with ``input_ids`` and optionally
        ``attention_mask`` / ``labels``) and return the :class:`KFACFisher`."""
        from tqdm.auto import tqdm

        from ..engine.per_sample import (
            _accepted_kwargs,
            _checkpointing,
            _position_convention,
        )

        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0):
            raise InvalidInputError(f"max_samples must be a positive integer, got {max_samples!r}")
        from contextlib import nullcontext

        from ..collection.fsdp import FSDPSharding, is_fsdp

        sharding = None
        if is_fsdp(model):
            if self.distributed is False:
                raise UnsupportedError(
                    "KFAC: distributed=False is not supported on an FSDP2-sharded model (its passes are collectives of "
                    "every rank, whose factors are summed); drop distributed=False"
                )
            sharding = FSDPSharding(model)  # refuses what it cannot shard over (HSDP meshes)
        merge = self._merging()
        task_type = self.task_type or task_type_of(model)
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        if task_type == "sequence_classification" and problem in ("regression", "multi_label_classification"):
            raise UnsupportedError(f"KFAC here is for categorical (cross-entropy) heads; this head's problem_type is {problem!r}")
        if _checkpointing(model):
            raise UnsupportedError("KFAC: gradient checkpointing re-runs forwards during the backward; disable it for the collection")
        V = self._output_size(model, task_type)
        if self.fisher_type == "type-2" and V is not None and self.max_type2_outputs < V:
            raise UnsupportedError(
                f"fisher_type='type-2' back-propagates one column of the loss Hessian's square root per output class: "
                f"{V} backward passes per batch for this model (max_type2_outputs={self.max_type2_outputs}). Use "
                f"fisher_type='mc' (mc_samples draws estimate the same expectation), or raise max_type2_outputs"
            )
        with sharding.unsharded() if sharding is not None else nullcontext():
            # under FSDP2: the unsharded parameters the forward uses (the same objects in every pass)
            layers, uncovered = self._layers(model)
            uses = _Ctx()  # which layers are running (for the first forward's check of the weights' uses)
            uses.checked, uses.active, uses.owners = False, {}, {}
            for a in layers.values():
                for local, pname in (("weight", a.weight), ("bias", a.bias)):
                    if pname is not None:
                        p = model.get_parameter(pname)
                        a.param_ids[local] = id(p)
                        uses.owners.setdefault(id(p), []).append(a)
        by_module = {id(a.module): a for a in layers.values()}
        accepted = _accepted_kwargs(model)
        explicit_positions = _position_convention(model) is None and "position_ids" in accepted
        device = next(model.parameters()).device
        compute = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        if self.memory_budget_mb is not None:  # two chunk-sized temporaries at a time
            elem = torch.empty((), dtype=compute).element_size()
            self.chunk_elems = max(1, int(self.memory_budget_mb * 2**20 / (2 * elem)))
        ctx = _Ctx()
        outputs: list[_Call] = []
        gen = torch.Generator().manual_seed(rank_seed(self.seed))  # the ranks' MC draws independent
        acc_dtype = self.accumulation_dtype

        def g_hook(acc: _Acc):
            def hook(g: torch.Tensor):
                gg = _output_moment(g, acc, ctx, compute, self.chunk_elems).to(acc_dtype)
                ctx.g_checks.append((acc.name, torch.isfinite(gg.sum())))
                acc.add_g(gg)
            return hook

        def f_hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return
            if ctx.in_backward:
                raise UnsupportedError("KFAC: a forward ran during the backward (activation checkpointing); disable it")
            acc = by_module[id(module)]
            if acc.dropped is not None:
                return
            acc.calls += 1
            if acc.calls > 1:
                raise UnsupportedError(
                    f"KFAC: {acc.name} is called more than once per forward; its factors would mix the calls. "
                    "Exclude it with params="
                )
            x = args[0] if args else next(iter(kwargs.values()))
            if acc.unverified and not self._verify_affine(acc, args, kwargs, output):
                return
            if acc.kind == "embedding":
                ids = x.reshape(ctx.B, -1) if x.dim() == 2 else x
                if tuple(ids.shape) != (ctx.B, ctx.T):
                    raise UnsupportedError(f"KFAC: embedding {acc.name} sees ids of shape {tuple(x.shape)}, not the batch's")
                pos = ctx.pos
                sel = ids[pos]
                cnt = torch.bincount(sel, minlength=module.num_embeddings).to(acc_dtype)
                if module.padding_idx is not None:
                    cnt[module.padding_idx] = 0
                acc.stage_a(cnt, int(sel.numel()))
            else:
                # q/k/v (gate/up) projections read the same input tensor: one product for all of
                # them (the cache holds the tensor, so its address cannot be reused meanwhile)
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, acc.form, acc.bias is not None)
                hit = ctx.a_cache.get(key)
                if hit is None:
                    aa, n_rows = self._input_moment(x.detach(), acc, ctx, compute, acc_dtype, self.chunk_elems)
                    ctx.a_cache[key] = (x, aa, n_rows)
                    per_sample = not ctx.all_valid and x.shape[0] == ctx.B
                    ctx.checks.append(_all_finite(x.detach(), ctx.valid if per_sample else None))
                else:
                    _, aa, n_rows = hit
                acc.stage_a(aa, n_rows)
            out = output if isinstance(output, torch.Tensor) else None
            if out is None or not out.requires_grad:
                return
            out.register_hook(g_hook(acc))
            outputs.append(_Call(out))
            return

        def run(prepared, labels, valid, n, padded: bool, may_redo: bool = True) -> bool:
            """One forward and the backward(s) of a prepared batch; ``valid`` [B]: the samples
            that count, ``n`` [B] their label tokens. The input products are added once the
            forward is finite at every position of the counted samples (padding included); if it
            is not, nothing is added and a padded batch (``may_redo``) raises _NonFiniteBatch (to be
            redone one sample at a time), an unpadded one NonFiniteError. Under FSDP2 such a padded
            batch instead runs the other ranks' backward passes counting nothing, and True is
            returned (the caller redoes it in step, :func:`in_step`)."""
            ids = prepared["input_ids"]
            B, T = ids.shape
            mask = prepared.get("attention_mask")
            real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            w, s = normalization_weights(n, self.normalization, torch.float64)
            ctx.B, ctx.T = B, T
            ctx.valid = valid.to(device)
            ctx.all_valid = bool(valid.all())
            ctx.pos = (real & valid.unsqueeze(1)).to(device)
            base_weight = torch.where(valid, (w * s) ** 2, torch.zeros_like(w)).to(device)
            ctx.weight = base_weight
            ctx.in_backward = False
            ctx.all_real = mask is None or bool(mask.bool().all())
            ctx.a_cache = {}
            ctx.checks, ctx.g_checks = [], []
            outputs.clear()
            for a in layers.values():
                a.calls = 0
                a.discard()
            inputs = {k: prepared[k] for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids") if k in prepared and k in accepted}
            if explicit_positions and "position_ids" not in inputs:
                # every sample's own positions, [B, T]: with the default [1, T] a learned
                # position table would be one lookup shared by the batch (no per-sample G)
                inputs["position_ids"] = (
                    (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None
                    else torch.arange(T, device=ids.device).expand(B, T)
                )
            if "use_cache" in accepted:
                inputs["use_cache"] = False
            try:
                with torch.enable_grad():
                    if uses.checked:
                        out = model(**inputs)
                    else:
                        for a in layers.values():
                            uses.active[id(a.module)] = 0
                        with _OutsideUses(uses.owners, uses.active) as mode:
                            out = model(**inputs)
                        self._drop_outside_uses(layers, mode.outside)
                        uses.checked = True
                    ctx.a_cache = {}
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    z = logits.detach() if ctx.all_valid or logits.shape[0] != B else logits.detach()[ctx.valid]
                    ok = bool(torch.stack([torch.isfinite(z).all(), *ctx.checks]).all())
                    redo = not ok and padded and may_redo
                    if redo and sharding is None:
                        raise _NonFiniteBatch
                    settle(ok or redo, NonFiniteError(
                        f"KFAC: batch {ctx.index}: the model's forward gives non-finite values (layer inputs or "
                        "logits); check the model's weights and dtype"
                    ), "the forward's finiteness check")
                    if redo:  # FSDP2: nothing of this forward counts; the others' passes run on a zero gradient
                        ctx.valid = torch.zeros_like(ctx.valid)
                        ctx.pos = torch.zeros_like(ctx.pos)
                        ctx.all_valid = False
                        base_weight = ctx.weight = torch.zeros_like(base_weight)
                        for a in layers.values():
                            a.discard()
                    for a in layers.values():
                        a.commit_a()
                    self._backward(logits, _targets(labels, task_type, logits), outputs, ctx, base_weight, gen)
                    del out, logits, z
                bad = [name for name, f in ctx.g_checks if not bool(f)]
                settle(not bad, NonFiniteError(
                    f"KFAC: batch {ctx.index}: the output gradients of {bad[:3]} are not finite although the forward "
                    "is" + (" (the model may hide NaN at padded positions in its forward; pass unpadded batches, "
                            "e.g. batch size 1, or another attention implementation)" if padded else
                            "; check the model's weights and dtype")
                ), "the output gradients' finiteness check")
            finally:
                ctx.a_cache = {}
                ctx.checks, ctx.g_checks = [], []
                outputs.clear()
                for a in layers.values():
                    a.discard()
            return redo

        def settle(ok: bool, error: BaseException, what: str) -> None:
            """Raise ``error`` unless ``ok``; under FSDP2 every rank raises when any rank's check
            fails (:meth:`FSDPSharding.settle`), so no rank enters a pass the others never join."""
            if sharding is not None:
                sharding.settle(ok, error, ctx.index, what)
            elif not ok:
                raise error

        ctx.settle = settle

        def run_alone(prepared, labels, valid, n, passes: int | None = None) -> None:
            """Each counted sample of a batch alone, without its padding (the definition); under
            FSDP2 ``passes`` in all, the ones after the samples on one sample counting nothing."""
            from ..engine.per_sample import alone

            rows = valid.nonzero().flatten().tolist()
            mask = prepared.get("attention_mask")
            spare = int(mask.sum(1).argmax()) if mask is not None else 0  # a row with real tokens
            for k in range(len(rows) if passes is None else passes):
                i = rows[k] if k < len(rows) else spare
                p1 = alone({**prepared, "_kfac_labels": labels}, i)
                l1 = p1.pop("_kfac_labels")
                m1 = p1.get("attention_mask")
                counts = k < len(rows)
                try:
                    run(p1, l1, valid[i : i + 1] & counts, n[i : i + 1] * counts, m1 is not None and not bool(m1.bool().all()),
                        may_redo=sharding is None)
                except (NonFiniteError, _NonFiniteBatch):
                    raise NonFiniteError(
                        f"KFAC: sample {i} of batch {ctx.index} gives non-finite values also alone, without its "
                        "padding; check the model's weights and dtype, or drop the sample"
                    ) from None

        def in_step(prepared, labels, valid, n, nv: int, padded: bool) -> str | None:
            """FSDP2: one batch on every rank in step, each rank redoing its padded batches one
            sample at a time exactly when one process over its batches would. First every rank
            runs one forward and its backward passes: its batch, or (a rank whose padded batches
            already go sample by sample, ``loop_reason``) one sample counting nothing; a rank
            whose padded batch is not finite counts nothing of it. Then, if some rank redoes its
            batch, every rank runs the largest number of samples to redo, one sample each, those
            beyond its own counting nothing (and drawing nothing). Returns this rank's loop reason."""
            alone_here = loop_reason is not None and padded and nv > 0
            if alone_here:
                run_alone(prepared, labels, torch.zeros_like(valid), n, passes=1)
                redo = True
            else:
                redo = run(prepared, labels, valid, n, padded, may_redo=nv > 0)
            passes = sharding.max_over_ranks(nv if redo else 0)
            if passes == 0:
                return loop_reason
            run_alone(prepared, labels, valid if redo else torch.zeros_like(valid), n, passes=passes)
            if not redo or loop_reason is not None:
                return loop_reason
            reason = (
                f"batch {ctx.index}: the padded batch gives non-finite values (the model produces NaN/inf at padded "
                "positions, e.g. fully masked attention rows of left padding in eager attention); this rank's padded "
                "batches are processed one sample at a time, without their padding, in step with the other ranks "
                "(exact, slower)"
            )
            log.warning("KFAC: %s", reason)
            return reason

        def enter(module, args):
            if not uses.checked:
                uses.active[id(module)] = uses.active.get(id(module), 0) + 1

        def leave(module, args, output):
            if not uses.checked:
                uses.active[id(module)] = uses.active.get(id(module), 1) - 1

        loop_reason = None
        handles = [a.module.register_forward_hook(f_hook, with_kwargs=True) for a in layers.values()]
        handles += [a.module.register_forward_pre_hook(enter) for a in layers.values()]
        handles += [a.module.register_forward_hook(leave, always_call=True) for a in layers.values()]
        was_training = model.training
        model.train(self.train_mode)
        samples = tokens = skipped = batches_seen = 0
        bar = tqdm(total=max_samples, desc=f"KFAC[{task}]", unit="sample", disable=not progress)
        last = None  # FSDP2: this rank's last batch, replayed (counting nothing) when the others have one and it not
        it = iter(batches)
        try:
            for bi in itertools.count():
                remaining = None if max_samples is None else max_samples - samples
                batch = next(it, None) if remaining is None or remaining > 0 else None
                item = error = None
                if batch is not None:
                    try:
                        item = self._item(batch, bi, device, task_type, V, remaining)
                    except Exception as e:
                        if sharding is None:
                            raise
                        error = e  # raised on this rank, and named on the others, by replay_step
                if sharding is None:
                    if item is None:
                        break
                    go = item[4] > 0
                else:  # every rank runs the same passes: see FSDPSharding.replay_step
                    go = sharding.replay_step(bi, has_batch=item is not None, counted=item is not None and item[4] > 0,
                                              error=error, can_replay=last is not None)
                    if go is None:
                        break
                ctx.index = bi
                if item is not None:
                    skipped += item[5]
                    last = item
                if not go:
                    continue
                prepared, labels, n, valid, nv, _ = last  # this batch, or (FSDP2, none left here) the last one
                if nv == 0 or item is None:  # FSDP2: this rank's passes, in step with the others', add nothing
                    valid, n, nv = torch.zeros_like(valid), torch.zeros_like(n), 0
                mask = prepared.get("attention_mask")
                padded = mask is not None and not bool(mask.bool().all())
                try:
                    if sharding is not None:
                        loop_reason = in_step(prepared, labels, valid, n, nv, padded)
                    elif loop_reason is not None and padded:
                        raise _NonFiniteBatch
                    else:
                        run(prepared, labels, valid, n, padded)
                except _NonFiniteBatch:
                    if loop_reason is None:
                        loop_reason = (
                            f"batch {bi}: the padded batch gives non-finite values (the model produces NaN/inf at padded "
                            "positions, e.g. fully masked attention rows of left padding in eager attention); padded "
                            "batches are processed one sample at a time, without their padding (exact, slower)"
                        )
                        log.warning("KFAC: %s", loop_reason)
                    run_alone(prepared, labels, valid, n)
                if nv:
                    samples += nv
                    tokens += int(n.sum())
                    batches_seen += 1
                    bar.update(nv)
        finally:
            bar.close()
            for h in handles:
                h.remove()
            model.train(was_training)
        if merge:  # a collective: before any rank can refuse its own (possibly empty) share
            samples, tokens, skipped, loop_reason = _merge_ranks(layers, samples, tokens, skipped, loop_reason, acc_dtype, device)
        if samples == 0:
            raise EmptyDataError("KFAC: the data yielded no sample with a label token (no batches, or every label is -100)")
        return self._artifact(model, layers, uncovered, samples, tokens, skipped, task, task_type, model_name_or_path,
                              data_description, loop_reason)

    def _item(self, batch, bi: int, device, task_type: str, V, remaining: int | None):
        """One batch checked and prepared: ``(prepared, labels, n, valid, nv, skipped)``, ``valid``
        [B] the samples that count (a label token, within ``remaining``), ``n`` [B] their label
        tokens (0 elsewhere), ``nv`` how many, ``skipped`` the samples without a label token."""
        prepared = self._prepare(batch, bi, device, task_type, V)
        labels = token_labels(prepared, task_type)
        n = label_counts(prepared, task_type)
        skipped = int((n == 0).sum())
        valid = n > 0
        if remaining is not None:
            valid &= valid.long().cumsum(0) <= remaining
            n = torch.where(valid, n, torch.zeros_like(n))
        return prepared, labels, n, valid, int(valid.sum()), skipped

    def _merging(self) -> bool:
        """Whether the factors are summed over the torch.distributed ranks (see ``distributed``)."""
        import torch.distributed as dist

        if self.distributed is False:
            return False
        if self.distributed is True and not (dist.is_available() and dist.is_initialized()):
            raise InvalidInputError("KFAC: distributed=True but torch.distributed is not initialised")
        return self.distributed is True or is_distributed()

    def _drop_outside_uses(self, layers: dict[str, _Acc], outside: set[int]) -> None:
        """Leave out (or refuse, when ``params`` names them) the layers whose weight or bias is
        also used outside the layer's forward (see :class:`_OutsideUses`)."""
        for a in layers.values():
            if a.dropped is not None:
                continue
            params = [n for n, local in ((a.weight, "weight"), (a.bias, "bias"))
                      if n is not None and a.param_ids.get(local) in outside]
            if not params:
                continue
            reason = (f"{type(a.module).__name__} {a.name}: {params[0]} is also used outside the layer's forward "
                      "(its factors would miss that use)")
            if self.params is not None and not isinstance(self.params, str):
                raise UnsupportedError(f"KFAC: {reason}; drop it from params")
            a.dropped = reason
            a.discard()
            log.warning("KFAC: %s; the layer is left out (recorded in KFACFisher.uncovered)", a.dropped)

    def _verify_affine(self, acc: _Acc, args, kwargs, output) -> bool:
        """First call of an nn.Linear / Conv1D subclass with its own forward (Falcon's
        ``FalconLinear`` computes ``x @ W.T + b`` in two steps): its forward, run in float64 on a
        few rows of this input, must give the layer's affine map ``x Wᵀ + b`` (Conv1D: ``x W + b``)
        to float64 rounding. Then the factors are the layer's; otherwise the layer is left out
        (WARNING, recorded in the artifact's ``uncovered``), or refused when ``params`` names it."""
        from torch.func import functional_call

        m = acc.module
        reason = None
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            reason = "its forward takes other arguments than the input, or returns more than one tensor"
        else:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])[:8].to(torch.float64)
            if not bool(torch.isfinite(rows).all()):
                return True  # judged at a finite call (a non-finite batch is redone or refused anyway)
            if x.dim() > 2:
                rows = rows.unsqueeze(0)
            params = {k: p.detach().to(torch.float64) for k, p in m.named_parameters(recurse=False)}
            w, b = params["weight"], params.get("bias")
            wt = w if acc.kind == "linear" else w.transpose(0, 1)
            # float64 throughout, whatever autocast the caller runs the collection under
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                try:
                    got = functional_call(m, params, (rows,))
                except Exception as e:
                    got, reason = None, f"its forward cannot be checked in float64 ({type(e).__name__}: {e})"
                ref = rows @ wt.transpose(0, 1) + (b if b is not None else 0)
                bound = rows.abs() @ wt.abs().transpose(0, 1) + (b.abs() if b is not None else 0)
                tol = (rows.shape[-1] + 2) * torch.finfo(torch.float64).eps
                if got is not None and not (
                    isinstance(got, torch.Tensor) and got.shape == ref.shape and bool(((got - ref).abs() <= tol * bound + 1e-300).all())
                ):
                    reason = f"its forward ({type(m).__qualname__}.forward) is not the layer's affine map x W^T + b"
        if reason is None:
            acc.unverified = False
            return True
        if self.params is not None and not isinstance(self.params, str):
            raise UnsupportedError(f"KFAC: {acc.name}: {reason}; its factors would not be its Fisher's. Drop it from params")
        acc.dropped = f"{type(m).__name__} {acc.name}: {reason}"
        log.warning("KFAC: %s; the layer is left out (recorded in KFACFisher.uncovered)", acc.dropped)
        return False

    @staticmethod
    def _input_moment(x, acc, ctx, compute, acc_dtype, chunk_elems: int = _CHUNK_ELEMS) -> tuple[torch.Tensor, int]:
        """``Σ ã ãᵀ`` over the counted rows of a layer input (tokens for expand, per-sample means
        for reduce) and the number of rows; temporaries in chunks of ``chunk_elems`` elements."""
        xt, pos = _per_token(x, ctx, f"the input of {acc.name}")
        d = xt.shape[-1]
        if acc.form == "expand" or xt.shape[1] == 1:
            full = ctx.all_real and bool(ctx.valid.all()) and pos.shape[1] == xt.shape[1]
            flat = xt.reshape(-1, d)
            mask = None if full else pos.reshape(-1)
            aa = _second_moment(flat, None, False, mask=mask, compute=compute, chunk_elems=chunk_elems).to(acc_dtype)
            n_rows = flat.shape[0] if mask is None else int(mask.sum())
            col = None
            if acc.bias is not None:
                ones = torch.ones(1, flat.shape[0], dtype=compute, device=flat.device) if mask is None else mask.to(compute).unsqueeze(0)
                col = _chunked_matmul(ones, flat, compute, chunk_elems).squeeze(0).to(acc_dtype)
        else:
            R = pos.sum(1).clamp(min=1).to(compute)
            rows = (_masked_sums(xt, pos, compute, chunk_elems) / R.unsqueeze(1))[ctx.valid]
            aa = _second_moment(rows, None, False, chunk_elems=chunk_elems).to(acc_dtype)
            n_rows = int(rows.shape[0])
            col = rows.sum(0).to(acc_dtype) if acc.bias is not None else None
        if col is not None:  # ã = [a, 1]: [[Σ aaᵀ, Σ a], [Σ aᵀ, n]] without copying a
            corner = torch.tensor([[float(n_rows)]], dtype=acc_dtype, device=col.device)
            aa = torch.cat([torch.cat([aa, col.unsqueeze(1)], 1), torch.cat([col.unsqueeze(0), corner], 1)], 0)
        return aa, n_rows

    def _prepare(self, batch, bi, device, task_type, V) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise InvalidInputError(f"batch {bi} must be a mapping with 'input_ids' (got {type(batch).__name__})")
        out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        ids = out["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
            raise InvalidInputError(f"batch {bi}: input_ids must be a non-empty integer tensor [batch, seq_len]")
        mask = out.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
            raise InvalidInputError(f"batch {bi}: attention_mask must have the shape of input_ids {tuple(ids.shape)}")
        labels = out.get("labels")
        if labels is not None and task_type != "sequence_classification" and (
            not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(ids.shape)
        ):
            raise InvalidInputError(f"batch {bi}: labels must have the shape of input_ids {tuple(ids.shape)} (-100 = ignored)")
        if labels is not None and V is not None:
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise InvalidInputError(f"batch {bi}: a label id is outside the model's {V} outputs; use -100 for tokens that must not count")
        return out

    def _backward(self, logits, targets, outputs, ctx, base_weight, gen) -> None:
        """The backward pass(es) of one batch; the G hooks accumulate (see the module docstring).

        ``targets`` [rows] are aligned with ``logits`` viewed as [rows, V] (-100: no label)."""
        V = logits.shape[-1]
        z = logits.reshape(-1, V)
        if z.grad_fn is None:
            raise InvalidInputError("KFAC: the logits do not depend on any collected parameter (nothing requires grad)")
        bottoms = [outputs[i].edge for i in bottom_outputs(outputs, z)]
        keep = targets != IGNORE_INDEX
        ctx.in_backward = True

        def back(root, grad, retain):
            torch.autograd.grad([root], bottoms, grad_outputs=[grad], retain_graph=retain, allow_unused=True)

        def finite(t):
            ctx.settle(bool(torch.isfinite(t).all()), NonFiniteError(
                "KFAC: the loss or the logits at label positions are not finite; check the model's weights and dtype"
            ), "the loss's finiteness check")

        try:
            if not bool(ctx.valid.any()):
                # FSDP2, a rank whose batch counts no sample: the other ranks' number of backward passes
                # (each a collective), from a zero gradient: every product adds zero (its rows are masked)
                ctx.settle(True, None, "the loss's finiteness check")
                passes = {"empirical": 1, "mc": self.mc_samples}.get(self.fisher_type, V)
                zero = torch.zeros_like(z)
                for m in range(passes):
                    back(z, zero, m < passes - 1)
            elif self.fisher_type == "empirical":
                loss = F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="sum")
                finite(loss.detach())
                back(loss, None, False)
            elif self.fisher_type == "mc":
                probs = torch.softmax(z.detach()[keep].to(torch.float64), dim=-1).cpu()
                finite(probs)
                ctx.weight = base_weight / self.mc_samples
                for m in range(self.mc_samples):
                    y = torch.full_like(targets, IGNORE_INDEX)
                    y[keep] = probs.multinomial(num_samples=1, generator=gen).squeeze(-1).to(y.device)
                    loss = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")
                    back(loss, None, m < self.mc_samples - 1)
            else:
                p = torch.softmax(z.detach()[keep].to(torch.float64), dim=-1)
                finite(p)
                sq = p.sqrt()
                for c in range(V):
                    col = -sq[:, c : c + 1] * p
                    col[:, c] += sq[:, c]
                    full = torch.zeros_like(z)
                    full[keep] = col.to(z.dtype)
                    back(z, full, c < V - 1)
        finally:
            ctx.in_backward = False
            ctx.weight = base_weight

    def _artifact(self, model, layers, uncovered, samples, tokens, skipped, task, task_type, model_name_or_path,
                  data_description, loop_reason=None) -> KFACFisher:
        out: dict[str, KFACLayer] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        uncovered = dict(uncovered)
        params = dict(model.named_parameters())
        for name, acc in layers.items():
            if acc.dropped is not None or ((acc.A is None or acc.G is None or acc.a_count == 0) and self.params is None):
                why = acc.dropped or (
                    f"layer {name} is never called in the forward (a weight used outside its module's forward, e.g. "
                    "Mamba's dt_proj, cannot be Kronecker-factored here)" if acc.A is None or acc.a_count == 0
                    else f"the output of layer {name} does not reach the loss (no output gradient)"
                )
                for p in (acc.weight, acc.bias):
                    if p is not None:
                        uncovered[p] = why
                continue
            if acc.A is None or acc.G is None or acc.a_count == 0:
                raise InvalidInputError(
                    f"KFAC: layer {name} received no {'input' if acc.A is None else 'output gradient'} during the "
                    "collection (it does not reach the loss); exclude it with params="
                )
            A = acc.A.div_(acc.a_count)
            G = acc.G.div_(samples)
            # a NaN or Inf entry makes the sum NaN or Inf (one reduction instead of an elementwise pass)
            if not (math.isfinite(float(A.sum())) and math.isfinite(float(G.sum()))):
                raise NonFiniteError(f"KFAC: the factors of {name} are not finite; check the model's weights and dtype")
            out[name] = KFACLayer(acc.kind, acc.weight, acc.bias, A, G, a_diagonal=acc.kind == "embedding", g_diagonal=acc.g_diag)
            shapes[acc.weight] = tuple(params[acc.weight].shape)
            if acc.bias is not None:
                shapes[acc.bias] = tuple(params[acc.bias].shape)
        partly = sorted(set(uncovered) & set(shapes))
        if partly:
            raise UnsupportedError(
                f"KFAC: {partly[0]} is used by a factored layer and by a layer left out ({uncovered[partly[0]]}); its "
                "factors would miss a use. Exclude it with params="
            )
        if uncovered:
            # Norm scales and other vector parameters are outside KFAC by design (INFO); a matrix left out
            # (a fused MoE expert, a layer that failed the affine check) changes what the KFAC means (WARNING).
            matrices = sorted(p for p in uncovered if p in params and params[p].dim() >= 2)
            first = matrices[0] if matrices else sorted(uncovered)[0]
            log.log(
                logging.WARNING if matrices else logging.INFO,
                "KFAC covers %d of the %d selected parameters; %d are not in a Kronecker-factored layer and are left out, recorded in KFACFisher.uncovered "
                "(to_diagonal(), matvec and inverse_vp do not cover them; select the covered layers with params= to "
                "leave nothing out): %s%s, e.g. %s: %s", len(shapes), len(shapes) + len(uncovered), len(uncovered),
                ", ".join(sorted(uncovered)[:5]), f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else "",
                first, uncovered[first],
            )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        settings = {
            "fisher_type": self.fisher_type,
            "kfac_approx": self.kfac_approx,
            "mc_samples": self.mc_samples if self.fisher_type == "mc" else None,
            "seed": self.seed if self.fisher_type == "mc" else None,
            "diagonal_g_above": self.diagonal_g_above,
        }
        meta = FisherMetadata(
            task=task,
            estimator="kfac",
            reduction="param",
            normalization=self.normalization,
            model_name_or_path=model_name_or_path or getattr(config, "_name_or_path", None) or None,
            revision=getattr(config, "_commit_hash", None),
            model_type=getattr(config, "model_type", None),
            mode="train" if self.train_mode else "eval",
            accumulation_dtype=str(self.accumulation_dtype).removeprefix("torch."),
            storage_dtype=str(self.accumulation_dtype).removeprefix("torch."),
            data_description=data_description,
            extra={"task_type": task_type, "kfac": dict(settings), **({"loop_reason": loop_reason} if loop_reason else {})},
        )
        return KFACFisher(out, param_shapes=shapes, counts=Counts(samples, tokens, skipped), metadata=meta, settings=settings,
                          uncovered=uncovered)


def _targets(labels: torch.Tensor, task_type: str, logits: torch.Tensor) -> torch.Tensor:
    """The label of every row of ``logits`` viewed as [rows, V] (-100 where none counts): shifted
    by one for a causal LM (position t predicts token t + 1); one per sample for a classifier."""
    if task_type == "sequence_classification":
        return labels.reshape(-1)
    if task_type == "causal_lm":
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels.reshape(-1)


@hookimpl
def hf_fisher_register_estimators(register):
    register("kfac", KFACEstimator)


def _merge_ranks(layers: dict[str, _Acc], samples: int, tokens: int, skipped: int, loop_reason: str | None,
                 dtype: torch.dtype, device: torch.device):
    """Sum every layer's factor sums ``A = Σ x xᵀ``, ``G = Σ g gᵀ``, its row count and the sample,
    token and skip counters over the ranks, in place: the state of one process that saw every
    rank's batches (``A / rows`` and ``G / samples`` are then the factors of all the data). A
    layer one rank left out (or never saw) is left out on every rank; a rank without a factor
    another has adds zeros. Returns the summed counters and the loop reason (any rank's)."""
    names = sorted(layers)
    # per layer: left out, a_count, then the shapes of A and G (up to 2 dims each, -1 = none)
    local = []
    for n in names:
        a = layers[n]
        shape = []
        for t in (a.A, a.G):
            shape += [*t.shape, -1, -1][:2] if t is not None else [-2, -2]
        local.append([int(a.dropped is not None), a.a_count, *shape])
    flat = [samples, tokens, skipped, int(loop_reason is not None)] + [v for row in local for v in row]
    every = [x.tolist() for x in all_gather_tensor(torch.tensor(flat, dtype=torch.int64))]
    samples, tokens, skipped = (sum(r[i] for r in every) for i in range(3))
    if loop_reason is None and any(r[3] for r in every):
        loop_reason = "another rank processed padded batches one sample at a time (its warning says why)"
    width = 6
    for j, n in enumerate(names):
        a = layers[n]
        rows = [r[4 + j * width: 4 + (j + 1) * width] for r in every]
        if any(r[0] for r in rows):
            if a.dropped is None:
                a.dropped = f"layer {n} was left out on another rank (its warning says why)"
            a.A = a.G = None
            continue
        a.a_count = sum(r[1] for r in rows)
        for k, attr in enumerate(("A", "G")):
            dims = [tuple(d for d in r[2 + 2 * k: 4 + 2 * k] if d >= 0) for r in rows if r[2 + 2 * k] != -2]
            if not dims:
                continue
            if len(set(dims)) != 1:
                raise DistributedMismatchError(f"KFAC: the ranks' {attr} factors of layer {n} differ in shape ({sorted(set(dims))})")
            t = getattr(a, attr)
            if t is None:
                t = torch.zeros(dims[0], dtype=dtype, device=device)
                setattr(a, attr, t)
            all_reduce_sum(t)
    return samples, tokens, skipped, loop_reason
