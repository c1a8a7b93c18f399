"""``hf-fisher demo``: two tiny tasks end to end (:mod:`hf_fisher.demo`)."""

from __future__ import annotations

import argparse

from hf_fisher.demo import add_arguments  # light: the demo imports torch only when it runs


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher demo`` to the subcommands ``sub``."""
    p = sub.add_parser("demo", help="two tiny tasks end to end: Trainer + FisherCallback, top heads, pruning, Fisher merging, report")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from hf_fisher import demo

    demo.run(args)
    return 0
