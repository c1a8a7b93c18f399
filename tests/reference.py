"""The brute-force per-sample reference, now public as :mod:`hf_fisher.testing` (kept for the tests' imports)."""

from hf_fisher.testing import *  # noqa: F403
from hf_fisher.testing import _logits, _token_losses  # noqa: F401  (used by a few tests)
