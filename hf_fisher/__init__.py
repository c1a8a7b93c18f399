"""hf_fisher: exact, fast Fisher information of Hugging Face transformers models.

Public API::

    import hf_fisher
    fisher = hf_fisher.collect(model, batches, reduction="group", task="math")
    fisher.save_pretrained("fisher-math")
    fisher = hf_fisher.Fisher.from_pretrained("fisher-math", model=model)

The public names are imported lazily (PEP 562): ``import hf_fisher`` itself does not import
torch, so light users of the package (``hf-fisher --help``, ``hf_fisher.errors``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule defining it
_LAZY = {
    "collect": "api",
    "FisherCollector": "collection.collector",
    "FisherCallback": "integrations.trainer",
    "EWCPenalty": "consumers.ewc",
    "forgetting_risk": "consumers.ewc",
    "merge_with_fisher": "consumers.merge.api",
    "prune": "consumers.prune.core",
    "PruneResult": "consumers.prune.core",
    "mask_overlap": "consumers.overlap",
    "task_overlap": "consumers.overlap",
    "perturb": "consumers.perturb",
    "perturbation_sweep": "consumers.perturb",
    "write_report": "consumers.report",
    "store_gradients": "collection.gradients",
    "GradientStore": "collection.gradients",
    "sample_conflicts": "consumers.circuits.conflicts",
    "qkov_interference": "consumers.circuits.qkov",
    "head_categories": "consumers.circuits.head_behaviour",
    "aggregate_by_category": "consumers.circuits.head_behaviour",
    "analyze": "consumers.analyze",
    "spectrum": "consumers.spectrum",
    "compare_estimators": "consumers.compare_estimators",
    "KFACFisher": "artifacts.kfac",
    "SpectrumResult": "consumers.spectrum",
    "scale_by_fisher": "consumers.natural_gradient",
    "EWCTrainer": "integrations.ewc_trainer",
    "EWCMixin": "integrations.ewc_trainer",
    "HfFisherError": "errors",
    "Fisher": "artifacts.fisher",
    "hookimpl": "hookspecs",
    "ModelLayout": "layout",
    "ParamGroups": "layout",
}

__all__ = ["EWCMixin", "EWCPenalty", "EWCTrainer", "Fisher", "FisherCallback", "FisherCollector", "GradientStore", "HfFisherError", "KFACFisher", "ModelLayout", "ParamGroups", "PruneResult", "SpectrumResult", "__version__", "aggregate_by_category", "analyze", "collect", "compare_estimators", "forgetting_risk", "head_categories", "hookimpl", "mask_overlap", "merge_with_fisher", "perturb", "perturbation_sweep", "prune", "qkov_interference", "sample_conflicts", "scale_by_fisher", "spectrum", "store_gradients", "task_overlap", "write_report"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .api import collect
    from .artifacts.fisher import Fisher
    from .artifacts.kfac import KFACFisher
    from .collection.collector import FisherCollector
    from .collection.gradients import GradientStore, store_gradients
    from .consumers.analyze import analyze
    from .consumers.circuits.conflicts import sample_conflicts
    from .consumers.circuits.head_behaviour import aggregate_by_category, head_categories
    from .consumers.circuits.qkov import qkov_interference
    from .consumers.compare_estimators import compare_estimators
    from .consumers.ewc import EWCPenalty, forgetting_risk
    from .consumers.merge.api import merge_with_fisher
    from .consumers.natural_gradient import scale_by_fisher
    from .consumers.overlap import mask_overlap, task_overlap
    from .consumers.perturb import perturb, perturbation_sweep
    from .consumers.prune.core import PruneResult, prune
    from .consumers.report import write_report
    from .consumers.spectrum import SpectrumResult, spectrum
    from .errors import HfFisherError
    from .hookspecs import hookimpl
    from .integrations.ewc_trainer import EWCMixin, EWCTrainer
    from .integrations.trainer import FisherCallback
    from .layout import ModelLayout, ParamGroups


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_fisher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
