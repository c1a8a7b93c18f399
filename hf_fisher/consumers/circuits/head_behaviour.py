"""Built-in consumers "head_categories" and "aggregate_by_category": what each attention head
*does*, so Fisher and interference results can be aggregated by behaviour ("the induction heads
of layer 3 carry most of the Q interference").

:func:`head_categories` runs the model on probe inputs it generates itself, reads the attention
probabilities (eager attention, ``output_attentions=True``) and scores every head of the model's
:class:`~hf_fisher.layout.ModelLayout` on five metrics, then assigns one behavioural category per
head. :func:`aggregate_by_category` sums any ``{(layer, head): value}`` table (e.g.
:func:`hf_fisher.analysis.head_importance`) per category.

Probes
------
Token ids are drawn with a ``torch.Generator`` seeded with ``seed`` from the *pool* ``{0, ...,
vocab_size - 1}`` minus the config's special tokens (``bos/eos/pad/unk/sep/cls/mask/
decoder_start_token_id`` of the config and of the generation config):

- ``n_probes`` **random probes** of length ``T = seq_len``: i.i.d. uniform tokens from the pool;
- ``n_probes`` **repeated probes** of length ``2L`` with ``L = seq_len``: ``[x_0..x_{L-1},
  x_0..x_{L-1}]`` where ``x_0..x_{L-1}`` are *distinct* tokens from the pool (so every token of
  the second half has exactly one earlier occurrence, and the token after it is unique).

No padding, no BOS is prepended: position 0 is an ordinary random token.

Scores (all in ``[0, 1]``)
--------------------------
``A[b, t, s]`` is a head's attention probability from query position ``t`` to key ``s`` on
probe ``b``. Each score is a mean over probes and over the stated query positions:

- ``previous_token``: ``A[t, t-1]`` on the random probes, queries ``t = 2..T-1`` (``t = 1`` is
  left out: there the previous token *is* the first token);
- ``first_token`` (attention sink / positional): ``A[t, 0]`` on the random probes, queries
  ``t = 2..T-1``;
- ``same_token`` (duplicate-token): the mass on earlier positions holding the current token,
  ``sum_{s < t, x_s = x_t} A[t, s]``, on the repeated probes, queries ``t = L+1..2L-1`` (the
  second half; ``t = L`` is left out because its earlier occurrence is position 0);
- ``induction``: the mass on the position *after* an earlier occurrence of the current token,
  ``sum_{1 <= s < t, x_{s-1} = x_t} A[t, s]`` (= ``A[t, t-L+1]`` on these probes), on the
  repeated probes, queries ``t = L+1..2L-1``;
- ``entropy``: normalised entropy of the attention row, ``-sum_s A[t,s] log A[t,s] / log n_t``
  with ``n_t`` the number of keys the query may attend (``t + 1`` for causal attention, ``T``
  for bidirectional attention, detected from the attention pattern), on the random probes,
  queries ``t = 2..T-1``. 0 = all mass on one key, 1 = uniform.

Categories
----------
The first rule that holds, in this order (``DEFAULT_THRESHOLDS`` in brackets):

1. ``"induction"``: ``induction >= thresholds["induction"]`` (0.4) and
   ``induction > previous_token``;
2. ``"previous_token"``: ``previous_token >= thresholds["previous_token"]`` (0.5);
3. ``"first_token"``: ``first_token >= thresholds["first_token"]`` (0.5);
4. ``"same_token"``: ``same_token >= thresholds["same_token"]`` (0.4);
5. ``"content"``: ``entropy <= thresholds["content_entropy"]`` (0.5): concentrated attention on
   positions chosen by content none of the above explains;
6. ``"mixed"``: anything else (diffuse attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_fisher.errors import InvalidInputError, UnsupportedError
from hf_fisher.hookspecs import hookimpl

__all__ = [
    "CATEGORIES",
    "DEFAULT_THRESHOLDS",
    "METRICS",
    "HeadCategories",
    "aggregate_by_category",
    "head_categories",
    "hf_fisher_register_consumers",
]

#: Categories in precedence order (the first rule that holds wins).
CATEGORIES = ("induction", "previous_token", "first_token", "same_token", "content", "mixed")
#: The per-head scores, each in [0, 1].
METRICS = ("previous_token", "first_token", "same_token", "induction", "entropy")
#: Default thresholds of the category rules (see the module docstring).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "induction": 0.4,
    "previous_token": 0.5,
    "first_token": 0.5,
    "same_token": 0.4,
    "content_entropy": 0.5,
}

_SPECIAL_ATTRS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "cls_token_id", "mask_token_id", "decoder_start_token_id",
)

Head = tuple[int, int]


@dataclass
class HeadCategories:
    """Behavioural scores and categories of every attention head of a model.

    - ``scores``: ``{(layer, head): {metric: value}}`` with the metrics of :data:`METRICS`;
    - ``categories``: ``{(layer, head): category}``, one of :data:`CATEGORIES`;
    - ``thresholds``: the thresholds used (defaults merged with the caller's);
    - ``settings``: how the probes were made (``seq_len``, ``n_probes``, ``seed``, ``vocab_size``,
      ``num_tokens`` in the pool).
    """

    scores: dict[Head, dict[str, float]]
    categories: dict[Head, str]
    thresholds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def by_category(self) -> dict[str, list[Head]]:
        """``{category: [(layer, head), ...]}`` for every category of :data:`CATEGORIES` (heads sorted;
        empty lists kept)."""
        out: dict[str, list[Head]] = {c: [] for c in CATEGORIES}
        for key in sorted(self.categories):
            out.setdefault(self.categories[key], []).append(key)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``heads`` is a list of rows ``{layer, head, category, **scores}``;
        ``by_category`` lists heads as ``"layer.head"`` strings."""
        return {
            "heads": [
                {"layer": lay, "head": h, "category": self.categories[(lay, h)],
                 **{m: float(v) for m, v in self.scores[(lay, h)].items()}}
                for lay, h in sorted(self.categories)
            ],
            "by_category": {c: [f"{lay}.{h}" for lay, h in heads] for c, heads in self.by_category().items()},
            "thresholds": dict(self.thresholds),
            "settings": dict(self.settings),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> HeadCategories:
        """Inverse of :meth:`to_dict`."""
        scores: dict[Head, dict[str, float]] = {}
        cats: dict[Head, str] = {}
        for row in d.get("heads", []):
            key = (int(row["layer"]), int(row["head"]))
            cats[key] = str(row["category"])
            scores[key] = {m: float(row[m]) for m in METRICS if m in row}
        return HeadCategories(scores, cats, dict(d.get("thresholds", {})), dict(d.get("settings", {})))


# ----------------------------------------------------------------------------------- validation


def _config(model: Any) -> Any:
    return getattr(model, "config", None)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _special_ids(model: Any) -> set[int]:
    out: set[int] = set()
    for cfg in (_config(model), getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for attr in _SPECIAL_ATTRS:
            val = getattr(cfg, attr, None)
            vals = val if isinstance(val, (list, tuple, set)) else [val]
            out.update(int(v) for v in vals if _is_int(v))
    return out


def _check_thresholds(thresholds: Mapping[str, Any] | None) -> dict[str, float]:
    merged = dict(DEFAULT_THRESHOLDS)
    if thresholds is None:
        return merged
    if not isinstance(thresholds, Mapping):
        raise InvalidInputError(
            f"thresholds must be a dict with keys among {sorted(DEFAULT_THRESHOLDS)}, got {type(thresholds).__name__}"
        )
    unknown = sorted(set(thresholds) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise InvalidInputError(
            f"unknown threshold(s) {unknown}; the thresholds are {sorted(DEFAULT_THRESHOLDS)}"
        )
    for k, v in thresholds.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise InvalidInputError(f"threshold {k!r} must be a number in [0, 1] (scores are in [0, 1]), got {v!r}")
        merged[k] = float(v)
    return merged


def _vocab_rows(model: Any) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except Exception:
        return None
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def _max_positions(cfg: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if _is_int(v) and v > 0:
            return v
    return None


# -------------------------------------------------------------------------------------- probes


def _make_probes(pool: torch.Tensor, seq_len: int, n_probes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    random_ids = pool[torch.randint(0, len(pool), (n_probes, seq_len), generator=g)]
    halves = torch.stack([pool[torch.randperm(len(pool), generator=g)[:seq_len]] for _ in range(n_probes)])
    return random_ids, torch.cat([halves, halves], dim=1)


# ---------------------------------------------------------------------------- attention access


def _get_impl(model: Any) -> Any:
    cfg = _config(model)
    return getattr(cfg, "_attn_implementation", None) if cfg is not None else None


def _set_impl(model: Any, impl: Any) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter) and impl is not None:
        setter(impl)
    else:
        model.config._attn_implementation = impl


def _attentions(model: Any, ids: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, ...]:
    mask = torch.ones_like(ids)
    try:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    except (TypeError, ValueError, NotImplementedError) as exc:
        if "attention" in str(exc).lower():
            raise UnsupportedError(
                f"{type(model).__name__} cannot return attention probabilities ({exc}); head_categories "
                f"needs a model whose eager attention supports output_attentions=True"
            ) from exc
        raise
    atts = getattr(out, "attentions", None)
    if atts is None and isinstance(out, Mapping):
        atts = out.get("attentions")
    if not atts or any(a is None for a in atts):
        raise UnsupportedError(
            f"{type(model).__name__} returned no attention probabilities with output_attentions=True even "
            f"with eager attention; head_categories cannot score its heads"
        )
    if len(atts) != num_layers:
        raise UnsupportedError(
            f"{type(model).__name__} returned attentions for {len(atts)} layers but its layout has "
            f"{num_layers}; head_categories needs one attention map per layer"
        )
    return tuple(atts)


# ---------------------------------------------------------------------------------- scoring


def _masks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """same[b, t, s] = (s < t and x_s == x_t); ind[b, t, s] = (1 <= s < t and x_{s-1} == x_t)."""
    T = ids.shape[1]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # s < t
    same = (ids[:, None, :] == ids[:, :, None]) & earlier
    prev = torch.full_like(ids, -1)
    prev[:, 1:] = ids[:, :-1]
    ind = (prev[:, None, :] == ids[:, :, None]) & earlier
    ind[:, :, 0] = False
    return same, ind


def _random_stats(att: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head sums over probes and queries t = 2..T-1 of the random-probe metrics, ``[H]`` each."""
    a = att.detach().to(torch.float64)
    T = a.shape[2]
    t = torch.arange(2, T)
    prev = a[:, :, t, t - 1].sum(dim=(0, 2))
    first = a[:, :, t, 0].sum(dim=(0, 2))
    causal = bool(a.triu(1).abs().amax() <= 1e-6)
    n_keys = (t + 1).to(torch.float64) if causal else torch.full((len(t),), float(T), dtype=torch.float64)
    rows = a[:, :, t, :]
    ent = -(rows * torch.log(rows.clamp_min(1e-30))).sum(-1)  # [B, H, len(t)]
    ent = (ent / torch.log(n_keys)).clamp(0.0, 1.0)
    return {"previous_token": prev, "first_token": first, "entropy": ent.sum(dim=(0, 2))}


def _repeated_stats(att: torch.Tensor, ids: torch.Tensor, L: int) -> dict[str, torch.Tensor]:
    a = att.detach().to(torch.float64)
    same, ind = _masks(ids.to(a.device))
    q = slice(L + 1, 2 * L)
    rows = a[:, :, q, :]
    same_mass = (rows * same[:, None, q, :]).sum(-1)
    ind_mass = (rows * ind[:, None, q, :]).sum(-1)
    return {"same_token": same_mass.sum(dim=(0, 2)), "induction": ind_mass.sum(dim=(0, 2))}


def _categorise(s: Mapping[str, float], th: Mapping[str, float]) -> str:
    if s["induction"] >= th["induction"] and s["induction"] > s["previous_token"]:
        return "induction"
    if s["previous_token"] >= th["previous_token"]:
        return "previous_token"
    if s["first_token"] >= th["first_token"]:
        return "first_token"
    if s["same_token"] >= th["same_token"]:
        return "same_token"
    if s["entropy"] <= th["content_entropy"]:
        return "content"
    return "mixed"


def head_categories(
    model: Any,
    *,
    vocab_size: int | None = None,
    seq_len: int = 32,
    n_probes: int = 16,
    seed: int = 0,
    thresholds: Mapping[str, float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> HeadCategories:
    """Score every attention head of ``model`` on generated probes and give it a category.

    Args:
        model: a transformers model (causal LMs are the intended case; PEFT-wrapped works) whose
            layout (:func:`hf_fisher.plugins.model_layout`) describes its attention heads.
        vocab_size: token ids are drawn from ``[0, vocab_size)`` minus the special tokens;
            default ``config.vocab_size``. At most the input-embedding rows.
        seq_len: length ``T`` of the random probes and ``L`` of each half of the repeated
            probes (which are ``2 * seq_len`` long), ``>= 4``. ``2 * seq_len`` must fit the
            model's position limit, and the pool must hold ``seq_len`` distinct tokens.
        n_probes: number of random probes, and of repeated probes (``>= 1``).
        seed: seed of the ``torch.Generator`` drawing the probes.
        thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (keys ``induction``,
            ``previous_token``, ``first_token``, ``same_token``, ``content_entropy``; values in
            ``[0, 1]``).
        batch_size: probes per forward pass.
        progress: a tqdm bar over the forward passes.

    The probes, the five scores and the category rules are defined in the module docstring
    (:mod:`hf_fisher.consumers.circuits.head_behaviour`). The forward passes run under ``torch.no_grad``
    in eval mode with eager attention; the model's train/eval mode and attention
    implementation are restored afterwards, also on error.

    Raises:
        InvalidInputError: (before any forward pass) no attention heads in the layout, bad
            ``seq_len``/``n_probes``/``batch_size``/``vocab_size``/``thresholds``, too few
            non-special tokens, probes longer than the model's position limit.
        UnsupportedError: the model cannot return attention probabilities.
    """
    from hf_fisher.plugins import model_layout

    # ---- validation, before any forward
    for name, val, low in (("seq_len", seq_len, 4), ("n_probes", n_probes, 1), ("batch_size", batch_size, 1)):
        if not _is_int(val) or val < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {val!r}")
    if not _is_int(seed):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    th = _check_thresholds(thresholds)
    layout = model_layout(model)
    if not layout.attention or not any(att.heads for att in layout.attention):
        raise InvalidInputError(
            f"the layout of {type(model).__name__} (adapter {layout.adapter!r}) describes no attention heads; "
            f"head_categories needs a model with attention layers the layout knows"
        )
    cfg = _config(model)
    rows = _vocab_rows(model)
    if vocab_size is None:
        vocab_size = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if not _is_int(vocab_size):
            vocab_size = rows
        if vocab_size is None:
            raise InvalidInputError(f"cannot tell the vocabulary size of {type(model).__name__}; pass vocab_size=")
    if not _is_int(vocab_size) or vocab_size < 1:
        raise InvalidInputError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if rows is not None and vocab_size > rows:
        raise InvalidInputError(f"vocab_size={vocab_size} exceeds the {rows} rows of the input embedding")
    special = _special_ids(model)
    pool = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if len(pool) < seq_len:
        raise InvalidInputError(
            f"only {len(pool)} non-special token ids in [0, {vocab_size}) (special: {sorted(special)}) but the "
            f"repeated probes need seq_len={seq_len} distinct ones; lower seq_len or raise vocab_size"
        )
    max_pos = _max_positions(cfg)
    if max_pos is not None and 2 * seq_len > max_pos:
        raise InvalidInputError(
            f"the repeated probes are 2 * seq_len = {2 * seq_len} tokens long but the model takes at most "
            f"{max_pos} positions; lower seq_len to {max_pos // 2} or less"
        )

    random_ids, repeated_ids = _make_probes(pool, seq_len, n_probes, seed)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    num_layers = max(layout.num_layers, 1 + max(att.layer for att in layout.attention))

    from tqdm.auto import tqdm

    n_batches = 2 * math.ceil(n_probes / batch_size)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    was_training = bool(getattr(model, "training", False))
    original = _get_impl(model)
    try:
        try:
            _set_impl(model, "eager")
        except Exception as exc:
            raise UnsupportedError(
                f"cannot switch {type(model).__name__} to eager attention ({exc}); head_categories needs "
                f"attention probabilities (output_attentions=True)"
            ) from exc
        model.eval()
        with torch.no_grad(), tqdm(total=n_batches, desc="head categories", unit="batch", disable=not progress) as bar:
            for kind, ids_all in (("random", random_ids), ("repeated", repeated_ids)):
                for start in range(0, n_probes, batch_size):
                    ids = ids_all[start:start + batch_size].to(device)
                    atts = _attentions(model, ids, num_layers)
                    for att_layer in layout.attention:
                        a = atts[att_layer.layer]
                        if a.dim() != 4 or a.shape[1] != att_layer.num_heads:
                            raise UnsupportedError(
                                f"attention of layer {att_layer.layer} has shape {tuple(a.shape)}, expected "
                                f"[batch, {att_layer.num_heads}, T, T]"
                            )
                        stats = _random_stats(a) if kind == "random" else _repeated_stats(a, ids, seq_len)
                        acc = sums.setdefault(att_layer.layer, {})
                        for m, v in stats.items():
                            acc[m] = acc.get(m, 0) + v.cpu()
                    bar.update(1)
    finally:
        try:
            _set_impl(model, original)
        finally:
            model.train(was_training)

    n_random = n_probes * (seq_len - 2)
    n_repeated = n_probes * (seq_len - 1)
    scores: dict[Head, dict[str, float]] = {}
    cats: dict[Head, str] = {}
    for att_layer in layout.attention:
        acc = sums[att_layer.layer]
        for h in att_layer.heads:
            s = {
                m: min(1.0, max(0.0, float(acc[m][h.head]) / (n_random if m in ("previous_token", "first_token", "entropy") else n_repeated)))
                for m in METRICS
            }
            scores[(h.layer, h.head)] = s
            cats[(h.layer, h.head)] = _categorise(s, th)
    settings = {
        "seq_len": seq_len, "n_probes": n_probes, "seed": seed, "vocab_size": int(vocab_size),
        "num_tokens": len(pool),
    }
    return HeadCategories(scores, cats, th, settings)


# ------------------------------------------------------------------------------- aggregation


def aggregate_by_category(
    values: Mapping[Head, float],
    categories: HeadCategories | Mapping[Head, str],
    *,
    per_layer: bool = False,
) -> dict:
    """Sum a per-head table over the behavioural categories.

    Args:
        values: ``{(layer, head): float}``, e.g. :func:`hf_fisher.analysis.head_importance` or
            QK-OV head scores. Every key must be a head of ``categories`` (a subset is fine).
        categories: a :class:`HeadCategories` or a ``{(layer, head): category}`` dict.
        per_layer: return ``{(category, layer): sum}`` instead (every (category, layer) pair that
            has at least one head in ``values``).

    Returns ``{category: {"sum", "count", "mean", "share", "top"}}`` for every category present
    in ``categories`` (in :data:`CATEGORIES` order, then any others): ``sum`` of the values of its
    heads in ``values``, ``count`` of those heads, ``mean = sum / count`` (0 if none), ``share =
    sum / total`` with ``total`` the sum of all values (0 when the total is 0), ``top`` the head
    with the largest value as ``{"layer", "head", "value"}`` (None if none). The sums add up to
    the total, the shares to 1.

    Raises:
        InvalidInputError: a value that is not a finite number, or a head without a category.
    """
    cats = categories.categories if isinstance(categories, HeadCategories) else categories
    if not isinstance(cats, Mapping):
        raise InvalidInputError(
            f"categories must be a HeadCategories or a {{(layer, head): category}} dict, got {type(categories).__name__}"
        )
    if not isinstance(values, Mapping):
        raise InvalidInputError(f"values must be a {{(layer, head): float}} dict, got {type(values).__name__}")
    clean: dict[Head, float] = {}
    for key, v in values.items():
        if key not in cats:
            raise InvalidInputError(
                f"head {key!r} of values has no category; values and categories must come from the same model"
            )
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidInputError(f"value of head {key!r} must be a finite number, got {v!r}")
        clean[key] = float(v)
    if per_layer:
        out_pl: dict[tuple[str, int], float] = {}
        for (lay, h), v in sorted(clean.items()):
            k = (cats[(lay, h)], lay)
            out_pl[k] = out_pl.get(k, 0.0) + v
        return out_pl
    total = math.fsum(clean.values())
    present = set(cats.values())
    order = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))
    out: dict[str, dict[str, Any]] = {}
    for c in order:
        heads = sorted(k for k in clean if cats[k] == c)
        s = math.fsum(clean[k] for k in heads)
        top = max(heads, key=lambda k: (clean[k], -k[0], -k[1])) if heads else None
        out[c] = {
            "sum": s,
            "count": len(heads),
            "mean": s / len(heads) if heads else 0.0,
            "share": s / total if total != 0 else 0.0,
            "top": None if top is None else {"layer": top[0], "head": top[1], "value": clean[top]},
        }
    return out


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("head_categories", head_categories)
    register("aggregate_by_category", aggregate_by_category)
