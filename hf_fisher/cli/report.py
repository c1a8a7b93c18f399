"""``hf-fisher report``: plots, a tall CSV and a readable summary of one or two Fisher artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_fisher.errors import InvalidInputError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher report`` to the subcommands ``sub``."""
    p = sub.add_parser("report", help="write plots, a tall CSV and a readable summary of one or two Fisher artifacts")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="one or two Fisher artifact folders")
    p.add_argument("--out", required=True, help="folder to write the report to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out (never other files)")
    p.add_argument("--top", type=int, default=10, help="hotspots listed per kind (default 10)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if len(args.artifacts) > 2:
        raise InvalidInputError(f"report takes one or two Fisher artifact folders, got {len(args.artifacts)}")
    if args.top < 1:
        raise InvalidInputError(f"--top must be >= 1 (got {args.top})")
    for a in args.artifacts:
        if not Path(a).is_dir():
            raise InvalidInputError(f"{a!r} is not a folder; pass Fisher artifact folders (hf-fisher collect --out)")
    from hf_fisher.artifacts.atomic import check_target
    from hf_fisher.consumers.report import _is_report_file, write_report

    check_target(args.out, allowed=_is_report_file, what="report", overwrite=args.overwrite, flag="--out")
    result = write_report(list(args.artifacts), args.out, k=args.top, overwrite=args.overwrite)
    print(result.summary)
    for note in result.notes:
        print(f"note: {note}")
    print(f"Wrote {', '.join(result.files)} to {args.out}")
    return 0
