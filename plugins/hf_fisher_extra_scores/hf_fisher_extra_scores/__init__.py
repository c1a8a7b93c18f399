"""hf-fisher-extra-scores: pruning criteria for :func:`hf_fisher.prune` added through the plugin
hook ``hf_fisher_register_prune_scores`` (see :mod:`hf_fisher_extra_scores.scores`)."""

__version__ = "0.1.0"
