"""The hf_fisher hooks of this plugin: ``register(GatedLinear, GatedLinearRule())``."""

from __future__ import annotations

from hf_fisher.hookspecs import hookimpl
from hf_fisher_gated_rule.layers import GatedLinear
from hf_fisher_gated_rule.rule import GatedLinearRule

RULE = GatedLinearRule()


@hookimpl
def hf_fisher_register_grad_rules(register):
    register(GatedLinear, RULE)
