"""hf_fisher plugin: layouts of fused-QKV models (the hook lives in :mod:`hf_fisher_fused_qkv.adapter`)."""

__version__ = "0.1.0"
