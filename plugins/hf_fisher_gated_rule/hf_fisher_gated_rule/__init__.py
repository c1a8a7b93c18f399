"""hf_fisher plugin: :class:`GatedLinear` and its per-sample gradient rule :class:`GatedLinearRule`.

The hook lives in :mod:`hf_fisher_gated_rule.plugin` (entry point ``gated_linear_rule``).
"""

from hf_fisher_gated_rule.layers import GatedLinear
from hf_fisher_gated_rule.rule import GatedLinearRule

__version__ = "0.1.0"
__all__ = ["GatedLinear", "GatedLinearRule"]
