"""The ``hf-fisher`` command line.

::

    hf-fisher collect --model DIR --data FILE.txt|FILE.jsonl --task NAME --out DIR [options]
    hf-fisher show DIR [--top 10]
    hf-fisher plugins
    hf-fisher demo [--out DIR]
    hf-fisher merge RECIPE.yaml --out DIR [options]
    hf-fisher compare-estimators --model DIR --data FILE [--methods empirical,true,kfac,spectrum] [options]
    hf-fisher prune --model DIR --sparsity 0.3 --out DIR [options]
    hf-fisher report ARTIFACT_DIR [ARTIFACT_DIR] --out DIR
    hf-fisher qkov | conflicts --model DIR --task-a FILE --task-b FILE --out DIR [options]
    hf-fisher analyze --model DIR --task NAME=FILE [--task NAME=FILE ...] --out DIR [options]

One module per command (:mod:`hf_fisher.cli.collect`, :mod:`~hf_fisher.cli.show`, ...), each with
its ``add_parser(sub)`` (its options) beside its ``run(args)`` (its handler); what they share (the
checks made before any work, loading the model and the data, errors to exit codes) is in
:mod:`hf_fisher.cli.common`. :func:`build_parser` puts the commands together in :data:`COMMANDS`'
order.

Every error hf_fisher raises on purpose (:class:`hf_fisher.errors.HfFisherError`), an ``OSError``
(a folder that cannot be written, a full disk...), and a model or tokenizer that cannot be loaded,
ends the command with a one-line message on stderr and exit code 2 (no traceback). Output
closed early (``hf-fisher plugins | head -1``) ends the command quietly with exit code 141
(128 + SIGPIPE, like other Unix tools).

Everything is checked before the work: the arguments, the device, the estimator, the output
folder (overwrite rule, writable, enough free disk space for the artifact), the data file
(encoding, JSON, labels against the model's ``num_labels``) -- all before the model's weights
are loaded, so a typo never costs a collection. Merge methods and prune scores are names of the
plugin registries (:func:`hf_fisher.plugins.merge_methods`, :func:`hf_fisher.plugins.prune_scores`),
checked by the consumers' own checks before any model is loaded, never by a hard-coded list.

Building the parser imports nothing heavy (no torch): ``hf-fisher --help`` is fast. ``python -m
hf_fisher.cli`` is ``hf-fisher``.
"""

from __future__ import annotations

import argparse
import shutil  # noqa: F401  (``hf_fisher.cli.shutil``: kept for callers that patch ``shutil.disk_usage`` through it)
import sys
from collections.abc import Sequence

from hf_fisher.cli import (
    analyze,
    collect,
    compare_estimators,
    conflicts,
    demo,
    merge,
    plugins,
    prune,
    qkov,
    report,
    show,
)
from hf_fisher.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    check_output_folder,
    configure_logging,
    estimate_artifact_bytes,
    position_limit,
    run_command,
    safetensors_shapes,
    silence_stdout,
)
from hf_fisher.tables import format_report, format_table

__all__ = ["build_parser", "check_output_folder", "estimate_artifact_bytes", "format_report", "format_table", "main"]

#: The commands, in the order ``hf-fisher --help`` lists them.
COMMANDS = (collect, show, plugins, demo, merge, compare_estimators, prune, report, qkov, conflicts, analyze)

# The names these helpers had when the command line was one module (tests and callers use them).
_safetensors_shapes = safetensors_shapes
_position_limit = position_limit


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-fisher`` argument parser: each command of :data:`COMMANDS` adds its own subparser
    (imports nothing heavy: no torch)."""
    parser = argparse.ArgumentParser(
        prog="hf-fisher",
        description="Exact per-sample Fisher information of Hugging Face transformers models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        sys.stdout.flush()
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    configure_logging(args.verbose)
    return run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-fisher`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        return _run(argv)
    except BrokenPipeError:  # e.g. `hf-fisher plugins | head -1`: the reader is gone, stop quietly
        silence_stdout()
        return EXIT_BROKEN_PIPE
