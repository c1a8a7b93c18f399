"""The Fisher artifact: diagonal Fisher tensors, their variance, counts, metadata, and its I/O.

A :class:`Fisher` holds, for each parameter name of ``model.named_parameters()``:

- ``fisher[name]``: the empirical diagonal Fisher ``F = mean_i C_i`` with ``C_i = g_i ⊙ g_i``
  (DESIGN.md section 2), either parameter-shaped (``reduction="param"``) or one value per group
  (``reduction="group"``: ``F_g = Σ_{j ∈ g} F_j``, a ``[num_groups]`` vector, groups from
  :class:`hf_fisher.layout.ParamGroups`);
- ``fisher.variances[name]``: the unbiased sample variance ``Var_i(C_i)`` (same shape) when
  known;
- ``fisher.counts`` (:class:`Counts`) and ``fisher.metadata`` (:class:`FisherMetadata`).

On disk an artifact is a folder::

    fisher.safetensors                 keys "mean.<param>" and "variance.<param>"
      (or fisher-00001-of-0000N.safetensors ... + fisher.safetensors.index.json when sharded)
    fisher_config.json                 metadata, counts, reduction, shapes, groups, layout, files
    sample_contributions.safetensors   optional (group Fisher collected with keep_sample_contributions):
                                       key "<param>" = per-sample group contributions [n, num_groups]
    README.md                          model card (hf_fisher.cards)

Saving is atomic and crash-safe (:mod:`hf_fisher.atomic`: temporary folder beside the target,
fsync, rename; a save killed at any point leaves the old or the new artifact, and the next save or
load repairs the leftovers). Loading never unpickles and checks everything the artifact claims
before using it (:class:`FisherReader`): every field of ``fisher_config.json`` (an
:class:`~hf_fisher.errors.ArtifactError` naming the field), file names that stay inside the
folder, and stored tensors of the dtype and shape the config gives, with valid values (finite and
non-negative, all zero when no sample was counted: :class:`ValueCheck`, the one rule every
reader of Fisher data applies; ``strict=False`` loads an invalid artifact with a WARNING, to
inspect or repair it). With a model,
:meth:`Fisher.validate` also checks the architecture (model type, layers, heads, kv-heads, head
dimension), not only names and shapes.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError, ModelMismatchError
from hf_fisher.layout import ModelLayout, ParamGroups

__all__ = [
    "Counts",
    "FisherMetadata",
    "Fisher",
    "FisherReader",
    "ValueCheck",
    "known_estimators",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "fisher_config.json"
WEIGHTS_NAME = "fisher.safetensors"
WEIGHTS_INDEX_NAME = "fisher.safetensors.index.json"
WEIGHTS_PATTERN = "fisher{suffix}.safetensors"
SAMPLES_NAME = "sample_contributions.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
REDUCTIONS = ("param", "group")
_KINDS = ("mean", "variance")


def _library_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hf-fisher")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    try:
        import hf_fisher

        return str(getattr(hf_fisher, "__version__", "0.1.0"))
    except Exception:  # pragma: no cover - partially initialised package
        return "0.1.0"


def _dtype_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value).removeprefix("torch.")


@dataclass
class Counts:
    """How many samples and label tokens the Fisher averages over.

    ``samples``: samples that contributed (n of ``F = mean_i C_i``); ``tokens``: their label
    tokens; ``skipped``: samples with no label token; ``nonfinite``: samples dropped because a
    loss or gradient was NaN/Inf (``on_nonfinite="skip"``).
    """

    samples: int
    tokens: int
    skipped: int = 0
    nonfinite: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                number = operator.index(value) if not isinstance(value, float) else int(value)
            except TypeError:
                raise InvalidInputError(
                    f"Counts.{f.name} must be a non-negative integer, got {value!r} ({type(value).__name__})"
                ) from None
            if number < 0:
                raise InvalidInputError(f"Counts.{f.name} must be a non-negative integer, got {number}")
            setattr(self, f.name, int(number))

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Counts":
        """From ``fisher_config.json``'s ``counts`` (unknown keys ignored; bad values: InvalidInputError)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FisherMetadata:
    """Provenance of an artifact: what was estimated, on what, how. Dtypes are stored as strings.

    Unknown keys met when reading a newer artifact are kept in ``extra``.
    """

    task: str = "default"
    estimator: str = "empirical"
    reduction: str = "param"
    normalization: str = "mean"
    model_name_or_path: str | None = None
    revision: str | None = None
    model_type: str | None = None
    mode: str = "eval"
    accumulation_dtype: str | None = "float64"
    storage_dtype: str | None = None
    library_version: str = field(default_factory=_library_version)
    data_description: str | None = None
    ema_decay: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accumulation_dtype = _dtype_str(self.accumulation_dtype)
        self.storage_dtype = _dtype_str(self.storage_dtype)
        if self.ema_decay is not None:
            self.ema_decay = float(self.ema_decay)
        if self.extra is None:
            self.extra = {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FisherMetadata":
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        extra = dict(known.pop("extra", None) or {})
        extra.update(unknown)
        return cls(**known, extra=extra)


# ---------------------------------------------------------------------------- value checks
# One home for the rule every reader of stored Fisher data applies (Fisher, FisherReader, the
# KFAC artifact, the Trainer's checkpoint state, and the consumers given an in-memory Fisher):
# a Fisher is finite and non-negative (F = mean_i g_i ⊙ g_i; its variance and per-sample
# contributions too; a KFAC factor is finite with a non-negative diagonal), and it is all zeros
# when it averages over no sample. One NaN would make every merged weight or EWC step NaN; a
# negative value would be clamped to the merge floor and silently ignore that model.

#: the metadata.extra key where a load with strict=False records what it let through
LOAD_PROBLEMS_KEY = "load_problems"


def _value_problems(t: torch.Tensor, nonnegative: str, zero: bool) -> dict[str, int]:
    """``{"NaN": n, "Inf": n, "negative": n, "non-zero": n}`` (only the non-zero counts) of ``t``;
    ``nonnegative``: "all" values, the "diagonal" (a square factor) or "none" must be >= 0;
    ``zero``: every value must be 0."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.numel() == 0:
        return {}
    x = t.detach()
    part = torch.diagonal(x) if nonnegative == "diagonal" and x.dim() == 2 else x
    # fast path, one reduction (NaN propagates into both ends, ±Inf shows at one): ~50x quicker
    # than counting, which only runs when something is wrong
    lo, hi = (float(v) for v in x.aminmax())
    ok = math.isfinite(lo) and math.isfinite(hi)
    if ok and nonnegative != "none":
        ok = (lo if part is x else float(part.amin())) >= 0
    if ok and zero:
        ok = lo == 0 and hi == 0
    if ok:
        return {}
    out = {"NaN": int(torch.isnan(x).sum()), "Inf": int(torch.isinf(x).sum())}
    if nonnegative != "none":
        out["negative"] = int((part < 0).sum())
    if zero:
        out["non-zero"] = int(((x != 0) & torch.isfinite(x)).sum())
    return {k: v for k, v in out.items() if v}


class ValueCheck:
    """Collects the invalid values of an artifact's tensors, then refuses them all at once.

    ``check = ValueCheck("Fisher artifact /x", strict=True, samples=n)``; ``check.add(key,
    tensor)`` for each tensor (``nonnegative="diagonal"`` for a square KFAC factor);
    ``check.finish()`` raises an :class:`~hf_fisher.errors.ArtifactError` naming every bad tensor
    (up to 5) with its counts of NaN / Inf / negative values (and non-zero values when
    ``samples == 0``), or with ``strict=False`` logs it as a WARNING and returns the message (the
    caller records it in ``metadata.extra["load_problems"]``).
    """

    def __init__(self, what: str, *, strict: bool = True, samples: int | None = None) -> None:
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        self.what, self.strict, self.samples = what, strict, samples
        self.found: dict[str, tuple[dict[str, int], int]] = {}

    def add(self, key: str, tensor: torch.Tensor, *, nonnegative: str = "all") -> None:
        problems = _value_problems(tensor, nonnegative, zero=self.samples == 0)
        if problems:
            self.found[key] = (problems, tensor.numel())

    def message(self) -> str:
        parts = []
        for key, (problems, numel) in list(self.found.items())[:5]:
            counts = ", ".join(f"{n} {kind}" for kind, n in problems.items())
            parts.append(f"tensor {key!r} has {counts} (of {numel} values)")
        more = f"; and {len(self.found) - 5} more tensor(s)" if len(self.found) > 5 else ""
        zero = (" (counts.samples is 0, so every value must be 0)"
                if any("non-zero" in p for p, _ in self.found.values()) else "")
        return (
            f"{self.what} holds invalid values: {'; '.join(parts)}{more}{zero}. A Fisher is finite and "
            "non-negative (the mean of squared gradients; its variance and a KFAC factor's diagonal too), so "
            "the artifact is corrupt or was edited: collect, save or download it again"
        )

    def finish(self) -> str | None:
        if not self.found:
            return None
        msg = self.message()
        if self.strict:
            raise ArtifactError(
                msg + " (to inspect it anyway: hf-fisher show --no-strict, or from_pretrained(..., strict=False), "
                f"which logs a WARNING and records the problem in metadata.extra[{LOAD_PROBLEMS_KEY!r}])"
            )
        logger.warning("%s. Loaded anyway (strict=False); the problem is recorded in metadata.extra[%r]", msg,
                       LOAD_PROBLEMS_KEY)
        return msg


def known_estimators() -> list[str]:
    """The estimator names an artifact may carry: every registered estimator (built-ins and
    plugins, :func:`hf_fisher.plugins.estimators`)."""
    from hf_fisher import plugins

    return sorted(plugins.estimators())


def check_estimator_name(name: str, what: str, *, strict: bool = True) -> str | None:
    """:class:`ArtifactError` (or, with ``strict=False``, a WARNING and the message) when ``name``
    is not a registered estimator."""
    known = known_estimators()
    if name in known:
        return None
    msg = (f"{what} was made by the estimator {name!r}, which is not registered here (known: {known}); "
           "install the plugin that provides it, or the artifact's metadata is corrupt")
    if strict:
        raise ArtifactError(msg + " (to inspect it anyway: hf-fisher show --no-strict, or from_pretrained(..., strict=False))")
    logger.warning("%s. Loaded anyway (strict=False)", msg)
    return msg


def _ema_state_problem(metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with the EMA weight sums an EMA Fisher keeps for resuming
    (``metadata.extra.ema_state``: ``weight_sum`` W > 0 and ``weight_sq_sum`` W2 with
    0 < W2 <= W², both finite), or None when absent or valid."""
    ema = (metadata.get("extra") or {}).get("ema_state", metadata.get("ema_state"))
    if ema is None:
        return None
    if not isinstance(ema, Mapping):
        return f"must be an object with weight_sum and weight_sq_sum, got {_describe(ema)}"
    values = {}
    for key in ("weight_sum", "weight_sq_sum"):
        v = ema.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"has {key} {_describe(v)}, which must be a positive finite number"
        values[key] = float(v)
    if values["weight_sq_sum"] > values["weight_sum"] ** 2 * (1 + 1e-9):
        return (f"has weight_sq_sum {values['weight_sq_sum']!r} > weight_sum² ({values['weight_sum'] ** 2!r}), "
                "which no set of non-negative weights gives")
    return None


def _record_problems(metadata: "FisherMetadata", problems: list[str]) -> "FisherMetadata":
    if not problems:
        return metadata
    extra = dict(metadata.extra)
    extra[LOAD_PROBLEMS_KEY] = list(extra.get(LOAD_PROBLEMS_KEY) or []) + problems
    return replace(metadata, extra=extra)


def _shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _group_summary(pg: ParamGroups) -> str:
    names = pg.names
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{shown} along axes {pg.axes}"


# ---------------------------------------------------------------------------- config schema
# fisher_config.json is checked field by field before anything is built from it, so that a
# malformed, truncated or hand-edited artifact is an ArtifactError naming the field (its JSON
# path, e.g. ``layout.attention[0].num_heads``), never a KeyError/TypeError from deep inside.


class _Bad(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:60]!r}"
    if isinstance(v, list):
        return f"a list of {len(v)} item(s)"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _key_path(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _s_int(minimum: int = 0):
    def check(v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(path, f"must be an integer >= {minimum}, got {_describe(v)}")
        if v < minimum:
            raise _Bad(path, f"must be an integer >= {minimum}, got {v}")
    return check


def _s_str(choices: tuple[str, ...] | None = None, nonempty: bool = False):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, str):
            raise _Bad(path, f"must be a string, got {_describe(v)}")
        if choices is not None and v not in choices:
            raise _Bad(path, f"must be one of {list(choices)}, got {v!r}")
        if nonempty and not v:
            raise _Bad(path, "must be a non-empty string")
    return check


def _s_bool(v: Any, path: str) -> None:
    if not isinstance(v, bool):
        raise _Bad(path, f"must be true or false, got {_describe(v)}")


def _s_number(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(path, f"must be a finite number, got {_describe(v)}")


def _s_nullable(spec):
    def check(v: Any, path: str) -> None:
        if v is not None:
            spec(v, path)
    return check


def _s_list(item, min_len: int = 0):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, list):
            raise _Bad(path, f"must be a list, got {_describe(v)}")
        if len(v) < min_len:
            raise _Bad(path, f"must have at least {min_len} item(s), got {len(v)}")
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def _s_map(value):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, f"must be an object, got {_describe(v)}")
        for k, x in v.items():
            if not k:
                raise _Bad(path, "has an empty key")
            value(x, _key_path(path, k))
    return check


_REQUIRED = object()


def _s_obj(spec: dict[str, tuple[Any, Any]], *, extra: bool = False, after=None):
    """An object with the given fields: ``{name: (check, default)}``, ``_REQUIRED`` = must be present.

    ``extra``: unknown keys allowed (kept for forward compatibility) or an error; ``after``: a
    cross-field check ``after(obj, path)``.
    """
    def check(v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, f"must be an object, got {_describe(v)}")
        for name, (sub, default) in spec.items():
            where = _key_path(path, name)
            if name not in v:
                if default is _REQUIRED:
                    raise _Bad(where, "is missing")
                continue
            sub(v[name], where)
        if not extra:
            unknown = sorted(set(v) - set(spec))
            if unknown:
                raise _Bad(_key_path(path, unknown[0]), f"is not a known field (expected {sorted(spec)})")
        if after is not None:
            after(v, path)
    return check


def _after_groups(v: dict, path: str) -> None:
    axes = [v["axis"], *v.get("extra_axes", [])]
    if len(set(axes)) != len(axes):
        raise _Bad(_key_path(path, "extra_axes"), f"must not repeat an axis (axes {axes})")


def _after_slice(v: dict, path: str) -> None:
    if v["stop"] < v["start"]:
        raise _Bad(_key_path(path, "stop"), f"must be >= start ({v['start']}), got {v['stop']}")


def _after_attention(v: dict, path: str) -> None:
    if v["num_heads"] % v["num_kv_heads"]:
        raise _Bad(
            _key_path(path, "num_kv_heads"),
            f"must divide num_heads ({v['num_heads']}), got {v['num_kv_heads']}",
        )


_S_SLICE = _s_obj(
    {"param": (_s_str(nonempty=True), _REQUIRED), "axis": (_s_int(), _REQUIRED), "start": (_s_int(), _REQUIRED),
     "stop": (_s_int(), _REQUIRED)},
    after=_after_slice,
)
_S_GROUPS = _s_obj(
    {
        "axis": (_s_int(), _REQUIRED),
        "runs": (_s_list(_s_obj({"prefix": (_s_str(), _REQUIRED), "count": (_s_int(), _REQUIRED),
                                 "size": (_s_int(), _REQUIRED), "first": (_s_int(), 0)})), _REQUIRED),
        "extra_axes": (_s_list(_s_int()), ()),
    },
    after=_after_groups,
)
_S_LAYOUT = _s_obj(
    {
        "adapter": (_s_str(), _REQUIRED),
        "model_type": (_s_nullable(_s_str()), _REQUIRED),
        "num_layers": (_s_int(), _REQUIRED),
        "attention": (_s_list(_s_obj(
            {
                "layer": (_s_int(), _REQUIRED),
                "num_heads": (_s_int(1), _REQUIRED),
                "num_kv_heads": (_s_int(1), _REQUIRED),
                "head_dim": (_s_int(1), _REQUIRED),
                "heads": (_s_list(_s_obj({
                    "layer": (_s_int(), _REQUIRED), "head": (_s_int(), _REQUIRED), "kv_head": (_s_int(), _REQUIRED),
                    **{role: (_s_list(_S_SLICE), _REQUIRED) for role in "qkvo"},
                })), _REQUIRED),
            },
            after=_after_attention,
        )), _REQUIRED),
        "mlp": (_s_list(_s_obj({
            "layer": (_s_int(), _REQUIRED),
            "num_channels": (_s_int(), _REQUIRED),
            "roles": (_s_list(_s_obj({"param": (_s_str(nonempty=True), _REQUIRED), "axis": (_s_int(), _REQUIRED),
                                      "offset": (_s_int(), 0)})), _REQUIRED),
        })), _REQUIRED),
        "vocab": (_s_list(_S_SLICE), _REQUIRED),
        "groups": (_s_map(_S_GROUPS), _REQUIRED),
        "param_layers": (_s_map(_s_int()), _REQUIRED),
        "experts": (_s_list(_s_obj({
            "layer": (_s_int(), _REQUIRED),
            "num_experts": (_s_int(), _REQUIRED),
            "num_channels": (_s_int(), _REQUIRED),
            "roles": (_s_list(_s_obj({
                "role": (_s_str(), _REQUIRED), "param": (_s_str(nonempty=True), _REQUIRED),
                "expert_axis": (_s_int(), _REQUIRED), "channel_axis": (_s_nullable(_s_int()), _REQUIRED),
                "offset": (_s_int(), 0),
            })), _REQUIRED),
            "router": (_s_nullable(_s_str()), None),
            "router_axis": (_s_int(), 0),
            "top_k": (_s_nullable(_s_int(1)), None),
        })), []),
    }
)
_S_METADATA = _s_obj(
    {
        "task": (_s_str(), _REQUIRED),
        "estimator": (_s_str(nonempty=True), _REQUIRED),
        "reduction": (_s_str(REDUCTIONS), _REQUIRED),
        "normalization": (_s_str(nonempty=True), _REQUIRED),
        "model_name_or_path": (_s_nullable(_s_str()), None),
        "revision": (_s_nullable(_s_str()), None),
        "model_type": (_s_nullable(_s_str()), None),
        "mode": (_s_str(("eval", "train")), _REQUIRED),
        "accumulation_dtype": (_s_nullable(_s_str()), None),
        "storage_dtype": (_s_nullable(_s_str()), None),
        "library_version": (_s_str(), _REQUIRED),
        "data_description": (_s_nullable(_s_str()), None),
        "ema_decay": (_s_nullable(_s_number), None),
        "extra": (_s_nullable(_s_map(lambda v, p: None)), None),
    },
    extra=True,  # keys of a newer hf_fisher are kept in metadata.extra
)
_S_COUNTS = _s_obj({name: (_s_int(), _REQUIRED) for name in ("samples", "tokens", "skipped", "nonfinite")}, extra=True)


def _after_config(cfg: dict, path: str) -> None:
    if cfg["metadata"]["reduction"] != cfg["reduction"]:
        raise _Bad("metadata.reduction", f"must equal reduction ({cfg['reduction']!r}), got {cfg['metadata']['reduction']!r}")
    for name in cfg.get("groups") or {}:
        if name not in cfg["param_shapes"]:
            raise _Bad(_key_path("groups", name), "is not a parameter listed in param_shapes")
    if cfg["reduction"] == "group":
        # the Fisher takes its groups from "groups", or from the layout when "groups" is null
        source = "groups" if cfg.get("groups") is not None else "layout.groups"
        have = cfg.get("groups") if cfg.get("groups") is not None else (cfg.get("layout") or {}).get("groups", {})
        lacking = sorted(set(cfg["param_shapes"]) - set(have))
        if lacking:
            raise _Bad(_key_path(source, lacking[0]), "is missing: a group-level Fisher needs the groups of every parameter")
    if len(set(cfg["tensor_files"])) != len(cfg["tensor_files"]):
        raise _Bad("tensor_files", "lists a file twice")


_S_CONFIG = _s_obj(
    {
        "format_version": (_s_int(), _REQUIRED),
        "library": (_s_str(), _REQUIRED),
        "reduction": (_s_str(REDUCTIONS), _REQUIRED),
        "metadata": (_S_METADATA, _REQUIRED),
        "counts": (_S_COUNTS, _REQUIRED),
        "param_shapes": (_s_map(_s_list(_s_int())), _REQUIRED),
        "groups": (_s_nullable(_s_map(_S_GROUPS)), _REQUIRED),
        "layout": (_s_nullable(_S_LAYOUT), _REQUIRED),
        "has_variance": (_s_bool, _REQUIRED),
        "tensor_files": (_s_list(_s_str(nonempty=True), min_len=1), _REQUIRED),
        "index_file": (_s_nullable(_s_str(nonempty=True)), _REQUIRED),
        "sample_contributions_file": (_s_nullable(_s_str(nonempty=True)), None),
    },
    extra=True,
    after=_after_config,
)
_S_INDEX = _s_obj({"metadata": (_s_nullable(_s_map(lambda v, p: None)), None),
                   "weight_map": (_s_map(_s_str(nonempty=True)), _REQUIRED)}, extra=True)


def _json_error_field(text: str, pos: int) -> str:
    """The last ``"key":`` before a JSON syntax error: the field being read when it broke."""
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text[:pos])
    return keys[-1] if keys else "(top level)"


def _read_json(path: Path, what: str, schema) -> dict[str, Any]:
    """Parse and check a JSON file of the artifact; :class:`ArtifactError` naming the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        pos = getattr(e, "pos", None)
        near = f" in field {_json_error_field(text, pos)!r}" if pos is not None else ""
        raise ArtifactError(
            f"{path} is not valid JSON{near}: {e}. The {what} is corrupt; save or download the artifact again"
        ) from e
    try:
        schema(data, "")
    except _Bad as e:
        raise ArtifactError(
            f"{path} is malformed: field '{e.path or '(top level)'}' {e.problem}. The {what} was not written "
            "by Fisher.save_pretrained or was damaged; save or download the artifact again"
        ) from None
    return data


def _in_hub_cache(root: Path, real: Path) -> bool:
    """Whether ``root`` is a huggingface_hub cache snapshot (``<repo>/snapshots/<revision>``), or a
    folder inside one (an artifact in a subfolder of the repository), and ``real`` lies in that
    repo's ``blobs/`` (the cache stores files as symlinks to blobs)."""
    for snapshot in (root, *root.parents):  # the artifact may be a subfolder of the snapshot
        if snapshot.parent.name == "snapshots":
            return real.is_relative_to(snapshot.parent.parent / "blobs")
    return False


def _artifact_path(root: Path, name: str, field_name: str) -> Path:
    """``root / name`` for a file the config or index names; it must stay inside the artifact.

    Rejected (:class:`ArtifactError` naming ``field_name``): absolute paths, drive letters,
    ``..`` components, and files that resolve outside ``root`` (a symlink pointing elsewhere),
    except a huggingface_hub cache snapshot's links into the same repo's ``blobs/``.
    """
    from pathlib import PurePosixPath, PureWindowsPath

    def bad(why: str) -> ArtifactError:
        return ArtifactError(
            f"Fisher artifact {root} is malformed: field '{field_name}' names {name!r}, {why}; an artifact "
            "only reads files inside its own folder — do not load it"
        )

    if "\x00" in name:
        raise bad("which contains a NUL character")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise bad("an absolute path")
    if ".." in re.split(r"[\\/]", name):
        raise bad("a path with '..'")
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root) and not _in_hub_cache(real_root, real):
        raise bad(f"which resolves outside the artifact folder (to {real})")
    return path


class Fisher:
    """A diagonal Fisher artifact (see the module docstring for the quantities it holds).

    ``Fisher(mean, variance, *, reduction, groups, param_shapes, counts, metadata, layout=None)``

    - ``mean``: ``{param name: tensor}``, parameter-shaped for ``reduction="param"``, ``[num_groups]``
      for ``reduction="group"``;
    - ``variance``: same names and shapes, or ``None`` when unknown;
    - ``groups``: ``{param name: ParamGroups}`` — required for "group" (taken from ``layout``
      when omitted), optional for "param" (used by :meth:`to_groups`);
    - ``param_shapes``: the shape of every parameter the Fisher covers;
    - ``sample_contributions``: optional, ``reduction="group"`` only: ``{param name: [n, num_groups]}``,
      row ``i`` the group contributions ``C_i,g = Σ_{j ∈ g} C_ij`` of used sample ``i``, in sample
      order, ``n = counts.samples`` (see ``collect(..., keep_sample_contributions=True)``); their
      mean over rows is ``fisher[name]`` up to rounding in their dtype.

    The constructor validates names and shapes and raises
    :class:`~hf_fisher.errors.InvalidInputError` naming what is inconsistent.
    """

    def __init__(
        self,
        mean: Mapping[str, torch.Tensor],
        variance: Mapping[str, torch.Tensor] | None,
        *,
        reduction: str,
        groups: Mapping[str, ParamGroups] | None,
        param_shapes: Mapping[str, Any],
        counts: Counts,
        metadata: FisherMetadata,
        layout: ModelLayout | None = None,
        sample_contributions: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise InvalidInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if metadata.reduction != reduction:
            raise InvalidInputError(
                f"metadata.reduction={metadata.reduction!r} disagrees with reduction={reduction!r}; "
                "pass the same value to both (dataclasses.replace(metadata, reduction=...))"
            )
        self.reduction = reduction
        self.counts = counts
        self.metadata = metadata
        self.layout = layout
        self._mean: dict[str, torch.Tensor] = {}
        for name, t in mean.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"Fisher mean for {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise InvalidInputError(f"Fisher mean for {name!r} must be floating point, got {t.dtype}")
            self._mean[name] = t.detach()
        self.param_shapes: dict[str, tuple[int, ...]] = {k: tuple(int(s) for s in v) for k, v in param_shapes.items()}
        if set(self.param_shapes) != set(self._mean):
            missing = sorted(set(self._mean) - set(self.param_shapes))
            extra = sorted(set(self.param_shapes) - set(self._mean))
            raise InvalidInputError(
                f"param_shapes must list exactly the Fisher's parameters; missing shapes for {missing[:5]}, "
                f"shapes without a Fisher tensor for {extra[:5]}"
            )
        if groups is None and layout is not None:
            groups = {k: g for k, g in layout.groups.items() if k in self._mean}
        self.groups: dict[str, ParamGroups] = {k: g for k, g in (groups or {}).items() if k in self._mean}
        self._variance: dict[str, torch.Tensor] = {}
        if variance is not None:
            if set(variance) != set(self._mean):
                diff = sorted(set(variance) ^ set(self._mean))
                raise InvalidInputError(
                    f"variance and mean must have the same parameter names; they differ on {diff[:5]}"
                )
            for name, v in variance.items():
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(self._mean[name].shape):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise InvalidInputError(
                        f"variance for {name!r} has shape {got}, mean has {tuple(self._mean[name].shape)}"
                    )
                self._variance[name] = v.detach()
        self._validate_shapes()
        self.sample_contributions: dict[str, torch.Tensor] | None = (
            None if sample_contributions is None else self._checked_samples(sample_contributions)
        )

    def _checked_samples(self, samples: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``samples`` as a dict after checking names, dtypes and shapes ``[counts.samples, num_groups]``."""
        if self.reduction != "group":
            raise InvalidInputError(
                "sample_contributions are only kept for a group Fisher (reduction='group'); this one is "
                f"reduction={self.reduction!r}"
            )
        if set(samples) != set(self._mean):
            diff = sorted(set(samples) ^ set(self._mean))
            raise InvalidInputError(f"sample_contributions and mean must have the same parameter names; they differ on {diff[:5]}")
        n = self.counts.samples
        out = {}
        for name in sorted(samples):
            t = samples[name]
            want = (n, self.groups[name].num_groups)
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != want:
                got = f"shape {_shape_str(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidInputError(
                    f"sample_contributions for {name!r} must be a floating-point tensor of shape {_shape_str(want)} "
                    f"([counts.samples, num_groups]), got {got}"
                )
            out[name] = t.detach()
        return out

    # ------------------------------------------------------------------ validation
    def _validate_shapes(self) -> None:
        for name, t in self._mean.items():
            shape = self.param_shapes[name]
            pg = self.groups.get(name)
            if pg is not None:
                n = pg.group_axes_size(shape)
                if n is None or (shape and pg.axis_size != n):
                    where = f"axis {pg.axis}" if not pg.extra_axes else f"axes {pg.axes} (flattened)"
                    raise InvalidInputError(
                        f"groups for {name!r} partition {where} into {pg.axis_size} indices, but the "
                        f"parameter has shape {_shape_str(shape)}"
                    )
            if self.reduction == "param":
                if tuple(t.shape) != shape:
                    raise InvalidInputError(
                        f"param-level Fisher for {name!r} has shape {_shape_str(t.shape)}, expected the "
                        f"parameter's shape {_shape_str(shape)}"
                    )
            else:
                if pg is None:
                    raise InvalidInputError(
                        f"group-level Fisher for {name!r} has no ParamGroups; pass groups=... or a layout "
                        "whose groups cover every parameter"
                    )
                if t.dim() != 1 or t.shape[0] != pg.num_groups:
                    raise InvalidInputError(
                        f"group-level Fisher for {name!r} must be 1-D of length {pg.num_groups} "
                        f"(its number of groups), got shape {_shape_str(t.shape)}"
                    )

    # ------------------------------------------------------------------ mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._mean[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this Fisher ({len(self._mean)} parameters; see .names())") from None

    def __contains__(self, name: object) -> bool:
        return name in self._mean

    def __len__(self) -> int:
        return len(self._mean)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """Parameter names, sorted."""
        return sorted(self._mean)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names():
            yield n, self._mean[n]

    @property
    def means(self) -> dict[str, torch.Tensor]:
        """``{name: F}`` (the live dict; do not mutate)."""
        return self._mean

    @property
    def variances(self) -> dict[str, torch.Tensor]:
        """``{name: Var_i(C_i)}``; empty when the variance is unknown (``fisher.variances[name]`` → KeyError)."""
        return self._variance

    @property
    def has_variance(self) -> bool:
        """Whether per-element variances ``Var_i(C_i)`` are known."""
        return bool(self._variance)

    def group_names(self, name: str) -> list[str]:
        """Labels of the groups of parameter ``name`` (e.g. ``["q_head0", ...]``)."""
        if name not in self.groups:
            raise KeyError(f"no groups known for {name!r}; collect with a layout or pass groups=...")
        return self.groups[name].names

    def total(self) -> float:
        """``Σ`` of every Fisher value (float64)."""
        return float(sum(t.double().sum() for t in self._mean.values())) if self._mean else 0.0

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Fisher":
        """A copy with tensors converted to ``dtype``/``device`` (metadata.storage_dtype updated)."""
        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

        meta = replace(self.metadata, storage_dtype=_dtype_str(dtype) if dtype else self.metadata.storage_dtype)
        samples = self.sample_contributions
        return self._replace(
            mean={k: conv(v) for k, v in self._mean.items()},
            variance={k: conv(v) for k, v in self._variance.items()} if self._variance else None,
            metadata=meta,
            sample_contributions={k: conv(v) for k, v in samples.items()} if samples is not None else None,
        )

    def _replace(self, **changes: Any) -> "Fisher":
        kwargs = dict(
            mean=self._mean,
            variance=self._variance or None,
            reduction=self.reduction,
            groups=self.groups,
            param_shapes=self.param_shapes,
            counts=self.counts,
            metadata=self.metadata,
            layout=self.layout,
            # per-sample contributions describe these means only: dropped when the means change
            sample_contributions=None if "mean" in changes else self.sample_contributions,
        )
        kwargs.update(changes)
        mean = kwargs.pop("mean")
        variance = kwargs.pop("variance")
        return Fisher(mean, variance, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Fisher(task={self.metadata.task!r}, estimator={self.metadata.estimator!r}, "
            f"reduction={self.reduction!r}, params={len(self)}, samples={self.counts.samples}, "
            f"variance={'yes' if self._variance else 'no'}"
            f"{', sample_contributions=yes' if self.sample_contributions is not None else ''})"
        )

    # ------------------------------------------------------------------ value checks
    def check_values(self, what: str | None = None) -> None:
        """:class:`~hf_fisher.errors.ArtifactError` unless every mean, variance and per-sample
        contribution is finite and non-negative (and all zero when ``counts.samples`` is 0),
        naming each bad tensor with its counts (:class:`ValueCheck`). Consumers (merging, EWC)
        call it before any work; a Fisher that passed is not scanned again."""
        if getattr(self, "_values_ok", False):
            return
        check = ValueCheck(what or f"the Fisher of task {self.metadata.task!r}", samples=self.counts.samples)
        for kind, tensors in (("mean", self._mean), ("variance", self._variance)):
            for name in sorted(tensors):
                check.add(f"{kind}.{name}", tensors[name])
        for name, t in sorted((self.sample_contributions or {}).items()):
            check.add(f"sample_contributions.{name}", t)
        check.finish()
        self._values_ok = True

    # ------------------------------------------------------------------ model checks
    def validate(self, model: Any) -> None:
        """Check that this Fisher belongs to ``model``: its architecture, names and shapes.

        Architecture (same shapes are not enough: with 8 heads instead of 4 every head result
        would be wrong), compared with the model's layout (:func:`hf_fisher.plugins.model_layout`):

        - ``model_type`` (``metadata.model_type`` / ``layout.model_type``) against the model's
          ``config.model_type`` (PEFT unwrapped);
        - with a stored layout: ``layout.num_layers`` (a model with more layers is a mismatch),
          per attention layer ``num_heads``, ``num_kv_heads``, ``head_dim`` (and which layers
          have attention), per MLP block ``num_channels``, per MoE layer ``num_experts`` and
          ``num_channels``; for ``reduction="group"`` also each parameter's groups;
        - every Fisher parameter must exist in ``model.named_parameters()`` with its shape (the
          model may have more parameters, e.g. frozen ones the Fisher does not cover).

        Raises :class:`~hf_fisher.errors.ModelMismatchError` naming each differing field with both
        values (up to 5 per section) and what to do.
        """
        arch = self._architecture_problems(model)
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        problems: list[str] = []
        for name in self.names():
            want = self.param_shapes[name]
            if name not in params:
                problems.append(f"  - {name}: in the Fisher with shape {_shape_str(want)}, not a parameter of the model")
            elif params[name] != want:
                problems.append(
                    f"  - {name}: Fisher expects shape {_shape_str(want)}, the model has {_shape_str(params[name])}"
                )
        if not (arch or problems):
            return

        def section(items: list[str]) -> str:
            shown = "\n".join(items[:5])
            return shown + (f"\n  ... and {len(items) - 5} more" if len(items) > 5 else "")

        parts = []
        if arch:
            parts.append(f"its architecture differs in {len(arch)} field(s) (artifact vs model):\n{section(arch)}")
        if problems:
            parts.append(f"{len(problems)} of its {len(self)} parameters differ:\n{section(problems)}")
        src = self.metadata.model_name_or_path or "an unrecorded model"
        raise ModelMismatchError(
            "this Fisher artifact does not match the model: " + "\n".join(parts) + "\n"
            f"It was computed for {src} (model_type={self.metadata.model_type}). Use it with that "
            "model (same config, same PEFT wrapping: names include wrapper prefixes such as "
            "'base_model.model.'), or collect a new Fisher for this model."
        )

    def _architecture_problems(self, model: Any) -> list[str]:
        """Lines ``  - <field>: the artifact has X, the model has Y`` (see :meth:`validate`)."""
        from hf_fisher.architectures.builder import model_type_of

        out: list[str] = []

        def differ(field_name: str, ours: Any, theirs: Any) -> None:
            out.append(f"  - {field_name}: the artifact has {ours!r}, the model has {theirs!r}")

        have_type = model_type_of(model)
        for field_name, want_type in (("metadata.model_type", self.metadata.model_type),
                                      ("layout.model_type", self.layout.model_type if self.layout else None)):
            if want_type is not None and have_type is not None and want_type != have_type:
                differ(field_name, want_type, have_type)
                break
        if self.layout is None:
            return out
        from hf_fisher import plugins

        theirs = plugins.model_layout(model)
        mine = self.layout
        if mine.num_layers != theirs.num_layers:
            differ("layout.num_layers", mine.num_layers, theirs.num_layers)
        # per-layer fields: the same difference in several layers is one line
        diffs: dict[tuple[str, str, Any, Any], list[tuple[int, int]]] = {}

        def per_layer(kind: str, mine_items: list, theirs_items: list, attrs: tuple[str, ...]) -> None:
            their_by_layer = {x.layer: x for x in theirs_items}
            for i, x in enumerate(mine_items):
                y = their_by_layer.pop(x.layer, None)
                if y is None:
                    out.append(f"  - layout.{kind}[{i}] (layer {x.layer}): the artifact has one, the model none")
                    continue
                for attr in attrs:
                    if getattr(x, attr) != getattr(y, attr):
                        diffs.setdefault((kind, attr, getattr(x, attr), getattr(y, attr)), []).append((i, x.layer))
            for layer in sorted(their_by_layer):
                out.append(f"  - layout.{kind} (layer {layer}): the model has one, the artifact none")

        per_layer("attention", mine.attention, theirs.attention, ("num_heads", "num_kv_heads", "head_dim"))
        per_layer("mlp", mine.mlp, theirs.mlp, ("num_channels",))
        per_layer("experts", mine.experts, theirs.experts, ("num_experts", "num_channels"))
        for (kind, attr, ours, other), where in diffs.items():
            if len(where) == 1:
                differ(f"layout.{kind}[{where[0][0]}].{attr} (layer {where[0][1]})", ours, other)
            else:
                layers = ", ".join(str(layer) for _, layer in where[:8]) + (", ..." if len(where) > 8 else "")
                differ(f"layout.{kind}[*].{attr} (layers {layers})", ours, other)
        if self.reduction == "group":
            for name in self.names():
                pg, other_pg = self.groups.get(name), theirs.groups.get(name)
                if pg is not None and other_pg is not None and pg != other_pg:
                    out.append(
                        f"  - groups[{json.dumps(name)}]: the artifact sums {pg.num_groups} group(s) "
                        f"({_group_summary(pg)}), the model's layout has {other_pg.num_groups} ({_group_summary(other_pg)})"
                    )
        return out

    # ------------------------------------------------------------------ saving
    def _state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for kind, tensors in (("mean", self._mean), ("variance", self._variance)):
            for name in sorted(tensors):
                t = tensors[name].detach().to("cpu").contiguous()
                key = t.untyped_storage().data_ptr() if t.numel() else None
                if key is not None and key in seen:
                    t = t.clone()  # safetensors refuses tensors sharing memory
                elif key is not None:
                    seen.add(key)
                out[f"{kind}.{name}"] = t
        return out

    def _config(self, tensor_files: list[str], sharded: bool) -> dict[str, Any]:
        # "sample_contributions_file" only when there are any (older readers ignore the key)
        samples = {"sample_contributions_file": SAMPLES_NAME} if self.sample_contributions is not None else {}
        return {
            "format_version": FORMAT_VERSION,
            "library": "hf_fisher",
            "reduction": self.reduction,
            "metadata": self.metadata.to_dict(),
            "counts": self.counts.to_dict(),
            "param_shapes": {n: list(self.param_shapes[n]) for n in self.names()},
            "groups": {n: self.groups[n].to_dict() for n in sorted(self.groups)} if self.groups else None,
            "layout": self.layout.to_dict() if self.layout is not None else None,
            "has_variance": bool(self._variance),
            "tensor_files": tensor_files,
            "index_file": WEIGHTS_INDEX_NAME if sharded else None,
            **samples,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "2GB") -> Path:
        """Write the artifact folder atomically and return its path.

        Files: ``fisher.safetensors`` (or shards ``fisher-0000k-of-0000N.safetensors`` plus
        ``fisher.safetensors.index.json`` when the tensors exceed ``max_shard_size``),
        ``fisher_config.json`` and a ``README.md`` model card; a Fisher with
        :attr:`sample_contributions` also gets ``sample_contributions.safetensors`` (one unsharded
        file, key ``<param>``, recorded as ``sample_contributions_file`` in the config). Everything is written to a
        temporary folder beside the target, fsync'ed and renamed into place
        (:func:`hf_fisher.atomic.atomic_folder`), so an interrupted save never leaves a
        half-written artifact: the target holds the previous artifact or the new one, and the
        next save (or load) repairs what a killed save left behind. An existing folder is
        replaced only when it holds nothing but a previous Fisher artifact (otherwise
        :class:`ArtifactError`, before anything is written); the new folder keeps its mode. New
        folders and files get the permissions of the user's umask.
        """
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        from hf_fisher.atomic import atomic_folder, check_target

        target = check_target(save_directory, allowed=is_artifact_file, what="Fisher artifact")
        with atomic_folder(target, what="Fisher artifact") as tmp:
            state = self._state_dict()
            split = split_torch_state_dict_into_shards(state, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
            file_meta = {
                "format": "pt",
                "task": str(self.metadata.task),
                "reduction": self.reduction,
                "estimator": str(self.metadata.estimator),
                "hf_fisher_format_version": str(FORMAT_VERSION),
            }
            if not state:  # an empty Fisher still gets a (valid, empty) tensor file
                filename_to_tensors: dict[str, list[str]] = {WEIGHTS_NAME: []}
                sharded = False
            else:
                filename_to_tensors = split.filename_to_tensors
                sharded = split.is_sharded
            for filename, keys in filename_to_tensors.items():
                save_file({k: state[k] for k in keys}, str(tmp / filename), metadata=file_meta)
            if sharded:
                index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
                _write_json(tmp / WEIGHTS_INDEX_NAME, index)
            files = sorted(filename_to_tensors)
            if self.sample_contributions is not None:
                kept = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.sample_contributions.items()}
                save_file(kept, str(tmp / SAMPLES_NAME), metadata={**file_meta, "kind": "sample_contributions"})
            _write_json(tmp / CONFIG_NAME, self._config(files, sharded))
            from hf_fisher.cards import render_card

            render_card(self).save(tmp / CARD_NAME)
        logger.info("saved Fisher artifact (%d parameters) to %s", len(self), target)
        return target

    def push_to_hub(
        self,
        repo_id: str,
        *,
        path_in_repo: str | None = None,
        private: bool = False,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        token: str | None = None,
        api: Any = None,
    ) -> str:
        """Publish this artifact on the Hugging Face Hub as ONE commit; returns the commit URL (or
        the pull-request URL with ``create_pr=True``).

        The artifact is written by :meth:`save_pretrained` into a temporary folder and uploaded by
        :func:`hf_fisher.integrations.hub.push_folder`: to the root of ``repo_id`` (a standalone
        artifact repository, created if needed, ``private`` when new), or under ``path_in_repo``
        (e.g. ``"fisher"`` in the model's own repository: load it back with
        ``Fisher.from_pretrained("user/model:fisher")``). ``revision``: the branch to commit to
        (created from ``main`` if missing). ``api``: an ``huggingface_hub.HfApi`` (its endpoint and
        token), else ``$HF_ENDPOINT`` / huggingface_hub's default. ``token`` is never written or
        logged. Arguments are checked before anything is written or sent
        (:class:`~hf_fisher.errors.InvalidInputError`); Hub failures are
        :class:`~hf_fisher.errors.ArtifactError`. The default commit message names the task,
        estimator, reduction and sample count.
        """
        import tempfile

        from hf_fisher.integrations import hub

        hub.check_push_ready(repo_id, path_in_repo=path_in_repo, revision=revision, create_pr=create_pr,
                             commit_message=commit_message, private=private, token=token, api=api)
        if commit_message is None:
            commit_message = (
                f"Upload Fisher artifact (task {self.metadata.task!r}, estimator {self.metadata.estimator}, "
                f"reduction {self.reduction}, {self.counts.samples} samples) with hf_fisher"
            )
        with tempfile.TemporaryDirectory(prefix="hf-fisher-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "fisher")
            return hub.push_folder(
                folder, repo_id, path_in_repo=path_in_repo, private=private, revision=revision,
                create_pr=create_pr, commit_message=commit_message, token=token, api=api,
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        model: Any = None,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        strict: bool = True,
    ) -> "Fisher":
        """Load an artifact written by :meth:`save_pretrained` (safetensors only, no pickle), from a
        local folder or from the Hugging Face Hub.

        ``path_or_repo``: an artifact folder, or a Hub reference ``"user/repo"`` /
        ``"user/repo:fisher"`` (the artifact in the subfolder ``fisher/``; or pass
        ``subfolder="fisher"``). A Hub reference is used when no local folder of that name exists
        (nor the backup of an interrupted save into it); it is downloaded with
        :func:`hf_fisher.integrations.hub.resolve_folder` (``revision``: branch, tag or commit sha;
        ``token``; ``cache_dir``; the Hugging Face cache is reused, ``HF_HUB_OFFLINE=1`` loads from
        it, and every Hub failure is an :class:`~hf_fisher.errors.ArtifactError` saying what to do).
        The downloaded folder then goes through exactly the checks of a local one.

        Every field of ``fisher_config.json``, every file name and every stored tensor (dtype,
        shape) is checked first (see :class:`FisherReader`): a malformed artifact is an
        :class:`~hf_fisher.errors.ArtifactError` naming the field or tensor. A folder missing
        because a save into it was killed between its two renames is restored from the backup
        the save left (a warning is logged).

        The values are checked too (:class:`ValueCheck`): every mean, variance and per-sample
        contribution must be finite and non-negative, and all zero when ``counts.samples`` is 0;
        ``metadata.estimator`` must be a registered estimator (built-in or plugin). Otherwise an
        :class:`~hf_fisher.errors.ArtifactError` names each bad tensor with its counts of NaN /
        Inf / negative values. ``strict=False`` loads such an artifact anyway, to inspect or
        repair it: a WARNING is logged and the problems are recorded in
        ``metadata.extra["load_problems"]`` (consumers such as merging and EWC still refuse
        invalid values).

        With ``model``, also checks that the artifact belongs to it (:meth:`validate`: model type,
        number of layers, attention heads / kv-heads / head dimension, names and shapes):
        :class:`~hf_fisher.errors.ModelMismatchError` naming every difference.
        """
        from hf_fisher.integrations import hub

        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")

        if _is_hub_source(path_or_repo):
            path: str | os.PathLike = hub.resolve_folder(
                path_or_repo, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                what="Fisher artifact",
            )
        else:
            if revision is not None:
                raise InvalidInputError(
                    f"revision={revision!r} only applies to Hub references, but {os.fspath(path_or_repo)!r} is a "
                    "local path; drop revision= or pass a Hub reference such as 'user/repo:fisher'"
                )
            path = Path(os.fspath(path_or_repo))
            if subfolder is not None:
                path = path / hub._check_repo_path(subfolder, "subfolder")
        reader = FisherReader(path, strict=strict)
        cfg = reader.config
        mean: dict[str, torch.Tensor] = {}
        variance: dict[str, torch.Tensor] = {}
        for filename, keys in reader.file_keys().items():
            for key, tensor in _load_file(reader.root / filename, keys, device).items():
                kind, _, name = key.partition(".")
                if kind not in _KINDS or name not in reader.param_shapes:
                    raise ArtifactError(
                        f"unexpected tensor {key!r} in {filename} of {reader.root}: not 'mean.<param>' or "
                        "'variance.<param>' of a parameter listed in fisher_config.json; the artifact is malformed"
                    )
                reader.check_tensor(key, tensor, filename)
                (mean if kind == "mean" else variance)[name] = tensor
        names = set(reader.param_shapes)
        missing = sorted(names - set(mean))
        if missing:
            raise ArtifactError(
                f"Fisher artifact {reader.root} lacks the mean tensor of {len(missing)} parameter(s) "
                f"(e.g. {missing[:5]}); the tensor files are incomplete — save it again"
            )
        if cfg["has_variance"]:
            lacking = sorted(names - set(variance))
            if lacking:
                raise ArtifactError(
                    f"Fisher artifact {reader.root} says it has variances (has_variance: true) but lacks the "
                    f"variance tensor of {len(lacking)} parameter(s) (e.g. {lacking[:5]}); save it again"
                )
        elif variance:
            raise ArtifactError(
                f"Fisher artifact {reader.root} is malformed: field 'has_variance' is false but its tensor files "
                f"hold {len(variance)} variance tensor(s)"
            )
        samples = reader.sample_contributions(device=device)
        check = ValueCheck(f"Fisher artifact {reader.root}", strict=strict, samples=reader.counts.samples)
        for kind, tensors in (("mean", mean), ("variance", variance)):
            for name in sorted(tensors):
                check.add(f"{kind}.{name}", tensors[name])
        for name, t in sorted((samples or {}).items()):
            check.add(f"{SAMPLES_NAME}: {name}", t)
        problem = check.finish()
        try:
            fisher = cls(
                mean,
                variance or None,
                reduction=cfg["reduction"],
                groups=reader.groups,
                param_shapes=reader.param_shapes,
                counts=reader.counts,
                metadata=_record_problems(reader.metadata, reader.problems + ([problem] if problem else [])),
                layout=reader.layout,
                sample_contributions=samples,
            )
        except (InvalidInputError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"Fisher artifact {reader.root} is malformed: {e}") from e
        fisher._values_ok = problem is None
        if model is not None:
            fisher.validate(model)
        return fisher

    @staticmethod
    def open_tensor(
        path: str | os.PathLike, name: str, kind: str = "mean", *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Read one tensor (``kind`` "mean" or "variance" of parameter ``name``) without loading the rest.

        The artifact is checked as by :meth:`from_pretrained` (config fields, file names, the
        tensor's dtype and shape; see :class:`FisherReader`)."""
        return FisherReader(path).get(name, kind, device=device)

    # ------------------------------------------------------------------ analysis (delegates)
    def to_groups(self, groups_or_layout: Mapping[str, ParamGroups] | ModelLayout | None = None) -> "Fisher":
        """Group view (see :func:`hf_fisher.analysis.group_view`)."""
        from hf_fisher import analysis

        return analysis.group_view(self, groups_or_layout)

    def expand(self, name: str, spread: bool = False) -> torch.Tensor:
        """Parameter-shaped values of ``name`` (see :func:`hf_fisher.analysis.expand`)."""
        from hf_fisher import analysis

        return analysis.expand(self, name, spread=spread)

    def top_k(self, k: int = 10, *, params=None) -> list[tuple[str, str, float]]:
        """Largest groups across parameters (see :func:`hf_fisher.analysis.top_k`)."""
        from hf_fisher import analysis

        return analysis.top_k(self, k, params=params)

    def per_layer(self) -> dict[int | None, float]:
        """Fisher mass per layer (see :func:`hf_fisher.analysis.per_layer`)."""
        from hf_fisher import analysis

        return analysis.per_layer(self)

    def normalized(self, scope: str = "global") -> "Fisher":
        """``F / Σ F`` globally or per layer (see :func:`hf_fisher.analysis.normalized`)."""
        from hf_fisher import analysis

        return analysis.normalized(self, scope)

    def head_importance(self) -> dict[tuple[int, int], float]:
        """Per attention head totals (see :func:`hf_fisher.analysis.head_importance`)."""
        from hf_fisher import analysis

        return analysis.head_importance(self)

    def channel_importance(self) -> dict[tuple[int, int], float]:
        """Per MLP channel totals (see :func:`hf_fisher.analysis.channel_importance`)."""
        from hf_fisher import analysis

        return analysis.channel_importance(self)

    def expert_importance(self, *, include_router: bool = False) -> dict[tuple[int, int], float]:
        """Per routed-expert totals of MoE layers (see :func:`hf_fisher.analysis.expert_importance`)."""
        from hf_fisher import analysis

        return analysis.expert_importance(self, include_router=include_router)

    def expert_channel_importance(self) -> dict[tuple[int, int, int], float]:
        """Per (layer, expert, channel) totals (see :func:`hf_fisher.analysis.expert_channel_importance`)."""
        from hf_fisher import analysis

        return analysis.expert_channel_importance(self)

    def compare(self, other: "Fisher", k: int = 100) -> dict[str, Any]:
        """Similarity with another Fisher (see :func:`hf_fisher.analysis.compare`)."""
        from hf_fisher import analysis

        return analysis.compare(self, other, k=k)

    def stderr(self, name: str) -> torch.Tensor:
        """Standard error of ``fisher[name]``: ``sqrt(Var_i(C_i) / n)``."""
        from hf_fisher import analysis

        return analysis.stderr(self, name)

    def confidence_interval(self, name: str, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Student-t interval for ``fisher[name]`` (see :func:`hf_fisher.analysis.confidence_interval`)."""
        from hf_fisher import analysis

        return analysis.confidence_interval(self, name, level)


class FisherReader:
    """Lazy, tensor-by-tensor access to an artifact folder (for merging large models).

    ``reader.names()``, ``reader.param_shapes``, ``reader.groups``, ``reader.config`` come from
    ``fisher_config.json``; ``reader.get(name, kind)`` reads one tensor with
    ``safetensors.safe_open`` from the shard the index points to.

    Opening checks the artifact before anything is read from it (every failure is an
    :class:`~hf_fisher.errors.ArtifactError` naming the file or field):

    - ``fisher_config.json`` is valid JSON and every field has its type (JSON path named, e.g.
      ``counts.samples`` or ``layout.attention[0].num_heads``); counts are non-negative integers;
      the format version is not newer than this hf_fisher;
    - ``tensor_files``, ``index_file`` and the shard index's file names stay inside the folder
      (no absolute paths, no ``..``, no symlink resolving outside it — except the links of a
      huggingface_hub cache snapshot into its ``blobs/``) and exist; the shard index names only
      ``mean.<param>``/``variance.<param>`` keys of listed parameters, in listed files.

    Values (:class:`ValueCheck`, the rule of :meth:`Fisher.from_pretrained`): every tensor
    :meth:`get` returns is checked (finite, non-negative, all zero when ``counts.samples`` is 0),
    and :meth:`check_values` reads the whole artifact once, one tensor at a time, so that a
    streaming consumer (merging) refuses an invalid artifact before any work or write. The
    estimator name must be registered and an EMA's resume state valid. ``strict=False`` logs
    these problems as WARNINGs and records them (:attr:`problems`, ``metadata.extra["load_problems"]``)
    instead of raising.

    A folder that does not exist, but whose previous version was left in a backup by a save
    killed between its two renames, is **restored** first (the backup is renamed back to the
    folder and a warning is logged; see :func:`hf_fisher.atomic.recover`); when the backup cannot
    be moved (read-only parent) it is read in place, with a warning.
    """

    def __init__(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        self.strict = strict
        #: what a strict=False reader let through (messages; also in ``metadata.extra["load_problems"]``)
        self.problems: list[str] = []
        self._values_ok = False
        root = Path(os.fspath(path))
        if not root.exists():
            root = _recover_missing(root)
        if not root.is_dir():
            raise ArtifactError(f"{root} is a file; a Fisher artifact is a folder containing {CONFIG_NAME}")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise ArtifactError(
                f"{root} is not a Fisher artifact: {CONFIG_NAME} is missing (was it written by "
                "Fisher.save_pretrained?)"
            )
        cfg_path = _artifact_path(root, CONFIG_NAME, CONFIG_NAME)
        raw = _read_json(cfg_path, "Fisher artifact", _s_obj({"format_version": (_s_int(), _REQUIRED)}, extra=True))
        version = raw["format_version"]
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{root} uses artifact format {version}, newer than this hf_fisher supports "
                f"({FORMAT_VERSION}); upgrade hf_fisher"
            )
        try:
            _S_CONFIG(raw, "")
        except _Bad as e:
            raise ArtifactError(
                f"{cfg_path} is malformed: field '{e.path or '(top level)'}' {e.problem}. The Fisher artifact was "
                "not written by Fisher.save_pretrained or was damaged; save or download it again"
            ) from None
        cfg = raw
        self.root = root
        self.config: dict[str, Any] = cfg
        files = list(cfg["tensor_files"])
        for i, f in enumerate(files):
            _artifact_path(root, f, f"tensor_files[{i}]")
        missing = [f for f in files if not (root / f).is_file()]
        self._weight_map: dict[str, str] | None = None
        if cfg["index_file"] is not None:
            index_path = _artifact_path(root, cfg["index_file"], "index_file")
            if not index_path.is_file():
                raise ArtifactError(f"Fisher artifact {root} is incomplete: the shard index {cfg['index_file']} is missing")
            index = _read_json(index_path, "shard index", _S_INDEX)
            self._weight_map = dict(index["weight_map"])
            for key, f in self._weight_map.items():
                where = f"{cfg['index_file']}: weight_map[{json.dumps(key)}]"
                kind, _, name = key.partition(".")
                if kind not in _KINDS or name not in cfg["param_shapes"]:
                    raise ArtifactError(
                        f"Fisher artifact {root} is malformed: field '{where}' is not 'mean.<param>' or "
                        "'variance.<param>' of a parameter listed in param_shapes"
                    )
                _artifact_path(root, f, where)
                if f not in files:
                    raise ArtifactError(
                        f"Fisher artifact {root} is malformed: field '{where}' names {f!r}, which is not in "
                        f"tensor_files {files[:5]}"
                    )
            missing += sorted({f for f in self._weight_map.values() if not (root / f).is_file()} - set(missing))
        if missing:
            raise ArtifactError(
                f"Fisher artifact {root} is incomplete: missing tensor file(s) {missing[:5]}; "
                "re-download or save it again"
            )
        self._files = files
        self._samples_file: Path | None = None
        if cfg.get("sample_contributions_file") is not None:
            if cfg["reduction"] != "group":
                raise ArtifactError(
                    f"{cfg_path} is malformed: field 'sample_contributions_file' is set, but per-sample contributions "
                    "exist only for reduction 'group'"
                )
            self._samples_file = _artifact_path(root, cfg["sample_contributions_file"], "sample_contributions_file")
            if not self._samples_file.is_file():
                raise ArtifactError(
                    f"Fisher artifact {root} is incomplete: the per-sample contributions file "
                    f"{cfg['sample_contributions_file']} is missing; re-download or save it again"
                )
        self.param_shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in cfg["param_shapes"].items()}
        self.groups: dict[str, ParamGroups] | None = None
        self.layout: ModelLayout | None = None
        try:
            if cfg["groups"]:
                self.groups = {k: ParamGroups.from_dict(v) for k, v in cfg["groups"].items()}
            if cfg["layout"]:
                self.layout = ModelLayout.from_dict(cfg["layout"])
        except (KeyError, TypeError, ValueError) as e:  # pragma: no cover - the schema catches these first
            raise ArtifactError(f"{cfg_path} is malformed: {e}") from e
        self._check_groups(cfg_path)
        problem = check_estimator_name(cfg["metadata"]["estimator"], f"Fisher artifact {root}", strict=strict)
        if problem:
            self.problems.append(problem)
        problem = _ema_state_problem(cfg["metadata"])
        if problem:
            msg = (f"{cfg_path} is malformed: field 'metadata.extra.ema_state' {problem}; a Trainer cannot resume "
                   "its exponential moving average from it")
            if strict:
                raise ArtifactError(msg + " (to inspect it anyway: hf-fisher show --no-strict, or from_pretrained(..., strict=False))")
            logger.warning("%s. Loaded anyway (strict=False)", msg)
            self.problems.append(msg)

    def _check_groups(self, cfg_path: Path) -> None:
        """Each parameter's groups partition its shape (the field named on failure)."""
        sources = [("groups", self.groups or {})]
        if self.layout is not None:
            sources.append(("layout.groups", self.layout.groups))
        for where, groups in sources:
            for name, pg in groups.items():
                shape = self.param_shapes.get(name)
                if shape is None:
                    continue
                n = pg.group_axes_size(shape)
                if n is None or (shape and pg.axis_size != n):  # the rule of Fisher's constructor
                    raise ArtifactError(
                        f"{cfg_path} is malformed: field '{_key_path(where, name)}' partitions {pg.axis_size} "
                        f"indices of axes {pg.axes}, which does not fit the parameter's shape {_shape_str(shape)}"
                    )

    @property
    def reduction(self) -> str:
        return self.config["reduction"]

    @property
    def metadata(self) -> FisherMetadata:
        return _record_problems(FisherMetadata.from_dict(self.config["metadata"]), self.problems)

    @property
    def counts(self) -> Counts:
        return Counts.from_dict(self.config["counts"])

    def names(self) -> list[str]:
        return sorted(self.param_shapes)

    def file_keys(self) -> dict[str, list[str] | None]:
        """``{tensor file: keys in it}`` (``None`` = every key of that file)."""
        if self._weight_map is None:
            return {f: None for f in self._files}
        out: dict[str, list[str] | None] = {}
        for key, f in self._weight_map.items():
            out.setdefault(f, []).append(key)  # type: ignore[union-attr]
        return out

    def _file_of(self, key: str) -> str:
        if self._weight_map is not None:
            if key not in self._weight_map:
                raise KeyError(key)
            return self._weight_map[key]
        return self._files[0]

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``'s stored tensors: the parameter's (``"param"``) or ``[num_groups]``."""
        if self.reduction == "param":
            return self.param_shapes[name]
        pg = (self.groups or {}).get(name)
        if pg is None and self.layout is not None:
            pg = self.layout.groups.get(name)
        if pg is None:  # pragma: no cover - the schema requires groups for "group" artifacts
            raise ArtifactError(f"Fisher artifact {self.root} has no groups for {name!r}")
        return (pg.num_groups,)

    def get(self, name: str, kind: str = "mean", *, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor: ``kind`` is "mean" or "variance".

        ``KeyError`` when ``name`` is not a parameter of the artifact (or it has no variances);
        :class:`ArtifactError` when the config lists the tensor but the files lack it, when the
        stored tensor is not floating point or its shape disagrees with ``fisher_config.json``,
        or when its values are invalid (NaN, Inf, negative; non-zero with ``counts.samples`` 0:
        :class:`ValueCheck`, logged and recorded instead with ``strict=False``).
        """
        if kind not in _KINDS:
            raise InvalidInputError(f"kind must be one of {_KINDS}, got {kind!r}")
        if name not in self.param_shapes:
            raise KeyError(f"{name!r} is not in the Fisher artifact at {self.root}")
        key = f"{kind}.{name}"
        if kind == "variance" and not self.config["has_variance"]:
            raise KeyError(f"the artifact at {self.root} has no variances (has_variance: false)")
        try:
            filename = self._file_of(key)
        except KeyError:
            filename = None
        tensors = _load_file(self.root / filename, [key], device, allow_missing=True) if filename else {}
        if key not in tensors:
            raise ArtifactError(
                f"Fisher artifact {self.root} is incomplete: {CONFIG_NAME} lists {name!r}, but its {kind} tensor "
                f"{key!r} is missing from {filename or 'the shard index'}; save or download the artifact again"
            )
        tensor = tensors[key]
        self.check_tensor(key, tensor, filename)
        if not self._values_ok:
            check = ValueCheck(f"Fisher artifact {self.root}", strict=self.strict, samples=self.counts.samples)
            check.add(key, tensor)
            problem = check.finish()
            if problem and problem not in self.problems:
                self.problems.append(problem)
        return tensor

    def check_values(self) -> None:
        """Read every stored tensor once (one at a time) and check its values as
        :meth:`Fisher.from_pretrained` does (:class:`ValueCheck`: finite, non-negative, zero when
        ``counts.samples`` is 0; a tensor the config lists but the files lack is an
        :class:`ArtifactError`). Streaming consumers call it before any work or write; with
        ``strict=False`` the problems are logged and recorded instead."""
        if self._values_ok:
            return
        check = ValueCheck(f"Fisher artifact {self.root}", strict=self.strict, samples=self.counts.samples)
        kinds = _KINDS if self.config["has_variance"] else ("mean",)
        strict, self.strict = self.strict, True
        self._values_ok = True  # get() below leaves the values to this check
        try:
            for name in self.names():
                for kind in kinds:
                    check.add(f"{kind}.{name}", self.get(name, kind))
            for name, t in sorted((self.sample_contributions() or {}).items()):
                check.add(f"{SAMPLES_NAME}: {name}", t)
        finally:
            self.strict, self._values_ok = strict, False
        problem = check.finish()
        if problem and problem not in self.problems:
            self.problems.append(problem)
        self._values_ok = problem is None

    def sample_contributions(self, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """The per-sample group contributions ``{param: [counts.samples, num_groups]}`` of
        ``sample_contributions_file``, or None when the artifact has none. :class:`ArtifactError`
        unless the file holds exactly one floating-point tensor of that shape per parameter."""
        if self._samples_file is None:
            return None
        filename = self._samples_file.name
        tensors = _load_file(self._samples_file, None, device)
        names = set(self.param_shapes)
        if set(tensors) != names:
            extra, lacking = sorted(set(tensors) - names), sorted(names - set(tensors))
            raise ArtifactError(
                f"Fisher artifact {self.root} is malformed: {filename} must hold one tensor per parameter; "
                f"unexpected {extra[:5]}, missing {lacking[:5]}"
            )
        n = self.counts.samples
        for name, t in tensors.items():
            want = (n, self.expected_shape(name)[0])
            if not t.dtype.is_floating_point or tuple(t.shape) != want:
                raise ArtifactError(
                    f"Fisher artifact {self.root} is malformed: tensor {name!r} in {filename} has shape "
                    f"{_shape_str(t.shape)} and dtype {t.dtype}, but must be floating point of shape {_shape_str(want)} "
                    "([counts.samples, num_groups])"
                )
        return tensors

    def check_tensor(self, key: str, tensor: torch.Tensor, filename: str) -> None:
        """:class:`ArtifactError` unless ``tensor`` (stored as ``key`` in ``filename``) is floating
        point with the shape ``fisher_config.json`` gives it."""
        _, _, name = key.partition(".")
        want = self.expected_shape(name)
        if not tensor.dtype.is_floating_point:
            raise ArtifactError(
                f"Fisher artifact {self.root} is malformed: tensor {key!r} in {filename} has dtype "
                f"{tensor.dtype}; Fisher values are floating point"
            )
        if tuple(tensor.shape) != want:
            raise ArtifactError(
                f"Fisher artifact {self.root} is malformed: tensor {key!r} in {filename} has shape "
                f"{_shape_str(tensor.shape)}, but fisher_config.json gives it {_shape_str(want)} "
                f"(reduction={self.reduction!r})"
            )


def _recover_missing(root: Path) -> Path:
    """The folder to read for a missing artifact ``root``: restored from an interrupted save's
    backup, the backup itself when it cannot be moved, else :class:`ArtifactError`."""
    from hf_fisher.atomic import recover

    try:
        rec = recover(root, what="Fisher artifact", clean=False)
    except HfFisherError:
        rec = None
    if root.exists():  # restored from the backup (recover() logged a warning), or a concurrent
        return root    # save was between its two renames and recover() waited for it
    if rec is not None and rec.backup is not None and rec.backup.is_dir():
        logger.warning(
            "Fisher artifact %s is missing because a save into it was interrupted; reading the previous "
            "version from the backup %s, which could not be moved back (%s)", root, rec.backup, rec.error,
        )
        return rec.backup
    raise ArtifactError(
        f"no Fisher artifact at {root}: the folder does not exist. Pass the folder written by "
        "Fisher.save_pretrained, or a Hub reference such as 'user/repo' or 'user/repo:fisher' to "
        "Fisher.from_pretrained (downloaded into the Hugging Face cache)."
    )


def _is_hub_source(path_or_repo: Any) -> bool:
    """Whether :meth:`Fisher.from_pretrained` should read ``path_or_repo`` from the Hub: a string
    that is a Hub reference, with no local file or folder of that name and no backup of an
    interrupted save into such a folder (those are local and are restored by :class:`FisherReader`).
    A reference with a bad subfolder counts, so that its error says what is wrong with it."""
    from hf_fisher.atomic import leftovers
    from hf_fisher.integrations.hub import looks_like_hub_repo

    if not isinstance(path_or_repo, str) or os.path.lexists(path_or_repo) or not looks_like_hub_repo(path_or_repo):
        return False
    return not any(lo.kind == "old" for lo in leftovers(path_or_repo.partition(":")[0]))


def _load_file(path: Path, keys, device, *, allow_missing: bool = False) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            available = set(f.keys())
            wanted = sorted(available) if keys is None else list(keys)
            out = {}
            for k in wanted:
                if k not in available:
                    if allow_missing:
                        continue
                    raise ArtifactError(f"tensor {k!r} is missing from {path}; the artifact is incomplete")
                out[k] = f.get_tensor(k)
            return out
    except HfFisherError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"cannot read tensor file {path}: {e}") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return _dtype_str(o)
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if hasattr(o, "item") and callable(o.item):  # numpy scalars
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise InvalidInputError(
        f"cannot store {o!r} (type {type(o).__name__}) in fisher_config.json: metadata.extra values "
        "must be JSON-serialisable (str, int, float, bool, None, lists, dicts)"
    )


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=_json_default)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def is_artifact_file(name: str) -> bool:
    """Whether a file name belongs to a Fisher artifact folder (what a save may replace)."""
    return name in (CONFIG_NAME, CARD_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SAMPLES_NAME) or (
        name.startswith("fisher-") and name.endswith(".safetensors")
    )
