"""``hf-fisher analyze``: every analysis stage into one report folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_fisher.cli.common import (
    add_task_data_options,
    batches_for,
    check_device,
    check_model_and_data_args,
    check_samples_against_config,
    load_model_and_batches,
    read_samples,
)
from hf_fisher.errors import InvalidInputError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher analyze`` to the subcommands ``sub``."""
    p = sub.add_parser("analyze", help="every analysis stage (Fisher, importance, pruning, overlap, conflicts, QK-OV, ...) into one report folder")
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer for text data)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=FILE", help="a task and its data file (.txt / .jsonl); repeat per task")
    p.add_argument("--out", required=True, help="folder to write the analysis to (new, empty, or a previous analysis with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an analysis already in --out (never other files)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default all; see `hf-fisher plugins`)")
    p.add_argument("--sparsity", type=float, default=0.3, help="pruning stage sparsity (default 0.3)")
    add_task_data_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
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
            paths[name], _ = check_model_and_data_args(args)
        except InvalidInputError as e:
            raise InvalidInputError(f"--task {name}: {e}".replace("--data ", "")) from None
    from hf_fisher.consumers.analyze import AnalysisConfig, _stages, check_out

    known = _stages()
    bad = [s for s in stages or [] if s not in known]
    if bad:
        raise InvalidInputError(f"--stages: unknown stage(s) {bad}; registered: {', '.join(known)}")
    check_out(args.out, overwrite=args.overwrite, flag="--out")
    check_device(args.device)
    samples = {n: read_samples(args, p) for n, p in paths.items()}
    config, task_type = check_samples_against_config(args, [x for v in samples.values() for x in v])
    model, batches = None, {}
    for name, smp in samples.items():
        m, b = load_model_and_batches(args, config, task_type, smp) if model is None else (model, batches_for(args, model, config, task_type, smp))
        model = m
        batches[name] = b
    from hf_fisher.consumers.analyze import analyze

    result = analyze(model, batches, out=args.out, overwrite=args.overwrite,
                     config=AnalysisConfig(stages=stages, sparsity=args.sparsity, progress=not args.no_progress))
    print((Path(result.folder) / "summary.txt").read_text(), end="")
    print(f"Wrote the analysis to {args.out}")
    return 0 if all(v != "failed" for v in result.status.values()) else 1
