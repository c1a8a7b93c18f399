"""Example third-party hf_fisher plugin (the hooks live in :mod:`hf_fisher_example.sequential`)."""

__version__ = "0.1.0"
