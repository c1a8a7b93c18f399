"""Fisher pruning: ``hf_fisher.prune`` — structured (attention heads, kv-heads, MLP channels,
vocabulary rows) or unstructured masks at a target sparsity, applied reversibly or physically,
with the least-squares rescale of Kwon et al. 2022, and the baseline criteria in the same API.

Budget. ``sparsity`` is the fraction of *parameters* of the candidate units to remove (the units
of the kinds in ``structured``, see :mod:`~hf_fisher.consumers.prune.units`; unstructured: the
nn.Linear / Conv1D weights). ``scope="layer"`` gives every layer the same budget: under GQA/MQA
query heads balanced over kv groups (``round(sparsity · H/H_kv)`` per group, at least one head kept
per group, so the model stays a valid GQA/MQA model); in multi-head attention (one query head per
kv-head: GPT-2, BERT, LLaMA with H_kv = H) ``round(sparsity · H)`` heads per layer, each
with its K/V rows; or ``round(sparsity · H_kv)`` whole kv groups; then as many MLP channels as
bring the layer's removed parameters nearest to ``sparsity`` × its unit parameters (every layer
then removes the same counts); ``scope="global"`` ranks all units together by score per parameter
(FLAP: by its standardised score, as FLAP's adaptive structure search does) and removes the
cheapest until the removed parameters are within half a unit of the target, keeping
``min_per_layer`` units of each (kind, layer) (query heads under GQA/MQA: also one per kv group).
A layer keeps at least one head (``min_per_layer=0`` is refused for heads / kv-heads). When these
floors hold back what the budget asks for, or whole-unit rounding misses it by more than a unit,
a WARNING says so and ``stats["warnings"]`` records it with the achieved sparsity. Unstructured
``scope="layer"`` gives every weight matrix the same sparsity.

Saturated models. On a model that fits its calibration data almost exactly (mean loss below
:data:`SATURATED_LOSS`) or whose Fisher says removing every candidate parameter costs nearly
nothing (``½ Σ F w²`` below :data:`SATURATED_QUADRATIC`), gradients vanish and with them the
empirical Fisher, the true Fisher and every curvature score: ``prune`` warns (recorded in
``stats["warnings"]``), and its default criterion (``score`` and ``compensate`` not chosen) adds
the bias compensation, which restores the mean output the pruned units carried and which no
rescale can (on the demo's converged copy model, 30% of heads / channels: held-out loss 0.00016
against FLAP's 0.00076, magnitude's 0.44 and the plain default's 0.73).

Confidence. ``confidence=c`` (needs a Fisher with variances, score "fisher" or "obd") withholds
from removal every selected unit whose upper confidence bound ``score + t_{(1+c)/2, n−1} · se``
(``se``: :func:`~hf_fisher.consumers.prune.statistics.slice_stderr`, conservative) is not below the
lowest score of the units kept in its budget (its bucket for ``scope="layer"``, all units for
``"global"``): only units confidently cheaper than everything kept are removed.

Applying. The masks (``True`` = kept) zero the removed slices in place; ``PruneResult.restore()``
puts every touched tensor back bitwise. With rescale batches, the kept units' output columns are
rescaled layer by layer (:mod:`~hf_fisher.consumers.prune.rescale`) while the masks go in: each
stage reconstructs the *unpruned* model's output of the layer (and, in pre-norm residual blocks,
its residual stream) from the inputs of the model pruned so far, as Kwon et al.'s layer-wise
reconstruction does (``stats["rescaled"]`` records per projection whether the residual term was
used; not with the bias compensation, which restores the mean output itself: on the demo's
converged copy model, 30 %, held-out loss 0.0008 without the residual term, 1.05 with it); FLAP's bias compensation adds ``(W₀ − W) E[x]`` (``Σ_{removed j} W_{:,j} E[x_j]``, plus
what a rescale took from the kept columns) to the projection's bias (creating one when the module
has none). ``physical=True`` returns a smaller model instead
(:mod:`~hf_fisher.consumers.prune.physical`) and leaves the given model as it was.

Validation. ``validation=`` held-out batches choose the options left unset by their loss: the
criterion among :data:`VALIDATION_SCORES` (KFAC-OBS, mask Fisher + rescale, FLAP, Wanda-sp) and FLAP's bias
compensation on or off; the choice and every candidate's validation loss are logged (WARNING) and
recorded in ``stats["validation"]`` (pruning.json). ``validation="holdout"`` makes the same
choice without held-out text: the last quarter of the calibration batches (at least
:data:`HOLDOUT_MIN_BATCHES`) is held out, the candidates prune with the rest, and the chosen one
then prunes with all of them (``stats["validation"]["source"] == "held-out calibration
batches"``); about eleven prunings instead of one. It is opt-in, not the default: on the five
models of bench_prune_quality.py it changed the default's choice for the better once (0.09 nats
at 40% on a prose model) and for the worse once (0.004), because held-out *calibration* batches
are text the model was trained on and fits better than new text, so they lean to the criteria
that reconstruct it (KFAC-OBS, the rescale) where new text may prefer Wanda-sp; ``validation=``
with text the model was not trained on avoids that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from hf_fisher import plugins
from hf_fisher.consumers.prune import statistics as S
from hf_fisher.consumers.prune.base import ScoreInputs, Stage
from hf_fisher.consumers.prune.registry import get_score
from hf_fisher.consumers.prune.select import global_keys as _global_keys
from hf_fisher.consumers.prune.select import round_half_up as _round
from hf_fisher.consumers.prune.select import select_global as _select_global
from hf_fisher.consumers.prune.select import select_layer as _select_layer
from hf_fisher.consumers.prune.units import KINDS, Unit, describe, input_axis, owner, structured_units
from hf_fisher.errors import EmptyDataError, InvalidInputError, UnsupportedError
from hf_fisher.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["API_TERMS", "CLI_TERMS", "PruneResult", "check_options", "hf_fisher_register_consumers", "prune"]

logger = logging.getLogger(__name__)

SCOPES = ("global", "layer")

#: the fraction ``γ`` of the KFAC-OBS update the default folds into the kept units (``obs_update=``;
#: :mod:`~hf_fisher.consumers.prune.obs`): scales ``1 + γ (s − 1)``. One value for every model, chosen
#: on the five models of benchmarks/bench_prune_quality.py together (held-out test loss at 20 / 40 /
#: 60 %; γ = 1, ½, ¼ on all five, 0 and ¾ on some), never per model or budget. The full update (γ = 1,
#: the default before) reconstructs the calibration text, which the prose models fit far better than
#: new text (held-out train loss 0.60 against test 1.58), and lost there to Wanda-sp or to no rescale
#: in 5 of the 15 cells (0.34 nats above the best other criterion in all). γ = ½: lower than every
#: other data-free criterion in 12 cells (γ = 1: 10, γ = ¼: 10), 0.069 above it in all over the 3
#: cells that resist (γ = ¼: 0.076 over 5), mean loss over the 15 cells 2.0449 (γ = 1: 2.0697, γ = ¼:
#: 2.0433). It resists at llama-mha-prose 20 % (+0.013 over fisher without rescale) and 40 % (+0.014
#: over Wanda-sp) and merge-task prose 40 % (+0.042 over Wanda-sp); γ = 1 stays lower at gpt2-man 40 /
#: 60 % and merge-task python 20 %. Same cost.
OBS_UPDATE = 0.5
#: what the KFAC-OBS update reconstructs (``obs_target=``; :mod:`~hf_fisher.consumers.prune.obs`): ``"layer"``
#: the layer's own output on the inputs of the model as pruned so far (OBS / OBC / SparseGPT: the update
#: compensates the units removed in this layer only), ``"unpruned"`` the unpruned model's output of the
#: layer and its residual stream (Kwon et al.'s target: the update also compensates what earlier layers lost)
OBS_TARGETS = ("layer", "unpruned")
OBS_TARGET = "unpruned"
PRUNE_FILES = ("pruning.json", "vocab_map.json")


@dataclass
class PruneResult:
    """What :func:`prune` did.

    - ``model``: the pruned model (the given one, masked in place; or a new, smaller one with
      ``physical=True``);
    - ``masks``: ``{param: BoolTensor}`` (True = kept) for every parameter a removed unit touches,
      in the given model's shapes;
    - ``removed``: the removed units (``kind, layer, index, kv_head, params``);
    - ``stats``: requested / achieved sparsity, per-layer counts and sparsities, score, seconds;
    - ``vocab_map``: after physical vocabulary pruning, ``old id -> new id`` (−1: removed).
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    removed: list[dict[str, Any]]
    stats: dict[str, Any]
    vocab_map: list[int] | None = None
    _edits: _Edits | None = field(default=None, repr=False)
    #: the model's tokenizer (an object with ``save_pretrained``, or the local folder holding its
    #: files): written beside the pruned model by :meth:`save_pretrained`
    tokenizer: Any = field(default=None, repr=False)

    def restore(self) -> None:
        """Put back every tensor the pruning changed in the given model (bitwise)."""
        if self._edits is not None:
            self._edits.restore()

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False, **kwargs: Any) -> Path:
        """``model.save_pretrained`` plus ``pruning.json`` (stats and removed units), the model's
        tokenizer (:attr:`tokenizer`: the one given to :func:`prune`, or the files of the folder the
        model was loaded from; token ids are unchanged by masking) and, after physical vocabulary
        pruning, ``vocab_map.json`` (``old_to_new``, ``new_to_old``); written to a temporary folder
        first, then renamed. An existing folder is replaced only when it holds a model
        (``overwrite=True``); never the folder the model was loaded from (``config.name_or_path``),
        nor one that holds it or lies inside it."""
        from hf_fisher.artifacts.atomic import atomic_folder, check_target
        from hf_fisher.consumers.merge.io import is_model_output_file

        target = check_target(save_directory, allowed=lambda n: is_model_output_file(n) or n in PRUNE_FILES,
                              what="pruned model", overwrite=overwrite,
                              inputs=[("model", getattr(getattr(self.model, "config", None), "name_or_path", None))])
        with atomic_folder(target, what="pruned model") as tmp:
            self.model.save_pretrained(tmp, **kwargs)
            (Path(tmp) / "pruning.json").write_text(json.dumps({"stats": self.stats, "removed": self.removed}, indent=1))
            if self.tokenizer is not None and self.vocab_map is None:
                _write_tokenizer(self.tokenizer, Path(tmp))
            if self.vocab_map is not None:
                new_to_old = [o for o, n in sorted(((o, n) for o, n in enumerate(self.vocab_map) if n >= 0), key=lambda t: t[1])]
                (Path(tmp) / "vocab_map.json").write_text(json.dumps({"old_to_new": self.vocab_map, "new_to_old": new_to_old}))
        return target


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    from hf_fisher.consumers.merge.io import TOKENIZER_FILES, copy_side_files

    if isinstance(tokenizer, (str, Path)):
        copy_side_files([Path(tokenizer)], folder, TOKENIZER_FILES)
    else:
        tokenizer.save_pretrained(folder)


def _source_tokenizer(model: nn.Module, tokenizer: Any) -> Any:
    """The tokenizer :func:`prune` carries: ``tokenizer`` when given (``False``: none), else the
    local folder the model was loaded from when it holds tokenizer files, else None."""
    from hf_fisher.consumers.merge.io import TOKENIZER_FILES

    if tokenizer is False:
        return None
    if tokenizer is not None:
        if not isinstance(tokenizer, (str, Path)) and not hasattr(tokenizer, "save_pretrained"):
            raise InvalidInputError(f"tokenizer= must be a tokenizer (with save_pretrained), a folder, or False; got {type(tokenizer).__name__}")
        if isinstance(tokenizer, (str, Path)) and not any((Path(tokenizer) / f).is_file() for f in TOKENIZER_FILES):
            raise InvalidInputError(f"tokenizer={str(tokenizer)!r} is not a folder with tokenizer files")
        return tokenizer
    from hf_fisher.architectures.builder import config_of

    for where in (getattr(model, "name_or_path", None), getattr(config_of(model), "_name_or_path", None)):
        if where and Path(where).is_dir() and any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
            return Path(where)
    return None


def _describe_tokenizer(tokenizer: Any) -> str:
    return f"the files in {str(tokenizer)!r}" if isinstance(tokenizer, (str, Path)) else type(tokenizer).__name__


def _finish(result: PruneResult, tokenizer: Any, notes: list[str]) -> PruneResult:
    result.tokenizer = tokenizer
    result.stats["warnings"] = notes + result.stats.get("warnings", [])
    return result


def _tokenizer_special_ids(tokenizer: Any) -> list[int]:
    """The special token ids of a tokenizer (object or folder): vocabulary pruning keeps them."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as e:
            raise InvalidInputError(
                f"cannot read the tokenizer in {str(tokenizer)!r} ({type(e).__name__}: {e}), so its special tokens could "
                "be pruned: pass tokenizer= (the tokenizer object), or tokenizer=False to prune without one"
            ) from None
    return [int(t) for t in getattr(tokenizer, "all_special_ids", []) if isinstance(t, int) and t >= 0]


class _Edits:
    """Originals of every tensor changed in place, and biases added, for an exact restore."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters())
        self.originals: dict[str, torch.Tensor] = {}
        self.added: list[nn.Module] = []

    def touch(self, name: str) -> None:
        if name not in self.originals:
            self.originals[name] = self.params[name].detach().clone()

    def add_bias(self, module: nn.Module, out_features: int, like: torch.Tensor) -> torch.Tensor:
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=like.dtype, device=like.device), requires_grad=False)
        self.added.append(module)
        return module.bias

    @contextlib.contextmanager
    def teacher(self):
        """The given (unpruned) model for the duration of the block: every tensor changed so far
        gets its original back by swapping ``.data`` (no copy), then the changed one again."""
        swapped = []
        try:
            for name, original in self.originals.items():
                p = self.params[name]
                swapped.append((p, p.data))
                p.data = original
            yield
        finally:
            for p, current in swapped:
                p.data = current

    def restore(self) -> None:
        with torch.no_grad():
            for name, t in self.originals.items():
                self.params[name].copy_(t)
        for m in self.added:
            m.bias = None
        self.originals, self.added = {}, []


# ----------------------------------------------------------------------------- checks
def _check_batches(name: str, batches, model: nn.Module) -> list | None:
    """The batches as a list, refused before any work when a score or the rescale could not read
    them: not batch dicts, an input_ids that is not an integer [batch, seq] tensor, a token id
    outside the model's vocabulary, an attention_mask of another shape, or no real (non-padding)
    token in any batch."""
    if batches is None:
        return None
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise InvalidInputError(f"{name} must be a list (or other re-iterable) of batch dicts with input_ids")
    out = list(batches)
    if not out:
        raise EmptyDataError(f"{name} is empty: give at least one batch dict with input_ids")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    real = 0
    for i, b in enumerate(out):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise InvalidInputError(f"{name}[{i}] is not a batch dict with input_ids")
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise InvalidInputError(f"{name}[{i}]: input_ids must be an integer tensor [batch, seq_len]")
        if vocab is not None and ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InvalidInputError(
                f"{name}[{i}]: token id {bad} is outside the model's vocabulary [0, {vocab}); check the tokenizer matches the model"
            )
        mask = b.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
            raise InvalidInputError(f"{name}[{i}]: attention_mask must be a tensor of input_ids' shape {tuple(ids.shape)}")
        real += int(ids.numel()) if mask is None else int(mask.bool().sum())
    if real == 0:
        raise EmptyDataError(
            f"{name} holds no real token (every position is padding: attention_mask is all 0); the data-based "
            "scores and the rescale read real tokens only — give batches with text"
        )
    return out


def _check_keep_tokens(keep_tokens, model: nn.Module) -> list[int]:
    if isinstance(keep_tokens, (str, bytes, Mapping)) or not isinstance(keep_tokens, Iterable):
        raise InvalidInputError(f"keep_tokens must be a list of token ids, got {type(keep_tokens).__name__}")
    out = list(keep_tokens)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab):
            raise InvalidInputError(
                f"keep_tokens: {t!r} is not a token id of this model (integers in [0, {vocab if vocab is not None else '?'}))"
            )
    return out


def _structured_kinds(structured) -> list[str] | None:
    if structured is None:
        return None
    kinds = [structured] if isinstance(structured, str) else list(structured)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InvalidInputError(f"structured={structured!r}: choose from {', '.join(KINDS)} (or None for unstructured)")
    if "heads" in kinds and "kv_heads" in kinds:
        raise InvalidInputError("structured: 'heads' and 'kv_heads' overlap (a kv group holds query heads); choose one")
    return list(dict.fromkeys(kinds))


def _confident_score(name: Any) -> bool:
    """Whether the registered score ``name`` has a standard error (``confidence=`` applies)."""
    cls = plugins.prune_scores().get(name) if isinstance(name, str) else None
    return bool(getattr(cls, "confidence", False))


def _layout_of(model: nn.Module, fisher: Fisher | None):
    if fisher is not None:
        fisher.validate(model)
        if fisher.layout is not None:
            return fisher.layout
    return plugins.model_layout(model)


#: how the option checks name what to change: in the Python API and on the command line
API_TERMS = {
    "score": "score={!r}", "data": "calibration_batches= (or rescale_batches=)", "rescale_data": "rescale_batches=",
    "fisher": "fisher= (hf_fisher.collect(model, batches))", "layer": "scope='layer'", "masked": "physical=False",
    "physical": "physical=True", "structured": "structured=...", "unstructured": "structured=None",
    "confidence": "confidence=", "param": "a Fisher collected with reduction='param'", "min": "min_per_layer",
    "no_rescale": "rescale=False", "compensate": "compensate", "sequential": "sequential=True",
    "obs_update": "obs_update=", "obs_target": "obs_target=",
}
CLI_TERMS = {
    "score": "--score {}", "data": "--data FILE", "rescale_data": "--data FILE",
    "fisher": "--fisher DIR (hf-fisher collect --out DIR)", "layer": "--scope layer", "masked": "no --physical",
    "physical": "--physical", "structured": "--structured heads,channels", "unstructured": "--structured none",
    "confidence": "--confidence", "param": "a Fisher collected with hf-fisher collect --reduction param",
    "min": "--min-per-layer", "no_rescale": "--no-rescale", "compensate": "FLAP's bias compensation",
    "sequential": "sequential", "obs_update": "--obs-update", "obs_target": "--obs-target",
}


def check_options(*, sparsity, structured, score, scope, min_per_layer, confidence, physical: bool, has_data: bool,
                  has_rescale_data: bool, fisher, rescale=None, compensate=None, sequential: bool = False, config=None,
                  obs_update=None, obs_target=None, terms: Mapping[str, str] = API_TERMS) -> tuple[list[str] | None, str, bool, bool]:
    """Every check of :func:`prune`'s options that needs neither the model's weights nor the data's
    content — run by ``prune`` and by ``hf-fisher prune`` before it loads the model, with the
    messages in ``terms`` (:data:`API_TERMS` or :data:`CLI_TERMS`). ``config``: the model's config
    (physical removal). Returns ``(kinds, score, rescale, compensate)`` resolved."""
    t = terms
    kinds = _structured_kinds(structured)
    default = score is None
    if default:  # the best criterion the inputs allow
        score = "kfac" if (has_data and scope == "layer" and kinds and "vocab" not in kinds
                           and confidence is None) else "fisher"
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise InvalidInputError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise InvalidInputError(f"scope={scope!r}: choose 'global' or 'layer'")
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, int) or min_per_layer < 0:
        raise InvalidInputError(f"{t['min']} must be a non-negative integer, got {min_per_layer!r}")
    if min_per_layer == 0 and set(kinds or ()) & {"heads", "kv_heads"}:
        raise InvalidInputError(
            f"{t['min']} 0 lets a layer lose every attention head (kv-head): its attention would be gone, and a "
            f"smaller model cannot have zero heads. Use {t['min']} 1 or more (the default 1)"
        )
    sc = t["score"].format(score)
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, float) or not 0.0 < confidence < 1.0:
            raise InvalidInputError(f"{t['confidence']} must be a number in (0, 1), e.g. 0.95; got {confidence!r}")
        if not _confident_score(score) or fisher is None or not fisher.has_variance:
            with_se = " or ".join(t["score"].format(n) for n, c in plugins.prune_scores().items() if c.confidence)
            raise InvalidInputError(
                f"{t['confidence']} needs {with_se} and {t['fisher']} "
                "with variances (collect keeps them)"
            )
        if kinds is None:
            raise InvalidInputError(f"{t['confidence']} applies to structured pruning (group scores), not {t['unstructured']}")
    cls = get_score(score, terms=t["score"])
    if kinds is None and not cls.unstructured:
        names = [n for n, c in plugins.prune_scores().items() if c.unstructured]
        raise InvalidInputError(
            f"{sc} is defined for structured units only; with {t['unstructured']} choose one of {', '.join(names)}"
        )
    if cls.needs_fisher and fisher is None and not sequential:
        how = (f" (the default without {t['data']} and {t['layer']}; with them it is 'kfac')" if default else "")
        raise InvalidInputError(f"{sc} reads a Fisher artifact{how}: pass {t['fisher']}, or choose another score")
    if cls.needs_fisher and fisher is not None and fisher.reduction != "param" and (
            cls.fisher_reduction == "param" or kinds is None):
        raise InvalidInputError(
            f"{sc} {'with ' + t['unstructured'] + ' ' if kinds is None else ''}needs the Fisher of every weight: "
            f"{t['param']}; the given Fisher is a group Fisher"
        )
    if cls.needs_data and not has_data:
        raise InvalidInputError(f"{sc} is computed on calibration data: pass {t['data']}")
    if cls.output_projection and kinds and "vocab" in kinds:
        raise InvalidInputError(f"{sc} is defined through output projections; it does not apply to vocabulary rows")
    if rescale is None:
        rescale = has_rescale_data and cls.rescale_default
    if rescale and not has_rescale_data:
        raise InvalidInputError(f"the rescale needs {t['rescale_data']} (a few calibration batches)")
    if rescale and kinds is None:
        raise InvalidInputError(f"the rescale applies to structured pruning; pass {t['structured']} or {t['no_rescale']}")
    if compensate is None:
        compensate = cls.compensate_default and kinds is not None
    if compensate and (not has_data or kinds is None or "vocab" in kinds):
        raise InvalidInputError(
            f"{t['compensate']} (with {t['score'].format('flap')}) needs heads / kv-heads / channels (no vocabulary rows) "
            f"and {t['data']}"
        )
    if cls.layer_by_layer and (scope != "layer" or not has_data or kinds is None or "vocab" in kinds
                               or confidence is not None):
        raise InvalidInputError(
            f"{sc} (structured OBS under the KFAC quadratic) prunes heads / kv-heads / channels layer by layer: it "
            f"needs {t['layer']}, {t['data']}, no vocabulary rows and no {t['confidence']}"
        )
    if sequential and (scope != "layer" or not has_data or kinds is None or confidence is not None):
        raise InvalidInputError(
            f"{t['sequential']} scores each layer on the pruned model: it needs structured units, {t['layer']}, "
            f"{t['data']} and no {t['confidence']}"
        )
    if obs_update is not None:
        if isinstance(obs_update, bool) or not isinstance(obs_update, (int, float)) or not 0.0 <= float(obs_update) <= 1.0:
            raise InvalidInputError(f"{t['obs_update']} must be a number in [0, 1] (the fraction of the KFAC-OBS update "
                                    f"applied; default {OBS_UPDATE}), got {obs_update!r}")
        if score != "kfac":
            raise InvalidInputError(f"{t['obs_update']} is the fraction of the KFAC-OBS update; it applies to "
                                    f"{t['score'].format('kfac')} only, not {sc}")
    if obs_target is not None:
        if obs_target not in OBS_TARGETS:
            raise InvalidInputError(f"{t['obs_target']} must be one of {', '.join(map(repr, OBS_TARGETS))} (what the "
                                    f"KFAC-OBS update reconstructs; default {OBS_TARGET!r}), got {obs_target!r}")
        if score != "kfac":
            raise InvalidInputError(f"{t['obs_target']} is what the KFAC-OBS update reconstructs; it applies to "
                                    f"{t['score'].format('kfac')} only, not {sc}")
    if physical:
        from hf_fisher.consumers.prune.physical import check_physical

        check_physical(config, kinds, scope, bool(compensate), terms=t)
    return kinds, score, bool(rescale), bool(compensate)


# ----------------------------------------------------------------------------- main
def prune(
    model: nn.Module,
    fisher: Fisher | None = None,
    *,
    sparsity: float,
    structured: str | Sequence[str] | None = ("heads", "channels"),
    score: str | None = None,
    scope: str = "global",
    min_per_layer: int = 1,
    confidence: float | None = None,
    physical: bool = False,
    rescale_batches: Sequence[Mapping[str, Any]] | None = None,
    rescale: bool | None = None,
    calibration_batches: Sequence[Mapping[str, Any]] | None = None,
    compensate: bool | None = None,
    keep_tokens: Sequence[int] = (),
    sequential: bool = False,
    seed: int = 0,
    progress: bool = True,
    tokenizer: Any = None,
    validation: Sequence[Mapping[str, Any]] | str | None = None,
    obs_update: float | None = None,
    obs_target: str | None = None,
) -> PruneResult:
    """Prune ``model`` to ``sparsity`` (module docstring for budgets, confidence and applying).

    ``score=None`` (default) is ``"kfac"`` — structured OBS under the KFAC quadratic with half of
    its Fisher-weighted reconstruction of the unpruned layers folded in (``obs_update``) — when calibration batches are given
    with ``scope="layer"`` (heads / kv-heads / channels), else ``"fisher"``; with ``validation=``
    batches the criterion and the bias compensation are chosen on them (below), with
    ``validation="holdout"`` on the last quarter of the calibration batches (module docstring).
    ``fisher``: the artifact for ``score="fisher"`` / ``"obd"`` (a group Fisher works for
    "fisher"; "obd" and unstructured pruning need ``reduction="param"``). ``score``: the name of a
    registered :class:`~hf_fisher.consumers.prune.base.PruneScore` (built-ins in
    :mod:`~hf_fisher.consumers.prune.scores`; plugins add more, ``hf_fisher.plugins.prune_scores()``
    lists them); what it needs is checked from its class before any work. ``rescale_batches``: calibration batches for the
    least-squares rescale, on by default when given (``rescale=False`` turns it off; FLAP uses its
    bias compensation instead unless ``rescale=True``). ``calibration_batches``: batches for the
    data-driven scores (default: ``rescale_batches``). ``compensate``: FLAP's bias compensation
    (default: on for ``score="flap"``). ``keep_tokens``: token ids vocabulary pruning never
    removes (besides the config's and the tokenizer's special tokens). ``physical``: remove heads /
    channels / rows and return a smaller model (LLaMA-family configs; ``scope="layer"``).
    ``tokenizer``: the model's tokenizer (object or folder; default: the tokenizer files of the
    local folder the model was loaded from, if any; ``False``: none). Its special tokens are never
    pruned and ``PruneResult.save_pretrained`` writes it beside the model. Physical vocabulary
    pruning renumbers the token ids, which a tokenizer cannot follow: with a tokenizer it is
    refused (prune the rows with ``physical=False``, ids unchanged; or pass ``tokenizer=False`` and
    map ids through ``vocab_map.json``).
    ``sequential=True`` (``scope="layer"``, calibration batches): each layer's units are scored on
    the model as pruned (and rescaled) so far, attention then MLP, layer by layer, with the same
    counts; "fisher" / "obd" then use the exact Fisher of the calibration batches on that model.
    ``validation``: held-out batches (not the calibration batches) on which the options left
    unset are chosen (:func:`_by_validation`): the criterion among :data:`VALIDATION_SCORES`
    when ``score`` is None, FLAP's bias compensation on or off when ``compensate`` is None; each
    candidate prunes the model (masked), its mean validation batch loss is measured, the lowest
    wins (logged as a WARNING and recorded in ``stats["validation"]``, saved in pruning.json).
    ``obs_update``: score "kfac" only, the fraction ``γ ∈ [0, 1]`` of the OBS update folded into
    the kept units, scales ``1 + γ (s − 1)`` (:mod:`~hf_fisher.consumers.prune.obs`); default
    :data:`OBS_UPDATE` = ½, ``1`` the full update (the default before), ``0`` the selection alone;
    recorded in ``stats["obs_update"]``. ``obs_target``: score "kfac" only, what the update
    reconstructs: ``"unpruned"`` (default, :data:`OBS_TARGET`) the unpruned model's output of each
    layer and its residual stream, ``"layer"`` the layer's own output on the inputs of the model
    pruned so far (:data:`OBS_TARGETS`); recorded in ``stats["obs_target"]``.
    """
    from hf_fisher.architectures.builder import config_of

    options = dict(sparsity=sparsity, structured=structured, score=score, scope=scope, min_per_layer=min_per_layer,
                   confidence=confidence, physical=physical, rescale_batches=rescale_batches, rescale=rescale,
                   calibration_batches=calibration_batches, compensate=compensate, keep_tokens=keep_tokens,
                   sequential=sequential, seed=seed, progress=progress, tokenizer=tokenizer, obs_update=obs_update,
                   obs_target=obs_target)
    if isinstance(validation, str):
        if validation != "holdout":
            raise InvalidInputError(f"validation must be held-out batches or 'holdout', got {validation!r}")
        if score is not None:
            raise InvalidInputError("validation='holdout' chooses the criterion: leave score=None (or drop validation=)")
        refusal = _holdout_refusal(options, model, fisher)
        if refusal is not None:
            raise InvalidInputError(f"validation='holdout' {refusal}")
        return _by_holdout(model, fisher, options)
    if validation is not None:
        return _by_validation(model, fisher, validation, **options)
    t_start = time.perf_counter()
    chosen = {"score": score is not None, "compensate": compensate is not None}
    if hasattr(model, "peft_config") and physical:
        raise UnsupportedError("physical removal of a PEFT model: merge the adapters first (model.merge_and_unload())")
    kinds, score, rescale, compensate = check_options(
        sparsity=sparsity, structured=structured, score=score, scope=scope, min_per_layer=min_per_layer,
        confidence=confidence, physical=physical, has_data=rescale_batches is not None or calibration_batches is not None,
        has_rescale_data=rescale_batches is not None, fisher=fisher, rescale=rescale, compensate=compensate,
        sequential=sequential, config=config_of(model), obs_update=obs_update, obs_target=obs_target,
    )
    keep_tokens = _check_keep_tokens(keep_tokens, model)
    tokenizer = _source_tokenizer(model, tokenizer)
    if tokenizer is not None and kinds and "vocab" in kinds:
        if physical:
            raise InvalidInputError(
                f"physical vocabulary pruning renumbers the token ids, and the tokenizer ({_describe_tokenizer(tokenizer)}) "
                "cannot be renumbered with them: prune the rows with physical=False (zeroed, ids and tokenizer "
                "unchanged), or pass tokenizer=False to write no tokenizer and map ids through vocab_map.json (old_to_new)"
            )
        keep_tokens = keep_tokens + _tokenizer_special_ids(tokenizer)
    rescale_batches = _check_batches("rescale_batches", rescale_batches, model)
    calibration_batches = _check_batches("calibration_batches", calibration_batches, model) or rescale_batches
    layout = _layout_of(model, fisher)
    notes: list[str] = []
    if kinds is None:
        names = [n for n, _ in model.named_parameters() if input_axis(model, n) is not None and (fisher is None or n in fisher)]
        _saturation(model, score, fisher, calibration_batches, notes, names=names)
        return _finish(_prune_unstructured(model, fisher, sparsity=float(sparsity), score=score, scope=scope,
                                           batches=calibration_batches, seed=seed, progress=progress, physical=physical,
                                           t_start=t_start), tokenizer, notes)
    units = structured_units(model, layout, kinds, keep_tokens=keep_tokens)
    if _saturation(model, score, fisher, calibration_batches, notes, units=units) and score == "kfac" \
            and not chosen["score"] and not chosen["compensate"] and not compensate:
        try:
            if physical:
                from hf_fisher.consumers.prune.physical import check_physical

                check_physical(config_of(model), kinds, scope, True)
            compensate = True
            _note(notes, "so the default criterion (score 'kfac', not chosen) runs WITH FLAP's bias compensation of the "
                         "mean output each projection loses (compensate=True, not chosen): it restores what the rescale "
                         "cannot on such a model (pass compensate=False to keep the plain default)")
        except UnsupportedError as e:
            _note(notes, f"the bias compensation that helps such a model cannot be added here ({e})")
    cls = get_score(score)
    if sequential or cls.layer_by_layer:
        return _finish(_prune_sequential(
            model, units, score=score, sparsity=float(sparsity), min_per_layer=min_per_layer, calibration=calibration_batches,
            rescale_batches=rescale_batches if rescale else None, compensate=bool(compensate), seed=seed, progress=progress,
            physical=physical, t_start=t_start, layout=layout, notes=notes,
            obs_update=OBS_UPDATE if obs_update is None else float(obs_update),
            obs_target=OBS_TARGET if obs_target is None else obs_target), tokenizer, notes)
    stats_act = None
    t_stats = time.perf_counter()
    if cls.needs_activations or compensate:
        stats_act = S.activation_stats(model, list(dict.fromkeys(s.param for u in units for s in u.out)), calibration_batches, progress=progress)
    t_stats = time.perf_counter() - t_stats
    scores, score_seconds = S.score_units(model, units, score, fisher=fisher, batches=calibration_batches,
                                          stats=stats_act, seed=seed, progress=progress)
    score_seconds += t_stats  # the activation statistics are part of the score's cost
    if scope == "layer":
        removed, blocked = _select_layer(units, scores, float(sparsity), min_per_layer)
    else:
        removed, blocked = _select_global(units, _global_keys(units, scores, cls.global_key), float(sparsity), min_per_layer)
    withheld = 0
    if confidence is not None:
        removed, withheld = _confident(units, scores, removed, fisher, confidence, scope, score, model)
    edits = _Edits(model)
    t_apply = time.perf_counter()
    # with FLAP's bias compensation (which restores each projection's mean output on the unpruned inputs)
    # the rescale reconstructs the projection output alone: the residual term would correct the same mean twice
    residuals = _residuals(model, units, layout, rescale_batches, notes) if rescale and not compensate else None
    rescaled = _apply(model, units, set(removed), edits, rescale_batches if rescale else None, progress,
                      residuals=residuals)
    if compensate:
        _compensate(model, units, set(removed), stats_act, edits)
    masks = _masks(model, units, removed)
    stats = _stats(units, removed, float(sparsity), score, scope, score_seconds, min_per_layer, blocked)
    stats.update(withheld_by_confidence=withheld, rescaled=rescaled, compensated=bool(compensate),
                 apply_seconds=time.perf_counter() - t_apply)
    result = PruneResult(model, masks, [describe(units[k]) for k in removed], stats, _edits=edits)
    if physical:
        from hf_fisher.consumers.prune.physical import build_physical

        try:
            small, vocab_map = build_physical(model, units, set(removed))
        finally:
            edits.restore()
        result = PruneResult(small, masks, result.removed, stats, vocab_map=vocab_map)
    stats["seconds"] = time.perf_counter() - t_start
    logger.info("pruned %d of %d units (%.1f%% of their parameters) by %s, scope %s",
                len(removed), len(units), 100 * stats["achieved_sparsity"], score, scope)
    return _finish(result, tokenizer, notes)


#: the criteria ``validation=`` chooses among when ``score`` is None, as ``(score, rescale)`` (None:
#: the score's default — KFAC-OBS's own reconstruction, the least squares for mask Fisher, none for
#: FLAP; Wanda-sp both in its published form and with the least squares), each with and without
#: the bias compensation; a ``rescale=`` given to ``prune`` applies to all
VALIDATION_SCORES = (("kfac", None), ("mask_fisher", None), ("flap", None), ("wanda_sp", False), ("wanda_sp", True))


#: ``validation="holdout"`` needs at least this many calibration batches and holds out the last
#: ``ceil(HOLDOUT_FRACTION · n)`` of them (:func:`_by_holdout`)
HOLDOUT_MIN_BATCHES = 4
HOLDOUT_FRACTION = 0.25


def _holdout_refusal(options: Mapping[str, Any], model: nn.Module, fisher) -> str | None:
    """Why ``validation="holdout"`` cannot choose here (None when it can): it needs ``scope="layer"``,
    heads / kv-heads / channels (no vocabulary rows), no ``confidence`` and at least
    :data:`HOLDOUT_MIN_BATCHES` calibration batches. The options are checked first, in their own terms."""
    kinds = _structured_kinds(options["structured"])
    batches = options["calibration_batches"] if options["calibration_batches"] is not None else options["rescale_batches"]
    if batches is None:
        return f"holds out calibration batches: pass at least {HOLDOUT_MIN_BATCHES} as calibration_batches= or rescale_batches="
    if options["scope"] != "layer" or not kinds or "vocab" in kinds or options["confidence"] is not None:
        return ("chooses among the layer-wise criteria: it needs scope='layer', heads / kv-heads / channels (no vocab) "
                "and no confidence=")
    from hf_fisher.architectures.builder import config_of

    check_options(sparsity=options["sparsity"], structured=kinds, score=None, scope=options["scope"],
                  min_per_layer=options["min_per_layer"], confidence=None, physical=options["physical"], has_data=True,
                  has_rescale_data=options["rescale_batches"] is not None, fisher=fisher, rescale=options["rescale"],
                  compensate=options["compensate"], sequential=options["sequential"], config=config_of(model))
    n = len(_check_batches("calibration_batches" if options["calibration_batches"] is not None else "rescale_batches",
                           batches, model))
    if n < HOLDOUT_MIN_BATCHES:
        return (f"holds out the last quarter of the calibration batches and needs at least {HOLDOUT_MIN_BATCHES} "
                f"(got {n}): pass more batches, or validation= batches of held-out text")
    return None


def _by_holdout(model, fisher, options: Mapping[str, Any]) -> PruneResult:
    """``validation="holdout"`` (:func:`_holdout_refusal`): the last
    ``h = ceil(HOLDOUT_FRACTION · n)`` of the ``n`` calibration batches are held out; every
    candidate of :func:`_by_validation` prunes the model with the other ``n − h`` batches (also
    as rescale batches, when the rescale batches are the calibration batches) and is scored by its
    mean loss on the held-out ones; the lowest (the first of equal losses) then prunes the model
    with all ``n`` batches. Deterministic; logged (WARNING) and recorded in
    ``stats["validation"]`` with ``"source": "held-out calibration batches"`` and their indices."""
    calib_given = options["calibration_batches"] is not None
    batches = _check_batches("calibration_batches" if calib_given else "rescale_batches",
                             options["calibration_batches"] if calib_given else options["rescale_batches"], model)
    h = max(1, math.ceil(HOLDOUT_FRACTION * len(batches)))
    fit, held = batches[:-h], batches[-h:]
    rescale = options["rescale_batches"]
    if rescale is not None:
        rescale = _check_batches("rescale_batches", rescale, model)
        rescale_fit = [b for b in rescale if not any(b is x for x in held)]
        rescale_fit = rescale_fit or fit  # every rescale batch held out: fit with the calibration ones kept
    else:
        rescale_fit = None
    fit_options = {**options, "calibration_batches": fit, "rescale_batches": rescale_fit}
    where = {"source": "held-out calibration batches", "held_out": list(range(len(batches) - h, len(batches))),
             "of": len(batches)}
    return _by_validation(model, fisher, held, fit_options=fit_options, record=where, **options)


def _by_validation(model, fisher, validation, *, fit_options: Mapping[str, Any] | None = None,
                   record: Mapping[str, Any] | None = None, **options) -> PruneResult:
    """``prune(..., validation=batches)``: every candidate setting of the options left unset
    (``score``: :data:`VALIDATION_SCORES` that the inputs allow, with their rescale setting;
    ``compensate``: off / on where allowed) prunes the model (masked) and is scored by the mean loss of the validation batches
    (``model(**batch).loss``, labels = inputs with padding ignored); the lowest (the first of
    equal losses) prunes the model for good. Refused before any work when nothing is left to
    choose or an option is refused for every candidate. ``fit_options``: the options the
    candidates prune with (default: ``options``; :func:`_by_holdout` gives them fewer calibration
    batches); ``record``: added to ``stats["validation"]``."""
    from hf_fisher.architectures.builder import config_of
    from hf_fisher.consumers.merge.api import validation_loss

    batches = _check_batches("validation", validation, model)
    has_data = options["rescale_batches"] is not None or options["calibration_batches"] is not None
    common = dict(sparsity=options["sparsity"], structured=options["structured"], scope=options["scope"],
                  min_per_layer=options["min_per_layer"], confidence=options["confidence"], has_data=has_data,
                  has_rescale_data=options["rescale_batches"] is not None, fisher=fisher,
                  sequential=options["sequential"], config=config_of(model), obs_update=options["obs_update"],
                  obs_target=options["obs_target"])
    user_rescale = options["rescale"]
    pairs = [(options["score"], None)] if options["score"] is not None else list(VALIDATION_SCORES)
    if user_rescale is not None or options["rescale_batches"] is None:
        pairs = list(dict.fromkeys((sc, user_rescale) for sc, _ in pairs))
    comps = [options["compensate"]] if options["compensate"] is not None else [False, True]
    if options["score"] is not None and options["compensate"] is not None:
        raise InvalidInputError("validation= chooses the score and the bias compensation left unset (score=None, "
                                "compensate=None); both are set here: leave one unset, or drop validation=")
    t_start = time.perf_counter()
    cands, refusals = [], []
    for sc, resc in pairs:
        for comp in comps:
            try:
                check_options(score=sc, compensate=comp, rescale=resc, physical=options["physical"], **common)
            except (InvalidInputError, UnsupportedError) as e:
                refusals.append(f"score={sc!r}, compensate={comp}: {e}")
                continue
            cands.append({"score": sc, "compensate": comp, "rescale": resc})
    if not cands:
        raise InvalidInputError("validation= has no candidate these options allow: " + "; ".join(refusals))
    run = {k: v for k, v in options.items() if k not in ("score", "compensate", "rescale")}
    fit = {k: v for k, v in (fit_options or options).items() if k not in ("score", "compensate", "rescale")}
    results = []
    from tqdm.auto import tqdm

    for c in tqdm(cands, desc="validation candidates", disable=not options["progress"]):
        r = prune(model, fisher, **{**fit, "physical": False, "progress": False}, **c)
        try:
            loss = validation_loss(model, [batches])
        finally:
            r.restore()
        results.append({**c, "rescale": bool(r.stats.get("rescaled")), "validation_loss": loss})
    best = min(range(len(results)), key=lambda i: results[i]["validation_loss"])
    choice = cands[best]
    result = prune(model, fisher, **run, **choice)
    result.stats["validation"] = {"criterion": "mean validation batch loss (labels = inputs, padding ignored)",
                                  "source": "validation=", **(record or {}), "batches": len(batches),
                                  "candidates": results, "chosen": results[best],
                                  "seconds": time.perf_counter() - t_start}
    others = ", ".join(f"{r['score']}{' + rescale' if r['rescale'] else ''}{' + bias compensation' if r['compensate'] else ''} "
                       f"{r['validation_loss']:.6g}" for i, r in enumerate(results) if i != best)
    by = "validation" if record is None else f"the default, on {len(batches)} held-out calibration batch(es),"
    logger.warning("prune: %s chose score=%r, rescale=%s, compensate=%s (validation loss %.6g; others: %s); "
                   "recorded in stats['validation'] and pruning.json", by, choice["score"], results[best]["rescale"],
                   choice["compensate"], results[best]["validation_loss"], others or "none")
    return result


#: below these, the model fits its data so closely that its Fisher scores are noise (``_saturation``)
SATURATED_LOSS = 0.01  # nats per label token on the calibration batches
SATURATED_QUADRATIC = 1e-5  # nats: the Fisher's own estimate of removing every candidate parameter (tiny random models: ~5e-4; the demo's converged model: ~1e-8)


def _note(notes: list[str], message: str) -> None:
    logger.warning("%s", message)
    notes.append(message)


def _saturation(model, score: str, fisher, batches, notes: list[str], *, units=None, names=None) -> bool:
    """Whether the model is saturated on its data, where Fisher (curvature) scores say nothing:
    its mean calibration loss is below :data:`SATURATED_LOSS`, or the given Fisher's quadratic
    estimate of the loss increase of zeroing *every* candidate parameter, ``½ Σ F w²`` (a group
    Fisher: ``½ Σ_u F_u ‖w_u‖² / n_u``), is below :data:`SATURATED_QUADRATIC`. Both the empirical
    and the true Fisher vanish there: the gradients of a model predicting its labels with
    probability ≈ 1 vanish, and so does the curvature of its loss. Adds a WARNING to ``notes``
    when ``score`` is a Fisher / gradient score."""
    if not get_score(score).curvature:
        return False
    from hf_fisher.engine.losses import model_loss

    loss = None
    if batches is not None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [float(model_loss(model, b)) for b in batches]
        except Exception:
            logger.debug("no calibration loss for the saturation check", exc_info=True)
            losses = []
        finally:
            model.train(was)
        finite = [v for v in losses if math.isfinite(v)]
        loss = sum(finite) / len(finite) if finite else None
    quad = None
    if fisher is not None and get_score(score).needs_fisher:
        params = dict(model.named_parameters())
        if names is not None:
            quad = sum(float((0.5 * fisher[n].double().cpu() * params[n].detach().double().cpu() ** 2).sum()) for n in names)
        elif units:
            F_u = S._fisher_sums(fisher, units)
            w2 = S._slice_sums(units, {n: params[n].detach().double() ** 2 for n in S._unit_params(units)})
            sizes = torch.tensor([max(1, u.size) for u in units], dtype=torch.float64)
            quad = float(0.5 * (F_u * w2 / sizes).sum())
    low_loss = loss is not None and loss < SATURATED_LOSS
    low_quad = quad is not None and quad < SATURATED_QUADRATIC
    if not (low_loss or low_quad):
        return False
    facts = []
    if loss is not None:
        facts.append(f"mean calibration loss {loss:.3g} nats")
    if quad is not None:
        facts.append(f"the Fisher's own estimate of the loss increase of removing every candidate parameter, "
                     f"½ Σ F w², is {quad:.3g} nats")
    _note(notes, f"score {score!r} on a saturated model ({'; '.join(facts)}): the model fits its data so closely that its "
                 "gradients vanish, and with them the empirical Fisher, the true Fisher (sampled labels: the model "
                 "samples its own confident answer) and every curvature-based score — their ranking is noise here. "
                 "Unstructured: prefer score='magnitude'. Structured: prune with calibration data and FLAP's bias "
                 "compensation (score='flap', or the default 'kfac' with compensate=True)")
    return True


def _confident(units, scores, removed, fisher, confidence, scope, score, model) -> tuple[list[int], int]:
    from scipy import stats as sps

    from hf_fisher import analysis

    se = get_score(score)().stderr(model, units, fisher)
    n = analysis.effective_count(fisher)
    t = float(sps.t.ppf((1 + confidence) / 2, max(1.0, n - 1)))
    ucb = scores + t * se
    rem = set(removed)
    kept_min: dict[Any, float] = {}
    for k, u in enumerate(units):
        if k in rem:
            continue
        key = u.bucket if scope == "layer" else None
        kept_min[key] = min(kept_min.get(key, math.inf), float(scores[k]))
    out = [k for k in removed if float(ucb[k]) < kept_min.get(units[k].bucket if scope == "layer" else None, math.inf)]
    return out, len(removed) - len(out)


def _zero(model: nn.Module, unit: Unit, edits: _Edits) -> None:
    with torch.no_grad():
        for s in unit.slices:
            edits.touch(s.param)
            edits.params[s.param][s.index()] = 0


def _apply(model, units: Sequence[Unit], removed: set[int], edits: _Edits, batches, progress: bool, choose=None,
           residuals=None) -> list[dict]:
    """Zero the removed units; with ``batches``, rescale stage by stage (layer order, attention
    before MLP) before each stage's masks go in, each stage reconstructing the unpruned model's
    output of the stage on the inputs of the model pruned so far (:mod:`.rescale`). ``choose(members)`` (sequential pruning) picks
    each stage's removed units on the model as it is then and adds them to ``removed``.
    ``residuals``: :func:`~.rescale.residual_blocks` of the model (the stage then also
    reconstructs the residual stream). Returns the rescale log."""
    from hf_fisher.consumers.prune.rescale import fold_scales, least_squares_scales, output_grams

    if batches is None and choose is None:
        for k in sorted(removed):
            _zero(model, units[k], edits)
        return []
    stages: dict[tuple, list[int]] = {}
    order = {"head": 0, "kv_head": 0, "channel": 1, "vocab": 2}
    for k, u in enumerate(units):
        stages.setdefault((u.layer if u.layer is not None else 1 << 30, order[u.kind]), []).append(k)
    log: list[dict] = []
    from tqdm.auto import tqdm

    for key in tqdm(sorted(stages), desc="rescale", unit="stage", disable=not progress):
        members = stages[key]
        if choose is not None:
            removed.update(choose(members))
        gone = [k for k in members if k in removed]
        if not gone:
            continue
        if batches is None or units[members[0]].kind == "vocab" or not units[members[0]].out:
            for k in gone:
                _zero(model, units[k], edits)
            continue
        weight = units[members[0]].out[0].param
        residual = (residuals or {}).get(weight)
        gram, cross, gap = output_grams(model, weight, batches, edits.teacher, residual)
        kept_pos = [i for i, k in enumerate(members) if k not in removed]
        stage_units = [units[k] for k in members]
        scales = least_squares_scales(model, weight, stage_units, kept_pos, gram, cross, gap) if kept_pos else None
        for k in gone:
            _zero(model, units[k], edits)
        if scales is not None:
            fold_scales(model, weight, [stage_units[i] for i in kept_pos], scales, edits.touch)
            log.append({"weight": weight, "kept": len(kept_pos), "removed": len(gone), "residual": residual is not None,
                        "scale_min": float(scales.min()), "scale_max": float(scales.max())})
    return log


class _ParamFisher(dict):
    """Parameter-level Fisher tensors in the form score_units reads (``fisher[name]``)."""

    reduction = "param"


def _prune_sequential(model, units, *, score, sparsity, min_per_layer, calibration, rescale_batches, compensate,
                      seed, progress, physical, t_start, layout, notes, obs_update: float,
                      obs_target: str) -> PruneResult:
    """Layer by layer, attention then MLP: score the stage's units on the model as it is now,
    remove the counts ``scope="layer"`` removes, rescale (or compensate), go on."""
    counts: dict[tuple, int] = {}
    planned, blocked = _select_layer(units, torch.zeros(len(units), dtype=torch.float64), sparsity, min_per_layer)
    for k in planned:
        counts[units[k].budget] = counts.get(units[k].budget, 0) + 1
    seconds = [0.0]

    scorer = get_score(score)()
    greedy = scorer.layer_by_layer
    if hasattr(scorer, "update"):  # KFAC-OBS: the fraction of its update folded in, and what it reconstructs
        scorer.update = obs_update
        scorer.target = obs_target
    edits = _Edits(model)
    if greedy:
        scorer.prepare(model, units, ScoreInputs(batches=calibration, seed=seed, progress=False))
    obs_log: list[dict] = []

    def choose_greedy(members: list[int]) -> list[int]:
        stage = [units[k] for k in members]
        t0 = time.perf_counter()
        quota = {k: v for k, v in counts.items() if k[1] == stage[0].layer}
        residual = residuals.get(stage[0].out[0].param) if stage[0].out else None
        gone, entry = scorer.prune_stage(model, Stage(stage, quota, edits.touch, edits.teacher, residual),
                                         ScoreInputs(batches=calibration, seed=seed + members[0], progress=False))
        if entry is not None:
            obs_log.append(entry)
        seconds[0] += time.perf_counter() - t0
        return [members[i] for i in gone]

    def choose(members: list[int]) -> list[int]:
        if greedy:
            return choose_greedy(members)
        stage = [units[k] for k in members]
        t0 = time.perf_counter()
        fisher = None
        if scorer.needs_fisher:
            names = list(dict.fromkeys(s.param for u in stage for s in u.slices))
            fisher = _ParamFisher(S.calibration_fisher(model, names, calibration, progress=False))
        scores, _ = S.score_units(model, stage, score, fisher=fisher, batches=calibration, seed=seed + members[0],
                                  progress=False)
        seconds[0] += time.perf_counter() - t0
        by_key: dict[tuple, list[int]] = {}
        for i, u in enumerate(stage):
            by_key.setdefault(u.budget, []).append(i)
        picked: list[int] = []
        for key, idx in by_key.items():
            order = sorted(idx, key=lambda i: (float(scores[i]), i))
            picked += [members[i] for i in order[: counts.get(key, 0)]]
        return picked

    removed: set[int] = set()
    stats_act = None
    if compensate:
        stats_act = S.activation_stats(model, list(dict.fromkeys(s.param for u in units for s in u.out)), calibration, progress=progress)
    t_apply = time.perf_counter()
    residuals = {} if compensate else _residuals(model, units, layout, (calibration if greedy else rescale_batches) or [None], notes)
    rescaled = _apply(model, units, removed, edits, None if greedy else rescale_batches, progress, choose=choose,
                      residuals=residuals)
    rescaled = obs_log or rescaled
    if compensate:
        _compensate(model, units, removed, stats_act, edits)
    order = sorted(removed)
    stats = _stats(units, order, sparsity, score, "layer", seconds[0], min_per_layer, blocked)
    stats.update(sequential=True, withheld_by_confidence=0, rescaled=rescaled, compensated=compensate,
                 apply_seconds=time.perf_counter() - t_apply - seconds[0])
    if hasattr(scorer, "update"):
        stats["obs_update"] = scorer.update
        stats["obs_target"] = scorer.target
    result = PruneResult(model, _masks(model, units, order), [describe(units[k]) for k in order], stats, _edits=edits)
    if physical:
        from hf_fisher.consumers.prune.physical import build_physical

        try:
            small, vocab_map = build_physical(model, units, removed)
        finally:
            edits.restore()
        result = PruneResult(small, result.masks, result.removed, stats, vocab_map=vocab_map)
    stats["seconds"] = time.perf_counter() - t_start
    return result


def _residuals(model, units: Sequence[Unit], layout, batches, notes: list[str]) -> dict:
    """:func:`~.rescale.residual_blocks` of the layers whose output projections the units write
    through, checked on the first batch; a WARNING (in ``notes``) names the layers whose block is
    not a pre-norm residual block (their rescale reconstructs the projection output alone)."""
    from hf_fisher.consumers.prune.rescale import residual_blocks

    if not batches or batches[0] is None:
        return {}
    wanted = {s.param for u in units for s in u.out}
    pairs: dict[int, tuple[str, str]] = {}
    downs = {}
    for block in layout.mlp:
        if block.num_channels:
            d = [sl.param for sl in block.slices(0) if input_axis(model, sl.param) == sl.axis]
            if d:
                downs[block.layer] = d[0]
    for att in layout.attention:
        if att.heads and att.heads[0].o and att.layer in downs:
            pairs[att.layer] = (att.heads[0].o[0].param, downs[att.layer])
    found = residual_blocks(model, pairs, batches[0])
    missing = sorted(w for w in wanted if w not in found)
    if missing:
        _note(notes, f"the rescale of {len(missing)} output projection(s) ({', '.join(missing[:2])}{' ...' if len(missing) > 2 else ''}) "
                     "reconstructs the unpruned projection output only, not the residual stream: their block is not a "
                     "pre-norm residual block (output = input + attention output + MLP output)")
    return found


def _compensate(model, units: Sequence[Unit], removed: set[int], stats, edits: _Edits) -> None:
    """FLAP's bias compensation, the mean output each output projection lost:
    ``b += (W₀ − W) E[x]`` — ``Σ_{removed j} W₀_{:,j} E[x_j]`` after masking, plus
    ``Σ_{kept j} (1 − s_j) W₀_{:,j} E[x_j]`` for the columns a rescale scaled by ``s_j``
    (``E[x]``: the unpruned model's mean input over the calibration tokens)."""
    names = list(dict.fromkeys(s.param for k in removed for s in units[k].out))
    for name in names:
        if name not in edits.originals:
            continue
        w0 = edits.originals[name].detach().double().cpu()
        dw = w0 - edits.params[name].detach().double().cpu()
        m = stats.mean(name)
        delta = dw @ m if input_axis(model, name) == 1 else m @ dw
        module, _ = owner(model, name)
        bias = getattr(module, "bias", None)
        if bias is None:
            bias = edits.add_bias(module, delta.shape[0], edits.params[name])
        else:
            bias_name = next(n for n, p in edits.params.items() if p is bias)
            edits.touch(bias_name)
        with torch.no_grad():
            bias += delta.to(bias.dtype)


def _masks(model: nn.Module, units: Sequence[Unit], removed: Iterable[int]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for k in removed:
        for s in units[k].slices:
            m = out.get(s.param)
            if m is None:
                m = out[s.param] = torch.ones(params[s.param].shape, dtype=torch.bool)
            m[s.index()] = False
    return out


def _warn(stats: dict[str, Any], message: str) -> None:
    """A WARNING that is also recorded in the result (``stats["warnings"]``, saved in pruning.json)."""
    logger.warning("%s", message)
    stats.setdefault("warnings", []).append(message)


def _reach(stats: dict[str, Any], units: Sequence[Unit], min_per_layer: int, blocked: bool) -> None:
    """Warn when the removed parameters fall short of the requested sparsity by more than half a
    unit because a floor (``min_per_layer``, one query head per kv group, one head per layer) held
    back removals the budget asked for, or miss it by more than one unit (whole-unit rounding per
    budget)."""
    biggest = max((u.size for u in units), default=0)
    missed = stats["removed_params"] - stats["requested_sparsity"] * stats["candidate_params"]
    short = blocked and missed < -biggest / 2  # a floor held back what the budget asked for
    if not short and abs(missed) <= biggest:
        return
    if missed < 0:
        why = (f"the floors keep the rest (min_per_layer={min_per_layer}; a GQA/MQA layer keeps a query head per kv "
               "group; a layer keeps at least one head): lower min_per_layer, or prune other kinds of units")
    else:
        why = "whole units are removed per budget (scope='layer' rounds each layer's / kv group's count)"
    _warn(stats, f"requested sparsity {stats['requested_sparsity']:.1%} is not reachable: removed "
                 f"{stats['removed_params']} of {stats['candidate_params']} candidate parameters "
                 f"({stats['achieved_sparsity']:.1%}) because {why}")


def _stats(units, removed, sparsity, score, scope, score_seconds, min_per_layer: int = 1, blocked: bool = False) -> dict[str, Any]:
    rem = set(removed)
    total = sum(u.size for u in units)
    gone = sum(units[k].size for k in rem)
    layers: dict[str, dict[str, Any]] = {}
    for k, u in enumerate(units):
        key = "vocab" if u.layer is None else str(u.layer)
        d = layers.setdefault(key, {"units": {}, "removed": {}, "params": 0, "removed_params": 0})
        d["units"][u.kind] = d["units"].get(u.kind, 0) + 1
        d["params"] += u.size
        if k in rem:
            d["removed"][u.kind] = d["removed"].get(u.kind, 0) + 1
            d["removed_params"] += u.size
    for d in layers.values():
        d["sparsity"] = d["removed_params"] / d["params"] if d["params"] else 0.0
    stats = {
        "requested_sparsity": sparsity,
        "achieved_sparsity": gone / total if total else 0.0,
        "candidate_params": total,
        "removed_params": gone,
        "units": len(units),
        "removed_units": len(rem),
        "score": score,
        "scope": scope,
        "score_seconds": score_seconds,
        "per_layer": layers,
        "warnings": [],
    }
    _reach(stats, units, min_per_layer, blocked)
    return stats


def _prune_unstructured(model, fisher, *, sparsity, score, scope, batches, seed, progress, physical, t_start) -> PruneResult:
    if physical:
        raise InvalidInputError("physical=True removes structures; unstructured masks cannot shrink a model (use physical=False)")
    params = dict(model.named_parameters())
    names = [n for n in params if input_axis(model, n) is not None and (fisher is None or n in fisher)]
    if not names:
        raise InvalidInputError("no nn.Linear / Conv1D weight to prune (covered by the Fisher)")
    t0 = time.perf_counter()
    scores = S.score_weights(model, names, score, fisher=fisher, batches=batches, seed=seed, progress=progress)
    score_seconds = time.perf_counter() - t0
    masks: dict[str, torch.Tensor] = {}
    groups = [names] if scope == "global" else [[n] for n in names]
    for group in groups:
        flat = torch.cat([scores[n].reshape(-1) for n in group])
        r = _round(sparsity * flat.numel())
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        if r > 0:
            keep[torch.sort(flat, stable=True).indices[:r]] = False
        off = 0
        for n in group:
            k = params[n].numel()
            masks[n] = keep[off : off + k].reshape(params[n].shape)
            off += k
    edits = _Edits(model)
    with torch.no_grad():
        for n, m in masks.items():
            edits.touch(n)
            params[n].mul_(m.to(params[n].device, params[n].dtype))
    total = sum(m.numel() for m in masks.values())
    gone = sum(int((~m).sum()) for m in masks.values())
    stats = {
        "requested_sparsity": sparsity, "achieved_sparsity": gone / total, "candidate_params": total,
        "removed_params": gone, "score": score, "scope": scope, "structured": None, "score_seconds": score_seconds,
        "per_param": {n: float((~m).float().mean()) for n, m in masks.items()},
        "seconds": time.perf_counter() - t_start,
    }
    return PruneResult(model, masks, [], stats, _edits=edits)


@hookimpl
def hf_fisher_register_consumers(register) -> None:
    register("prune", prune)
