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
    README.md                          model card (hf_fisher.cards)

Saving is atomic (temporary folder beside the target, then rename); loading never unpickles.
"""

from __future__ import annotations

import json
import logging
import os
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
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "FORMAT_VERSION",
]

logger = logging.getLogger("hf_fisher.fisher")

CONFIG_NAME = "fisher_config.json"
WEIGHTS_NAME = "fisher.safetensors"
WEIGHTS_INDEX_NAME = "fisher.safetensors.index.json"
WEIGHTS_PATTERN = "fisher{suffix}.safetensors"
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

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Counts":
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})


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


def _shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


class Fisher:
    """A diagonal Fisher artifact (see the module docstring for the quantities it holds).

    ``Fisher(mean, variance, *, reduction, groups, param_shapes, counts, metadata, layout=None)``

    - ``mean``: ``{param name: tensor}``, parameter-shaped for ``reduction="param"``, ``[num_groups]``
      for ``reduction="group"``;
    - ``variance``: same names and shapes, or ``None`` when unknown;
    - ``groups``: ``{param name: ParamGroups}`` — required for "group" (taken from ``layout``
      when omitted), optional for "param" (used by :meth:`to_groups`);
    - ``param_shapes``: the shape of every parameter the Fisher covers.

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
        return self._replace(
            mean={k: conv(v) for k, v in self._mean.items()},
            variance={k: conv(v) for k, v in self._variance.items()} if self._variance else None,
            metadata=meta,
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
        )
        kwargs.update(changes)
        mean = kwargs.pop("mean")
        variance = kwargs.pop("variance")
        return Fisher(mean, variance, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Fisher(task={self.metadata.task!r}, estimator={self.metadata.estimator!r}, "
            f"reduction={self.reduction!r}, params={len(self)}, samples={self.counts.samples}, "
            f"variance={'yes' if self._variance else 'no'})"
        )

    # ------------------------------------------------------------------ model checks
    def validate(self, model: Any) -> None:
        """Check that every Fisher parameter exists in ``model.named_parameters()`` with its shape.

        Raises :class:`~hf_fisher.errors.ModelMismatchError` listing (up to 5) offending names.
        """
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
        if problems:
            shown = "\n".join(problems[:5])
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            src = self.metadata.model_name_or_path or "an unrecorded model"
            raise ModelMismatchError(
                f"this Fisher artifact does not match the model: {len(problems)} of its {len(self)} "
                f"parameters differ:\n{shown}{more}\n"
                f"It was computed for {src} (model_type={self.metadata.model_type}). Use it with that "
                "model (same config, same PEFT wrapping: names include wrapper prefixes such as "
                "'base_model.model.'), or collect a new Fisher for this model."
            )

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
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "2GB") -> Path:
        """Write the artifact folder atomically and return its path.

        Files: ``fisher.safetensors`` (or shards ``fisher-0000k-of-0000N.safetensors`` plus
        ``fisher.safetensors.index.json`` when the tensors exceed ``max_shard_size``),
        ``fisher_config.json`` and a ``README.md`` model card. Everything is written to a
        temporary folder beside the target and renamed into place, so an interrupted save never
        leaves a half-written artifact. An existing folder is replaced only when it holds
        nothing but a previous Fisher artifact (otherwise :class:`ArtifactError`).
        """
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        from hf_fisher.atomic import atomic_folder, check_target

        target = check_target(save_directory, allowed=is_artifact_file, what="Fisher artifact")
        with atomic_folder(target) as tmp:
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
            _write_json(tmp / CONFIG_NAME, self._config(files, sharded))
            from hf_fisher.cards import render_card

            render_card(self).save(tmp / CARD_NAME)
        logger.info("saved Fisher artifact (%d parameters) to %s", len(self), target)
        return target

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, model: Any = None, device: torch.device | str = "cpu"
    ) -> "Fisher":
        """Load an artifact folder written by :meth:`save_pretrained` (safetensors only, no pickle).

        With ``model``, also checks names and shapes (:meth:`validate`):
        :class:`~hf_fisher.errors.ModelMismatchError` on any difference.
        """
        reader = FisherReader(path)
        cfg = reader.config
        mean: dict[str, torch.Tensor] = {}
        variance: dict[str, torch.Tensor] = {}
        for filename, keys in reader.file_keys().items():
            for key, tensor in _load_file(reader.root / filename, keys, device).items():
                kind, _, name = key.partition(".")
                if kind == "mean":
                    mean[name] = tensor
                elif kind == "variance":
                    variance[name] = tensor
                else:
                    raise ArtifactError(f"unexpected tensor key {key!r} in {filename}; the artifact is malformed")
        names = set(reader.param_shapes)
        missing = sorted(names - set(mean))
        if missing:
            raise ArtifactError(
                f"Fisher artifact {reader.root} lacks the mean tensor of {len(missing)} parameter(s) "
                f"(e.g. {missing[:5]}); the tensor files are incomplete — save it again"
            )
        if cfg.get("has_variance") and sorted(names - set(variance)):
            raise ArtifactError(f"Fisher artifact {reader.root} says it has variances but some are missing")
        try:
            fisher = cls(
                mean,
                variance or None,
                reduction=cfg["reduction"],
                groups=reader.groups,
                param_shapes=reader.param_shapes,
                counts=Counts.from_dict(cfg["counts"]),
                metadata=FisherMetadata.from_dict(cfg["metadata"]),
                layout=ModelLayout.from_dict(cfg["layout"]) if cfg.get("layout") else None,
            )
        except (InvalidInputError, KeyError, TypeError) as e:
            raise ArtifactError(f"Fisher artifact {reader.root} is malformed: {e}") from e
        if model is not None:
            fisher.validate(model)
        return fisher

    @staticmethod
    def open_tensor(
        path: str | os.PathLike, name: str, kind: str = "mean", *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Read one tensor (``kind`` "mean" or "variance" of parameter ``name``) without loading the rest."""
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
    """

    def __init__(self, path: str | os.PathLike) -> None:
        root = Path(os.fspath(path))
        if not root.exists():
            raise ArtifactError(
                f"no Fisher artifact at {root}: the folder does not exist. Only local folders are "
                "supported here; download a Hub artifact first (huggingface_hub.snapshot_download) "
                "and pass the local folder."
            )
        if not root.is_dir():
            raise ArtifactError(f"{root} is a file; a Fisher artifact is a folder containing {CONFIG_NAME}")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise ArtifactError(
                f"{root} is not a Fisher artifact: {CONFIG_NAME} is missing (was it written by "
                "Fisher.save_pretrained?)"
            )
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {cfg_path}: {e}") from e
        if not isinstance(cfg, dict) or "param_shapes" not in cfg or "reduction" not in cfg:
            raise ArtifactError(f"{cfg_path} is malformed: it lacks 'param_shapes'/'reduction'")
        version = int(cfg.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{root} uses artifact format {version}, newer than this hf_fisher supports "
                f"({FORMAT_VERSION}); upgrade hf_fisher"
            )
        self.root = root
        self.config: dict[str, Any] = cfg
        files = cfg.get("tensor_files") or [WEIGHTS_NAME]
        missing = [f for f in files if not (root / f).is_file()]
        self._weight_map: dict[str, str] | None = None
        if cfg.get("index_file"):
            index_path = root / cfg["index_file"]
            if not index_path.is_file():
                raise ArtifactError(f"Fisher artifact {root} is incomplete: the shard index {cfg['index_file']} is missing")
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                self._weight_map = dict(index["weight_map"])
            except (OSError, ValueError, KeyError) as e:
                raise ArtifactError(f"cannot read the shard index {index_path}: {e}") from e
            missing += sorted({f for f in self._weight_map.values() if not (root / f).is_file()} - set(missing))
        if missing:
            raise ArtifactError(
                f"Fisher artifact {root} is incomplete: missing tensor file(s) {missing[:5]}; "
                "re-download or save it again"
            )
        self._files = files
        self.param_shapes: dict[str, tuple[int, ...]] = {
            k: tuple(int(s) for s in v) for k, v in cfg["param_shapes"].items()
        }
        self.groups: dict[str, ParamGroups] | None = (
            {k: ParamGroups.from_dict(v) for k, v in cfg["groups"].items()} if cfg.get("groups") else None
        )

    @property
    def reduction(self) -> str:
        return self.config["reduction"]

    @property
    def metadata(self) -> FisherMetadata:
        return FisherMetadata.from_dict(self.config.get("metadata", {}))

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

    def get(self, name: str, kind: str = "mean", *, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor: ``kind`` is "mean" or "variance"."""
        if kind not in _KINDS:
            raise InvalidInputError(f"kind must be one of {_KINDS}, got {kind!r}")
        if name not in self.param_shapes:
            raise KeyError(f"{name!r} is not in the Fisher artifact at {self.root}")
        key = f"{kind}.{name}"
        try:
            filename = self._file_of(key)
        except KeyError:
            raise KeyError(f"the artifact at {self.root} has no {kind} tensor for {name!r}") from None
        tensors = _load_file(self.root / filename, [key], device, allow_missing=True)
        if key not in tensors:
            raise KeyError(f"the artifact at {self.root} has no {kind} tensor for {name!r}")
        return tensors[key]


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
    return name in (CONFIG_NAME, CARD_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or (
        name.startswith("fisher-") and name.endswith(".safetensors")
    )
