"""Lazy, checked, tensor-by-tensor reading of a Fisher artifact folder: :class:`FisherReader`
and :func:`open_tensor` (what streaming consumers such as merging use instead of loading the whole
artifact).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hf_fisher.artifacts.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    KINDS,
    REQUIRED,
    S_CONFIG,
    S_INDEX,
    SAMPLES_NAME,
    SchemaError,
    artifact_path,
    key_path,
    load_file,
    read_json,
    s_int,
    s_obj,
    shape_str,
)
from hf_fisher.artifacts.metadata import Counts, FisherMetadata
from hf_fisher.artifacts.values import ValueCheck, check_estimator_name, ema_state_problem, record_problems
from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError
from hf_fisher.layout import ModelLayout, ParamGroups

__all__ = ["FisherReader", "open_tensor"]

logger = logging.getLogger(__name__)


def open_tensor(path: str | os.PathLike, name: str, kind: str = "mean", *, device: torch.device | str = "cpu",
                strict: bool = True) -> torch.Tensor:
    """Read one tensor (``kind`` "mean" or "variance" of parameter ``name``) of the artifact at
    ``path`` without loading the rest, checked as by :meth:`Fisher.from_pretrained` (config
    fields, file names, the tensor's dtype, shape and values; see :class:`FisherReader`)."""
    return FisherReader(path, strict=strict).get(name, kind, device=device)


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
    folder and a warning is logged; see :func:`hf_fisher.artifacts.atomic.recover`); when the backup cannot
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
        cfg_path = artifact_path(root, CONFIG_NAME, CONFIG_NAME)
        raw = read_json(cfg_path, "Fisher artifact", s_obj({"format_version": (s_int(), REQUIRED)}, extra=True))
        version = raw["format_version"]
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{root} uses artifact format {version}, newer than this hf_fisher supports "
                f"({FORMAT_VERSION}); upgrade hf_fisher"
            )
        try:
            S_CONFIG(raw, "")
        except SchemaError as e:
            raise ArtifactError(
                f"{cfg_path} is malformed: field '{e.path or '(top level)'}' {e.problem}. The Fisher artifact was "
                "not written by Fisher.save_pretrained or was damaged; save or download it again"
            ) from None
        cfg = raw
        self.root = root
        self.config: dict[str, Any] = cfg
        files = list(cfg["tensor_files"])
        for i, f in enumerate(files):
            artifact_path(root, f, f"tensor_files[{i}]")
        missing = [f for f in files if not (root / f).is_file()]
        self._weight_map: dict[str, str] | None = None
        if cfg["index_file"] is not None:
            index_path = artifact_path(root, cfg["index_file"], "index_file")
            if not index_path.is_file():
                raise ArtifactError(f"Fisher artifact {root} is incomplete: the shard index {cfg['index_file']} is missing")
            index = read_json(index_path, "shard index", S_INDEX)
            self._weight_map = dict(index["weight_map"])
            for key, f in self._weight_map.items():
                where = f"{cfg['index_file']}: weight_map[{json.dumps(key)}]"
                kind, _, name = key.partition(".")
                if kind not in KINDS or name not in cfg["param_shapes"]:
                    raise ArtifactError(
                        f"Fisher artifact {root} is malformed: field '{where}' is not 'mean.<param>' or "
                        "'variance.<param>' of a parameter listed in param_shapes"
                    )
                artifact_path(root, f, where)
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
            self._samples_file = artifact_path(root, cfg["sample_contributions_file"], "sample_contributions_file")
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
        problem = ema_state_problem(cfg["metadata"])
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
                        f"{cfg_path} is malformed: field '{key_path(where, name)}' partitions {pg.axis_size} "
                        f"indices of axes {pg.axes}, which does not fit the parameter's shape {shape_str(shape)}"
                    )

    @property
    def reduction(self) -> str:
        return self.config["reduction"]

    @property
    def metadata(self) -> FisherMetadata:
        return record_problems(FisherMetadata.from_dict(self.config["metadata"]), self.problems)

    @property
    def counts(self) -> Counts:
        return Counts.from_dict(self.config["counts"])

    def names(self) -> list[str]:
        return sorted(self.param_shapes)

    def file_keys(self) -> dict[str, list[str] | None]:
        """``{tensor file: keys in it}`` (``None`` = every key of that file)."""
        if self._weight_map is None:
            return dict.fromkeys(self._files)
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
        if kind not in KINDS:
            raise InvalidInputError(f"kind must be one of {KINDS}, got {kind!r}")
        if name not in self.param_shapes:
            raise KeyError(f"{name!r} is not in the Fisher artifact at {self.root}")
        key = f"{kind}.{name}"
        if kind == "variance" and not self.config["has_variance"]:
            raise KeyError(f"the artifact at {self.root} has no variances (has_variance: false)")
        try:
            filename = self._file_of(key)
        except KeyError:
            filename = None
        tensors = load_file(self.root / filename, [key], device, allow_missing=True) if filename else {}
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
        kinds = KINDS if self.config["has_variance"] else ("mean",)
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
        tensors = load_file(self._samples_file, None, device)
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
                    f"{shape_str(t.shape)} and dtype {t.dtype}, but must be floating point of shape {shape_str(want)} "
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
                f"{shape_str(tensor.shape)}, but fisher_config.json gives it {shape_str(want)} "
                f"(reduction={self.reduction!r})"
            )


def _recover_missing(root: Path) -> Path:
    """The folder to read for a missing artifact ``root``: restored from an interrupted save's
    backup, the backup itself when it cannot be moved, else :class:`ArtifactError`."""
    from hf_fisher.artifacts.atomic import recover

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
