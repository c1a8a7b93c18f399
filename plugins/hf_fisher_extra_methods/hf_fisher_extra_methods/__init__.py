"""hf_fisher plugin: extra merge methods (see :mod:`hf_fisher_extra_methods.model_stock`)."""
