"""``hf-fisher compare-estimators``: empirical / true / KFAC / Lanczos Fisher on the same data, one table."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from hf_fisher.cli.common import (
    add_device_options,
    check_device,
    check_model_and_data_args,
    check_samples_against_config,
    load_model_and_batches,
    read_samples,
)
from hf_fisher.errors import InvalidInputError

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher compare-estimators`` to the subcommands ``sub``."""
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
    add_device_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from hf_fisher.consumers.compare_estimators import parse_methods

    methods = parse_methods(args.methods)
    data_path, _ = check_model_and_data_args(args)
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
    check_device(args.device)
    samples = read_samples(args, data_path)
    config, task_type = check_samples_against_config(args, samples)
    model, batches = load_model_and_batches(args, config, task_type, samples)

    from hf_fisher.consumers.compare_estimators import compare_estimators

    logger.info("comparing %s over %d samples in %d batches", ", ".join(methods), len(samples), len(batches))
    result = compare_estimators(model, batches, methods=methods, reduction=args.reduction, k=args.k,
                                top_k=args.top_k, progress=not args.no_progress)
    print(result.to_markdown())
    if args.json is not None:
        result.to_json(args.json)
        print(f"Saved the comparison to {args.json}")
    return 0
