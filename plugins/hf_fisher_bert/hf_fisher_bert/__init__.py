"""hf_fisher plugin for BERT-family encoders (the hook lives in :mod:`hf_fisher_bert.layout`)."""

__version__ = "0.1.0"
