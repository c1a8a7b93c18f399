"""Curvature-vector products of the empirical Fisher and of the GGN (true Fisher), matrix-free.

Two curvature matrices over the selected trainable parameters θ ∈ R^P and the N used samples
(samples with at least one label token), with the per-sample loss l_i of the normalisation in use
(``"mean"`` default: l_i = S_i / n_i, S_i the summed cross-entropy over the n_i label tokens of
sample i; see :mod:`hf_fisher.engine.losses`):

- **empirical Fisher** (``curvature="empirical"``)::

      F = (1/N) Σ_i g_i g_iᵀ,        g_i = d l_i / dθ,        F v = (1/N) Σ_i g_i (g_iᵀ v)

  Its diagonal is exactly the core's empirical diagonal Fisher (``hf_fisher.collect``, same
  normalisation). The signed per-sample gradients g_i come from the core engine
  (:class:`~hf_fisher.engine.per_sample.PerSampleEngine`, one batched forward/backward per
  batch, with its exactness checks) through a gradient sink, and are kept as an N x P float64
  matrix G; then ``F v = Gᵀ (G v) / N`` costs two matrix products. Where G would not fit in
  ``max_memory_mb`` the operator is matrix-free instead: per batch, ``u = J_l v`` by forward-mode
  AD (``torch.func.jvp`` of the per-sample losses l = (l_1..l_B)) and ``F v += J_lᵀ u / N`` by
  ``torch.func.vjp`` (block spectra need G and are then refused).

- **GGN = true Fisher** (``curvature="ggn"``)::

      G = (1/N) Σ_i c_i Σ_{t ∈ L_i} J_itᵀ H_it J_it,      H_it = diag(p_it) − p_it p_itᵀ

  with z_it the logits that predict label position t of sample i (causal LM: position t − 1),
  J_it = dz_it/dθ, p_it = softmax(z_it) and H_it the Hessian of the cross-entropy with respect
  to the logits (the same for every label, so no label enters: padding and -100 positions are
  masked out). ``G v`` is ``torch.func.jvp`` of the logits (J v), H applied analytically per
  position, then ``torch.func.vjp`` (Jᵀ ·): no double backward and no sampled labels.

  **Scale.** ``c_i = (w_i s_i)²`` with ``(w_i, s_i) = normalization_weights(n_i)``: 1/n_i² for
  "mean", 1 for "sum", 1/n_i for "token". With it G is *exactly* the expectation that the core's
  true Fisher estimator samples, ``G = (1/N) Σ_i E_{y ~ p_θ}[g_i(y) g_i(y)ᵀ]`` (label positions
  drawn independently; cross terms vanish since E[p − e_y] = 0), so ``diag(G)`` is the
  ``estimator="true"`` Fisher in the limit of infinitely many draws, and the GGN and the
  empirical Fisher are on the same scale. (The Gauss-Newton matrix of the *objective*
  (1/N) Σ_i l_i would instead weight sample i by w_i, i.e. 1/n_i for "mean": n_i times larger.)

Here: :class:`EmpiricalFisherOperator` (``F v``) and :class:`GGNOperator` (``G v``) over a
:class:`_Problem` (model, selected parameters, prepared batches), each a symmetric P x P operator on
float64 vectors with a scipy ``LinearOperator`` view, and :func:`block_definitions` (the flat
coordinates of layer and head blocks from the architecture adapter's layout). The spectrum
consumer (:mod:`hf_fisher.consumers.spectrum`) measures eigenvalues, traces, densities and
capacity metrics with them. These are not entries of the estimator registry: that registry's
entries return a diagonal :class:`~hf_fisher.Fisher` artifact, these return products.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import plugins
from ..engine.losses import (
    IGNORE_INDEX,
    NORMALIZATIONS,
    label_counts,
    normalization_weights,
    task_type_of,
    token_labels,
)
from ..engine.per_sample import ContributionSink, PerSampleEngine, Target
from ..errors import (
    EmptyDataError,
    InvalidInputError,
    NonFiniteError,
    NoTrainableParametersError,
    UnsupportedError,
)

__all__ = [
    "BLOCK_KINDS",
    "CURVATURES",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "block_definitions",
]

log = logging.getLogger(__name__)

CURVATURES = ("empirical", "ggn")
BLOCK_KINDS = ("layer", "head", "head_qkvo")


# ============================================================================================
# the problem: model, parameters, prepared batches


class _GradientSink(ContributionSink):
    """Keeps the engine's signed per-sample gradients g_i of one batch (``reduction="param"``)."""

    accepts_gradients = True

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.squared: set[str] = set()

    def reset(self) -> None:
        self.rows = {}
        self.squared = set()

    def add(self, name: str, contributions: torch.Tensor) -> None:
        # the engine hands squares here on its per-sample path, zeros for a parameter without
        # parts: only the latter are usable as signed gradients
        if bool((contributions != 0).any()):
            self.squared.add(name)
        self.rows.setdefault(name, []).append(contributions.to(torch.float64))

    def add_gradients(self, name: str, gradients: torch.Tensor, *, owned: bool = False) -> list[int]:
        flat = gradients.reshape(gradients.shape[0], -1)
        if not bool(torch.isfinite(flat.sum())):
            return (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
        self.rows.setdefault(name, []).append(gradients.detach().to(torch.float64).clone())
        return []

    def commit(self, accumulators) -> None:  # pragma: no cover - never called: we read rows directly
        pass


@dataclass
class _Prepared:
    batch: dict[str, torch.Tensor]
    inputs: dict[str, Any]
    n_tokens: torch.Tensor      # [B] label tokens per sample
    used: torch.Tensor          # [B] bool: sample has label tokens
    label_mask: torch.Tensor    # [B, T] (or [B, 1]) bool: logit positions with a label
    w: torch.Tensor             # backward weight per sample
    s: torch.Tensor             # contribution scale per sample
    split: bool = False         # products taken sample by sample (see _Operator._functional_matvec)
    parts: list[_Prepared] | None = None


class _Problem:
    """Model, selected parameters and prepared batches shared by the curvature operators."""

    def __init__(self, model, batches, *, params, normalization: str, task_type: str | None):
        from ..collection.collector import select_parameters

        if normalization not in NORMALIZATIONS:
            raise InvalidInputError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
        named = select_parameters(model, params)
        if not named:
            raise NoTrainableParametersError(
                f"{type(model).__name__} has no trainable parameter (requires_grad=True); unfreeze the parameters "
                "whose spectrum you want"
            )
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self.numel = [int(p.numel()) for p in self.params]
        self.offsets = {}
        off = 0
        for n, k in zip(self.names, self.numel):
            self.offsets[n] = off
            off += k
        self.dim = off
        self.normalization = normalization
        self.restore_attn: str | None = None  # attention implementation to restore (see _forward_ad)
        self.task_type = task_type or task_type_of(model)
        self.problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        self.engine = PerSampleEngine(
            model, [Target(n, p, None) for n, p in named], plugins.grad_rules(),
            task_type=self.task_type, normalization=normalization, on_nonfinite="raise",
        )
        self.device = self.engine.device
        self.param_dtype = self.params[0].dtype
        if batches is None:
            raise EmptyDataError("batches is None: pass an iterable of batch dicts with input_ids")
        self.batches: list[_Prepared] = []
        for i, b in enumerate(batches):
            self.batches.append(self._prepare(b, i))
        if not self.batches:
            raise EmptyDataError("no batches: pass at least one batch with input_ids")
        self.n_samples = int(sum(int(b.used.sum()) for b in self.batches))
        if self.n_samples == 0:
            raise EmptyDataError("no sample has a label token (all labels are -100 or padded); nothing to measure")

    def _prepare(self, batch: Mapping[str, Any], index: int) -> _Prepared:
        return self._prepared(self.engine.prepare(batch, index), alone=False)

    def split_parts(self, prep: _Prepared) -> list[_Prepared]:
        """The used samples of a batch, each alone without its padding (the engine's reference)."""
        from ..engine.per_sample import alone

        if prep.parts is None:
            idx = prep.used.nonzero().flatten().tolist()
            prep.parts = [self._prepared(alone(prep.batch, i), alone=True) for i in idx]
        return prep.parts

    def _prepared(self, b: dict[str, torch.Tensor], *, alone: bool) -> _Prepared:
        n = label_counts(b, self.task_type).to(self.device)
        w, s = normalization_weights(n, self.normalization, torch.float64)
        labels = token_labels(b, self.task_type)
        B = labels.shape[0]
        if self.task_type == "causal_lm":
            mask = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
        elif self.task_type == "masked_lm":
            mask = labels != IGNORE_INDEX
        else:
            mask = (n > 0).view(B, 1)
        return _Prepared(b, self.engine.model_inputs(b, alone=alone), n, n > 0, mask.to(self.device), w.to(self.device), s.to(self.device))

    # ---------------------------------------------------------------- flat <-> dict
    def unflatten(self, v: np.ndarray | torch.Tensor, dtype=None) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(v, dtype=torch.float64)
        out = {}
        for n, p, k in zip(self.names, self.params, self.numel):
            o = self.offsets[n]
            out[n] = t[o : o + k].view(p.shape).to(device=self.device, dtype=dtype or p.dtype)
        return out

    def flatten(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.reshape(-1).to(torch.float64).cpu() for t in tensors]).numpy()

    # ---------------------------------------------------------------- functional pieces
    def _call(self, pdict: dict[str, torch.Tensor], prep: _Prepared):
        return torch.func.functional_call(self.model, pdict, (), prep.inputs, strict=False)

    def logits_fn(self, prep: _Prepared):
        def f(*flat):
            out = self._call(dict(zip(self.names, flat)), prep)
            z = out.logits if hasattr(out, "logits") else out[0]
            return z
        return f

    def losses_fn(self, prep: _Prepared):
        """``θ -> l`` [B]: l_i = s_i w_i S_i, whose gradient is the engine's g_i."""
        def f(*flat):
            out = self._call(dict(zip(self.names, flat)), prep)
            losses = self.engine.sample_losses(out, prep.batch)
            return losses.loss_sum * (prep.w * prep.s).to(losses.loss_sum.dtype)
        return f

    def primals(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach() for p in self.params)

    # ---------------------------------------------------------------- per-sample gradients
    def gradient_matrix(self) -> torch.Tensor:
        """G [N, P] (float64, CPU): row i is g_i of the i-th used sample (batches in order)."""
        rows = []
        for bi, prep in enumerate(self.batches):
            sink = _GradientSink()
            report = self.engine.process(prep.batch, sink, batch_index=bi)
            used = report.used_index
            if sink.squared or self.engine.loop_mode:
                # the engine's per-sample path hands squares: take signed gradients sample by sample
                per = [self._gradient_alone(prep, i, bi) for i in used]
                rows.append(torch.stack(per) if per else torch.zeros((0, self.dim), dtype=torch.float64))
                continue
            cols = []
            for n, k in zip(self.names, self.numel):
                parts = sink.rows.get(n)
                t = torch.cat(parts) if parts else torch.zeros((len(used), k), dtype=torch.float64)
                cols.append(t.reshape(t.shape[0], -1).cpu())
            rows.append(torch.cat(cols, dim=1))
        G = torch.cat(rows)
        if G.shape[0] != self.n_samples:
            raise NonFiniteError(f"expected {self.n_samples} per-sample gradients, the engine gave {G.shape[0]}")
        return G

    def _gradient_alone(self, prep: _Prepared, i: int, batch_index: int) -> torch.Tensor:
        grads = self.engine.gradient_alone(prep.batch, i)
        if grads is None:
            raise NonFiniteError(f"sample {i} of batch {batch_index} has a non-finite loss")
        return torch.cat([grads[id(p)].reshape(-1).to(torch.float64).cpu() for p in self.params])


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _forward_ad(fn, primals, tangents, problem: _Problem):
    """``torch.func.jvp``; a model whose attention kernel has no forward-mode derivative (PyTorch's
    CPU flash SDPA) is switched to the numerically equivalent "eager" attention for the call."""
    try:
        return torch.func.jvp(fn, primals, tangents)
    except (NotImplementedError, RuntimeError) as e:
        if "forward AD" not in str(e) and "forward-mode" not in str(e):
            raise
        model = problem.model
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl == "eager" or not hasattr(model, "set_attn_implementation"):
            raise UnsupportedError(
                f"forward-mode AD (needed for curvature-vector products) is not implemented for an operation of "
                f"this model: {str(e).splitlines()[0]}. Load the model with attn_implementation='eager'"
            ) from e
        log.info("hf_fisher: attention %r has no forward-mode AD; using 'eager' attention for the products", impl)
        model.set_attn_implementation("eager")
        problem.restore_attn = impl
        return torch.func.jvp(fn, primals, tangents)


# ============================================================================================
# operators


def _linear_operator_base():
    from scipy.sparse.linalg import LinearOperator

    return LinearOperator


class _Operator:
    """A symmetric P x P curvature operator on float64 numpy vectors (``matvec``), with a
    count of products and their time; :meth:`scipy` wraps it as a scipy ``LinearOperator``."""

    def __init__(self, problem: _Problem, *, retain_graphs: bool = False):
        self.problem = problem
        self.dim = problem.dim
        self.matvecs = 0
        self.seconds = 0.0
        self.retain_graphs = bool(retain_graphs)
        self._backs: dict[int, Any] = {}

    def _vjp(self, prep: _Prepared, fn):
        """The vjp closure of ``fn`` at θ: recomputed per product (one forward), or, with
        ``retain_graphs``, built once per batch and kept (no forward per product; memory: every
        batch's activations, as many training steps' worth)."""
        if not self.retain_graphs:
            return torch.func.vjp(fn, *self.problem.primals())[1]
        back = self._backs.get(id(prep))
        if back is None:
            back = self._backs[id(prep)] = torch.func.vjp(fn, *self.problem.primals())[1]
        return back

    def matvec(self, v: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self._matvec(np.asarray(v, dtype=np.float64).ravel())
        self.seconds += time.perf_counter() - t0
        self.matvecs += 1
        if not np.isfinite(out).all():
            raise NonFiniteError("a curvature-vector product is not finite; check the model's weights and dtype")
        return out

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _product(self, prep: _Prepared, tangents: tuple) -> tuple[torch.Tensor, ...]:
        """One batch's share of the product (already divided by N), per parameter."""
        raise NotImplementedError

    def _functional_matvec(self, v: np.ndarray) -> np.ndarray:
        """Σ over batches of :meth:`_product`. A batch whose product is not finite (a model giving
        NaN at padded positions, e.g. fully masked attention rows) is done sample by sample from
        then on, each sample alone without its padding, as the engine does."""
        pr = self.problem
        tang = tuple(pr.unflatten(v).values())
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in pr.params]
        for bi, prep in enumerate(pr.batches):
            grads = None
            if not prep.split:
                grads = self._product(prep, tang)
                if not all(bool(torch.isfinite(g).all()) for g in grads):
                    prep.split = True
                    grads = None
                    self._backs.pop(id(prep), None)
                    log.warning(
                        "hf_fisher spectrum: batch %d gives a non-finite curvature-vector product in one pass (NaN at "
                        "padded positions?); its products are taken sample by sample, each without padding", bi,
                    )
            if grads is None:
                for part in pr.split_parts(prep):
                    for a, g in zip(acc, self._product(part, tang)):
                        a.add_(g.to(torch.float64))
                continue
            for a, g in zip(acc, grads):
                a.add_(g.to(torch.float64))
        return pr.flatten(acc)

    def scipy(self):
        LinearOperator = _linear_operator_base()
        return LinearOperator((self.dim, self.dim), matvec=self.matvec, rmatvec=self.matvec, dtype=np.float64)


class EmpiricalFisherOperator(_Operator):
    """``F v = (1/N) Σ_i g_i (g_iᵀ v)`` (module docstring). ``G`` given: ``Gᵀ (G v) / N`` from the
    engine's per-sample gradients; ``G=None``: matrix-free, ``J_lᵀ (J_l v) / N`` per batch by
    ``torch.func.jvp`` / ``vjp`` of the per-sample losses."""

    def __init__(self, problem: _Problem, G: torch.Tensor | None = None, *, retain_graphs: bool = False):
        super().__init__(problem, retain_graphs=retain_graphs)
        self.G = G

    def _matvec(self, v):
        N = self.problem.n_samples
        if self.G is not None:
            t = torch.from_numpy(v)
            return (self.G.T @ (self.G @ t)).div_(N).numpy()
        return self._functional_matvec(v)

    def _product(self, prep, tang):
        pr = self.problem
        fn = pr.losses_fn(prep)
        _, jv = _forward_ad(fn, pr.primals(), tang, pr)
        back = self._vjp(prep, fn)
        jv = torch.where(prep.used, jv.detach(), torch.zeros((), dtype=jv.dtype))
        return back((jv / pr.n_samples).to(jv.dtype))


class GGNOperator(_Operator):
    """``G v = (1/N) Σ_i c_i Σ_t J_itᵀ H_it J_it v`` (module docstring; H_it = diag(p) − ppᵀ)."""

    def __init__(self, problem: _Problem, *, retain_graphs: bool = False):
        super().__init__(problem, retain_graphs=retain_graphs)
        if problem.task_type == "sequence_classification" and problem.problem_type in ("regression", "multi_label_classification"):
            raise UnsupportedError(
                f"the GGN here is that of a softmax cross-entropy; this head's problem_type is {problem.problem_type!r}. "
                "Use curvature='empirical'"
            )

    def _matvec(self, v):
        return self._functional_matvec(v)

    def _product(self, prep, tang):
        pr = self.problem
        N = pr.n_samples
        fn = pr.logits_fn(prep)
        z, jz = _forward_ad(fn, pr.primals(), tang, pr)
        shape = z.shape
        B = shape[0]
        z64 = z.detach().to(torch.float64).reshape(B, -1, shape[-1])
        u = jz.detach().to(torch.float64).reshape(B, -1, shape[-1])
        keep = prep.label_mask.reshape(B, -1, 1)
        # positions without a label (padding, -100) are cut out with where, not a product:
        # a model may give NaN logits (or tangents) at padded positions
        z64 = torch.where(keep, z64, torch.zeros((), dtype=z64.dtype))
        u = torch.where(keep, u, torch.zeros((), dtype=u.dtype))
        p = torch.softmax(z64, dim=-1)
        hu = p * u - p * (p * u).sum(-1, keepdim=True)
        c = (prep.w * prep.s) ** 2 / N
        hu = torch.where(keep, hu * c.view(B, 1, 1), torch.zeros((), dtype=hu.dtype))
        return self._vjp(prep, fn)(hu.reshape(shape).to(z.dtype))


# ============================================================================================
# blocks


def _block_index(problem: _Problem, slices) -> torch.Tensor:
    """Flat coordinates (into θ) of a union of layout slices / whole parameters."""
    idx = []
    for item in slices:
        if isinstance(item, str):
            o = problem.offsets[item]
            idx.append(torch.arange(o, o + int(np.prod(problem.shapes[item], dtype=np.int64))))
            continue
        if item.param not in problem.offsets:
            continue
        shape = problem.shapes[item.param]
        grid = torch.arange(int(np.prod(shape, dtype=np.int64))).view(shape)
        idx.append(grid[item.index()].reshape(-1) + problem.offsets[item.param])
    if not idx:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat(idx))


def block_definitions(problem: _Problem, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Block name -> flat coordinates, from the architecture adapter's layout.

    - ``"layer"``: ``layer{l}`` = every selected parameter of layer l (``ModelLayout.layer``),
      ``other`` = the rest (embeddings, final norm, head), when any;
    - ``"head"``: ``layer{l}.head{h}`` = head h's Q rows, its kv-head's K and V rows and its O
      columns (heads of one kv group share their K/V coordinates);
    - ``"head_qkvo"``: ``layer{l}.head{h}.q`` / ``.o`` and ``layer{l}.kv_head{g}.k`` / ``.v``.
    """
    bad = [k for k in kinds if k not in BLOCK_KINDS]
    if bad:
        raise InvalidInputError(f"unknown block kind(s) {bad}; choose from {BLOCK_KINDS}")
    layout = plugins.model_layout(problem.model)
    out: dict[str, torch.Tensor] = {}
    if "layer" in kinds:
        by_layer: dict[int | None, list[str]] = {}
        for n in problem.names:
            by_layer.setdefault(layout.layer(n), []).append(n)
        for l in sorted(k for k in by_layer if k is not None):
            out[f"layer{l}"] = _block_index(problem, by_layer[l])
        if None in by_layer:
            out["other"] = _block_index(problem, by_layer[None])
    if "head" in kinds or "head_qkvo" in kinds:
        for h in layout.heads():
            if "head" in kinds:
                ix = _block_index(problem, (*h.q, *h.k, *h.v, *h.o))
                if ix.numel():
                    out[f"layer{h.layer}.head{h.head}"] = ix
            if "head_qkvo" in kinds:
                for role, label in (("q", f"head{h.head}.q"), ("k", f"kv_head{h.kv_head}.k"), ("v", f"kv_head{h.kv_head}.v"), ("o", f"head{h.head}.o")):
                    ix = _block_index(problem, getattr(h, role))
                    if ix.numel():
                        out[f"layer{h.layer}.{label}"] = ix
    return out

