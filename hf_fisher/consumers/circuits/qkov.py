"""QK-OV interference: how much sample ``i`` of task A and sample ``j`` of task B compete for
the parameters of one attention head's Q, K, V or O block (built-in consumer).

Definitions
-----------
``g_i`` is the exact signed per-sample gradient of sample ``i`` (from
:func:`hf_fisher.collection.gradients.store_gradients`: the batched per-sample engine, loss
= the sample's mean token loss), ``C_i = g_i ⊙ g_i`` its contribution, and ``I`` the diagonal
empirical Fisher, elementwise::

    I_k = mean_{s ∈ P} C_{s,k}      P = A's samples (fisher_from="a"), B's ("b"), or both ("both")

or the ``fisher[name]`` of a given :class:`~hf_fisher.Fisher` artifact (``reduction="param"``).

For layer ``l``, query head ``h`` and block ``b ∈ {Q, K, V, O}`` the slice ``S = S(l, h, b)`` is
taken from the model layout's :class:`~hf_fisher.layout.HeadSlices`: Q = the head's query rows
(and their bias entries), K / V = the rows of the key / value head the query head reads
(``kv_head = h // (H / H_kv)``: under GQA/MQA several query heads share one K/V slice), O = the
head's input columns of the output projection (the output bias belongs to no head). GPT-2's fused
``c_attn`` is handled by the layout: Q, K and V are column blocks at offsets 0, d and 2d.

With ``λ`` the ridge of the slice and ``k`` running over the elements of ``S``::

    unsigned   M_ij = Σ_k C_ik / (I_k + λ) · |g_jk|                       (default; asymmetric)
    signed     M_ij = Σ_k g_ik g_jk / (I_k + λ)                           (> 0 synergy, < 0 conflict)
    symmetric  M_ij = Σ_k sqrt(C_ik C_jk) / (I_k + λ) = Σ_k |g_ik||g_jk| / (I_k + λ)
    natural    M_ij = Σ_k C_ik / (I_k + λ) · |g_jk| / sqrt(I_k + λ)       (g_j natural-gradient normalised)

and ``aggregate="mean"`` divides by ``|S|`` (the number of elements of the slice), ``"sum"``
does not. The ridge is absolute, ``λ = ridge``, or relative when ``ridge_rel`` is given:
``λ = max(ridge_min, ridge_rel · median_{k ∈ S} I_k)`` (the lower median, ``torch.median``;
one λ per slice, recorded in :attr:`QKOVResult.diagnostics`). An element with ``I_k + λ = 0`` (possible only with a zero
ridge) contributes 0 and is counted in the diagnostics (``zero_denominator``).

Scaling: multiplying every gradient by ``a`` (e.g. scaling the loss) multiplies ``C`` and ``I``
by ``a²``. With a relative ridge (λ scales with I, as long as ``ridge_min`` is not the one
applied) "unsigned" then scales by ``a`` (degree 2 - 2 + 1), while "signed" and "symmetric"
(degree 1 + 1 - 2) and "natural" (degree 2 - 2 + 1 - 1) are unchanged. With an absolute ridge
this holds only where ``λ << I``. Keep the loss normalisation fixed across tasks when comparing
"unsigned" scores, or use "natural".

Additivity (``aggregate="sum"``, absolute ridge, so that λ is the same for every slice): the
score is a sum over elements, so for every pair (i, j) and layer l

- Σ_h Q-score(l, h) equals the same formula evaluated on the union of the heads' Q slices, i.e.
  the whole Q block of the layer (``q_proj`` weight, and bias if any; GPT-2: columns 0:d of the
  ``c_attn`` weight and entries 0:d of its bias);
- Σ_h O-score(l, h) equals the score of the whole ``o_proj`` (``c_proj``) *weight* (an output
  bias belongs to no head and is in no slice);
- K and V add up over *kv-heads*: Σ_{kv} K-score(l, h(kv)) (one query head per kv-head, each
  kv slice counted once) equals the score of the whole ``k_proj`` (``v_proj``); summing over all
  query heads instead counts every kv slice ``H / H_kv`` times.

With a relative ridge the slices get different λ and the identity holds only approximately.

Computation: per (layer, slice) the score matrix is the product
``left [nA, |S|] @ right [nB, |S|]ᵀ`` in float64 on the CPU (unsigned: ``left = C_A / (I + λ)``,
``right = |g_B|``; signed: ``g_A / (I + λ)``, ``g_B``; symmetric: ``|g_A| / (I + λ)``,
``|g_B|``; natural: ``C_A / (I + λ)``, ``|g_B| / sqrt(I + λ)``), accumulated over chunks of
the slice's elements so that the float64 temporaries stay below ~64 MB whatever ``n`` and
``|S|``; a slice shared by several heads (GQA/MQA K/V) is computed once. Memory is bounded by
the two gradient stores (checked against ``memory_budget_mb`` before any work), one layer's
Fisher (float64, parameter-shaped), the chunk temporaries and the result ``[nA, nB, L, H, 4]``.

Empty task: when A or B has no sample with a label token (no batch, every label -100 or
padding, or an empty gradient store) :func:`qkov_interference` raises
:class:`~hf_fisher.errors.EmptyDataError` before any gradient is computed. (``empty`` stays in
the result and its JSON, always ``False`` for a computed result.)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_fisher.collection.gradients import (
    GradientStore,
    attention_params,
    require_samples,
    samples_that_fit,
    store_gradients,
)
from hf_fisher.consumers.plotting import integer_ticks
from hf_fisher.errors import EmptyDataError, InvalidInputError, ModelMismatchError
from hf_fisher.hookspecs import hookimpl

__all__ = ["AGGREGATES", "BLOCKS", "FISHER_FROM", "VARIANTS", "QKOVResult", "qkov_interference"]

logger = logging.getLogger(__name__)

BLOCKS = ("Q", "K", "V", "O")
VARIANTS = ("unsigned", "signed", "symmetric", "natural")
AGGREGATES = ("mean", "sum")
FISHER_FROM = ("a", "b", "both")
_CHUNK_BYTES = 64 * 2**20  # float64 temporaries of one chunk (A and B rows together)


class _FisherMismatchError(InvalidInputError, ModelMismatchError):
    """A Fisher artifact that does not belong to the model (both an input and a mismatch error)."""


# ----------------------------------------------------------------------------- result
@dataclass
class QKOVResult:
    """Scores ``scores[i, j, l, h, b]`` (float64) of sample ``i`` of A, ``j`` of B, layer
    ``layers[l]``, query head ``heads[h]``, block ``blocks[b]`` (Q, K, V, O); module docstring
    for the formulas. Entries of heads a layer does not have (layers with fewer heads) are NaN.

    ``diagnostics[(layer, head, block)]``: the Fisher over the slice (``I_min``, ``I_median``,
    ``I_max``), ``frac_below_ridge`` (fraction of elements with ``I_k < λ``), ``ridge`` (λ
    applied), ``ridge_mode`` ("absolute"/"relative"), ``numel`` (``|S|``) and
    ``zero_denominator`` (elements skipped because ``I_k + λ = 0``). K/V entries of query heads
    sharing a kv-head are copies of one computation. ``fisher_from`` is "fisher" when a Fisher
    artifact was given. ``kv_heads[(layer, head)]`` is the kv-head the query head reads.
    """

    scores: torch.Tensor
    layers: list[int]
    heads: list[int]
    blocks: tuple[str, ...] = BLOCKS
    variant: str = "unsigned"
    aggregate: str = "mean"
    fisher_from: str = "both"
    ridge: float = 1e-8
    ridge_rel: float | None = None
    ridge_min: float = 1e-12
    sample_ids_a: list[tuple[int, int]] = field(default_factory=list)
    sample_ids_b: list[tuple[int, int]] = field(default_factory=list)
    kv_heads: dict[tuple[int, int], int] = field(default_factory=dict)
    diagnostics: dict[tuple[int, int, str], dict[str, Any]] = field(default_factory=dict)
    top_k: int = 20
    empty: bool = False
    task_names: tuple[str, str] = ("task A", "task B")

    @property
    def num_samples_a(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_samples_b(self) -> int:
        return int(self.scores.shape[1])

    def heatmaps(self) -> dict[str, torch.Tensor]:
        """``{block: [L, H]}``: the mean score over all (i, j) pairs (zeros when there is no pair)."""
        out = {}
        for b, name in enumerate(self.blocks):
            s = self.scores[..., b]
            if s.shape[0] * s.shape[1] == 0:
                out[name] = torch.zeros(s.shape[2:], dtype=torch.float64)
            else:
                out[name] = s.mean(dim=(0, 1))
        return out

    def by_head(self) -> dict[tuple[int, int], float]:
        """``{(layer, head): mean score over pairs and the four blocks}`` (for aggregation by head
        category, e.g. induction vs previous-token heads)."""
        maps = torch.stack(list(self.heatmaps().values()), dim=-1).mean(-1)  # [L, H]
        out = {}
        for li, layer in enumerate(self.layers):
            for hi, head in enumerate(self.heads):
                v = float(maps[li, hi])
                if (layer, head) in self.kv_heads:
                    out[(layer, head)] = v
        return out

    def top(self, k: int | None = None, *, block: str | None = None, absolute: bool = False) -> list[dict[str, Any]]:
        """The ``k`` (default ``top_k``) largest entries (of ``block`` only, if given; by
        ``|score|`` with ``absolute=True``, e.g. for the signed variant's conflicts), largest first:
        dicts with ``sample_a`` / ``sample_b`` (``(batch, row)``), ``index_a`` / ``index_b``,
        ``layer``, ``head``, ``kv_head``, ``block``, ``score``."""
        k = self.top_k if k is None else int(k)
        if block is not None and block not in self.blocks:
            raise InvalidInputError(f"block must be one of {self.blocks}, got {block!r}")
        s = self.scores if block is None else self.scores[..., self.blocks.index(block)].unsqueeze(-1)
        flat = s.reshape(-1)
        if k <= 0 or flat.numel() == 0:
            return []
        key = flat.abs() if absolute else flat.clone()
        key[torch.isnan(key)] = -math.inf
        vals, idx = torch.topk(key, min(k, key.numel()))
        out = []
        shape = s.shape
        for v, flat_i in zip(vals.tolist(), idx.tolist()):
            if v == -math.inf:
                break
            i, rest = divmod(flat_i, shape[1] * shape[2] * shape[3] * shape[4])
            j, rest = divmod(rest, shape[2] * shape[3] * shape[4])
            li, rest = divmod(rest, shape[3] * shape[4])
            hi, bi = divmod(rest, shape[4])
            layer, head = self.layers[li], self.heads[hi]
            out.append({
                "sample_a": tuple(self.sample_ids_a[i]) if i < len(self.sample_ids_a) else (None, i),
                "sample_b": tuple(self.sample_ids_b[j]) if j < len(self.sample_ids_b) else (None, j),
                "index_a": i,
                "index_b": j,
                "layer": layer,
                "head": head,
                "kv_head": self.kv_heads.get((layer, head)),
                "block": block if block is not None else self.blocks[bi],
                "score": float(flat[flat_i]),
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-pair tensor, JSON-ready (NaN -> None)."""

        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, list):
                return [clean(y) for y in x]
            return x

        return {
            "variant": self.variant,
            "aggregate": self.aggregate,
            "fisher_from": self.fisher_from,
            "ridge": self.ridge,
            "ridge_rel": self.ridge_rel,
            "ridge_min": self.ridge_min,
            "empty": self.empty,
            "task_names": list(self.task_names),
            "num_samples_a": self.num_samples_a,
            "num_samples_b": self.num_samples_b,
            "sample_ids_a": [list(s) for s in self.sample_ids_a],
            "sample_ids_b": [list(s) for s in self.sample_ids_b],
            "layers": list(self.layers),
            "heads": list(self.heads),
            "blocks": list(self.blocks),
            "gqa": [{"layer": l, "head": h, "kv_head": kv} for (l, h), kv in sorted(self.kv_heads.items())],
            "heatmaps": {b: clean(m.tolist()) for b, m in self.heatmaps().items()},
            "top": [{**t, "sample_a": list(t["sample_a"]), "sample_b": list(t["sample_b"])} for t in self.top()],
            "diagnostics": [
                {"layer": l, "head": h, "block": b, **{k: clean(v) if isinstance(v, float) else v for k, v in d.items()}}
                for (l, h, b), d in sorted(self.diagnostics.items(), key=lambda kv: (kv[0][0], kv[0][1], BLOCKS.index(kv[0][2])))
            ],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The :meth:`to_dict` summary as a JSON string; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def heatmap_figures(self, task_names: tuple[str, str] | None = None) -> dict[str, Any]:
        """``{block: matplotlib Figure}``: layers x query heads, mean over sample pairs, titled
        with the two tasks (``task_names``, default :attr:`task_names`), the colour bar labelled
        with the metric, one integer tick per head and layer (every few when there are many);
        640 x 400 pixels or more at 100 dpi. Raises ImportError without matplotlib."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        a, b = task_names if task_names is not None else self.task_names
        figs = {}
        for block, m in self.heatmaps().items():
            fig = Figure(figsize=(max(6.4, 1.6 + 0.35 * len(self.heads)), max(4.0, 1.6 + 0.3 * len(self.layers))),
                         layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
            im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            integer_ticks(ax.xaxis, list(self.heads))
            integer_ticks(ax.yaxis, list(self.layers))
            ax.set_title(f"QK-OV interference, {block} block: {a} vs {b}\n"
                         f"({self.variant} variant, {self.aggregate} over the slice; "
                         f"{self.num_samples_a} x {self.num_samples_b} sample pairs)", fontsize=11)
            cbar = fig.colorbar(im, ax=ax)
            cbar.set_label(f"interference score ({self.variant}), mean over sample pairs")
            figs[block] = fig
        return figs

    def save_heatmaps(self, out_dir: str | os.PathLike, *, prefix: str = "qkov",
                      task_names: tuple[str, str] | None = None) -> list[Path]:
        """One PNG per block (``{prefix}_{block}.png``, :meth:`heatmap_figures`) in ``out_dir``;
        returns the paths, or [] with a logged note when matplotlib is missing."""
        try:
            figs = self.heatmap_figures(task_names)
        except ImportError:
            logger.info("matplotlib is not installed: no QK-OV heatmap PNGs written (pip install matplotlib)")
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for block, fig in figs.items():
            p = out / f"{prefix}_{block}.png"
            fig.savefig(p, dpi=100)
            paths.append(p)
        return paths


# ----------------------------------------------------------------------------- validation
def _check_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_store(store: GradientStore, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], which: str) -> None:
    missing = [n for n in names if n not in store.grads]
    if missing:
        raise InvalidInputError(
            f"the gradient store of task {which} lacks {len(missing)} attention parameter(s) of the chosen layers, "
            f"e.g. {missing[:2]}; store them (store_gradients(..., layers=...)) or pass layers= it covers"
        )
    for n in names:
        g = store.grads[n]
        if tuple(g.shape[1:]) != shapes[n] or g.shape[0] != store.num_samples:
            raise InvalidInputError(
                f"the gradient store of task {which} holds {n!r} with shape {tuple(g.shape)}, expected "
                f"[{store.num_samples}, *{shapes[n]}]; is it from another model?"
            )


def _store_layers(store: GradientStore, layout, shapes) -> set[int]:
    out = set()
    for att in layout.attention:
        names = attention_params(None, layout, [att.layer])
        if all(n in store.grads and tuple(store.grads[n].shape[1:]) == shapes[n] for n in names):
            out.add(att.layer)
    return out


def _count_rows(batches: Sequence[Any], which: str) -> int:
    n = 0
    for i, b in enumerate(batches):
        ids = b.get("input_ids") if isinstance(b, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InvalidInputError(f"task {which}: batch {i} must be a dict with input_ids [batch, seq_len]")
        n += int(ids.shape[0])
    return n


# ----------------------------------------------------------------------------- computation
def _sum_sq(g: torch.Tensor) -> torch.Tensor:
    """``Σ_s g_s ⊙ g_s`` (float64) in sample chunks (no [n, *shape] float64 temporary)."""
    out = torch.zeros(g.shape[1:], dtype=torch.float64)
    per = max(1, math.prod(g.shape[1:]) * 8)
    step = max(1, _CHUNK_BYTES // per)
    for s in range(0, g.shape[0], step):
        c = g[s : s + step].to(torch.float64)
        out += (c * c).sum(0)
    return out


def _slice_fisher(pieces, fisher_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([fisher_layer[s.param][s.index()].reshape(-1) for s in pieces])


def _ridge_for(values: torch.Tensor, ridge: float, ridge_rel: float | None, ridge_min: float) -> tuple[float, str]:
    if ridge_rel is None:
        return float(ridge), "absolute"
    med = float(values.median()) if values.numel() else 0.0
    return max(float(ridge_min), float(ridge_rel) * med), "relative"


def _chunks(a: torch.Tensor, b: torch.Tensor, i: torch.Tensor):
    """Chunks along the first slice axis of a [nA, d0, ...], b [nB, d0, ...], i [d0, ...]."""
    if i.dim() == 0:
        yield a.reshape(a.shape[0], 1), b.reshape(b.shape[0], 1), i.reshape(1)
        return
    rest = math.prod(i.shape[1:])
    rows = max(1, _CHUNK_BYTES // max(1, (a.shape[0] + b.shape[0]) * rest * 8))
    for r in range(0, i.shape[0], rows):
        yield a[:, r : r + rows], b[:, r : r + rows], i[r : r + rows]


def _pair_scores(pieces, store_a: GradientStore, store_b: GradientStore, fisher_layer, lam: float, variant: str) -> tuple[torch.Tensor, int]:
    """``[nA, nB]`` score sums of one slice (before aggregation) and the number of skipped
    elements (``I + λ = 0``)."""
    nA, nB = store_a.num_samples, store_b.num_samples
    M = torch.zeros((nA, nB), dtype=torch.float64)
    skipped = 0
    for s in pieces:
        idx = (slice(None), *s.index())
        for a_c, b_c, i_c in _chunks(store_a.grads[s.param][idx], store_b.grads[s.param][idx], fisher_layer[s.param][s.index()]):
            ga = a_c.reshape(nA, -1).to(torch.float64, copy=True)
            gb = b_c.reshape(nB, -1).to(torch.float64, copy=True)
            d = i_c.reshape(-1).to(torch.float64) + lam
            ok = d > 0
            skipped += int((~ok).sum())
            inv = torch.where(ok, 1.0 / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(d))
            if variant == "unsigned":
                left, right = ga.square_().mul_(inv), gb.abs_()
            elif variant == "signed":
                left, right = ga.mul_(inv), gb
            elif variant == "symmetric":
                left, right = ga.abs_().mul_(inv), gb.abs_()
            else:  # natural
                left, right = ga.square_().mul_(inv), gb.abs_().mul_(inv.sqrt())
            M.addmm_(left, right.T)
    return M, skipped


# ----------------------------------------------------------------------------- entry point
def qkov_interference(
    model: nn.Module,
    batches_a: Iterable[Mapping[str, Any]] | GradientStore,
    batches_b: Iterable[Mapping[str, Any]] | GradientStore,
    *,
    fisher: Any = None,
    fisher_from: str = "both",
    layers: Iterable[int] | None = None,
    variant: str = "unsigned",
    ridge: float = 1e-8,
    ridge_rel: float | None = None,
    ridge_min: float = 1e-12,
    aggregate: str = "mean",
    memory_budget_mb: float = 512,
    dtype: torch.dtype = torch.float32,
    top_k: int = 20,
    max_samples: int | None = None,
    progress: bool = True,
    task_names: tuple[str, str] | None = None,
) -> QKOVResult:
    """QK-OV interference scores of every (sample of A, sample of B, layer, head, block).

    Args:
        model: the transformers model (its layout gives the head slices).
        batches_a, batches_b: lists of batch dicts (``input_ids``, ``labels``, ...), or
            precomputed :class:`~hf_fisher.collection.gradients.GradientStore`\\ s holding
            the attention parameters of ``layers`` (reused as they are). Passing the same list
            (or store) object twice computes its gradients once.
        fisher: a :class:`~hf_fisher.Fisher` with ``reduction="param"`` covering the attention
            parameters of ``layers``, used as ``I`` instead of the stores' pooled Fisher.
        fisher_from: "a", "b" or "both": ``I = mean of C`` over A's, B's or all samples (ignored
            with ``fisher=``).
        layers: attention layers to analyse (default all; with stores given: every layer they
            all cover).
        variant: "unsigned" | "signed" | "symmetric" | "natural" (module docstring).
        ridge: absolute ridge λ >= 0 (used when ``ridge_rel`` is None).
        ridge_rel, ridge_min: relative ridge ``λ = max(ridge_min, ridge_rel · median_S I)``.
        aggregate: "mean" (divide by ``|S|``) or "sum".
        memory_budget_mb: budget of the gradient stores this call builds (A and B together),
            checked before any work; raises saying how many samples fit.
        dtype: storage dtype of the gradients (computation is float64).
        top_k: default ``k`` of :meth:`QKOVResult.top` and of the JSON export.
        max_samples: at most this many samples per task (the first ones).
        progress: progress bars.
        task_names: the two tasks' names for titles and JSON (default: the tasks of given
            :class:`GradientStore` objects, else ``("task A", "task B")``).

    Returns a :class:`QKOVResult`. An empty task (no batch, no sample with a label token, or an
    empty store), on either side, raises :class:`~hf_fisher.errors.EmptyDataError`; other bad
    arguments :class:`~hf_fisher.errors.InvalidInputError`; both before any gradient is computed.
    """
    from tqdm.auto import tqdm

    from hf_fisher import plugins
    from hf_fisher.artifacts.fisher import Fisher

    # ---- arguments (nothing computed yet)
    if variant not in VARIANTS:
        raise InvalidInputError(f"variant={variant!r}: choose one of {VARIANTS}")
    if aggregate not in AGGREGATES:
        raise InvalidInputError(f"aggregate={aggregate!r}: choose 'mean' (divide by the slice size) or 'sum'")
    if fisher_from not in FISHER_FROM:
        raise InvalidInputError(f"fisher_from={fisher_from!r}: choose 'a', 'b' or 'both' (or pass fisher=)")
    _check_number("ridge", ridge)
    _check_number("ridge_rel", ridge_rel, allow_none=True)
    _check_number("ridge_min", ridge_min)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidInputError(f"top_k must be an integer >= 0, got {top_k!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise InvalidInputError(f"max_samples must be a positive integer, got {max_samples!r}")
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or not memory_budget_mb > 0:
        raise InvalidInputError(f"memory_budget_mb must be a positive number of MB, got {memory_budget_mb!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidInputError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if task_names is None:
        task_names = tuple(src.task if isinstance(src, GradientStore) and src.task != "default" else f"task {w}"
                           for w, src in (("A", batches_a), ("B", batches_b)))
    elif (isinstance(task_names, (str, bytes)) or len(tuple(task_names)) != 2
          or not all(isinstance(t, str) and t.strip() for t in task_names)):
        raise InvalidInputError(f"task_names must be two non-empty strings, got {task_names!r}")
    inputs = {}
    for which, src in (("A", batches_a), ("B", batches_b)):
        if isinstance(src, GradientStore):
            inputs[which] = src
        elif src is None or isinstance(src, (Mapping, str, bytes)) or not isinstance(src, Iterable):
            raise InvalidInputError(f"batches_{which.lower()} must be a list of batch dicts or a GradientStore, got {type(src).__name__}")
        else:
            inputs[which] = src if isinstance(src, list) else list(src)
    same = batches_a is batches_b or inputs["A"] is inputs["B"]

    layout = plugins.model_layout(model)
    if not layout.attention:
        raise InvalidInputError(f"layout {layout.adapter!r} describes no attention heads; QK-OV needs attention layers")
    params = dict(model.named_parameters())
    all_names = attention_params(model, layout, None)
    shapes = {n: tuple(params[n].shape) for n in all_names}
    known = [a.layer for a in layout.attention]
    if layers is None:
        wanted = set(known)
        for which in ("A", "B"):
            if isinstance(inputs[which], GradientStore):
                wanted &= _store_layers(inputs[which], layout, shapes)
        if not wanted:
            raise InvalidInputError("the given gradient stores cover no complete attention layer of the model; pass layers=")
    else:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise InvalidInputError(f"layers must be a list of layer indices, got {layers!r}")
        try:
            wanted = {int(x) for x in layers}
        except (TypeError, ValueError):
            raise InvalidInputError(f"layers must be a list of layer indices, got {layers!r}") from None
        if not wanted:
            raise InvalidInputError("layers is empty: pass at least one attention layer (or None for all)")
    names = attention_params(model, layout, sorted(wanted))  # raises for layers not in the model
    atts = [a for a in layout.attention if a.layer in wanted]
    for which in ("A", "B"):
        if isinstance(inputs[which], GradientStore):
            _check_store(inputs[which], names, shapes, which)

    fisher_layer_src = None
    if fisher is not None:
        if not isinstance(fisher, Fisher):
            raise InvalidInputError(f"fisher must be an hf_fisher.Fisher artifact (or None), got {type(fisher).__name__}")
        if fisher.reduction != "param":
            raise InvalidInputError(
                f"QK-OV slices parameters element by element: the Fisher has reduction={fisher.reduction!r}; collect "
                "it with reduction='param' (hf_fisher.collect(model, batches, reduction='param')) or pass fisher=None "
                "to pool it from the gradient stores"
            )
        try:
            fisher.validate(model)
        except ModelMismatchError as e:
            raise _FisherMismatchError(str(e)) from e
        missing = [n for n in names if n not in fisher]
        if missing:
            raise InvalidInputError(
                f"the Fisher does not cover {len(missing)} attention parameter(s) of the chosen layers, e.g. "
                f"{missing[:2]}; collect it for them (reduction='param') or choose other layers="
            )
        wrong = [n for n in names if tuple(fisher[n].shape) != shapes[n]]
        if wrong:
            raise _FisherMismatchError(f"the Fisher of {wrong[0]!r} has shape {tuple(fisher[wrong[0]].shape)}, the model {shapes[wrong[0]]}")
        fisher_layer_src = fisher

    # ---- budget of the stores to build (both tasks together), before any work
    to_build = [w for w in ("A", "B") if not isinstance(inputs[w], GradientStore) and not (w == "B" and same)]
    for which in ("A", "B"):
        if not isinstance(inputs[which], GradientStore):
            _count_rows(inputs[which], which)  # well-formed batches
        require_samples(model, inputs[which], f"task {which}")
    if to_build:
        fit, per_sample = samples_that_fit(model, names, dtype, memory_budget_mb)
        counts = {w: _count_rows(inputs[w], w) for w in to_build}
        if max_samples is not None:
            counts = {w: min(c, max_samples) for w, c in counts.items()}
        total = sum(counts.values())
        if total > fit:
            detail = " + ".join(f"{c} of task {w}" for w, c in counts.items())
            raise InvalidInputError(
                f"{total} samples ({detail}) x {per_sample / 2**20:.2f} MB of gradients ({len(names)} attention "
                f"parameters of {len(atts)} layer(s) in {dtype}) need {total * per_sample / 2**20:.1f} MB; "
                f"memory_budget_mb={memory_budget_mb:g} holds {fit} samples. Raise memory_budget_mb, pass "
                f"max_samples={max(fit // max(len(counts), 1), 1)} (per task), analyse fewer layers=, or use a smaller dtype"
            )
        budget_each = max(memory_budget_mb, 1e-6)

    # ---- gradients
    stores: dict[str, GradientStore] = {}
    for which in ("A", "B"):
        if which == "B" and same:
            stores["B"] = stores["A"]
        elif isinstance(inputs[which], GradientStore):
            stores[which] = inputs[which]
        else:
            stores[which] = store_gradients(
                model, inputs[which], params=names, task=f"qkov_{which.lower()}", dtype=dtype,
                memory_budget_mb=budget_each, max_samples=max_samples, progress=progress,
            )
    sa, sb = stores["A"], stores["B"]
    nA, nB = sa.num_samples, sb.num_samples

    L = len(atts)
    Hmax = max(a.num_heads for a in atts)
    scores = torch.full((nA, nB, L, Hmax, len(BLOCKS)), math.nan, dtype=torch.float64)
    kv_heads = {(a.layer, h.head): h.kv_head for a in atts for h in a.heads}
    for li, a in enumerate(atts):
        scores[:, :, li, : a.num_heads] = 0.0
    result = QKOVResult(
        scores=scores, layers=[a.layer for a in atts], heads=list(range(Hmax)), variant=variant, aggregate=aggregate,
        fisher_from="fisher" if fisher is not None else fisher_from, ridge=float(ridge),
        ridge_rel=None if ridge_rel is None else float(ridge_rel), ridge_min=float(ridge_min),
        sample_ids_a=list(sa.sample_ids), sample_ids_b=list(sb.sample_ids), kv_heads=kv_heads, top_k=top_k,
        task_names=tuple(task_names),
    )
    pool = {"a": [sa], "b": [sb], "both": [sa] if sb is sa else [sa, sb]}[fisher_from]
    pooled_n = sum(s.num_samples for s in pool)
    if nA == 0 or nB == 0 or (fisher is None and pooled_n == 0):  # e.g. every sample dropped by the engine
        empty = [w for w, n in (("A", nA), ("B", nB)) if n == 0] or [fisher_from]
        raise EmptyDataError(f"QK-OV interference: task(s) {', '.join(empty)} gave no per-sample gradient; "
                             "pass data with label tokens")

    # ---- scores, one layer at a time
    for li, att in enumerate(tqdm(atts, desc="QK-OV interference", unit="layer", disable=not progress)):
        lnames = attention_params(model, layout, [att.layer])
        if fisher_layer_src is not None:
            I = {n: fisher_layer_src[n].detach().to("cpu", torch.float64) for n in lnames}
        else:
            I = {n: sum(_sum_sq(s.grads[n]) for s in pool) / pooled_n for n in lnames}
        cache: dict[tuple, tuple[torch.Tensor, dict[str, Any]]] = {}
        for head in att.heads:
            for bi, block in enumerate(BLOCKS):
                pieces = getattr(head, block.lower())
                if pieces not in cache:
                    Is = _slice_fisher(pieces, I)
                    lam, mode = _ridge_for(Is, ridge, ridge_rel, ridge_min)
                    M, skipped = _pair_scores(pieces, sa, sb, I, lam, variant)
                    numel = int(Is.numel())
                    if aggregate == "mean" and numel:
                        M /= numel
                    diag = {
                        "I_min": float(Is.min()) if numel else math.nan,
                        "I_median": float(Is.median()) if numel else math.nan,
                        "I_max": float(Is.max()) if numel else math.nan,
                        "frac_below_ridge": float((Is < lam).double().mean()) if numel else math.nan,
                        "ridge": lam,
                        "ridge_mode": mode,
                        "numel": numel,
                        "zero_denominator": skipped,
                    }
                    if skipped:
                        logger.warning("QK-OV layer %d head %d %s: %d element(s) with I + ridge = 0 skipped (use ridge > 0)",
                                       att.layer, head.head, block, skipped)
                    cache[pieces] = (M, diag)
                M, diag = cache[pieces]
                scores[:, :, li, head.head, bi] = M
                result.diagnostics[(att.layer, head.head, block)] = dict(diag)
        del I, cache
    return result


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("qkov_interference", qkov_interference)
