"""The ``hf-fisher`` command line.

::

    hf-fisher collect --model DIR --data FILE.txt|FILE.jsonl --task NAME --out DIR [options]
    hf-fisher show DIR [--top 10]
    hf-fisher plugins
    hf-fisher demo [--out DIR]
    hf-fisher merge RECIPE.yaml --out DIR [options]
    hf-fisher compare-estimators --model DIR --data FILE [--methods empirical,true,kfac,spectrum] [options]

Every error hf_fisher raises on purpose (:class:`hf_fisher.errors.HfFisherError`), an ``OSError``
(a folder that cannot be written, a full disk...), and a model or tokenizer that cannot be loaded,
ends the command with a one-line message on stderr and exit code 2 (no traceback). Output
closed early (``hf-fisher plugins | head -1``) ends the command quietly with exit code 141
(128 + SIGPIPE, like other Unix tools).

Everything is checked before the work: the arguments, the device, the estimator, the output
folder (overwrite rule, writable, enough free disk space for the artifact), the data file
(encoding, JSON, labels against the model's ``num_labels``) -- all before the model's weights
are loaded, so a typo never costs a collection.

Building the parser imports nothing heavy (no torch): ``hf-fisher --help`` is fast.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError, UnsupportedError

__all__ = ["main", "build_parser", "format_table", "format_report", "check_output_folder", "estimate_artifact_bytes"]

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a Unix tool killed by a closed pipe returns
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")
STORAGE_DTYPES = ("float64", "float32", "float16")


# --------------------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """A plain-text table: left-aligned text columns, right-aligned numeric columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[c], (int, float)) or row[c] is None for row in rows) if rows else False
        for c in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    if not rows:
        out.append("(none)")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) and 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _share(value: float, total: float) -> str:
    return f"{100.0 * value / total:.1f}%" if total > 0 else "-"


def format_report(fisher: Any, *, top: int = 10, source: str | None = None) -> str:
    """Header, top heads, top MLP channels and per-layer totals of a Fisher artifact.

    Shares are the item's Fisher mass over the total of its table's kind (all heads, all
    channels, all parameters). Head and channel totals are those of
    :func:`hf_fisher.analysis.head_importance` / :func:`~hf_fisher.analysis.channel_importance`.
    A table the artifact cannot support (no layout, no heads) is replaced by a one-line note.
    """
    from hf_fisher import analysis

    md = fisher.metadata
    counts = fisher.counts
    total = fisher.total()
    header = [
        f"Fisher artifact: {source}" if source else "Fisher artifact",
        f"  task: {md.task}   estimator: {md.estimator}   reduction: {fisher.reduction}   "
        f"normalization: {md.normalization}   mode: {md.mode}",
        f"  model: {md.model_name_or_path or '-'} ({md.model_type or 'unknown type'})   data: {md.data_description or '-'}",
        f"  samples: {counts.samples}   tokens: {counts.tokens}   skipped: {counts.skipped}   "
        f"nonfinite: {getattr(counts, 'nonfinite', 0)}",
        f"  tensors: {len(fisher)}   total Fisher mass: {_cell(total)}",
    ]

    sections = ["\n".join(header)]
    layout = getattr(fisher, "layout", None)
    shapes = getattr(fisher, "param_shapes", {}) or {}
    for kind, fn, unit, parts in (
        ("attention heads", analysis.head_importance, "head", head_parts(layout, shapes)),
        ("MLP channels", analysis.channel_importance, "channel", channel_parts(layout, shapes)),
    ):
        try:
            values = fn(fisher)
        except (InvalidInputError, UnsupportedError) as e:
            sections.append(f"{kind[0].upper() + kind[1:]}: not available ({e})")
            continue
        kind_total = sum(values.values())
        rows = [
            (rank, layer, index, value, _share(value, kind_total))
            for rank, ((layer, index), value) in enumerate(_top(values, top), start=1)
        ]
        sections.append(
            format_table(["rank", "layer", unit, "Fisher", "share"], rows,
                         title=f"Top {len(rows)} of {len(values)} {kind} ({parts})")
        )
    layers = analysis.per_layer(fisher)
    layer_rows = [
        ("-" if layer is None else layer, value, _share(value, total))
        for layer, value in sorted(layers.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0))
    ]
    sections.append(
        format_table(["layer", "Fisher", "share"], layer_rows,
                     title="Per-layer totals ('-' = outside the layers: embeddings, final norm, head)")
    )
    return "\n\n".join(sections)


def _module_names(params: Sequence[str]) -> dict[str, str]:
    """Short module names of parameters: ``model.layers.0.mlp.gate_proj.weight`` -> ``gate``
    (``_proj`` dropped); two components (``intermediate.dense``) where one is ambiguous."""
    def short(param: str, depth: int) -> str:
        parts = param.split(".")
        parts = parts[:-1] if len(parts) > 1 else parts  # drop "weight" / "bias"
        name = ".".join(parts[-depth:])
        stem = name[: -len("_proj")] if name.endswith("_proj") else name
        return stem if len(stem) > 1 else name  # gate_proj -> gate, but GPT-2's c_proj stays

    modules = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in params))
    depth = 1
    while depth < 4 and len({short(m + ".w", depth) for m in modules}) < len(modules):
        depth += 1
    return {p: short(p, depth) for p in params}


def _axis_word(param: str, axis: int, shapes: dict) -> str:
    shape = shapes.get(param)
    if (shape is not None and len(shape) == 1) or (shape is None and param.endswith("bias")):
        return "bias"
    return {0: "row", 1: "column"}.get(axis, f"axis {axis}")


def channel_parts(layout: Any, shapes: dict | None = None) -> str:
    """What an MLP channel's total adds up, in the model's own terms: ``gate/up row + down
    column`` (LLaMA), ``c_fc column and bias + c_proj row`` (GPT-2's ``Conv1D`` weights are
    ``[in, out]``), read from the layout's first channel block."""
    blocks = getattr(layout, "mlp", None) or []
    if not blocks:
        return "its rows and columns in the MLP"
    roles = blocks[0].roles
    names = _module_names([r.param for r in roles])
    per_module: dict[str, list[str]] = {}
    for r in roles:
        words = per_module.setdefault(names[r.param], [])
        word = _axis_word(r.param, r.axis, shapes or {})
        if word not in words:
            words.append(word)
    merged: list[tuple[list[str], list[str]]] = []  # (modules, words): consecutive modules with equal words
    for module, words in per_module.items():
        if merged and merged[-1][1] == words:
            merged[-1][0].append(module)
        else:
            merged.append(([module], words))
    return " + ".join(f"{'/'.join(mods)} {' and '.join(words)}" for mods, words in merged)


def head_parts(layout: Any, shapes: dict | None = None) -> str:
    """What an attention head's total adds up: ``Q + K + V + O`` when every head has its own K, V
    (GPT-2, naming a fused QKV module), ``Q + O + its share of the kv-head's K, V`` under GQA/MQA."""
    atts = getattr(layout, "attention", None) or []
    shared = any(a.num_kv_heads < a.num_heads for a in atts)
    text = "Q + O + its share of the kv-head's K, V" if shared else "Q + K + V + O"
    heads = [h for a in atts for h in a.heads][:1]
    if heads:
        h = heads[0]
        qkv = {s.param.rsplit(".", 1)[0] for s in (*h.q, *h.k, *h.v)}
        if len(qkv) == 1:  # one fused projection (GPT-2's c_attn)
            text += f"; Q, K, V fused in {next(iter(qkv)).rsplit('.', 1)[-1]}"
    return text


def _top(values: dict, k: int) -> list:
    return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[: max(k, 0)]


# --------------------------------------------------------------------------- commands


# ---- output folders


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output_folder(
    path: str | os.PathLike,
    *,
    allowed: Callable[[str], bool],
    what: str,
    overwrite: bool,
    needed_bytes: int | None = None,
    needed_detail: str = "",
    flag: str = "--out",
) -> Path:
    """Check, before any work, that ``path`` can receive a ``what``; return it as an absolute path.

    - the rules of :func:`hf_fisher.atomic.check_target` (new, empty, or holding only ``allowed``
      files, replaced only with ``overwrite``; the nearest existing folder above it writable);
    - with ``needed_bytes``, that folder's disk has at least that much free space.

    Raises :class:`~hf_fisher.errors.ArtifactError` (an ``OSError``) naming the problem. Writes
    nothing that stays.
    """
    from hf_fisher.atomic import check_target, check_writable

    target = check_target(path, allowed=allowed, what=what, overwrite=overwrite, flag=flag)
    base = check_writable(target, what=what, flag=flag)
    if needed_bytes is not None:
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            free = None
        if free is not None and free < needed_bytes:
            raise ArtifactError(
                f"not enough disk space for the {what} in {target}: it needs about {_human(needed_bytes)}"
                f"{f' ({needed_detail})' if needed_detail else ''} but only {_human(free)} are free there; "
                f"free some space or choose another {flag}"
            )
    return target


def _safetensors_shapes(model_dir: Path) -> list[tuple[int, ...]] | None:
    """Tensor shapes from the headers of the ``*.safetensors`` files of a model folder (the
    data is not read), or None when there are none or a header cannot be read."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return None
    shapes: list[tuple[int, ...]] = []
    try:
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= 100 * 2**20:
                    return None
                header = json.loads(fh.read(n))
            shapes.extend(tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return shapes


def estimate_artifact_bytes(shapes: Sequence[Sequence[int]], *, reduction: str, element_size: int) -> int:
    """About how many bytes a Fisher artifact of parameters of ``shapes`` takes on disk.

    ``param``: every element, twice (mean and variance) at ``element_size`` bytes; ``group``:
    at most one value per row of the longest axis of each tensor (heads, channels, vocabulary
    rows), twice -- small. Plus 1 MiB for the config and the model card.
    """
    if reduction == "param":
        values = sum(math.prod(s) for s in shapes)
    else:
        values = sum(max(s) if len(s) else 1 for s in shapes)
    return int(values) * element_size * 2 + 2**20


_ELEMENT_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _disk_need(shapes: Sequence[Sequence[int]], args: argparse.Namespace) -> tuple[int, str]:
    dtype = args.storage_dtype or "float64"
    need = estimate_artifact_bytes(shapes, reduction=args.reduction, element_size=_ELEMENT_SIZE[dtype])
    if args.reduction == "param":
        n = sum(math.prod(s) for s in shapes)
        detail = f"{n:,} parameters x {_ELEMENT_SIZE[dtype]} bytes ({dtype}) x 2 for mean and variance"
    else:
        detail = f"group reduction, {dtype}"
    return need, detail


def _meta_shapes(config: Any, task_type: str) -> list[tuple[int, ...]] | None:
    """Parameter shapes of the model ``config`` describes, built on the meta device (no memory,
    no weights read); None when that fails."""
    try:
        import torch
        import transformers

        cls = (transformers.AutoModelForSequenceClassification if task_type == "sequence_classification"
               else transformers.AutoModelForCausalLM)
        with torch.device("meta"):
            model = cls.from_config(config)
        return [tuple(p.shape) for p in model.parameters()]
    except Exception as e:  # an estimate only: never a reason to fail
        logger.debug("could not estimate the model's size from its config: %s", e)
        return None


# ---- devices, models, data


def _check_device(device: str):
    """Parse ``--device`` and check that it exists here; returns the ``torch.device``."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise InvalidInputError("--device meta holds no data; use cpu or a GPU")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)"
            )
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InvalidInputError(f"--device {device}: no {dev.type} device is available here; use --device cpu")
    return dev


def _check_estimator(name: str) -> None:
    from hf_fisher import plugins

    names = plugins.estimators()
    if name not in names:
        raise InvalidInputError(
            f"--estimator {name!r} is not registered; available: {', '.join(sorted(names)) or 'none'} "
            f"(see `hf-fisher plugins`)"
        )


def _position_limit(model: Any, config: Any) -> int | None:
    """Longest sequence the model can place (config ``max_position_embeddings`` / ``n_positions``;
    RoBERTa-style models, numbering positions from ``padding_idx + 1``: minus ``padding_idx + 1``)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return max(limit - (m.padding_idx + 1), 1)
    return limit


def _check_token_ids(samples: Sequence[Any], vocab_size: Any) -> None:
    """Ready ``input_ids`` against the config's vocabulary, before the weights are loaded."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        return
    for i, sample in enumerate(samples):
        if sample.input_ids is not None and max(sample.input_ids) >= vocab_size:
            raise InvalidInputError(
                f"{sample.where or f'sample {i}'}: token id {max(sample.input_ids)} but the model's vocabulary "
                f"has {vocab_size} entries (config.vocab_size); were these ids made by this model's tokenizer?"
            )


def _looks_local(name: str) -> bool:
    """Whether ``--model`` can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


SCORING = {
    "causal_lm": "every token of each line scored, causal-LM labels = the input ids",
    "sequence_classification": "each sample scored on its 'label'",
}


def _check_model_and_data_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cheap checks shared by ``collect`` and ``compare-estimators`` (nothing heavy loaded):
    ``--data`` (.txt / .jsonl, exists), ``--batch-size`` / ``--max-length`` / ``--max-samples``
    (>= 1), ``--encoding``, ``--model`` (a folder with a config.json, or a Hub id)."""
    data_path = Path(args.data)
    if data_path.suffix.lower() not in (".txt", ".jsonl"):
        raise InvalidInputError(f"--data {str(data_path)!r}: expected a .txt or .jsonl file")
    if not data_path.is_file():
        raise InvalidInputError(f"--data {str(data_path)!r} does not exist (or is not a file)")
    for flag in ("batch_size", "max_length", "max_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise InvalidInputError(f"--encoding {args.encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return data_path, _check_model_arg(args)


def _check_model_arg(args: argparse.Namespace) -> Path:
    """``--model``: a folder with a config.json, or a Hub id."""
    model_path = Path(args.model)
    if not model_path.exists() and _looks_local(args.model):
        raise InvalidInputError(f"--model {args.model!r} does not exist; pass the folder of a saved transformers model")
    if model_path.exists():
        if not model_path.is_dir():
            raise InvalidInputError(f"--model {str(model_path)!r} is a file; pass the folder of a saved transformers model")
        if not (model_path / "config.json").is_file():
            raise InvalidInputError(f"--model {str(model_path)!r} has no config.json: is it a saved transformers model?")
    return model_path


def _read_samples(args: argparse.Namespace, data_path: Path) -> list:
    """The samples of ``--data`` (the first ``--max-samples`` of them)."""
    from hf_fisher.data import load_samples

    samples = load_samples(data_path, encoding=args.encoding)
    if args.max_samples is not None:  # the first N samples of the file
        samples = samples[: args.max_samples]
    return samples


def _check_samples_against_config(args: argparse.Namespace, samples: Sequence[Any]) -> tuple[Any, str]:
    """The model's config and task type, with the samples' labels and token ids checked against
    it (before the weights are loaded)."""
    from hf_fisher.data import check_labels

    config, task_type = _load_config(args.model)
    check_labels(samples, task_type, getattr(config, "num_labels", None))
    _check_token_ids(samples, getattr(config, "vocab_size", None))
    return config, task_type


def _load_model_and_batches(args: argparse.Namespace, config: Any, task_type: str, samples: Sequence[Any]):
    """Tokenizer (when a sample needs one), model (``--dtype``, ``--device``) and the batches
    (``--batch-size``; ``--max-length`` capped to the model's positions) on ``--device``."""
    from hf_fisher.data import make_batches, pad_token_id

    tokenizer = _load_tokenizer(args.model) if any(s.input_ids is None for s in samples) else None
    model = _load_model(args.model, config, args.dtype, args.device)
    max_length = args.max_length
    limit = _position_limit(model, config)
    if limit is not None and max_length > limit:
        logger.info("--max-length %d is more than the model's %d positions: samples are truncated to %d tokens",
                    max_length, limit, limit)
        max_length = limit
    batches = make_batches(
        tokenizer,
        samples,
        batch_size=args.batch_size,
        max_length=max_length,
        task_type=task_type,
        pad_id=pad_token_id(tokenizer, model.config),
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    if args.device != "cpu":
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    return model, batches


def _cmd_collect(args: argparse.Namespace) -> int:
    # Cheap checks first: nothing heavy is loaded when an argument is wrong.
    data_path, model_path = _check_model_and_data_args(args)
    if not args.task.strip():
        raise InvalidInputError("--task must not be empty: it names what the data stands for (e.g. --task math)")

    # The output folder, before the model is touched: overwrite rule, writable, disk space.
    from hf_fisher.fisher import is_artifact_file

    shapes = _safetensors_shapes(model_path)
    need, detail = _disk_need(shapes, args) if shapes else (None, "")
    out = check_output_folder(args.out, allowed=is_artifact_file, what="Fisher artifact",
                              overwrite=args.overwrite, needed_bytes=need, needed_detail=detail)
    _check_device(args.device)

    samples = _read_samples(args, data_path)
    _check_estimator(args.estimator)  # loads the plugins
    config, task_type = _check_samples_against_config(args, samples)
    if need is None:  # no safetensors headers to read: estimate from the config, still before the weights
        shapes = _meta_shapes(config, task_type)
        if shapes:
            need, detail = _disk_need(shapes, args)
            check_output_folder(out, allowed=is_artifact_file, what="Fisher artifact",
                                overwrite=args.overwrite, needed_bytes=need, needed_detail=detail)
    model, batches = _load_model_and_batches(args, config, task_type, samples)

    import hf_fisher

    logger.info("collecting %s Fisher (task %r) over %d samples in %d batches; %s", args.estimator, args.task,
                len(samples), len(batches), SCORING[task_type])
    fisher = hf_fisher.collect(
        model,
        batches,
        estimator=args.estimator,
        task=args.task,
        reduction=args.reduction,
        normalization=args.normalization,
        progress=not args.no_progress,
        storage_dtype=_torch_dtype(args.storage_dtype) if args.storage_dtype else None,
        model_name_or_path=str(args.model),
        data_description=f"{data_path.name}: {len(samples)} samples",
    )
    fisher.save_pretrained(out)
    c = fisher.counts
    extra = fisher.metadata.extra
    path = extra.get("per_sample_path", "batched")
    if path == "loop":
        path = f"per-sample loop: {extra.get('loop_reason', '')}"
    elif extra.get("vjp_params"):
        path = f"batched, {len(extra['vjp_params'])} parameter(s) through the batched vjp"
    print(f"Saved {args.reduction} Fisher of {len(fisher)} tensors to {out} "
          f"(samples {c.samples}, tokens {c.tokens}, skipped {c.skipped}; {SCORING[task_type]}; {path})")
    return 0


def _cmd_compare_estimators(args: argparse.Namespace) -> int:
    from hf_fisher.consumers.compare_estimators import parse_methods

    methods = parse_methods(args.methods)
    data_path, _ = _check_model_and_data_args(args)
    for flag in ("k", "top_k"):
        if getattr(args, flag) < 1:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.json is not None:
        target = Path(args.json)
        if target.is_dir():
            raise InvalidInputError(f"--json {args.json!r} is a folder; pass a file name such as comparison.json")
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise InvalidInputError(f"--json {args.json!r}: folder {str(parent)!r} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise InvalidInputError(f"--json {args.json!r}: folder {str(parent)!r} is not writable")
    _check_device(args.device)
    samples = _read_samples(args, data_path)
    config, task_type = _check_samples_against_config(args, samples)
    model, batches = _load_model_and_batches(args, config, task_type, samples)

    from hf_fisher.consumers.compare_estimators import compare_estimators

    logger.info("comparing %s over %d samples in %d batches", ", ".join(methods), len(samples), len(batches))
    result = compare_estimators(model, batches, methods=methods, reduction=args.reduction, k=args.k,
                                top_k=args.top_k, progress=not args.no_progress)
    print(result.to_markdown())
    if args.json is not None:
        result.to_json(args.json)
        print(f"Saved the comparison to {args.json}")
    return 0


PRUNE_SCORES = ("fisher", "kfac", "mask_fisher", "obd", "magnitude", "random", "wanda_sp", "flap", "taylor1", "taylor2")


def _parse_structured(text: str):
    if text.strip().lower() in ("none", "unstructured", ""):
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("heads", "kv_heads", "channels", "vocab")]
    if bad:
        raise InvalidInputError(f"--structured {text!r}: unknown unit {bad[0]!r}; use a comma list of heads, kv_heads, channels, vocab (or none)")
    return kinds


def _cmd_prune(args: argparse.Namespace) -> int:
    # Cheap checks first: flags, the model and Fisher folders, the data file, the output folder.
    if not 0.0 <= args.sparsity < 1.0:
        raise InvalidInputError(f"--sparsity must be in [0, 1) (a fraction of the candidate parameters), got {args.sparsity}")
    structured = _parse_structured(args.structured)
    if args.min_per_layer < 0:
        raise InvalidInputError(f"--min-per-layer must be >= 0 (got {args.min_per_layer})")
    if args.confidence is not None and not 0.0 < args.confidence < 1.0:
        raise InvalidInputError(f"--confidence must be in (0, 1), e.g. 0.95 (got {args.confidence})")
    if args.data is not None:
        data_path, _ = _check_model_and_data_args(args)
    else:
        data_path = None
        _check_model_arg(args)
    if args.fisher is not None and not Path(args.fisher).is_dir():
        raise InvalidInputError(f"--fisher {args.fisher!r} is not a folder; pass a Fisher artifact folder (hf-fisher collect --out)")
    from hf_fisher.atomic import check_target
    from hf_fisher.consumers.merge_io import TOKENIZER_FILES, is_model_output_file
    from hf_fisher.consumers.pruning import CLI_TERMS, PRUNE_FILES, check_options, prune

    check_target(args.out, allowed=lambda n: is_model_output_file(n) or n in PRUNE_FILES, what="pruned model",
                 overwrite=args.overwrite, flag="--out", inputs=[("--model", args.model), ("--fisher", args.fisher)])
    # The flag combinations, on the model's config and the Fisher artifact, before the model is loaded.
    if args.physical and structured and "vocab" in structured and Path(args.model).is_dir() and any(
            (Path(args.model) / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidInputError(
            "--structured vocab with --physical renumbers the token ids, and the tokenizer in --model cannot be "
            "renumbered with them (the output would have none that fits): prune the vocabulary without --physical "
            "(rows zeroed, ids and tokenizer unchanged), or use hf_fisher.prune(..., physical=True, tokenizer=False) "
            "and map ids through its vocab_map.json"
        )
    config, _ = _load_config(args.model)
    fisher = None
    if args.fisher is not None:
        from hf_fisher.fisher import Fisher

        fisher = Fisher.from_pretrained(args.fisher)
    has_data = data_path is not None
    check_options(sparsity=args.sparsity, structured=structured, score=args.score, scope=args.scope,
                  min_per_layer=args.min_per_layer, confidence=args.confidence, physical=args.physical,
                  has_data=has_data, has_rescale_data=has_data and not args.no_rescale, fisher=fisher,
                  rescale=False if args.no_rescale or not has_data else None, config=config, terms=CLI_TERMS)
    _check_device(args.device)
    batches = None
    if data_path is not None:
        samples = _read_samples(args, data_path)
        config, task_type = _check_samples_against_config(args, samples)
        model, batches = _load_model_and_batches(args, config, task_type, samples)
    else:
        model = _load_model(args.model, config, args.dtype, args.device)
    result = prune(
        model, fisher, sparsity=args.sparsity, structured=structured, score=args.score, scope=args.scope,
        min_per_layer=args.min_per_layer, confidence=args.confidence, physical=args.physical,
        rescale_batches=None if args.no_rescale else batches, calibration_batches=batches,
        rescale=False if args.no_rescale or batches is None else None, seed=args.seed, progress=not args.no_progress,
    )
    result.save_pretrained(args.out, overwrite=args.overwrite)
    st = result.stats
    print(f"Removed {st.get('removed_units', len(result.masks))} units ({100 * st['achieved_sparsity']:.1f}% of "
          f"{st['candidate_params']:,} candidate parameters; score {st['score']}, scope {st['scope']})")
    print(f"Saved the {'smaller' if args.physical else 'masked'} model to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if len(args.artifacts) > 2:
        raise InvalidInputError(f"report takes one or two Fisher artifact folders, got {len(args.artifacts)}")
    if args.top < 1:
        raise InvalidInputError(f"--top must be >= 1 (got {args.top})")
    for a in args.artifacts:
        if not Path(a).is_dir():
            raise InvalidInputError(f"{a!r} is not a folder; pass Fisher artifact folders (hf-fisher collect --out)")
    from hf_fisher.atomic import check_target
    from hf_fisher.consumers.report import _is_report_file, write_report

    check_target(args.out, allowed=_is_report_file, what="report", overwrite=args.overwrite, flag="--out")
    result = write_report(list(args.artifacts), args.out, k=args.top, overwrite=args.overwrite)
    print(result.summary)
    for note in result.notes:
        print(f"note: {note}")
    print(f"Wrote {', '.join(result.files)} to {args.out}")
    return 0


CIRCUIT_FILES = ("qkov.json", "conflicts.json", "claims.txt", "head_categories.json")


def _is_circuit_file(name: str) -> bool:
    return name in CIRCUIT_FILES or (name.startswith("qkov_") and name.endswith(".png"))


def _two_task_batches(args: argparse.Namespace):
    """Checks and loading shared by ``qkov`` and ``conflicts``: --task-a / --task-b data files,
    --model, --out (new, empty, or a previous output with --overwrite), then the model and both
    tasks' batches."""
    from hf_fisher.atomic import check_target

    paths = []
    for flag in ("task_a", "task_b"):
        args.data = getattr(args, flag)
        try:
            data_path, _ = _check_model_and_data_args(args)
        except InvalidInputError as e:
            raise InvalidInputError(str(e).replace("--data", f"--{flag.replace('_', '-')}")) from None
        paths.append(data_path)
    if args.memory_budget_mb <= 0:
        raise InvalidInputError(f"--memory-budget-mb must be > 0 (got {args.memory_budget_mb})")
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise InvalidInputError(f"--layers {args.layers!r}: give comma-separated layer indices, e.g. 0,3") from None
    if args.fisher is not None and not Path(args.fisher).is_dir():
        raise InvalidInputError(f"--fisher {args.fisher!r} is not a folder; pass a Fisher artifact (hf-fisher collect --reduction param)")
    target = check_target(args.out, allowed=_is_circuit_file, what="analysis", overwrite=args.overwrite, flag="--out")
    _check_device(args.device)
    samples = [_read_samples(args, p) for p in paths]
    config, task_type = _check_samples_against_config(args, samples[0] + samples[1])
    model, batches_a = _load_model_and_batches(args, config, task_type, samples[0])
    batches_b = _batches_for(args, model, config, task_type, samples[1])
    fisher = None
    if args.fisher is not None:
        from hf_fisher.fisher import Fisher

        fisher = Fisher.from_pretrained(args.fisher)
    return model, batches_a, batches_b, layers, fisher, target


def _cmd_qkov(args: argparse.Namespace) -> int:
    model, a, b, layers, fisher, target = _two_task_batches(args)
    from hf_fisher.atomic import atomic_folder
    from hf_fisher.consumers.qkov import qkov_interference

    result = qkov_interference(model, a, b, fisher=fisher, layers=layers, variant=args.variant, aggregate=args.aggregate,
                               memory_budget_mb=args.memory_budget_mb, top_k=args.top, progress=not args.no_progress,
                               task_names=(Path(args.task_a).stem or "task A", Path(args.task_b).stem or "task B"))
    extra = {}
    if args.head_categories:
        from hf_fisher.consumers.head_behaviour import aggregate_by_category, head_categories

        cats = head_categories(model, progress=not args.no_progress)
        extra = {"head_categories": cats.to_dict(),
                 "by_category": aggregate_by_category(result.by_head(), cats)}
    with atomic_folder(target, what="analysis") as tmp:
        data = json.loads(result.to_json())
        data.update(extra)
        (tmp / "qkov.json").write_text(json.dumps(data, indent=1))
        pngs = result.save_heatmaps(tmp)
    print(f"QK-OV interference ({args.variant}, {args.aggregate}) of {len(a)} x {len(b)} batches; top entries:")
    for row in result.top(min(args.top, 10)):
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print(f"Wrote qkov.json{' and ' + str(len(pngs)) + ' heatmaps' if pngs else ''} to {args.out}")
    return 0


def _cmd_conflicts(args: argparse.Namespace) -> int:
    if not 0.0 < args.alpha < 1.0:
        raise InvalidInputError(f"--alpha must be in (0, 1) (got {args.alpha})")
    if not 0.0 <= args.min_effect_size < 1.0:
        raise InvalidInputError(f"--min-effect-size must be in [0, 1) (got {args.min_effect_size})")
    model, a, b, layers, fisher, target = _two_task_batches(args)
    from hf_fisher.atomic import atomic_folder
    from hf_fisher.consumers.conflicts import sample_conflicts

    result = sample_conflicts(model, a, b, fisher=fisher, layers=layers, groups=args.groups, alpha=args.alpha,
                              min_effect_size=args.min_effect_size, memory_budget_mb=args.memory_budget_mb,
                              top_k=args.top, progress=not args.no_progress)
    with atomic_folder(target, what="analysis") as tmp:
        result.to_json(tmp / "conflicts.json")
        (tmp / "claims.txt").write_text("".join(c + "\n" for c in result.claims), encoding="utf-8")
    for claim in result.claims[:10] or [f"no significant conflict (Benjamini-Hochberg FDR {result.alpha:g}, "
                                        f"cosine <= -{result.min_effect_size:g})"]:
        print(claim)
    print(f"Wrote conflicts.json and claims.txt to {args.out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    tasks = {}
    for spec in args.task:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise InvalidInputError(f"--task {spec!r}: write NAME=FILE, e.g. --task math=math.jsonl")
        if name in tasks:
            raise InvalidInputError(f"--task {name!r} is given twice")
        tasks[name] = path
    if not 0.0 <= args.sparsity < 1.0:
        raise InvalidInputError(f"--sparsity must be in [0, 1) (got {args.sparsity})")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    paths = {}
    for name, path in tasks.items():
        args.data = path
        try:
            paths[name], _ = _check_model_and_data_args(args)
        except InvalidInputError as e:
            raise InvalidInputError(f"--task {name}: {e}".replace("--data ", "")) from None
    from hf_fisher.consumers.analyze import AnalysisConfig, _stages, check_out

    known = _stages()
    bad = [s for s in stages or [] if s not in known]
    if bad:
        raise InvalidInputError(f"--stages: unknown stage(s) {bad}; registered: {', '.join(known)}")
    check_out(args.out, overwrite=args.overwrite, flag="--out")
    _check_device(args.device)
    samples = {n: _read_samples(args, p) for n, p in paths.items()}
    config, task_type = _check_samples_against_config(args, [x for v in samples.values() for x in v])
    model, batches = None, {}
    for name, smp in samples.items():
        m, b = _load_model_and_batches(args, config, task_type, smp) if model is None else (model, _batches_for(args, model, config, task_type, smp))
        model = m
        batches[name] = b
    from hf_fisher.consumers.analyze import analyze

    result = analyze(model, batches, out=args.out, overwrite=args.overwrite,
                     config=AnalysisConfig(stages=stages, sparsity=args.sparsity, progress=not args.no_progress))
    print((Path(result.folder) / "summary.txt").read_text(), end="")
    print(f"Wrote the analysis to {args.out}")
    return 0 if all(v != "failed" for v in result.status.values()) else 1


def _batches_for(args: argparse.Namespace, model: Any, config: Any, task_type: str, samples: Sequence[Any]):
    from hf_fisher.data import make_batches, pad_token_id

    tokenizer = _load_tokenizer(args.model) if any(s.input_ids is None for s in samples) else None
    limit = _position_limit(model, config)
    batches = make_batches(tokenizer, samples, batch_size=args.batch_size,
                           max_length=min(args.max_length, limit) if limit else args.max_length, task_type=task_type,
                           pad_id=pad_token_id(tokenizer, model.config), vocab_size=model.get_input_embeddings().num_embeddings)
    if args.device != "cpu":
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    return batches


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _load_config(name_or_path: str):
    """The model's config and task type: causal LM by default, sequence classification when
    ``config.architectures`` says so."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # whatever fails while reading a config, the model cannot be used
        logger.debug("loading the config failed", exc_info=True)
        if not os.path.exists(name_or_path) and not _looks_local(name_or_path):
            offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
            why = "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set" if offline else "the Hub could not be reached"
            raise InvalidInputError(
                f"--model {name_or_path!r} is not a local folder, and it is not in the Hugging Face cache ({why}). "
                "Pass the folder of a saved model (model.save_pretrained(DIR)), or download it first where the Hub is "
                f"reachable: hf download {name_or_path}"
            ) from None
        raise InvalidInputError(f"could not load the config of model {name_or_path!r}: {e}") from None
    archs = getattr(config, "architectures", None) or []
    task_type = "sequence_classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"
    return config, task_type


def _load_model(name_or_path: str, config: Any, dtype: str, device: str):
    import torch
    import transformers
    from packaging.version import Version

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        cls = transformers.AutoModelForSequenceClassification
    else:
        cls = transformers.AutoModelForCausalLM
    # transformers >= 4.56 names the argument ``dtype`` (``torch_dtype`` before).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model = cls.from_pretrained(name_or_path, config=config, **{key: getattr(torch, dtype)})
        return model.to(device)
    except Exception as e:  # corrupt weights (SafetensorError), shape mismatches, missing files...
        logger.debug("loading the model failed", exc_info=True)
        raise InvalidInputError(f"could not load model {name_or_path!r}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def _load_tokenizer(name_or_path: str):
    import transformers

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise InvalidInputError(
            f"the data has text, but {name_or_path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save "
            "the tokenizer next to the model (tokenizer.save_pretrained(DIR)), or give a .jsonl data file with "
            "ready 'input_ids'"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        logger.debug("loading the tokenizer failed", exc_info=True)
        raise InvalidInputError(
            f"could not load a tokenizer from {name_or_path!r} ({e}); save one next to the model, "
            f"or use a .jsonl data file with 'input_ids'"
        ) from None


def _cmd_show(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise InvalidInputError(f"--top must be >= 0 (got {args.top})")
    from hf_fisher.fisher import Fisher

    fisher = Fisher.from_pretrained(args.dir, strict=not args.no_strict)
    for problem in fisher.metadata.extra.get("load_problems") or []:
        print(f"WARNING: {problem}")
    print(format_report(fisher, top=args.top, source=str(args.dir)))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from hf_fisher import plugins

    # Adapters are listed in the order they are asked (the first that recognises a model wins).
    described = plugins.describe()
    rows = [(r["kind"], r["name"], r["plugin"], r.get("distribution") or "-") for r in described]
    print(format_table(["kind", "name", "plugin", "distribution"], rows, title="Registered plugins"))
    adapters = [(r["name"], ", ".join(r["model_types"]) if r["model_types"] else "(not declared)", r["order"],
                 r.get("distribution") or "-", r.get("version") or "-") for r in described if r["kind"] == "adapter"]
    print()
    print(format_table(["adapter", "model types", "order", "distribution", "version"], adapters,
                       title="Architecture adapters (asked in this order; the first that knows a model wins)"))
    failed = plugins.failed_plugins()
    if failed:
        rows = [(f.get("name"), f.get("distribution"), f.get("stage"), f.get("error")) for f in failed]
        print()
        print(format_table(["plugin", "distribution", "stage", "error"], rows, title="Failed plugins (skipped)"))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hf_fisher import demo

    demo.run(args)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    recipe_path = Path(args.recipe)
    # Cheap checks first: the recipe file and its keys, the output folder -- before torch is imported.
    if not recipe_path.is_file():
        raise InvalidInputError(f"recipe {str(recipe_path)!r} does not exist (or is not a file); pass a merge recipe YAML")
    if args.dtype is not None and args.dtype not in MERGE_DTYPES:  # pragma: no cover - argparse choices
        raise InvalidInputError(f"--dtype must be one of {MERGE_DTYPES}")
    from hf_fisher.consumers.merging import _check_output, _input_paths, load_recipe, recipe_to_kwargs

    recipe = load_recipe(recipe_path)
    kwargs = recipe_to_kwargs(recipe, relative_to=recipe_path.parent)
    for ref in [*kwargs["models"], kwargs.get("base_model"), *(kwargs.get("fishers") or [])]:
        if ref is not None and not os.path.exists(ref) and _looks_local(ref):
            raise InvalidInputError(f"recipe {recipe_path}: {ref!r} does not exist (a local path, not a Hub id)")
    out = Path(os.path.abspath(args.out))
    if args.push_to_hub:
        from hf_fisher.integrations.hub import check_push_ready

        check_push_ready(args.push_to_hub, flag="--push-to-hub")
    _check_output(out, _input_paths(kwargs["models"], kwargs.get("base_model"), kwargs.get("fishers")), flag="--out")
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    if args.max_shard_size is not None:
        kwargs["max_shard_size"] = args.max_shard_size
    if args.allow_tokenizer_mismatch:
        kwargs["allow_tokenizer_mismatch"] = True
    from hf_fisher.consumers.merging import merge_with_fisher

    path = merge_with_fisher(output_dir=out, progress=not args.no_progress,
                             push_to_hub=args.push_to_hub, **kwargs)
    print(f"Merged {len(kwargs['models'])} models ({kwargs['method']}) into {path}")
    return 0


# --------------------------------------------------------------------------- parser


COLLECT_DESCRIPTION = """\
Collect the Fisher information of a saved model on a data file and save it as an artifact folder.

What is scored: for a causal LM every token of each line counts (the labels are the input ids,
padding ignored; the model predicts each token from the ones before it), unlike the demo, which
scores only the copied half of its sequences. A classifier (config architectures
...ForSequenceClassification) is scored on each sample's integer 'label' (.jsonl).

Everything is checked before the model's weights are loaded: arguments, --device, --estimator,
--out (new or empty, or a previous artifact with --overwrite; writable; enough free disk space),
the data file (encoding, JSON, labels). --max-length is capped to the model's position limit.
"""


PRUNE_DESCRIPTION = """\
Prune a model by its Fisher information (or a baseline criterion) and save the result:

    hf-fisher prune --model M --sparsity 0.3 --structured heads,channels \\
        --scope layer --data calib.txt --physical --out M-pruned
    hf-fisher prune --model M --fisher fisher-lm --sparsity 0.3 --out M-masked

With --data and --scope layer the default criterion is "kfac": layer by layer, units are removed
greedily by the least loss increase under the KFAC quadratic (Fisher of the layer output x
Gram of its input) with the kept units' scales re-optimised and folded into the weights.
Without data, "fisher": a head's score is the Fisher of its Q rows and O columns (no share of
the K/V it shares under GQA; in multi-head attention a head takes its K/V rows along), a
channel's that of its gate/up rows and down column. --physical removes the units (a smaller model
from_pretrained loads); otherwise the weights are zeroed. --out gets the tokenizer files of
--model and pruning.json: what was removed, and the warnings (a sparsity the floors cannot reach;
a saturated model, whose Fisher vanishes: then the default adds FLAP's bias compensation).
The flag combinations are checked before the model is loaded.
"""


MERGE_DESCRIPTION = """\
Merge models as a recipe describes (mergekit-like YAML):

    merge_method: fisher            # fisher, fisher_task_vector, average, task_arithmetic, ties, dare
    base_model: null                # required by fisher_task_vector, task_arithmetic, ties, dare
    models:
      - model: path/or/hub-id
        parameters: {weight: 0.5, fisher: path/to/fisher-artifact}
      - model: other/model
        parameters: {weight: 0.5, fisher: other/fisher:subfolder}
    parameters: {fisher_floor: 1.0e-6, normalize_fishers: false}
    dtype: null

Every input, Fisher and the output folder are checked before any tensor is merged. Relative
paths are read relative to the recipe's folder.
"""
MERGE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _add_task_data_options(p: argparse.ArgumentParser) -> None:
    """The data and model-loading options of the commands that read one file per task."""
    p.add_argument("--encoding", default="utf-8", help="text encoding of the data files (default utf-8)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens (default 512)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples of each task")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in (default float32)")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-fisher`` argument parser (imports nothing heavy: no torch)."""
    parser = argparse.ArgumentParser(
        prog="hf-fisher",
        description="Exact per-sample Fisher information of Hugging Face transformers models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")

    p = sub.add_parser("collect", help="collect a Fisher artifact of a model on a data file",
                       description=COLLECT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one sample per line) or .jsonl ('text' or 'input_ids', optional 'label')")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8; e.g. latin-1, cp1252, utf-16)")
    p.add_argument("--task", required=True, help="name of the task the data stands for (recorded in the artifact)")
    p.add_argument("--out", required=True, help="folder to write the artifact to (new or empty; checked before the work)")
    p.add_argument("--overwrite", action="store_true", help="replace a Fisher artifact already in --out (never other files)")
    p.add_argument("--reduction", choices=("group", "param"), default="group", help="group: per head/channel/row (default); param: parameter-shaped")
    p.add_argument("--normalization", choices=("mean", "sum", "token"), default="mean", help="per-sample loss normalisation (default mean)")
    p.add_argument("--estimator", default="empirical", help="estimator plugin (default empirical; see `hf-fisher plugins`)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward/backward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens (default 512; capped to the model's positions)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in (default float32)")
    p.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None, help="dtype of the saved tensors (default: the accumulation dtype, float64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("show", help="print the top heads, channels and per-layer totals of an artifact")
    p.add_argument("dir", help="folder of a Fisher artifact")
    p.add_argument("--top", type=int, default=10, help="rows in the heads and channels tables (default 10)")
    p.add_argument("--no-strict", action="store_true",
                   help="show an artifact with invalid values (NaN, Inf, negative) or an unknown estimator anyway, "
                        "with a warning per problem, to inspect it")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("plugins", help="list registered plugins and plugins that failed to load")
    p.set_defaults(func=_cmd_plugins)

    from hf_fisher.demo import add_arguments  # light: the demo imports torch only when it runs

    p = sub.add_parser("demo", help="two tiny tasks end to end: Trainer + FisherCallback, top heads, pruning, Fisher merging, report")
    add_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("merge", help="merge models (Fisher, TIES, DARE, task arithmetic, ...) from a recipe YAML",
                       description=MERGE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="merge recipe YAML (the merge_recipe.yaml a merge writes reproduces it)")
    p.add_argument("--out", required=True, help="folder to write the merged model to (new, empty, or a previous merge output)")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default=None, help="dtype of the merged weights (default: the recipe's, else the inputs')")
    p.add_argument("--max-shard-size", default=None, help="largest weight shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="merge even when the inputs' tokenizer vocabularies differ")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the merged folder to this Hub repo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("compare-estimators",
                       help="run empirical / true / KFAC / Lanczos on the same data and print one comparison table")
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one sample per line) or .jsonl ('text' or 'input_ids', optional 'label')")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8)")
    p.add_argument("--methods", default="empirical,true,kfac,spectrum",
                   help="comma-separated methods from empirical,true,kfac,spectrum (default all four)")
    p.add_argument("--reduction", choices=("group", "param"), default="group", help="diagonal reduction of empirical/true and unit of the correlations (default group)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward/backward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens (default 512; capped to the model's positions)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples")
    p.add_argument("--k", type=int, default=5, help="top eigenvalues of spectrum and KFAC (default 5)")
    p.add_argument("--top-k", type=int, default=20, help="groups in the top-k overlap (default 20)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the comparison as JSON to this file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compare_estimators)

    p = sub.add_parser("prune", help="prune heads / kv-heads / channels / vocabulary rows (or weights) by Fisher or a baseline score",
                       description=PRUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder of a saved transformers model")
    p.add_argument("--fisher", default=None, help="Fisher artifact folder of the model (needed by --score fisher / obd)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of the candidate parameters to remove, in [0, 1)")
    p.add_argument("--structured", default="heads,channels", help="comma list of heads, kv_heads, channels, vocab; or none (unstructured)")
    p.add_argument("--score", choices=PRUNE_SCORES, default=None,
                   help="criterion (default: kfac with --data and --scope layer, else fisher)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="one global budget, or the same budget in every layer (default global)")
    p.add_argument("--min-per-layer", type=int, default=1, help="units of each kind kept in every layer (default 1)")
    p.add_argument("--confidence", type=float, default=None, help="remove only units whose upper confidence bound is below every kept unit (e.g. 0.95)")
    p.add_argument("--physical", action="store_true", help="remove the units and save a smaller model (LLaMA family; needs --scope layer)")
    p.add_argument("--data", default=None, help="calibration data (.txt / .jsonl): the least-squares rescale and the data-driven scores")
    p.add_argument("--no-rescale", action="store_true", help="no least-squares rescale even with --data")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch of --data (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate calibration samples to this many tokens (default 512)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of --score random (default 0)")
    p.add_argument("--out", required=True, help="folder to write the pruned model to (new, empty, or a previous output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (never other files)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("report", help="write plots, a tall CSV and a readable summary of one or two Fisher artifacts")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="one or two Fisher artifact folders")
    p.add_argument("--out", required=True, help="folder to write the report to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out (never other files)")
    p.add_argument("--top", type=int, default=10, help="hotspots listed per kind (default 10)")
    p.set_defaults(func=_cmd_report)

    for name, helptext, func in (
        ("qkov", "QK-OV interference between two tasks per layer, head and Q/K/V/O block", _cmd_qkov),
        ("conflicts", "per-sample gradient conflicts between two tasks (sign-symmetric null, BH-FDR, effect-size floor, forensic claims)", _cmd_conflicts),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer for text data)")
        p.add_argument("--task-a", required=True, help="task A data (.txt / .jsonl)")
        p.add_argument("--task-b", required=True, help="task B data (.txt / .jsonl)")
        p.add_argument("--out", required=True, help="folder to write the results to (new, empty, or a previous output with --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace results already in --out (never other files)")
        p.add_argument("--fisher", default=None, help="Fisher artifact (reduction param) to use instead of the tasks' own Fisher")
        p.add_argument("--layers", default=None, help="comma-separated layers to analyse (default all)")
        p.add_argument("--memory-budget-mb", type=float, default=512.0, help="bound on each task's stored per-sample gradients (default 512)")
        p.add_argument("--top", type=int, default=20, help="top entries reported (default 20)")
        _add_task_data_options(p)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "qkov":
            p.add_argument("--variant", choices=("unsigned", "signed", "symmetric", "natural"), default="unsigned", help="interference metric (default unsigned)")
            p.add_argument("--aggregate", choices=("mean", "sum"), default="mean", help="mean or sum over a slice (default mean)")
            p.add_argument("--head-categories", action="store_true", help="also categorise the heads (induction, previous-token, ...) and aggregate by category")
        else:
            p.add_argument("--groups", choices=("param", "layer"), default="param", help="conflicts per parameter or per layer, plus overall (default param)")
            from hf_fisher.consumers.conflict_defaults import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE

            p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"false discovery rate (default {DEFAULT_ALPHA:g})")
            p.add_argument("--min-effect-size", type=float, default=DEFAULT_MIN_EFFECT_SIZE,
                           help=f"a conflict needs cosine <= -this (default {DEFAULT_MIN_EFFECT_SIZE:g}; 0: any negative cosine)")
        p.set_defaults(func=func)

    p = sub.add_parser("analyze", help="every analysis stage (Fisher, importance, pruning, overlap, conflicts, QK-OV, ...) into one report folder")
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer for text data)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=FILE", help="a task and its data file (.txt / .jsonl); repeat per task")
    p.add_argument("--out", required=True, help="folder to write the analysis to (new, empty, or a previous analysis with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an analysis already in --out (never other files)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default all; see `hf-fisher plugins`)")
    p.add_argument("--sparsity", type=float, default=0.3, help="pruning stage sparsity (default 0.3)")
    _add_task_data_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_analyze)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (works under capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    lib = logging.getLogger("hf_fisher")
    lib.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in lib.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again (the recipe of
    the Python docs for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        sys.stdout.flush()
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    _configure_logging(args.verbose)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        raise
    except HfFisherError as e:
        print(f"hf-fisher {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a folder that cannot be written, a full disk, an unreadable file...
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        print(f"hf-fisher {args.command}: error: {e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hf-fisher: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-fisher`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        return _run(argv)
    except BrokenPipeError:  # e.g. `hf-fisher plugins | head -1`: the reader is gone, stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
