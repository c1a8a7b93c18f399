"""Deprecated: ``hf_fisher.estimators.spectrum`` was split in two (this path goes in the next release).

- the spectrum consumer (:func:`spectrum`, :class:`SpectrumResult`, :class:`BlockSpectrum`,
  :func:`capacity_metrics`, :func:`lanczos`, :func:`hutchinson_trace`, :func:`slq_density`) is
  :mod:`hf_fisher.consumers.spectrum`;
- the curvature operators it measures (:class:`EmpiricalFisherOperator`, :class:`GGNOperator`,
  :func:`block_definitions`) are :mod:`hf_fisher.estimators.curvature`.

Every name of both modules (private ones included) is re-exported here, except the consumer's
hook implementation: registering this module as a plugin registers nothing twice.
"""

import warnings

from hf_fisher.consumers import spectrum as _consumer
from hf_fisher.estimators import curvature as _curvature

warnings.warn(
    "hf_fisher.estimators.spectrum was split: import spectrum / SpectrumResult / capacity_metrics / ... from "
    "hf_fisher.consumers.spectrum and the curvature operators from hf_fisher.estimators.curvature "
    "(the old path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

for _module in (_curvature, _consumer):
    globals().update(
        {k: v for k, v in vars(_module).items() if not k.startswith("__") and not k.startswith("hf_fisher_")}
    )
del _module

__all__ = sorted(set(_curvature.__all__) | (set(_consumer.__all__) - {"hf_fisher_register_consumers"}))
