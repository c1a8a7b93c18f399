"""Streaming inputs and output of the merger: one tensor at a time, never a whole model.

Sources (:class:`TensorSource`) give the tensors of one input model by name, as transformers
saves them (tied weights stored once, under the name ``save_pretrained`` keeps):

- :class:`FolderSource`: a local folder with ``model.safetensors`` or shards
  ``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``. Names, shapes and
  dtypes come from the safetensors headers (no data read); :meth:`FolderSource.get` opens the
  shard memory-mapped (``safetensors.safe_open``), reads one tensor and closes the file again, so
  no mapping (and no resident page of it) outlives the read.
- :class:`ModelSource`: a loaded ``PreTrainedModel``'s state dict, with tied weights removed
  exactly as ``save_pretrained`` does (``remove_tied_weights_from_state_dict``).
- :func:`open_source`: a path, a Hub id (resolved to a local folder by
  :func:`hf_fisher.artifacts.hub.resolve_folder`) or a model.

Output: :class:`ShardedWriter` plans the shards before the first tensor is written (every name,
shape and dtype is known from the sources), so each shard's safetensors header is written first
and each merged tensor is appended as soon as it is computed: memory holds one output tensor, not
a shard. Shards are named like transformers names them (``model.safetensors`` for one shard, else
``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` with ``total_size``), so
``AutoModel.from_pretrained(folder)`` loads the result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_fisher.errors import ArtifactError, InvalidInputError

__all__ = [
    "TOKENIZER_FILES",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "FolderSource",
    "ModelSource",
    "ShardedWriter",
    "TensorInfo",
    "TensorSource",
    "is_model_output_file",
    "open_source",
    "parse_size",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "vocab.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def is_model_output_file(name: str) -> bool:
    """Whether a file name is one a merged-model folder holds (weights, index, configs, tokenizer)."""
    return name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *CONFIG_FILES, *TOKENIZER_FILES) or bool(_SHARD_RE.fullmatch(name))


def parse_size(value: int | str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``10KiB`` or an int (decimal units like transformers; ``iB`` binary)."""
    if isinstance(value, bool):
        raise InvalidInputError(f"max_shard_size must be a size such as '5GB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidInputError(f"max_shard_size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise InvalidInputError(f"max_shard_size must be a size such as '5GB', '500MB' or a number of bytes, got {value!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise InvalidInputError(f"max_shard_size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """The tensors of one input model, read one at a time.

    ``ref``: how the input was given (path, Hub id, or ``<loaded ClassName>``), for the recipe;
    ``folder``: its local folder (config, tokenizer files) or None; ``config``: the config dict.
    """

    ref: str
    folder: Path | None
    config: dict[str, Any]
    hub_id: str | None = None

    def infos(self) -> dict[str, TensorInfo]:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self.infos())

    def file_in_folder(self, name: str) -> Path | None:
        if self.folder is None:
            return None
        p = self.folder / name
        return p if p.is_file() else None


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``, after checking that the file holds every byte the
    header's ``data_offsets`` promise (a truncated download or copy is found here, before any
    work, not when its last tensor is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if not 0 < n <= 100 * 2**20:
                raise ValueError(f"header length {n} is not plausible")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for key, v in header.items():
            if key == "__metadata__":
                continue
            offsets = v.get("data_offsets") if isinstance(v, dict) else None
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] or not isinstance(v.get("shape"), list)):
                raise ValueError(f"the entry of tensor {key!r} has no valid data_offsets/shape")
            end = max(end, offsets[1])
        size = path.stat().st_size
        if size < 8 + n + end:
            raise ValueError(
                f"the file is truncated: its header describes {8 + n + end} bytes, the file has {size}"
            )
        return header
    except (OSError, ValueError) as e:
        raise ArtifactError(
            f"cannot read the safetensors file {path}: {e}; the file is corrupt, truncated or not safetensors "
            "(download or save the model again)"
        ) from e


class FolderSource(TensorSource):
    """A local model folder with safetensors weights (one file or shards with an index)."""

    def __init__(self, folder: str | os.PathLike, *, ref: str | None = None, hub_id: str | None = None) -> None:
        folder = Path(os.fspath(folder))
        if not folder.is_dir():
            raise InvalidInputError(f"model {ref or str(folder)!r}: {folder} is not a folder; pass a saved transformers model folder")
        self.folder = folder
        self.ref = ref or str(folder)
        self.hub_id = hub_id
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise InvalidInputError(f"model {self.ref!r} has no config.json in {folder}: is it a saved transformers model?")
        try:
            self.config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"model {self.ref!r}: cannot read {cfg}: {e}") from e
        index = folder / WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InvalidInputError(f"model {self.ref!r}: cannot read {index}: {e}") from e
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
            weight_map = None
        else:
            other = sorted(p.name for p in folder.glob("*.safetensors"))
            if not other:
                bins = sorted(p.name for p in folder.glob("*.bin"))
                hint = (f" (it has {bins[:2]}: load it with transformers and save it again with "
                        "save_pretrained(..., safe_serialization=True), or pass the loaded model)") if bins else ""
                raise InvalidInputError(f"model {self.ref!r}: no safetensors weights in {folder}{hint}")
            files, weight_map = other, None
        self._file_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise InvalidInputError(f"model {self.ref!r}: shard {fname} named by {WEIGHTS_INDEX_NAME} is missing from {folder}")
            for key, v in _read_header(path).items():
                if key == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(key) != fname:
                    continue
                dtype = _ST_DTYPES.get(v.get("dtype"))
                if dtype is None:
                    raise InvalidInputError(f"model {self.ref!r}: tensor {key!r} in {fname} has unsupported dtype {v.get('dtype')!r}")
                self._infos[key] = TensorInfo(key, tuple(int(s) for s in v["shape"]), dtype)
                self._file_of[key] = path
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self._infos))
            if lost:
                raise InvalidInputError(f"model {self.ref!r}: {WEIGHTS_INDEX_NAME} names tensors missing from their shards, e.g. {lost[:3]}")

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    @property
    def checkpoint_names(self) -> dict[str, str]:
        """``{name in the loaded model: name on disk}`` (:func:`folder_checkpoint_names`)."""
        if not hasattr(self, "_checkpoint_names"):
            self._checkpoint_names = folder_checkpoint_names(self.config)
        return self._checkpoint_names

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of[name]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:  # mapped for this read only
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ArtifactError(f"model {self.ref!r}: cannot read tensor {name!r} from {path}: {e}") from e


class ModelSource(TensorSource):
    """A loaded ``PreTrainedModel``: its state dict as ``save_pretrained`` would write it."""

    def __init__(self, model: Any, *, ref: str | None = None) -> None:
        self.model = model
        self.ref = ref or f"<loaded {type(model).__name__}>"
        self.config = model.config.to_dict()
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        self.folder = Path(name) if name and Path(name).is_dir() else None
        self.hub_id = None
        state = {k: v.detach() for k, v in model.state_dict().items()}
        for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
            state.pop(key, None)
        try:
            from transformers.modeling_utils import remove_tied_weights_from_state_dict

            state = remove_tied_weights_from_state_dict(state, model)
        except ImportError:  # pragma: no cover - older transformers: keep the first name of each storage
            seen: set[tuple[int, tuple]] = set()
            for k in list(state):
                key = (state[k].untyped_storage().data_ptr(), tuple(state[k].shape))
                if key in seen:
                    del state[k]
                seen.add(key)
        state, self.checkpoint_names = _reverted(model, state)
        self._state = state
        self._infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def _reverted(model: Any, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` under the names ``save_pretrained`` writes (transformers' weight conversions
    reverted, e.g. ViT's ``vit.layers.0.attention.q_proj`` -> ``vit.encoder.layer.0.attention.attention.query``),
    and ``{name in the loaded model: name on disk}`` for the tensors the conversion only renames
    (a Fisher, collected on the loaded model, names its tensors the first way)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers without weight conversions
        return state, {}
    names = {id(v): k for k, v in state.items()}
    out = revert_weight_conversion(model, dict(state))
    return out, {names[id(v)]: k for k, v in out.items() if id(v) in names and names[id(v)] != k}


def folder_checkpoint_names(config: dict[str, Any]) -> dict[str, str]:
    """:func:`_reverted`'s name map for a saved folder's model class, built on the meta device
    from its ``config.json`` (empty when the class cannot be built)."""
    try:
        import transformers

        cls = getattr(transformers, (config.get("architectures") or [""])[0])
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(cfg)
        return _reverted(model, dict(model.state_dict()))[1]
    except Exception:  # no class, an old transformers, a config the class refuses: no renaming known
        return {}


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "state_dict") and hasattr(obj, "config") and hasattr(obj.config, "to_dict")


def open_source(ref: Any, *, what: str = "model", hub_options: dict | None = None) -> TensorSource:
    """A :class:`TensorSource` for a loaded model, a local folder, or a Hub id (``repo`` or
    ``repo:subfolder``, downloaded by :func:`hf_fisher.artifacts.hub.resolve_folder`)."""
    if isinstance(ref, TensorSource):  # e.g. a slices recipe's virtual model
        return ref
    if _is_model(ref):
        return ModelSource(ref)
    if not isinstance(ref, (str, os.PathLike)):
        raise InvalidInputError(
            f"{what} {ref!r} ({type(ref).__name__}) is not a folder, a Hub id or a loaded PreTrainedModel"
        )
    text = os.fspath(ref)
    if os.path.exists(text):
        return FolderSource(text, ref=text)
    folder = resolve_hub(text, what=what, hub_options=hub_options, allow_patterns=MODEL_PATTERNS)
    return FolderSource(folder, ref=text, hub_id=text.split(":", 1)[0])


#: what a Hub model download fetches: configs, safetensors weights, tokenizer files (no .bin/.pt copies)
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]


def resolve_hub(ref: str, *, what: str, hub_options: dict | None = None, allow_patterns=None) -> Path:
    """A Hub reference (``repo`` or ``repo:subfolder``) downloaded to a local folder."""
    from hf_fisher.artifacts.hub import looks_like_hub_id

    repo, _, sub = ref.partition(":")
    if not looks_like_hub_id(repo):
        raise InvalidInputError(f"{what} {ref!r} does not exist locally and is not a Hub repo id ('owner/name' or 'owner/name:subfolder')")
    try:
        from hf_fisher.artifacts.hub import resolve_folder
    except ImportError as e:
        raise InvalidInputError(
            f"{what} {ref!r} is not a local folder, and Hub downloads need hf_fisher.artifacts.hub ({e}); "
            "download it first (huggingface_hub.snapshot_download) and pass the folder"
        ) from None
    opts = {k: v for k, v in (hub_options or {}).items() if k in ("revision", "token", "endpoint", "cache_dir")}
    return Path(resolve_folder(repo, subfolder=sub or None, what=what, allow_patterns=allow_patterns, **opts))


# ---------------------------------------------------------------------------- writer
class ShardedWriter:
    """Write a planned list of tensors as sharded safetensors, one tensor at a time.

    ``ShardedWriter(folder, plan, max_shard_size)`` with ``plan`` the ``TensorInfo`` of every output
    tensor in the order they will be written. Shards are cut greedily in that order (a new shard
    starts when the next tensor would take the current one past ``max_shard_size``; a tensor larger
    than the limit gets a shard of its own). Each shard's header is written when the shard is
    opened; :meth:`write` appends the next tensor's bytes (its name, shape and dtype must be the
    planned ones); :meth:`close` checks everything was written and writes the index.
    """

    def __init__(self, folder: str | os.PathLike, plan: Sequence[TensorInfo], max_shard_size: int | str = "5GB") -> None:
        self.folder = Path(folder)
        self.plan = list(plan)
        limit = parse_size(max_shard_size)
        shards: list[list[TensorInfo]] = []
        size = 0
        for info in self.plan:
            if not shards or (size + info.nbytes > limit and shards[-1]):
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        if not shards:
            shards = [[]]
        n = len(shards)
        self.files = [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._shards = shards
        self._shard = -1
        self._pos = 0  # index into the current shard
        self._fh = None
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(i.nbytes for i in self.plan)
        self._open_next()

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        self._pos = 0
        infos = self._shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in infos:
            if info.dtype not in _ST_NAMES:
                raise InvalidInputError(f"cannot store tensor {info.name!r} of dtype {info.dtype} in safetensors")
            header[info.name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
            self.weight_map[info.name] = self.files[self._shard]
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._fh = open(self.folder / self.files[self._shard], "wb")  # noqa: SIM115 - open across write() calls
        self._fh.write(struct.pack("<Q", len(text)))
        self._fh.write(text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        while self._pos >= len(self._shards[self._shard]):
            if self._shard + 1 >= len(self._shards):
                raise InvalidInputError(f"tensor {name!r} written after the last planned tensor")
            self._open_next()
        info = self._shards[self._shard][self._pos]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise InvalidInputError(
                f"writer expected tensor {info.name!r} {info.shape} {info.dtype}, got {name!r} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self._pos += 1

    def close(self) -> list[str]:
        """Finish: every planned tensor must have been written; writes the index when sharded.
        Returns the files written."""
        while self._pos >= len(self._shards[self._shard]) and self._shard + 1 < len(self._shards):
            self._open_next()
        if self._shard != len(self._shards) - 1 or self._pos != len(self._shards[self._shard]):
            raise InvalidInputError("the merged model is incomplete: not every planned tensor was written")
        self._fh.close()
        self._fh = None
        files = list(self.files)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append(WEIGHTS_INDEX_NAME)
        return files

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def copy_side_files(source_folders: Iterable[Path | None], dest: Path, names: Sequence[str]) -> list[str]:
    """Copy each of ``names`` from the first folder that has it; returns the names copied."""
    import shutil

    copied = []
    folders = [f for f in source_folders if f is not None]
    for name in names:
        for folder in folders:
            src = folder / name
            if src.is_file():
                shutil.copyfile(src, dest / name)
                copied.append(name)
                break
    return copied
