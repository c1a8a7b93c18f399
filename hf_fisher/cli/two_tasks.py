"""What ``hf-fisher qkov`` and ``hf-fisher conflicts`` share: their options (a model, one data file
per task, ``--out``...), their checks and the loading of the model and both tasks' batches."""

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

CIRCUIT_FILES = ("qkov.json", "conflicts.json", "claims.txt", "head_categories.json")


def is_circuit_file(name: str) -> bool:
    return name in CIRCUIT_FILES or (name.startswith("qkov_") and name.endswith(".png"))


def two_task_batches(args: argparse.Namespace):
    """Checks and loading shared by ``qkov`` and ``conflicts``: --task-a / --task-b data files,
    --model, --out (new, empty, or a previous output with --overwrite), then the model and both
    tasks' batches."""
    from hf_fisher.artifacts.atomic import check_target

    paths = []
    for flag in ("task_a", "task_b"):
        args.data = getattr(args, flag)
        try:
            data_path, _ = check_model_and_data_args(args)
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
    target = check_target(args.out, allowed=is_circuit_file, what="analysis", overwrite=args.overwrite, flag="--out")
    check_device(args.device)
    samples = [read_samples(args, p) for p in paths]
    config, task_type = check_samples_against_config(args, samples[0] + samples[1])
    model, batches_a = load_model_and_batches(args, config, task_type, samples[0])
    batches_b = batches_for(args, model, config, task_type, samples[1])
    fisher = None
    if args.fisher is not None:
        from hf_fisher.artifacts.fisher import Fisher

        fisher = Fisher.from_pretrained(args.fisher)
    return model, batches_a, batches_b, layers, fisher, target


def add_two_task_options(p: argparse.ArgumentParser) -> None:
    """The options of a command on two tasks' data (all of ``qkov``'s and ``conflicts``' but their own)."""
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer for text data)")
    p.add_argument("--task-a", required=True, help="task A data (.txt / .jsonl)")
    p.add_argument("--task-b", required=True, help="task B data (.txt / .jsonl)")
    p.add_argument("--out", required=True, help="folder to write the results to (new, empty, or a previous output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out (never other files)")
    p.add_argument("--fisher", default=None, help="Fisher artifact (reduction param) to use instead of the tasks' own Fisher")
    p.add_argument("--layers", default=None, help="comma-separated layers to analyse (default all)")
    p.add_argument("--memory-budget-mb", type=float, default=512.0, help="bound on each task's stored per-sample gradients (default 512)")
    p.add_argument("--top", type=int, default=20, help="top entries reported (default 20)")
    add_task_data_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
