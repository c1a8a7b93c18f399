"""The plugin guide (plugins/README.md) documents exactly the hooks of hf_fisher/hookspecs.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import hf_fisher.hookspecs as hookspecs

GUIDE = Path(__file__).resolve().parents[1] / "plugins" / "README.md"


def _hooks() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(hookspecs).items()
            if name.startswith("hf_fisher_") and callable(fn) and hasattr(fn, "hf_fisher_spec")}


def test_every_hook_has_a_section_with_its_signature():
    text = GUIDE.read_text(encoding="utf-8")
    hooks = _hooks()
    assert hooks, "no hook specifications found"
    for name, sig in hooks.items():
        args = ", ".join(sig.parameters)
        assert f"### `{name}({args})`" in text, f"plugins/README.md does not document {name}({args})"


def test_the_guide_names_no_hook_that_does_not_exist():
    text = GUIDE.read_text(encoding="utf-8")
    named = set(re.findall(r"\b(hf_fisher_(?:register_\w+|model_layout))\b", text))
    assert named <= set(_hooks()), f"plugins/README.md names unknown hooks {sorted(named - set(_hooks()))}"
