"""``hf-fisher show``: the top heads, channels and per-layer totals of a Fisher artifact."""

from __future__ import annotations

import argparse

from hf_fisher.errors import InvalidInputError
from hf_fisher.tables import format_report


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher show`` to the subcommands ``sub``."""
    p = sub.add_parser("show", help="print the top heads, channels and per-layer totals of an artifact")
    p.add_argument("dir", help="folder of a Fisher artifact")
    p.add_argument("--top", type=int, default=10, help="rows in the heads and channels tables (default 10)")
    p.add_argument("--no-strict", action="store_true",
                   help="show an artifact with invalid values (NaN, Inf, negative) or an unknown estimator anyway, "
                        "with a warning per problem, to inspect it")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise InvalidInputError(f"--top must be >= 0 (got {args.top})")
    from hf_fisher.artifacts.fisher import Fisher

    fisher = Fisher.from_pretrained(args.dir, strict=not args.no_strict)
    for problem in fisher.metadata.extra.get("load_problems") or []:
        print(f"WARNING: {problem}")
    print(format_report(fisher, top=args.top, source=str(args.dir)))
    return 0
