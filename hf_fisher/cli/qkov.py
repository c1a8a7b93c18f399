"""``hf-fisher qkov``: QK-OV interference between two tasks per layer, head and Q/K/V/O block."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_fisher.cli.two_tasks import add_two_task_options, two_task_batches


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher qkov`` to the subcommands ``sub``."""
    p = sub.add_parser("qkov", help="QK-OV interference between two tasks per layer, head and Q/K/V/O block")
    add_two_task_options(p)
    p.add_argument("--variant", choices=("unsigned", "signed", "symmetric", "natural"), default="unsigned", help="interference metric (default unsigned)")
    p.add_argument("--aggregate", choices=("mean", "sum"), default="mean", help="mean or sum over a slice (default mean)")
    p.add_argument("--head-categories", action="store_true", help="also categorise the heads (induction, previous-token, ...) and aggregate by category")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    model, a, b, layers, fisher, target = two_task_batches(args)
    from hf_fisher.artifacts.atomic import atomic_folder
    from hf_fisher.consumers.circuits.qkov import qkov_interference

    result = qkov_interference(model, a, b, fisher=fisher, layers=layers, variant=args.variant, aggregate=args.aggregate,
                               memory_budget_mb=args.memory_budget_mb, top_k=args.top, progress=not args.no_progress,
                               task_names=(Path(args.task_a).stem or "task A", Path(args.task_b).stem or "task B"))
    extra = {}
    if args.head_categories:
        from hf_fisher.consumers.circuits.head_behaviour import aggregate_by_category, head_categories

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
