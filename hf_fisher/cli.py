"""The ``hf-fisher`` command line.

::

    hf-fisher collect --model DIR --data FILE.txt|FILE.jsonl --task NAME --out DIR [options]
    hf-fisher show DIR [--top 10]
    hf-fisher plugins
    hf-fisher demo [--out DIR]

Every error hf_fisher raises on purpose (:class:`hf_fisher.errors.HfFisherError`), and a model or
tokenizer that cannot be loaded, ends the command with a one-line message on stderr and exit
code 2 (no traceback). Arguments are checked before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from hf_fisher.errors import HfFisherError, InvalidInputError, UnsupportedError

__all__ = ["main", "build_parser", "format_table", "format_report"]

logger = logging.getLogger("hf_fisher.cli")

EXIT_ERROR = 2
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
    for kind, fn, unit, parts in (
        ("attention heads", analysis.head_importance, "head", "Q + O + its share of the kv-head's K, V"),
        ("MLP channels", analysis.channel_importance, "channel", "gate + up rows + down column"),
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


def _top(values: dict, k: int) -> list:
    return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[: max(k, 0)]


# --------------------------------------------------------------------------- commands


def _cmd_collect(args: argparse.Namespace) -> int:
    data_path = Path(args.data)
    out = Path(args.out)
    # Cheap checks first: nothing heavy is loaded when an argument is wrong.
    if data_path.suffix.lower() not in (".txt", ".jsonl"):
        raise InvalidInputError(f"--data {str(data_path)!r}: expected a .txt or .jsonl file")
    if not data_path.is_file():
        raise InvalidInputError(f"--data {str(data_path)!r} does not exist (or is not a file)")
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InvalidInputError(f"--out {str(out)!r} is not empty; choose another folder or pass --overwrite")
    model_path = Path(args.model)
    if model_path.exists() and not (model_path / "config.json").is_file():
        raise InvalidInputError(f"--model {str(model_path)!r} has no config.json: is it a saved transformers model?")
    for flag in ("batch_size", "max_length", "max_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")

    from hf_fisher.data import load_samples, make_batches, pad_token_id

    samples = load_samples(data_path)
    if args.max_samples is not None:  # the first N samples of the file
        samples = samples[: args.max_samples]
    model, task_type = _load_model(args.model, args.dtype, args.device)
    tokenizer = _load_tokenizer(args.model) if any(s.input_ids is None for s in samples) else None
    batches = make_batches(
        tokenizer,
        samples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        task_type=task_type,
        pad_id=pad_token_id(tokenizer, model.config),
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    if args.device != "cpu":
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]

    import hf_fisher

    logger.info("collecting %s Fisher (task %r) over %d samples in %d batches", args.estimator, args.task, len(samples), len(batches))
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
          f"(samples {c.samples}, tokens {c.tokens}, skipped {c.skipped}; {path})")
    return 0


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _load_model(name_or_path: str, dtype: str, device: str):
    """Causal LM by default; sequence classification when config.architectures says so."""
    import torch
    import transformers
    from packaging.version import Version

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            cls, task_type = transformers.AutoModelForSequenceClassification, "sequence_classification"
        else:
            cls, task_type = transformers.AutoModelForCausalLM, "causal_lm"
        # transformers >= 4.56 names the argument ``dtype`` (``torch_dtype`` before).
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = cls.from_pretrained(name_or_path, config=config, **{key: getattr(torch, dtype)})
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInputError(f"could not load model {name_or_path!r}: {e}") from None
    return model.to(device), task_type


def _load_tokenizer(name_or_path: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(
            f"could not load a tokenizer from {name_or_path!r} ({e}); save one next to the model, "
            f"or use a .jsonl data file with 'input_ids'"
        ) from None


def _cmd_show(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise InvalidInputError(f"--top must be >= 0 (got {args.top})")
    from hf_fisher.fisher import Fisher

    fisher = Fisher.from_pretrained(args.dir)
    print(format_report(fisher, top=args.top, source=str(args.dir)))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from hf_fisher import plugins

    # Adapters are listed in the order they are asked (the first that recognises a model wins).
    rows = [(r["kind"], r["name"], r["plugin"], r.get("distribution") or "-") for r in plugins.describe()]
    print(format_table(["kind", "name", "plugin", "distribution"], rows, title="Registered plugins"))
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


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fisher",
        description="Exact per-sample Fisher information of Hugging Face transformers models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="collect a Fisher artifact of a model on a data file")
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one sample per line) or .jsonl ('text' or 'input_ids', optional 'label')")
    p.add_argument("--task", required=True, help="name of the task the data stands for (recorded in the artifact)")
    p.add_argument("--out", required=True, help="folder to write the artifact to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a Fisher artifact already in --out")
    p.add_argument("--reduction", choices=("group", "param"), default="group", help="group: per head/channel/row (default); param: parameter-shaped")
    p.add_argument("--normalization", choices=("mean", "sum", "token"), default="mean", help="per-sample loss normalisation (default mean)")
    p.add_argument("--estimator", default="empirical", help="estimator plugin (default empirical; see `hf-fisher plugins`)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in")
    p.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None, help="dtype of the saved tensors (default: the accumulation dtype, float64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("show", help="print the top heads, channels and per-layer totals of an artifact")
    p.add_argument("dir", help="folder of a Fisher artifact")
    p.add_argument("--top", type=int, default=10, help="rows in the heads and channels tables (default 10)")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("plugins", help="list registered plugins and plugins that failed to load")
    p.set_defaults(func=_cmd_plugins)

    from hf_fisher.demo import add_arguments

    p = sub.add_parser("demo", help="train a tiny LLaMA on a copy task and show its Fisher information")
    add_arguments(p)
    p.set_defaults(func=_cmd_demo)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-fisher`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except HfFisherError as e:
        print(f"hf-fisher {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hf-fisher: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
