"""``hf-fisher conflicts``: per-sample gradient conflicts between two tasks (sign-symmetric null,
Benjamini-Hochberg FDR, effect-size floor, forensic claims)."""

from __future__ import annotations

import argparse

from hf_fisher.cli.two_tasks import add_two_task_options, two_task_batches
from hf_fisher.consumers.circuits.conflict_defaults import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE
from hf_fisher.errors import InvalidInputError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher conflicts`` to the subcommands ``sub``."""
    p = sub.add_parser("conflicts", help="per-sample gradient conflicts between two tasks (sign-symmetric null, BH-FDR, effect-size floor, forensic claims)")
    add_two_task_options(p)
    p.add_argument("--groups", choices=("param", "layer"), default="param", help="conflicts per parameter or per layer, plus overall (default param)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"false discovery rate (default {DEFAULT_ALPHA:g})")
    p.add_argument("--min-effect-size", type=float, default=DEFAULT_MIN_EFFECT_SIZE,
                   help=f"a conflict needs cosine <= -this (default {DEFAULT_MIN_EFFECT_SIZE:g}; 0: any negative cosine)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.alpha < 1.0:
        raise InvalidInputError(f"--alpha must be in (0, 1) (got {args.alpha})")
    if not 0.0 <= args.min_effect_size < 1.0:
        raise InvalidInputError(f"--min-effect-size must be in [0, 1) (got {args.min_effect_size})")
    model, a, b, layers, fisher, target = two_task_batches(args)
    from hf_fisher.artifacts.atomic import atomic_folder
    from hf_fisher.consumers.circuits.conflicts import sample_conflicts

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
