"""The built-in merge methods, one module per method or family (registered in
:mod:`hf_fisher.consumers.merge.registry`)."""

from .average import Average, Linear
from .dare import Dare
from .fisher import Fisher, FisherTaskVector
from .generalized import GENERALIZED, Breadcrumbs, BreadcrumbsTies, DareLinear, DareTies, Della, DellaLinear
from .kfac import KFAC
from .passthrough import Passthrough
from .regmean import FisherRegMean, RegMean
from .slerp import NuSlerp, Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties

#: every built-in, in the order ``hf-fisher plugins`` lists them
BUILTINS = (Fisher, FisherTaskVector, Average, TaskArithmetic, Ties, Dare, RegMean, FisherRegMean, KFAC,
            Linear, *GENERALIZED, Slerp, NuSlerp, Passthrough)

__all__ = ["BUILTINS", "KFAC", "Average", "Breadcrumbs", "BreadcrumbsTies", "Dare", "DareLinear", "DareTies",
           "Della", "DellaLinear", "Fisher", "FisherRegMean", "FisherTaskVector", "Linear", "NuSlerp", "Passthrough", "RegMean", "Slerp",
           "TaskArithmetic", "Ties"]
