"""Merging peft LoRA adapters in delta-W space, Fisher-weighted or with the other merge rules.

For every module a LoRA adapter i targets, its update of the dense weight is

    ΔW_i = s_i · B_i A_i          (s_i = lora_alpha / r, or lora_alpha / sqrt(r) with rslora;
                                   transposed for fan_in_fan_out, e.g. GPT-2's Conv1D)

with r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern``. The ΔW_i are merged
with the formulas of :mod:`hf_fisher.consumers.merge.math` (one definition of every method),
in the dense weight's own layout:

- ``"fisher"``: ``ΔW* = Σ_i λ_i F̃_i ΔW_i / Σ_i λ_i F̃_i``, ``F̃_i = max(F_i, floor)``, with F_i a
  Fisher of the *dense* weight (see below). Since ``Σ_i λ_i F̃_i / Σ_i λ_i F̃_i = 1``,
  ``W_0 + ΔW*`` is exactly the Fisher merge of the merged-in models ``W_0 + ΔW_i``;
- ``"average"``: ``ΔW* = Σ λ_i ΔW_i / Σ λ_i``; ``"task_arithmetic"``: ``ΔW* = s Σ λ_i ΔW_i``;
  ``"ties"`` / ``"dare"``: on the task vectors ΔW_i with a zero base (DARE's masks are seeded
  with the dense weight's name, so they equal the dense merge of the merged-in models).

The result is either merged into the base (``merge_into_base=True``: ``W_0 + ΔW*``, a dense
model) or refactored into a LoRA by truncated SVD ``ΔW* = U S V^T``: ``B' = U_r S_r^{1/2}``,
``A' = S_r^{1/2} V_r^T``, written with ``lora_alpha = r`` per module so peft's scaling is 1. The
relative truncation error ``||ΔW* − B'A'||_F / ||ΔW*||_F = sqrt(Σ_{k>r} σ_k² / Σ_k σ_k²)`` is
reported per module and overall (``sqrt(Σ tails / Σ ||ΔW*||²)`` over modules).

Ranks: ``"average"`` and ``"task_arithmetic"`` are linear in the ΔW_i, so ``ΔW*`` has rank at
most ``Σ_i r_i``: the default rank (``rank=None``) is ``min(Σ_i r_i, out, in)``, which is exact.
The other methods act element by element (Fisher weights, trimming, dropping) and give a
full-rank ``ΔW*`` in general: their default is ``min(out, in)`` (exact); pass an int to truncate
(the error is reported), ``"full"`` for ``min(out, in)`` with any method.

peft's ``PeftModel.add_weighted_adapter`` (peft 0.18 - 0.22) and how this differs, and why:

- ``combination_type="linear"`` / ``"ties"`` / ``"dare_linear"`` / ``"dare_ties"`` / ``"magnitude_prune"``
  (no ``_svd``) merge the *factors*: ``A* = f(√|λ_i s_i| sign(λ_i s_i) A_i)``, ``B* = f(√|λ_i s_i| B_i)``,
  so ``B* A*`` holds cross terms ``B_i A_j`` (i ≠ j) and is not ``Σ_i λ_i ΔW_i``; trimming or dropping
  entries of A and B is not trimming ΔW. Here every method acts on ``ΔW_i`` itself, so a merge of
  adapters equals the same merge of the merged-in models (what a user of a method means by it);
- ``"cat"`` concatenates the factors: exactly ``Σ_i λ_i ΔW_i`` at rank ``Σ_i r_i`` -- what
  ``method="task_arithmetic"`` gives here at the default rank (refactored by SVD, also exact);
- the ``*_svd`` types combine ``ΔW_i`` (as here) and truncate by SVD to the new rank (as ``rank=``
  here, which also reports the truncation error);
- the factor-space types need one rank ``r`` for every adapter (peft raises otherwise) and give rank
  ``r``; here adapters of any ranks merge, at the rank of the merged ``ΔW*`` (above);
- peft's TIES (``utils/merge_utils.py``): trim ``int(d·n)`` entries (mergekit and hf_fisher's default
  ``convention="mergekit"``: ``max(1, int(d·n))``, so a tiny tensor at a small density keeps its largest
  entry where peft zeroes it; ``"hf_fisher"``: ``round(d·n)``), elect the sign from the
  *unweighted* trimmed tensors (``majority_sign_method="total"``: ``Σ_i τ̂_i ≥ 0`` → +1; mergekit and
  hf_fisher elect from the weighted ``Σ_i λ_i τ̂_i``), divide the agreeing weighted sum by the *count*
  of agreeing entries (hf_fisher's ``"hf_fisher"`` convention; mergekit's and hf_fisher's default divide
  by the agreeing weights' sum);
- peft's DARE keeps ``m ~ Bernoulli(d)`` from torch's global generator and rescales by ``1/d``
  (hf_fisher's ``"hf_fisher"`` convention rescales the same way; mergekit's and hf_fisher's default
  rescale to the L1 norm of the task vector), with no seed of its own; hf_fisher's masks are seeded
  per tensor (``seed``);
- ``"magnitude_prune"`` (trim, then the weighted sum, no sign election) has no method here: it is
  ``ties`` without the election; ``"svd"`` is ``task_arithmetic`` truncated to ``rank``.

Why: a merge of adapters here is defined as the same merge of the merged-in dense models (the only
definition under which the mergekit-convention numbers, the Fisher weights and the trim/sign rules
mean what they mean for full models), and the rank is a separate, reported approximation.

Fisher names: a Fisher collected on the merged-in model names the weight
``model.layers.0.self_attn.q_proj.weight``; one collected on the PeftModel with the base weights
trainable names it ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` (the
gradient with respect to W_0 there equals the merged model's gradient with respect to W). Both
are recognised. A Fisher of lora_A / lora_B only cannot weight ΔW element-wise and is refused.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.errors import InvalidInputError, ModelMismatchError, UnsupportedError

from .base import MergeMethod, TensorInputs

__all__ = ["LoraMergeResult", "merge_lora_adapters"]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the string era's tuple, from the registry (kept for one release)
        from .registry import available

        return tuple(k for k, cls in available().items() if cls.lora_refusal is None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# config fields that change the forward away from y = W_0 x + s B A x (or add saved tensors):
# an adapter setting any of them cannot be merged exactly here
_REFUSED_FIELDS = {
    "use_dora": "DoRA rescales the merged weight per column by a learned magnitude",
    "lora_bias": "lora_B has a bias",
    "target_parameters": "LoRA on nn.Parameters (not modules)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "alora_invocation_tokens": "activated LoRA (the update applies after invocation tokens only)",
    "use_qalora": "QA-LoRA",
}

_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass
class _Module:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    r: int
    alpha: float
    scaling: float


@dataclass
class _Adapter:
    label: str
    config: dict
    modules: dict[str, _Module]  # module key relative to the base model -> factors
    model: Any = None  # the PeftModel, when given one


def _is_peft_model(x: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of this module
        return False
    return isinstance(x, PeftModel)


def _read_adapter(src: Any, index: int) -> _Adapter:
    """Config and LoRA factors of one adapter (a folder or a PeftModel); no base model needed."""
    if _is_peft_model(src):
        from peft import get_peft_model_state_dict

        name = src.active_adapter
        if not isinstance(name, str):
            raise UnsupportedError(f"adapter {index} (a PeftModel) has several active adapters {name}; activate one")
        from peft.tuners.lora import LoraLayer

        merged = [n for n, m in src.named_modules() if isinstance(m, LoraLayer) and getattr(m, "merged", False)]
        if merged:
            raise UnsupportedError(
                f"adapter {index} (a PeftModel): its LoRA is already merged into the base weights ({merged[0]}, ...); "
                "call model.unmerge_adapter() first"
            )
        config = src.peft_config[name].to_dict()
        state = {k: v.detach() for k, v in get_peft_model_state_dict(src, adapter_name=name).items()}
        label = f"adapter {index} (PeftModel, adapter {name!r})"
        model = src
    else:
        if not isinstance(src, (str, os.PathLike)):
            raise InvalidInputError(
                f"adapter {index} must be an adapter folder (adapter_config.json + adapter_model.safetensors) or a "
                f"peft.PeftModel, got {type(src).__name__}"
            )
        root = Path(src)
        label = f"adapter {index} ({root})"
        cfg_path, w_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise InvalidInputError(f"{label}: {ADAPTER_CONFIG} is missing; pass a folder written by PeftModel.save_pretrained")
        if not w_path.is_file():
            extra = " (adapter_model.bin is not read: it needs unpickling; re-save with safe_serialization=True)" if (root / "adapter_model.bin").is_file() else ""
            raise InvalidInputError(f"{label}: {ADAPTER_WEIGHTS} is missing{extra}")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{label}: {ADAPTER_CONFIG} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(config, dict):
            raise InvalidInputError(f"{label}: {ADAPTER_CONFIG} must hold a JSON object")
        from safetensors.torch import load_file

        state = load_file(str(w_path))
        model = None
    return _Adapter(label, config, _factors(label, config, state), model)


def _factors(label: str, config: dict, state: Mapping[str, torch.Tensor]) -> dict[str, _Module]:
    from peft.utils.other import get_pattern_key

    peft_type = config.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # a peft PeftType from a PeftModel's config
    if str(peft_type).upper() != "LORA":
        raise UnsupportedError(f"{label}: peft_type is {peft_type!r}; only LoRA adapters are merged here")
    for fld, what in _REFUSED_FIELDS.items():
        if config.get(fld):
            raise UnsupportedError(
                f"{label}: {fld}={config[fld]!r} ({what}) cannot be merged exactly in delta-W space; merge the "
                "merged-in models (merge_and_unload) with merge_with_fisher instead"
            )
    if config.get("bias", "none") not in ("none", None):
        raise UnsupportedError(
            f"{label}: bias={config['bias']!r} (the adapter trains biases too); only bias='none' adapters are merged here"
        )
    if config.get("modules_to_save"):
        raise UnsupportedError(
            f"{label}: modules_to_save={config['modules_to_save']} (full copies of modules, not LoRA updates) are not "
            "merged in delta-W space; merge the merged-in models (merge_and_unload) with merge_with_fisher instead"
        )
    embedding = sorted(k for k in state if re.search(r"\.lora_embedding_[AB](\.|$)", k))
    if embedding:
        raise UnsupportedError(
            f"{label}: {embedding[0]} is an embedding LoRA (target {embedding[0].rsplit('.lora_embedding', 1)[0]}); "
            "embedding adapters are not supported here: leave embeddings out of target_modules or merge the "
            "merged-in models (merge_and_unload) with merge_with_fisher"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise UnsupportedError(f"{label}: unexpected tensor {key!r} (not under {PREFIX!r})")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m is None:
            raise UnsupportedError(
                f"{label}: tensor {key!r} is not a LoRA factor (lora_A/lora_B .weight); only plain LoRA adapters are merged"
            )
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    if not parts:
        raise InvalidInputError(f"{label}: the adapter holds no LoRA factor")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    out = {}
    for key, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise InvalidInputError(f"{label}: module {key} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2:
            raise UnsupportedError(
                f"{label}: module {key} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}: only Linear/Conv1D LoRAs "
                "(2-D factors) are supported, not convolutions"
            )
        if A.shape[0] != B.shape[1]:
            raise InvalidInputError(f"{label}: module {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on r")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), config.get("r"))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), config.get("lora_alpha"))
        if r != A.shape[0]:
            raise InvalidInputError(f"{label}: module {key}: the config gives r={r} but lora_A has {A.shape[0]} rows")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[key] = _Module(A, B, int(r), float(alpha), float(scaling))
    return out


def _check_compatible(adapters: list[_Adapter]) -> None:
    first = adapters[0]
    keys0 = set(first.modules)
    for ad in adapters[1:]:
        keys = set(ad.modules)
        if keys != keys0:
            only_a, only_b = sorted(keys0 - keys), sorted(keys - keys0)
            raise ModelMismatchError(
                f"{ad.label} targets different modules than {first.label}: "
                + (f"{len(only_a)} only in the first (e.g. {only_a[:2]})" if only_a else "")
                + ("; " if only_a and only_b else "")
                + (f"{len(only_b)} only in this one (e.g. {only_b[:2]})" if only_b else "")
                + "; delta-W merging needs the same target modules (field target_modules / layers_to_transform)"
            )
        for fld in ("fan_in_fan_out", "base_model_name_or_path", "revision"):
            a, b = first.config.get(fld), ad.config.get(fld)
            if fld == "fan_in_fan_out":
                a, b = bool(a), bool(b)
            if a != b and not (fld != "fan_in_fan_out" and (a is None or b is None)):
                raise ModelMismatchError(
                    f"{ad.label} has {fld}={b!r} but {first.label} has {fld}={a!r}; adapters merged together must "
                    f"share it" + (" (the same base model)" if fld != "fan_in_fan_out" else "")
                )
        for key in sorted(keys0):
            m0, m = first.modules[key], ad.modules[key]
            if m0.A.shape[1] != m.A.shape[1] or m0.B.shape[0] != m.B.shape[0]:
                raise ModelMismatchError(
                    f"module {key}: {ad.label} updates a [{m.B.shape[0]}, {m.A.shape[1]}] weight, {first.label} a "
                    f"[{m0.B.shape[0]}, {m0.A.shape[1]}] one; are they adapters of the same base model?"
                )


class _FisherSource:
    """One model's dense-weight Fisher (a Fisher, a FisherReader or an artifact folder), read
    tensor by tensor with the name mapping of the module docstring."""

    def __init__(self, src: Any, index: int, adapter: _Adapter, fan_in_fan_out: bool):
        from hf_fisher.artifacts.fisher import Fisher, FisherReader

        if isinstance(src, (str, os.PathLike)):
            src = FisherReader(src)
        if not isinstance(src, (Fisher, FisherReader)):
            raise InvalidInputError(
                f"fishers[{index}] must be a Fisher, a FisherReader or an artifact folder, got {type(src).__name__}"
            )
        self.src = src
        src.check_values()  # finite and non-negative, before any work
        names = set(src.names())
        self.names: dict[str, str] = {}
        missing = []
        for key, m in adapter.modules.items():
            shape = (m.A.shape[1], m.B.shape[0]) if fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
            for cand in (f"{key}.weight", f"{PREFIX}{key}.base_layer.weight", f"{PREFIX}{key}.weight"):
                if cand in names:
                    got = tuple(src.param_shapes[cand])
                    if got != tuple(shape):
                        raise ModelMismatchError(
                            f"fishers[{index}] has {cand} of shape {got}, but {adapter.label} updates a weight of shape "
                            f"{tuple(shape)} there; is it the Fisher of this adapter's model?"
                        )
                    self.names[key] = cand
                    break
            else:
                missing.append(key)
        if missing:
            lora_only = any(re.search(r"\.lora_[AB]\.", n) for n in names)
            if lora_only and len(missing) == len(adapter.modules):
                raise UnsupportedError(
                    f"fishers[{index}] covers the adapter's own parameters (lora_A / lora_B), not the dense weights: a "
                    "diagonal Fisher over A and B cannot weight ΔW = B·A element by element. Collect a Fisher of the "
                    "dense weights instead: on the merged-in model (peft_model.merge_and_unload(), then "
                    "hf_fisher.collect on it), or on the PeftModel with the base weights trainable (set requires_grad "
                    "on the '.base_layer.weight' parameters and collect with params=r'base_layer\\.weight'); or merge "
                    "with method='average'"
                )
            raise ModelMismatchError(
                f"fishers[{index}] has no Fisher for {len(missing)} module weights {adapter.label} updates (e.g. "
                f"{missing[0]}.weight or {PREFIX}{missing[0]}.base_layer.weight; the Fisher has e.g. "
                f"{sorted(names)[:2]}); collect it over the dense weights of the LoRA target modules"
            )

    def get(self, key: str) -> torch.Tensor:
        from hf_fisher.analysis import expand
        from hf_fisher.artifacts.fisher import Fisher

        name = self.names[key]
        if isinstance(self.src, Fisher):
            return expand(self.src, name).to("cpu", torch.float64)
        v = self.src.get(name)
        if self.src.reduction == "group":
            v = self.src.groups[name].expand(v, self.src.param_shapes[name])
        return v.to("cpu", torch.float64)


def _load_base(base_model: Any, adapters: list[_Adapter]) -> tuple[Callable[[], nn.Module], nn.Module]:
    """``(fresh(), view)``: a function returning a new, unmodified copy of the base model, and a
    model whose weights are the base weights (for reading only)."""
    if base_model is None:
        peft_given = [a for a in adapters if a.model is not None]
        if peft_given:
            src = peft_given[0].model

            def fresh():
                return copy.deepcopy(src).unload()

            return fresh, fresh()
        name = adapters[0].config.get("base_model_name_or_path")
        if not name:
            raise InvalidInputError(
                f"{adapters[0].label} does not name its base model (base_model_name_or_path is empty); pass base_model="
            )
        base_model = name
    if _is_peft_model(base_model):
        raise InvalidInputError("base_model must be the base model (a PreTrainedModel or a folder / Hub id), not a PeftModel")
    if isinstance(base_model, nn.Module):
        model = base_model

        def fresh():
            return copy.deepcopy(model)

        return fresh, model
    if not isinstance(base_model, (str, os.PathLike)):
        raise InvalidInputError(f"base_model must be a model, a folder or a Hub id, got {type(base_model).__name__}")
    import transformers

    task = adapters[0].config.get("task_type")
    task = getattr(task, "value", task)  # a peft TaskType from a PeftModel's config
    cls = getattr(transformers, _AUTO_CLASSES.get(str(task), "AutoModelForCausalLM"))
    revision = adapters[0].config.get("revision")

    def fresh():
        return cls.from_pretrained(os.fspath(base_model), revision=revision, dtype="auto")

    return fresh, fresh()


def _base_weights(view: nn.Module, adapter: _Adapter, fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """The base weight of every target module, checked against the adapter's shapes."""
    out = {}
    for key, m in adapter.modules.items():
        try:
            w = view.get_submodule(key).weight
        except AttributeError:
            raise ModelMismatchError(
                f"the base model has no module {key} with a weight, which {adapter.label} targets; is it the adapter's "
                "base model?"
            ) from None
        shape = (m.A.shape[1], m.B.shape[0]) if fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
        if tuple(w.shape) != tuple(shape):
            raise ModelMismatchError(
                f"base weight {key}.weight has shape {tuple(w.shape)}, {adapter.label} updates one of shape {shape}; "
                "is it the adapter's base model?"
            )
        out[key] = w
    return out


@dataclass
class LoraMergeResult:
    """The merge of LoRA adapters: a refactored LoRA (``kind="adapter"``: ``config`` is the
    adapter_config dict, ``tensors`` the adapter's state dict in peft's file format) or a dense
    model (``kind="dense"``: ``tensors`` the merged weights ``W_0 + ΔW*`` by parameter name)."""

    kind: str
    config: dict | None
    tensors: dict[str, torch.Tensor]
    summary: dict
    _fresh_base: Callable[[], nn.Module] = field(repr=False, default=None)

    @property
    def truncation_error(self) -> float:
        """Overall relative Frobenius error of the refactored ΔW* (0.0 for a dense merge)."""
        return float(self.summary["overall_truncation_error"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def to_model(self) -> nn.Module:
        """A new model: the base model with the merged LoRA attached (a PeftModel), or the base
        model with the merged weights (a PreTrainedModel). The base model passed in is not modified."""
        base = self._fresh_base()
        if self.kind == "dense":
            with torch.no_grad():
                for name, t in self.tensors.items():
                    p = base.get_parameter(name)
                    p.copy_(t.to(p.dtype))
            return base.eval()
        import peft

        cfg = dict(self.config)
        cfg.pop("peft_type", None)
        known = set(peft.LoraConfig.__dataclass_fields__)
        lcfg = peft.LoraConfig(**{k: v for k, v in cfg.items() if k in known})
        model = peft.get_peft_model(base, lcfg)
        result = peft.set_peft_model_state_dict(model, self.tensors)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:  # pragma: no cover - the keys are peft's own
            raise UnsupportedError(f"peft did not accept the merged adapter's tensors {unexpected[:3]}")
        return model.eval()

    def write_files(self, folder: str | os.PathLike) -> list[str]:
        """Write the result into the existing ``folder``: ``adapter_config.json`` +
        ``adapter_model.safetensors`` (load with ``PeftModel.from_pretrained(base, folder)``), or
        the dense model by ``save_pretrained``. Returns the names written (no atomicity: the
        caller writes into a temporary folder)."""
        root = Path(folder)
        if not root.is_dir():
            raise InvalidInputError(f"{root} is not an existing folder; create it first")
        if self.kind == "dense":
            model = self.to_model()
            before = set(os.listdir(root))
            model.save_pretrained(root)
            return sorted(set(os.listdir(root)) - before) or sorted(os.listdir(root))
        from safetensors.torch import save_file

        (root / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(root / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def merge_lora_adapters(
    adapters: Sequence[Any],
    fishers: Sequence[Any] | None = None,
    *,
    weights: Sequence[float] | None = None,
    method: str | MergeMethod = "fisher",
    base_model: Any = None,
    rank: int | str | None = None,
    merge_into_base: bool = False,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> LoraMergeResult:
    """Merge peft LoRA ``adapters`` (folders or PeftModels) in delta-W space (module docstring).

    - ``method``: a registered merge method's name or instance
      (:mod:`hf_fisher.consumers.merge.registry`) that can merge deltas (its ``lora_refusal`` is
      None); ``**options``: its options, checked by their declarations (as in
      ``merge_with_fisher``; here ``density`` defaults to 1.0 and ``drop_p`` to 0.0);
    - ``fishers``: one dense-weight Fisher per adapter (Fisher, FisherReader or folder), for
      the methods that take Fishers; ``normalize_fishers`` divides each by its mean over the
      merged weights so every model counts equally whatever its Fisher's scale;
    - ``weights``: λ_i (default 1 each);
    - ``merge_into_base``: return the dense model ``W_0 + ΔW*``; else a LoRA of ``rank``
      (None: exact, see the module docstring; ``"full"``; or an int, capped at min(out, in));
    - ``dtype``: of the output tensors (default: the LoRA factors' dtype, or the base weights').

    Everything that cannot be merged exactly (different target modules, base models or
    ``fan_in_fan_out``; DoRA and other LoRA variants; ``modules_to_save``; embedding or conv
    LoRAs; a Fisher of lora_A/lora_B only) is refused before any computation.
    """
    # ---------------------------------------------------------------- arguments
    from .base import real_number
    from .registry import build

    if not isinstance(method, MergeMethod):
        options = {"density": 1.0, "drop_p": 0.0, **options}  # this function's own defaults
    m = build(method, options)  # the name and every option, checked by their declarations
    if m.lora_refusal is not None:
        raise UnsupportedError(f"method={m.name!r} {m.lora_refusal}")
    if m.fishers not in (None, "diagonal"):  # pragma: no cover - a plugin's own kind of Fisher
        raise UnsupportedError(f"method={m.name!r} takes {m.fishers!r} Fishers; LoRA merging takes dense-weight Fishers")
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or len(adapters) == 0:
        raise InvalidInputError("adapters must be a non-empty list of adapter folders or PeftModels")
    n = len(adapters)
    if weights is not None and (isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence)):
        raise InvalidInputError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
    weights = [1.0] * n if weights is None else [real_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if len(weights) != n:
        raise InvalidInputError(f"{len(weights)} weights for {n} adapters; give one weight per adapter")
    m.check_weights(weights)
    use_fisher = m.fishers == "diagonal"
    if use_fisher:
        if fishers is None or isinstance(fishers, (str, os.PathLike)) or len(fishers) != n:
            got = "none" if fishers is None else (1 if isinstance(fishers, (str, os.PathLike)) else len(fishers))
            raise InvalidInputError(f"method={m.name!r} needs one dense-weight Fisher per adapter ({n}), got {got}; or use method='average'")
    elif fishers is not None:
        log.warning("merge_lora_adapters: method=%r does not use Fishers; the %d given are ignored", m.name, len(fishers))
    if merge_into_base and rank is not None:
        raise InvalidInputError("rank applies to a refactored LoRA; with merge_into_base=True the result is dense (drop rank)")
    if rank is not None and rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidInputError(f"rank must be a positive integer, 'full' or None, got {rank!r}")

    # ---------------------------------------------------------------- inputs, all checked before work
    ads = [_read_adapter(a, i) for i, a in enumerate(adapters)]
    _check_compatible(ads)
    fan = bool(ads[0].config.get("fan_in_fan_out"))
    srcs = [_FisherSource(f, i, ad, fan) for i, (f, ad) in enumerate(zip(fishers, ads))] if use_fisher else None
    fresh, view = (None, None)
    base_w: dict[str, torch.Tensor] = {}
    if merge_into_base or base_model is not None:
        fresh, view = _load_base(base_model, ads)
        base_w = _base_weights(view, ads[0], fan)
    else:
        def fresh():  # the base is loaded only when to_model() needs it
            return _load_base(base_model, ads)[0]()

    keys = sorted(ads[0].modules)
    norms = [1.0] * n
    if srcs is not None and getattr(m, "normalize_fishers", False):
        for i, s in enumerate(srcs):
            tot, cnt = 0.0, 0
            for k in keys:
                f = s.get(k)
                tot, cnt = tot + float(f.sum()), cnt + f.numel()
            if not tot > 0:
                raise InvalidInputError(f"fishers[{i}] is zero on every merged weight; it cannot be normalised")
            norms[i] = tot / cnt

    # ---------------------------------------------------------------- merge, one module at a time
    out_dtype = dtype
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    tail_sum = total_sum = 0.0
    f64 = torch.float64
    for key in keys:
        mods = [ad.modules[key] for ad in ads]
        deltas = [(mod.B.to("cpu", f64) @ mod.A.to("cpu", f64)) * mod.scaling for mod in mods]  # [out, in]
        dense = [d.T if fan else d for d in deltas]
        zero = torch.zeros_like(dense[0])
        wname = f"{key}.weight"
        fis = [s.get(key) / c for s, c in zip(srcs, norms)] if srcs is not None else None
        merged = m.merge(TensorInputs(wname, dense, weights, base=zero, fishers=fis))
        if merge_into_base:
            w0 = base_w[key]
            tensors[wname] = (w0.detach().to("cpu", f64) + merged).to(out_dtype or w0.dtype)
            continue
        delta = merged.T if fan else merged  # [out, in], = B' A'
        out_f, in_f = delta.shape
        full = min(out_f, in_f)
        if rank is None:
            r = min(sum(mod.r for mod in mods), full) if m.linear else full
        else:
            r = full if rank == "full" else min(int(rank), full)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:r].sqrt()
        B_new = U[:, :r] * root
        A_new = root[:, None] * Vh[:r]
        tail, total = float((S[r:] ** 2).sum()), float((S**2).sum())
        errors[key] = math.sqrt(tail / total) if total > 0 else 0.0
        ranks[key] = r
        tail_sum, total_sum = tail_sum + tail, total_sum + total
        dt = out_dtype or mods[0].A.dtype
        tensors[f"{PREFIX}{key}.lora_A.weight"] = A_new.to(dt).contiguous()
        tensors[f"{PREFIX}{key}.lora_B.weight"] = B_new.to(dt).contiguous()

    overall = math.sqrt(tail_sum / total_sum) if total_sum > 0 else 0.0
    config = None
    if not merge_into_base:
        top = max(ranks.values())
        config = {k: getattr(v, "value", v) for k, v in ads[0].config.items()}  # enums (PeftModel configs) as strings
        config.update(
            r=top, lora_alpha=top, use_rslora=False, target_modules=keys, layers_to_transform=None, layers_pattern=None,
            rank_pattern={re.escape(k): r for k, r in ranks.items() if r != top},
            alpha_pattern={re.escape(k): r for k, r in ranks.items() if r != top},
            inference_mode=True, peft_type="LORA", exclude_modules=None,
        )
        if overall > 0:
            log.info("LoRA merge: refactored to rank %d (max) with relative truncation error %.3g", top, overall)
    summary = {
        "method": m.name,
        "merge_into_base": bool(merge_into_base),
        "rank": None if merge_into_base else max(ranks.values()),
        "ranks": ranks,
        "truncation_error": errors,
        "overall_truncation_error": overall,
        "inputs": [ad.label for ad in ads],
        "input_ranks": [{k: m.r for k, m in ad.modules.items()} for ad in ads],
        "weights": weights,
        "modules": keys,
        "fisher_floor": getattr(m, "fisher_floor", None) if use_fisher else None,
        "normalize_fishers": bool(getattr(m, "normalize_fishers", False)) if use_fisher else None,
        "fisher_names": [dict(s.names) for s in srcs] if srcs is not None else None,
    }
    summary.update({k: v for k, v in m.parameters().items() if k not in summary and k != "no_fisher_rule"})
    return LoraMergeResult("dense" if merge_into_base else "adapter", config, tensors, summary, fresh)
