"""``hf-fisher plugins``: the registered plugins, and those that failed to load."""

from __future__ import annotations

import argparse

from hf_fisher.tables import format_table


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher plugins`` to the subcommands ``sub``."""
    p = sub.add_parser("plugins", help="list registered plugins and plugins that failed to load")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from hf_fisher import plugins

    # Adapters are listed in the order they are asked (the first that recognises a model wins).
    described = plugins.describe()
    rows = [(r["kind"], r["name"], r["plugin"], r.get("distribution") or "-") for r in described]
    print(format_table(["kind", "name", "plugin", "distribution"], rows, title="Registered plugins"))
    adapters = [(r["name"], ", ".join(r["model_types"]) if r["model_types"] else "(not declared)", r["order"],
                 r.get("distribution") or "-", r.get("version") or "-") for r in described if r["kind"] == "adapter"]
    print()
    print(format_table(["adapter", "model types", "order", "distribution", "version"], adapters,
                       title="Architecture adapters (asked in this order; the first that knows a model wins)"))
    failed = plugins.failed_plugins()
    if failed:
        rows = [(f.get("name"), f.get("distribution"), f.get("stage"), f.get("error")) for f in failed]
        print()
        print(format_table(["plugin", "distribution", "stage", "error"], rows, title="Failed plugins (skipped)"))
    return 0
