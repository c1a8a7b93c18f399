"""Physical removal of pruned heads, kv-heads, MLP channels and vocabulary rows: a smaller model
that ``from_pretrained`` loads and whose outputs equal the masked model's.

Every removed unit's slices leave its parameters (Q rows and O columns of a head, K/V rows of a
kv group, gate/up rows and down column of a channel, embedding / LM-head rows of a token); the
new config states the new sizes. LLaMA-family configs (llama, mistral, qwen2, qwen3) hold one
head count, one kv-head count and one intermediate size for *all* layers, so physical removal
needs the same counts in every layer (``scope="layer"``) and, under GQA, the same number of
query heads kept in every kv group (what ``scope="layer"`` selects); in multi-head attention
(as many kv-heads as heads) a removed head takes its K/V rows along and the new config has as
many kv-heads as heads again. Other architectures (e.g.
GPT-2, whose fused ``c_attn`` split is tied to the hidden size) keep the masks
(``physical=False``) unless a plugin adds a :class:`PhysicalPruner` for them through the hook
``hf_fisher_physical_pruner(config)`` (the built-in LLaMA-family one registers the same way). Vocabulary removal renumbers the kept tokens in order; the config's special
token ids are renumbered with them and ``PruneResult.vocab_map`` says ``old -> new``; a tokenizer
cannot follow, so :func:`~hf_fisher.consumers.prune.core.prune` refuses it when the model has one
(unless ``tokenizer=False``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn

from hf_fisher.architectures.llama import MODEL_TYPES
from hf_fisher.consumers.prune.units import Unit
from hf_fisher.errors import InvalidInputError, UnsupportedError

__all__ = ["LlamaPhysicalPruner", "PhysicalPruner", "build_physical", "check_physical", "physical_pruner"]

_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "decoder_start_token_id")


class PhysicalPruner(Protocol):
    """What the hook ``hf_fisher_physical_pruner(config)`` returns for an architecture it can shrink.

    ``check(config, kinds, scope, compensate, terms)`` refuses, from the config alone and before
    any work, what this architecture's smaller config cannot describe (raise
    :class:`~hf_fisher.errors.InvalidInputError` / :class:`~hf_fisher.errors.UnsupportedError`
    with the remedy in ``terms``); ``build(model, units, removed)`` returns ``(smaller model,
    vocab map or None)`` built from the model as masked now, whose outputs equal the masked
    model's.
    """

    name: str

    def check(self, config: Any, kinds: Sequence[str], scope: str, compensate: bool, terms: Mapping[str, str]) -> None: ...

    def build(self, model: nn.Module, units: Sequence[Unit], removed: set[int]) -> tuple[nn.Module, list[int] | None]: ...


def physical_pruner(config: Any) -> PhysicalPruner | None:
    """The pruner the first ``hf_fisher_physical_pruner`` implementation returns for ``config``
    (plugins with ``tryfirst`` are asked before the built-in LLaMA-family one), or None."""
    from hf_fisher import plugins

    return plugins.get_plugin_manager().hook.hf_fisher_physical_pruner(config=config)


def check_physical(config, kinds: Sequence[str] | None, scope: str, compensate: bool, *, terms=None) -> None:
    """Refuse, before any work (the model's config is enough), what physical removal cannot
    produce, saying what to do (``terms``: :data:`hf_fisher.consumers.prune.core.API_TERMS` or
    ``CLI_TERMS``): unstructured masks, an architecture no ``hf_fisher_physical_pruner`` claims,
    and what the claiming pruner's :meth:`PhysicalPruner.check` refuses."""
    from hf_fisher.consumers.prune.core import API_TERMS

    t = terms or API_TERMS
    if kinds is None:
        raise InvalidInputError(
            f"{t['physical']} removes structures; unstructured masks ({t['unstructured']}) cannot shrink a model "
            f"(use {t['masked']})"
        )
    pruner = physical_pruner(config)
    if pruner is None:
        mt = getattr(config, "model_type", None)
        raise UnsupportedError(
            f"physical removal is implemented for LLaMA-family configs ({', '.join(sorted(MODEL_TYPES))}) and the "
            f"architectures plugins add (hook hf_fisher_physical_pruner), not {mt!r}: its config cannot describe the "
            f"smaller shapes. Use {t['masked']} (masks) for this model"
        )
    pruner.check(config, kinds, scope, compensate, t)


def build_physical(model: nn.Module, units: Sequence[Unit], removed: set[int]) -> tuple[nn.Module, list[int] | None]:
    """``(smaller model, vocab map or None)`` from the model as masked (and rescaled) now, by the
    physical pruner of its config (:func:`physical_pruner`)."""
    from hf_fisher.architectures.builder import config_of

    config = config_of(model)
    pruner = physical_pruner(config)
    if pruner is None:
        raise UnsupportedError(f"no physical pruner for {getattr(config, 'model_type', None)!r}; use physical=False")
    return pruner.build(model, units, removed)


class LlamaPhysicalPruner:
    """Physical removal for LLaMA-family configs (:data:`hf_fisher.architectures.llama.MODEL_TYPES`):
    one head count, one kv-head count and one intermediate size for all layers, so every layer
    must keep the same counts (``scope="layer"``) and, under GQA, every kv group the same number
    of query heads; biases FLAP's compensation adds need ``attention_bias`` / ``mlp_bias`` in the
    config."""

    name = "llama_family"

    def check(self, config, kinds: Sequence[str], scope: str, compensate: bool, terms: Mapping[str, str]) -> None:
        t = terms
        mt = getattr(config, "model_type", None)
        if scope != "layer" and any(k != "vocab" for k in kinds):
            raise InvalidInputError(
                f"a {mt} config holds one head count and one intermediate size for all layers, so physical removal "
                f"needs the same counts in every layer: pass {t['layer']} (uniform per-layer budgets), or {t['masked']}"
            )
        if compensate:
            need = [k for k, kind in (("attention_bias", ("heads", "kv_heads")), ("mlp_bias", ("channels",)))
                    if any(x in kinds for x in kind) and not hasattr(config, k)]
            if need:
                raise UnsupportedError(
                    f"FLAP's bias compensation adds output biases a {mt} config cannot declare ({', '.join(need)} missing); "
                    f"use {t['masked']} or another score"
                )

    def build(self, model: nn.Module, units: Sequence[Unit], removed: set[int]) -> tuple[nn.Module, list[int] | None]:
        return _build_llama(model, units, removed)


def _kept(n: int, gone: set[int]) -> list[int]:
    return [i for i in range(n) if i not in gone]


def _build_llama(model: nn.Module, units: Sequence[Unit], removed: set[int]) -> tuple[nn.Module, list[int] | None]:
    """``(smaller model, vocab map or None)`` from the LLaMA-family model as masked (and rescaled) now."""
    cfg = model.config
    params = dict(model.named_parameters())
    cut: dict[tuple[int, int], set[int]] = {}  # (id(param), axis) -> removed indices
    for k in removed:
        for s in units[k].slices:
            cut.setdefault((id(params[s.param]), s.axis), set()).update(range(s.start, s.stop))
    new_cfg = copy.deepcopy(cfg)
    heads = {}  # layer -> (kept heads, kept kv heads)
    for layer in {u.layer for u in units if u.kind in ("head", "kv_head")}:
        members = [k for k, u in enumerate(units) if u.layer == layer and u.kind in ("head", "kv_head")]
        H = int(cfg.num_attention_heads)
        Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
        g = H // Hkv
        if units[members[0]].kind == "kv_head":
            gone = {units[k].index for k in members if k in removed}
            heads[layer] = (H - g * len(gone), Hkv - len(gone))
        elif g == 1:  # multi-head attention: a query head's unit holds its kv-head's K/V rows
            kept = sum(k not in removed for k in members)
            heads[layer] = (kept, kept)
        else:
            per_group: dict[int, int] = {}
            for k in members:
                if k not in removed:
                    per_group[units[k].group] = per_group.get(units[k].group, 0) + 1
            if len(set(per_group.values())) > 1 or len(per_group) != Hkv:
                raise UnsupportedError(
                    f"layer {layer}: the kept query heads per kv group differ ({per_group}); a GQA model needs the same "
                    "number in every group — use scope='layer', or physical=False"
                )
            heads[layer] = (sum(per_group.values()), Hkv)
    if heads:
        counts = set(heads.values())
        if len(counts) > 1:
            raise UnsupportedError(f"the layers keep different head counts {sorted(counts)}; use scope='layer' or physical=False")
        Hn, Hkvn = counts.pop()
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        new_cfg.num_attention_heads, new_cfg.num_key_value_heads, new_cfg.head_dim = Hn, Hkvn, hd
    channels = {}
    for k, u in enumerate(units):
        if u.kind == "channel":
            d = channels.setdefault(u.layer, [0, 0])
            d[0] += 1
            d[1] += k not in removed
    if channels:
        sizes = {v[1] for v in channels.values()}
        if len(sizes) > 1:
            raise UnsupportedError(f"the layers keep different MLP widths {sorted(sizes)}; use scope='layer' or physical=False")
        new_cfg.intermediate_size = sizes.pop()
    vocab_map = None
    vocab_units = [k for k, u in enumerate(units) if u.kind == "vocab"]
    if vocab_units:
        V = int(cfg.vocab_size)
        gone = {units[k].index for k in vocab_units if k in removed}
        vocab_map = [-1] * V
        for new, old in enumerate(_kept(V, gone)):
            vocab_map[old] = new
        new_cfg.vocab_size = V - len(gone)
        for key in _TOKEN_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, int) and 0 <= v < V:
                setattr(new_cfg, key, vocab_map[v])
            elif isinstance(v, (list, tuple)):
                setattr(new_cfg, key, [vocab_map[t] if isinstance(t, int) and 0 <= t < V else t for t in v])
    state = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident = id(t)  # a parameter (tied ones share it) or a buffer
        t = t.detach()
        for axis in range(t.dim()):
            gone = cut.get((ident, axis))
            if gone:
                t = t.index_select(axis, torch.tensor(_kept(t.shape[axis], gone), device=t.device))
        state[key] = t.clone()
    dtype = next(model.parameters()).dtype
    small = type(model)(new_cfg).to(dtype)
    extra = [k for k in state if k not in small.state_dict()]
    if extra:  # output biases FLAP's compensation added
        if not all(k.endswith(".bias") for k in extra):
            raise UnsupportedError(f"the pruned model has tensors the smaller config does not describe: {extra[:3]}")
        if any(".mlp." in k for k in extra):
            new_cfg.mlp_bias = True
        if any(".self_attn." in k for k in extra):
            new_cfg.attention_bias = True
        small = type(model)(new_cfg).to(dtype)
    want = small.state_dict()
    for key in want:
        if key not in state:
            if not key.endswith(".bias"):
                raise UnsupportedError(f"the smaller model expects {key}, which the pruned model does not have")
            state[key] = torch.zeros(want[key].shape, dtype=want[key].dtype)  # a bias the flag turned on
    small.load_state_dict({k: state[k] for k in want}, strict=True)
    if getattr(model, "generation_config", None) is not None:
        small.generation_config = copy.deepcopy(model.generation_config)
    small.train(model.training)
    return small.to(next(model.parameters()).device), vocab_map
