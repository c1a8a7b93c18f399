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
    README.md                          model card (hf_fisher.artifacts.cards)

Saving is atomic and crash-safe (:mod:`hf_fisher.artifacts.atomic`: temporary folder beside the target,
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
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hf_fisher.artifacts import base as _base
from hf_fisher.artifacts import format as _format
from hf_fisher.artifacts import metadata as _metadata
from hf_fisher.artifacts import values as _values
from hf_fisher.artifacts.base import ArtifactHubMixin
from hf_fisher.artifacts.format import (
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    FORMAT_VERSION,
    KINDS,
    REDUCTIONS,
    SAMPLES_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_PATTERN,
    dtype_str,
    is_artifact_file,
    load_file,
    shape_str,
    write_json,
)
from hf_fisher.artifacts.metadata import Counts, FisherMetadata
from hf_fisher.artifacts.reader import FisherReader, open_tensor
from hf_fisher.artifacts.values import LOAD_PROBLEMS_KEY, ValueCheck, check_estimator_name, known_estimators
from hf_fisher.errors import ArtifactError, InvalidInputError, ModelMismatchError
from hf_fisher.layout import ModelLayout, ParamGroups

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "LOAD_PROBLEMS_KEY",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "Counts",
    "Fisher",
    "FisherMetadata",
    "FisherReader",
    "ValueCheck",
    "check_estimator_name",
    "is_artifact_file",
    "known_estimators",
    "open_tensor",
]

logger = logging.getLogger(__name__)

#: ``produce(kind, name) -> tensor``: makes one tensor of a streamed save (:meth:`Fisher.save_streaming`)
TensorSource = Callable[[str, str], torch.Tensor]

# The private names this module had before the artifacts package: code outside the package may
# still reach them through the deprecated alias ``hf_fisher.artifacts.fisher`` (to be swept to the public names).
_is_hub_source = _base.is_hub_source
_KINDS, _REQUIRED, _Bad = _format.KINDS, _format.REQUIRED, _format.SchemaError
_S_CONFIG, _S_COUNTS, _S_INDEX, _S_METADATA = _format.S_CONFIG, _format.S_COUNTS, _format.S_INDEX, _format.S_METADATA
_s_bool, _s_int, _s_list, _s_map = _format.s_bool, _format.s_int, _format.s_list, _format.s_map
_s_nullable, _s_number, _s_obj, _s_str = _format.s_nullable, _format.s_number, _format.s_obj, _format.s_str
_artifact_path, _describe, _dtype_str, _key_path = _format.artifact_path, _format.describe, _format.dtype_str, _format.key_path
_load_file, _read_json, _write_json, _shape_str = _format.load_file, _format.read_json, _format.write_json, _format.shape_str
_library_version = _metadata.library_version
_ema_state_problem, _record_problems, _value_problems = (_values.ema_state_problem, _values.record_problems,
                                                         _values.value_problems)


def _group_summary(pg: ParamGroups) -> str:
    names = pg.names
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{shown} along axes {pg.axes}"


class Fisher(ArtifactHubMixin):
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
                got = f"shape {shape_str(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidInputError(
                    f"sample_contributions for {name!r} must be a floating-point tensor of shape {shape_str(want)} "
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
                        f"parameter has shape {shape_str(shape)}"
                    )
            if self.reduction == "param":
                if tuple(t.shape) != shape:
                    raise InvalidInputError(
                        f"param-level Fisher for {name!r} has shape {shape_str(t.shape)}, expected the "
                        f"parameter's shape {shape_str(shape)}"
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
                        f"(its number of groups), got shape {shape_str(t.shape)}"
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

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Fisher:
        """A copy with tensors converted to ``dtype``/``device`` (metadata.storage_dtype updated)."""
        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)

        meta = replace(self.metadata, storage_dtype=dtype_str(dtype) if dtype else self.metadata.storage_dtype)
        samples = self.sample_contributions
        return self._replace(
            mean={k: conv(v) for k, v in self._mean.items()},
            variance={k: conv(v) for k, v in self._variance.items()} if self._variance else None,
            metadata=meta,
            sample_contributions={k: conv(v) for k, v in samples.items()} if samples is not None else None,
        )

    def _replace(self, **changes: Any) -> Fisher:
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
        super().check_values(what)

    def _default_what(self) -> str:
        return f"the Fisher of task {self.metadata.task!r}"

    def _value_check(self, what: str, strict: bool = True) -> ValueCheck:
        check = ValueCheck(what, strict=strict, samples=self.counts.samples)
        for kind, tensors in (("mean", self._mean), ("variance", self._variance)):
            for name in sorted(tensors):
                check.add(f"{kind}.{name}", tensors[name])
        for name, t in sorted((self.sample_contributions or {}).items()):
            check.add(f"sample_contributions.{name}", t)
        return check

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
                problems.append(f"  - {name}: in the Fisher with shape {shape_str(want)}, not a parameter of the model")
            elif params[name] != want:
                problems.append(
                    f"  - {name}: Fisher expects shape {shape_str(want)}, the model has {shape_str(params[name])}"
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
        return self._shard_tensors([f"{kind}.{name}" for kind, tensors in (("mean", self._mean), ("variance", self._variance))
                                    for name in sorted(tensors)])

    def _shard_tensors(self, keys: list[str], produce: TensorSource | None = None) -> dict[str, torch.Tensor]:
        """``{key: CPU tensor}`` of one tensor file: this Fisher's tensors, or those ``produce``
        makes (each checked against this Fisher's shape and dtype for it); tensors sharing memory
        are cloned (safetensors refuses them)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key in keys:
            kind, name = key.split(".", 1)
            planned = (self._mean if kind == "mean" else self._variance)[name]
            if produce is None:
                t = planned
            else:
                t = produce(kind, name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(planned.shape) or t.dtype != planned.dtype:
                    got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise InvalidInputError(f"{kind} of {name!r} was planned as {tuple(planned.shape)} {planned.dtype}, produced {got}")
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in seen:
                t = t.clone()
            elif ptr is not None:
                seen.add(ptr)
            out[key] = t
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

    artifact_kind = "Fisher artifact"
    is_own_file = staticmethod(is_artifact_file)

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write the artifact folder atomically and return its path.

        Files: ``fisher.safetensors`` (or shards ``fisher-0000k-of-0000N.safetensors`` plus
        ``fisher.safetensors.index.json`` when the tensors exceed ``max_shard_size``),
        ``fisher_config.json`` and a ``README.md`` model card; a Fisher with
        :attr:`sample_contributions` also gets ``sample_contributions.safetensors`` (one unsharded
        file, key ``<param>``, recorded as ``sample_contributions_file`` in the config). Everything is written to a
        temporary folder beside the target, fsync'ed and renamed into place
        (:func:`hf_fisher.artifacts.atomic.atomic_folder`, through
        :class:`~hf_fisher.artifacts.base.ArtifactHubMixin`), so an interrupted save never leaves a
        half-written artifact: the target holds the previous artifact or the new one, and the
        next save (or load) repairs what a killed save left behind. An existing folder is
        replaced only when it holds nothing but a previous Fisher artifact (otherwise
        :class:`ArtifactError`, before anything is written); the new folder keeps its mode. New
        folders and files get the permissions of the user's umask.
        """
        return super().save_pretrained(save_directory, max_shard_size=max_shard_size)

    def _save_pretrained(self, folder: Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                         produce: TensorSource | None = None) -> None:
        """Write the files into ``folder``, one tensor file (shard) at a time.

        The split into shards is planned from shapes and dtypes alone (meta tensors, the same
        greedy split in key order as ``huggingface_hub.split_torch_state_dict_into_shards``:
        every ``mean.*`` then every ``variance.*``), then each shard's tensors are gathered,
        written and dropped before the next: at most one shard (or one tensor larger than
        ``max_shard_size``) of CPU copies is held at a time. ``produce(kind, name)``
        (:meth:`save_streaming`) makes each tensor on demand for a Fisher whose own tensors are
        placeholders; the model card is then computed from memory-mapped views of the written
        files (:func:`~hf_fisher.artifacts.format.mapped_safetensors`), not from copies.
        """
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        from hf_fisher.artifacts import cards

        keys = [f"{kind}.{name}" for kind, tensors in (("mean", self._mean), ("variance", self._variance)) for name in sorted(tensors)]
        plan = {}
        for key in keys:
            kind, name = key.split(".", 1)
            t = (self._mean if kind == "mean" else self._variance)[name]
            plan[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        split = split_torch_state_dict_into_shards(plan, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
        file_meta = {
            "format": "pt",
            "task": str(self.metadata.task),
            "reduction": self.reduction,
            "estimator": str(self.metadata.estimator),
            "hf_fisher_format_version": str(FORMAT_VERSION),
        }
        if not plan:  # an empty Fisher still gets a (valid, empty) tensor file
            filename_to_tensors: dict[str, list[str]] = {WEIGHTS_NAME: []}
            sharded = False
        else:
            filename_to_tensors = split.filename_to_tensors
            sharded = split.is_sharded
        for filename, shard_keys in filename_to_tensors.items():
            shard = self._shard_tensors(shard_keys, produce)
            save_file(shard, str(folder / filename), metadata=file_meta)
            del shard
        if sharded:
            index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
            write_json(folder / WEIGHTS_INDEX_NAME, index)
        files = sorted(filename_to_tensors)
        if self.sample_contributions is not None:
            kept = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.sample_contributions.items()}
            save_file(kept, str(folder / SAMPLES_NAME), metadata={**file_meta, "kind": "sample_contributions"})
        write_json(folder / CONFIG_NAME, self._config(files, sharded))
        shown = self
        if produce is not None:
            mapped: dict[str, torch.Tensor] = {}
            for filename in files:
                mapped.update(_format.mapped_safetensors(folder / filename))
            shown = self._replace(
                mean={n: mapped[f"mean.{n}"] for n in self._mean},
                variance={n: mapped[f"variance.{n}"] for n in self._variance} if self._variance else None,
                sample_contributions=self.sample_contributions,
            )
        cards.render_card(shown).save(folder / CARD_NAME)

    @staticmethod
    def save_streaming(plan: Fisher, save_directory: str | os.PathLike, produce: TensorSource, *,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write an artifact whose tensors are made one at a time, without ever holding them all.

        ``plan``: a Fisher with everything but the tensor values (counts, metadata, groups,
        layout; its tensors may be placeholders, e.g. ``torch.empty(shape, dtype=..., device="meta")``,
        giving each tensor's shape and storage dtype). ``produce(kind, name)`` returns the tensor
        ``kind`` (``"mean"`` | ``"variance"``) of parameter ``name``, of the planned shape and
        dtype (:class:`~hf_fisher.errors.InvalidInputError` otherwise, and nothing is written).
        The files are those of :meth:`save_pretrained`, written shard by shard (see
        :meth:`_save_pretrained`: at most one shard of tensors held at a time) with the same atomic
        semantics: the target holds the previous artifact or the complete new one, never a
        half-written one. :meth:`hf_fisher.FisherCollector.save_fisher` uses it to write straight
        from the accumulators. Returns the target path.
        """
        return ArtifactHubMixin.save_pretrained(plan, save_directory, max_shard_size=max_shard_size, produce=produce)

    def _commit_message(self) -> str:
        return (
            f"Upload Fisher artifact (task {self.metadata.task!r}, estimator {self.metadata.estimator}, "
            f"reduction {self.reduction}, {self.counts.samples} samples) with hf_fisher"
        )

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
        :func:`hf_fisher.artifacts.hub.push_folder`: to the root of ``repo_id`` (a standalone
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
        return super().push_to_hub(repo_id, path_in_repo=path_in_repo, private=private, revision=revision,
                                   create_pr=create_pr, commit_message=commit_message, token=token, api=api)

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
    ) -> Fisher:
        """Load an artifact written by :meth:`save_pretrained` (safetensors only, no pickle), from a
        local folder or from the Hugging Face Hub.

        ``path_or_repo``: an artifact folder, or a Hub reference ``"user/repo"`` /
        ``"user/repo:fisher"`` (the artifact in the subfolder ``fisher/``; or pass
        ``subfolder="fisher"``). A Hub reference is used when no local folder of that name exists
        (nor the backup of an interrupted save into it); it is downloaded with
        :func:`hf_fisher.artifacts.hub.resolve_folder` (``revision``: branch, tag or commit sha;
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
        return super().from_pretrained(path_or_repo, model=model, device=device, revision=revision,
                                       subfolder=subfolder, token=token, cache_dir=cache_dir, strict=strict)

    @classmethod
    def _from_pretrained(cls, folder: Path, *, device: torch.device | str, strict: bool) -> Fisher:
        """The artifact in ``folder`` after every structural check (:class:`FisherReader`; the
        mixin then checks the values)."""
        reader = FisherReader(folder, strict=strict)
        cfg = reader.config
        mean: dict[str, torch.Tensor] = {}
        variance: dict[str, torch.Tensor] = {}
        for filename, keys in reader.file_keys().items():
            for key, tensor in load_file(reader.root / filename, keys, device).items():
                kind, _, name = key.partition(".")
                if kind not in KINDS or name not in reader.param_shapes:
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
        try:
            fisher = cls(
                mean,
                variance or None,
                reduction=cfg["reduction"],
                groups=reader.groups,
                param_shapes=reader.param_shapes,
                counts=reader.counts,
                metadata=reader.metadata,  # with the problems a strict=False reader let through
                layout=reader.layout,
                sample_contributions=reader.sample_contributions(device=device),
            )
        except (InvalidInputError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"Fisher artifact {reader.root} is malformed: {e}") from e
        fisher._root = reader.root
        return fisher

    @staticmethod
    def open_tensor(
        path: str | os.PathLike, name: str, kind: str = "mean", *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Read one tensor (``kind`` "mean" or "variance" of parameter ``name``) without loading the rest.

        The artifact is checked as by :meth:`from_pretrained` (config fields, file names, the
        tensor's dtype and shape; see :class:`FisherReader`)."""
        return open_tensor(path, name, kind, device=device)

    # ------------------------------------------------------------------ analysis (delegates)
    def to_groups(self, groups_or_layout: Mapping[str, ParamGroups] | ModelLayout | None = None) -> Fisher:
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

    def normalized(self, scope: str = "global") -> Fisher:
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

    def compare(self, other: Fisher, k: int = 100) -> dict[str, Any]:
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
