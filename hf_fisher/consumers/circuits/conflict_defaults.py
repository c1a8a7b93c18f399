"""The defaults of the sample-conflict test, in one torch-free place: :func:`hf_fisher.consumers.circuits.conflicts.sample_conflicts`,
``analyze`` (:class:`hf_fisher.consumers.analyze.AnalysisConfig`) and ``hf-fisher conflicts`` all read them from here."""

DEFAULT_ALPHA = 0.05
"""False-discovery rate (Benjamini–Hochberg) of the conflict test."""

DEFAULT_MIN_EFFECT_SIZE = 0.05
"""Effect-size floor: a conflict needs ``cos ≤ −0.05`` in natural-gradient space."""
