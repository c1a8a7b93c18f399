"""The artifact file format: file names, the checked JSON config schema, safe file paths, JSON and
safetensors I/O, and the default shard size. One home for what every artifact of
:mod:`hf_fisher.artifacts` writes and reads (the Fisher artifact, the KFAC artifact).

A Fisher artifact folder::

    fisher.safetensors                 keys "mean.<param>" and "variance.<param>"
      (or fisher-00001-of-0000N.safetensors ... + fisher.safetensors.index.json when sharded,
       shards of at most DEFAULT_MAX_SHARD_SIZE unless save_pretrained(max_shard_size=...) says)
    fisher_config.json                 metadata, counts, reduction, shapes, groups, layout, files
    sample_contributions.safetensors   optional per-sample group contributions
    README.md                          model card (hf_fisher.artifacts.cards)

A KFAC artifact folder: ``kfac.safetensors`` (keys "A.<layer>", "G.<layer>"), ``kfac_config.json``
and ``README.md``.

Config checking: :func:`read_json` parses a JSON file and checks it against a schema built from
the ``s_*`` combinators (``s_obj``, ``s_list``, ``s_map``, ``s_int``, ...); a schema is a callable
``check(value, path)`` raising :class:`SchemaError` with the JSON path of the bad field, turned
into an :class:`~hf_fisher.errors.ArtifactError` naming that field.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMAT_VERSION",
    "KFAC_CONFIG_NAME",
    "KFAC_FORMAT_VERSION",
    "KFAC_WEIGHTS_NAME",
    "KINDS",
    "REDUCTIONS",
    "REQUIRED",
    "SAMPLES_NAME",
    "S_CONFIG",
    "S_COUNTS",
    "S_INDEX",
    "S_METADATA",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_PATTERN",
    "SchemaError",
    "artifact_path",
    "describe",
    "dtype_str",
    "is_artifact_file",
    "is_kfac_artifact_file",
    "key_path",
    "load_file",
    "mapped_safetensors",
    "read_json",
    "s_bool",
    "s_int",
    "s_list",
    "s_map",
    "s_nullable",
    "s_number",
    "s_obj",
    "s_str",
    "shape_str",
    "write_json",
]

# ---------------------------------------------------------------------------- file names
CONFIG_NAME = "fisher_config.json"
WEIGHTS_NAME = "fisher.safetensors"
WEIGHTS_INDEX_NAME = "fisher.safetensors.index.json"
WEIGHTS_PATTERN = "fisher{suffix}.safetensors"
SAMPLES_NAME = "sample_contributions.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
REDUCTIONS = ("param", "group")
#: the tensor kinds of a Fisher artifact: keys "mean.<param>" and "variance.<param>"
KINDS = ("mean", "variance")

KFAC_CONFIG_NAME = "kfac_config.json"
KFAC_WEIGHTS_NAME = "kfac.safetensors"
KFAC_FORMAT_VERSION = 1

#: the one default shard size of the tensor files an artifact writes (huggingface_hub's
#: ``split_torch_state_dict_into_shards`` syntax: an int of bytes or "2GB", "500MB", ...)
DEFAULT_MAX_SHARD_SIZE = "2GB"


def shape_str(shape: Any) -> str:
    """``(2, 3)`` for any shape-like (torch.Size, list, tuple)."""
    return str(tuple(int(s) for s in shape))


def dtype_str(value: Any) -> str | None:
    """``torch.float32`` / ``"torch.float32"`` / ``"float32"`` -> ``"float32"`` (None stays None)."""
    if value is None:
        return None
    return str(value).removeprefix("torch.")



# ---------------------------------------------------------------------------- config schema
# fisher_config.json is checked field by field before anything is built from it, so that a
# malformed, truncated or hand-edited artifact is an ArtifactError naming the field (its JSON
# path, e.g. ``layout.attention[0].num_heads``), never a KeyError/TypeError from deep inside.


class SchemaError(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


def describe(v: Any) -> str:
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


def key_path(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def s_int(minimum: int = 0):
    def check(v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(path, f"must be an integer >= {minimum}, got {describe(v)}")
        if v < minimum:
            raise SchemaError(path, f"must be an integer >= {minimum}, got {v}")
    return check


def s_str(choices: tuple[str, ...] | None = None, nonempty: bool = False):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, str):
            raise SchemaError(path, f"must be a string, got {describe(v)}")
        if choices is not None and v not in choices:
            raise SchemaError(path, f"must be one of {list(choices)}, got {v!r}")
        if nonempty and not v:
            raise SchemaError(path, "must be a non-empty string")
    return check


def s_bool(v: Any, path: str) -> None:
    if not isinstance(v, bool):
        raise SchemaError(path, f"must be true or false, got {describe(v)}")


def s_number(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(path, f"must be a finite number, got {describe(v)}")


def s_nullable(spec):
    def check(v: Any, path: str) -> None:
        if v is not None:
            spec(v, path)
    return check


def s_list(item, min_len: int = 0):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, list):
            raise SchemaError(path, f"must be a list, got {describe(v)}")
        if len(v) < min_len:
            raise SchemaError(path, f"must have at least {min_len} item(s), got {len(v)}")
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def s_map(value):
    def check(v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise SchemaError(path, f"must be an object, got {describe(v)}")
        for k, x in v.items():
            if not k:
                raise SchemaError(path, "has an empty key")
            value(x, key_path(path, k))
    return check


REQUIRED = object()


def s_obj(spec: dict[str, tuple[Any, Any]], *, extra: bool = False, after=None):
    """An object with the given fields: ``{name: (check, default)}``, ``REQUIRED`` = must be present.

    ``extra``: unknown keys allowed (kept for forward compatibility) or an error; ``after``: a
    cross-field check ``after(obj, path)``.
    """
    def check(v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise SchemaError(path, f"must be an object, got {describe(v)}")
        for name, (sub, default) in spec.items():
            where = key_path(path, name)
            if name not in v:
                if default is REQUIRED:
                    raise SchemaError(where, "is missing")
                continue
            sub(v[name], where)
        if not extra:
            unknown = sorted(set(v) - set(spec))
            if unknown:
                raise SchemaError(key_path(path, unknown[0]), f"is not a known field (expected {sorted(spec)})")
        if after is not None:
            after(v, path)
    return check


def _after_groups(v: dict, path: str) -> None:
    axes = [v["axis"], *v.get("extra_axes", [])]
    if len(set(axes)) != len(axes):
        raise SchemaError(key_path(path, "extra_axes"), f"must not repeat an axis (axes {axes})")


def _after_slice(v: dict, path: str) -> None:
    if v["stop"] < v["start"]:
        raise SchemaError(key_path(path, "stop"), f"must be >= start ({v['start']}), got {v['stop']}")


def _after_attention(v: dict, path: str) -> None:
    if v["num_heads"] % v["num_kv_heads"]:
        raise SchemaError(
            key_path(path, "num_kv_heads"),
            f"must divide num_heads ({v['num_heads']}), got {v['num_kv_heads']}",
        )


S_SLICE = s_obj(
    {"param": (s_str(nonempty=True), REQUIRED), "axis": (s_int(), REQUIRED), "start": (s_int(), REQUIRED),
     "stop": (s_int(), REQUIRED)},
    after=_after_slice,
)
S_GROUPS = s_obj(
    {
        "axis": (s_int(), REQUIRED),
        "runs": (s_list(s_obj({"prefix": (s_str(), REQUIRED), "count": (s_int(), REQUIRED),
                                 "size": (s_int(), REQUIRED), "first": (s_int(), 0)})), REQUIRED),
        "extra_axes": (s_list(s_int()), ()),
    },
    after=_after_groups,
)
S_LAYOUT = s_obj(
    {
        "adapter": (s_str(), REQUIRED),
        "model_type": (s_nullable(s_str()), REQUIRED),
        "num_layers": (s_int(), REQUIRED),
        "attention": (s_list(s_obj(
            {
                "layer": (s_int(), REQUIRED),
                "num_heads": (s_int(1), REQUIRED),
                "num_kv_heads": (s_int(1), REQUIRED),
                "head_dim": (s_int(1), REQUIRED),
                "heads": (s_list(s_obj({
                    "layer": (s_int(), REQUIRED), "head": (s_int(), REQUIRED), "kv_head": (s_int(), REQUIRED),
                    **{role: (s_list(S_SLICE), REQUIRED) for role in "qkvo"},
                })), REQUIRED),
            },
            after=_after_attention,
        )), REQUIRED),
        "mlp": (s_list(s_obj({
            "layer": (s_int(), REQUIRED),
            "num_channels": (s_int(), REQUIRED),
            "roles": (s_list(s_obj({"param": (s_str(nonempty=True), REQUIRED), "axis": (s_int(), REQUIRED),
                                      "offset": (s_int(), 0)})), REQUIRED),
        })), REQUIRED),
        "vocab": (s_list(S_SLICE), REQUIRED),
        "groups": (s_map(S_GROUPS), REQUIRED),
        "param_layers": (s_map(s_int()), REQUIRED),
        "experts": (s_list(s_obj({
            "layer": (s_int(), REQUIRED),
            "num_experts": (s_int(), REQUIRED),
            "num_channels": (s_int(), REQUIRED),
            "roles": (s_list(s_obj({
                "role": (s_str(), REQUIRED), "param": (s_str(nonempty=True), REQUIRED),
                "expert_axis": (s_int(), REQUIRED), "channel_axis": (s_nullable(s_int()), REQUIRED),
                "offset": (s_int(), 0),
            })), REQUIRED),
            "router": (s_nullable(s_str()), None),
            "router_axis": (s_int(), 0),
            "top_k": (s_nullable(s_int(1)), None),
        })), []),
    }
)
S_METADATA = s_obj(
    {
        "task": (s_str(), REQUIRED),
        "estimator": (s_str(nonempty=True), REQUIRED),
        "reduction": (s_str(REDUCTIONS), REQUIRED),
        "normalization": (s_str(nonempty=True), REQUIRED),
        "model_name_or_path": (s_nullable(s_str()), None),
        "revision": (s_nullable(s_str()), None),
        "model_type": (s_nullable(s_str()), None),
        "mode": (s_str(("eval", "train")), REQUIRED),
        "accumulation_dtype": (s_nullable(s_str()), None),
        "storage_dtype": (s_nullable(s_str()), None),
        "library_version": (s_str(), REQUIRED),
        "data_description": (s_nullable(s_str()), None),
        "ema_decay": (s_nullable(s_number), None),
        "extra": (s_nullable(s_map(lambda v, p: None)), None),
    },
    extra=True,  # keys of a newer hf_fisher are kept in metadata.extra
)
S_COUNTS = s_obj({name: (s_int(), REQUIRED) for name in ("samples", "tokens", "skipped", "nonfinite")}, extra=True)


def _after_config(cfg: dict, path: str) -> None:
    if cfg["metadata"]["reduction"] != cfg["reduction"]:
        raise SchemaError("metadata.reduction", f"must equal reduction ({cfg['reduction']!r}), got {cfg['metadata']['reduction']!r}")
    for name in cfg.get("groups") or {}:
        if name not in cfg["param_shapes"]:
            raise SchemaError(key_path("groups", name), "is not a parameter listed in param_shapes")
    if cfg["reduction"] == "group":
        # the Fisher takes its groups from "groups", or from the layout when "groups" is null
        source = "groups" if cfg.get("groups") is not None else "layout.groups"
        have = cfg.get("groups") if cfg.get("groups") is not None else (cfg.get("layout") or {}).get("groups", {})
        lacking = sorted(set(cfg["param_shapes"]) - set(have))
        if lacking:
            raise SchemaError(key_path(source, lacking[0]), "is missing: a group-level Fisher needs the groups of every parameter")
    if len(set(cfg["tensor_files"])) != len(cfg["tensor_files"]):
        raise SchemaError("tensor_files", "lists a file twice")


S_CONFIG = s_obj(
    {
        "format_version": (s_int(), REQUIRED),
        "library": (s_str(), REQUIRED),
        "reduction": (s_str(REDUCTIONS), REQUIRED),
        "metadata": (S_METADATA, REQUIRED),
        "counts": (S_COUNTS, REQUIRED),
        "param_shapes": (s_map(s_list(s_int())), REQUIRED),
        "groups": (s_nullable(s_map(S_GROUPS)), REQUIRED),
        "layout": (s_nullable(S_LAYOUT), REQUIRED),
        "has_variance": (s_bool, REQUIRED),
        "tensor_files": (s_list(s_str(nonempty=True), min_len=1), REQUIRED),
        "index_file": (s_nullable(s_str(nonempty=True)), REQUIRED),
        "sample_contributions_file": (s_nullable(s_str(nonempty=True)), None),
    },
    extra=True,
    after=_after_config,
)
S_INDEX = s_obj({"metadata": (s_nullable(s_map(lambda v, p: None)), None),
                   "weight_map": (s_map(s_str(nonempty=True)), REQUIRED)}, extra=True)


def _json_error_field(text: str, pos: int) -> str:
    """The last ``"key":`` before a JSON syntax error: the field being read when it broke."""
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text[:pos])
    return keys[-1] if keys else "(top level)"


def read_json(path: Path, what: str, schema) -> dict[str, Any]:
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
    except SchemaError as e:
        raise ArtifactError(
            f"{path} is malformed: field '{e.path or '(top level)'}' {e.problem}. The {what} was not written "
            "by Fisher.save_pretrained or was damaged; save or download the artifact again"
        ) from None
    return data


def in_hub_cache(root: Path, real: Path) -> bool:
    """Whether ``root`` is a huggingface_hub cache snapshot (``<repo>/snapshots/<revision>``), or a
    folder inside one (an artifact in a subfolder of the repository), and ``real`` lies in that
    repo's ``blobs/`` (the cache stores files as symlinks to blobs)."""
    for snapshot in (root, *root.parents):  # the artifact may be a subfolder of the snapshot
        if snapshot.parent.name == "snapshots":
            return real.is_relative_to(snapshot.parent.parent / "blobs")
    return False


def artifact_path(root: Path, name: str, field_name: str) -> Path:
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
    if not real.is_relative_to(real_root) and not in_hub_cache(real_root, real):
        raise bad(f"which resolves outside the artifact folder (to {real})")
    return path



def load_file(path: Path, keys, device, *, allow_missing: bool = False) -> dict[str, torch.Tensor]:
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


def json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return dtype_str(o)
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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (floating point only), memory-mapped, read-only in effect:
    views of one private mapping of the file (``torch.from_file(shared=False)``), so nothing is
    read until a tensor is used and the pages are the file's (the page cache), not process
    memory. For reading back a file this library has just written (the model card of a
    streamed artifact); the layout is the safetensors format: an 8-byte little-endian header
    length, a JSON header ``{key: {dtype, shape, data_offsets}}``, then the data."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    out = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, not a floating point dtype")
        begin, end = (8 + n + int(o) for o in entry["data_offsets"])
        piece = raw[begin:end]
        try:
            t = piece.view(dtype)
        except RuntimeError:  # an offset not aligned to the element size: a copy of this tensor
            t = piece.clone().view(dtype)
        out[key] = t.view([int(d) for d in entry["shape"]])
    return out


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=json_default)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def is_artifact_file(name: str) -> bool:
    """Whether a file name belongs to a Fisher artifact folder (what a save may replace)."""
    return name in (CONFIG_NAME, CARD_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SAMPLES_NAME) or (
        name.startswith("fisher-") and name.endswith(".safetensors")
    )



def is_kfac_artifact_file(name: str) -> bool:
    """Whether a file name belongs to a KFAC artifact folder (what a save may replace)."""
    return name in (KFAC_CONFIG_NAME, KFAC_WEIGHTS_NAME, CARD_NAME)
