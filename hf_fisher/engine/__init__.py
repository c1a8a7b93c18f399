"""Exact per-sample gradients from one batched forward and backward.

- :mod:`.capture`: hooks that record module calls and receive output gradients;
- :mod:`.rules`: per-module-type rules turning a call into per-sample gradient parts;
- :mod:`.losses`: per-sample losses (causal LM, masked LM, classification) and normalisations;
- :mod:`.vision`: image / audio classification batches (``pixel_values``, ``input_values``);
- :mod:`.per_sample`: the engine that runs a batch and reduces the parts per parameter.
"""

from .per_sample import BatchReport, ContributionSink, PerSampleEngine, Target
from .rules import GradRule, ModuleCall, Part

__all__ = ["BatchReport", "ContributionSink", "GradRule", "ModuleCall", "Part", "PerSampleEngine", "Target"]
