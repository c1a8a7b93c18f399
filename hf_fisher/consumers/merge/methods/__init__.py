"""The built-in merge methods, one module per method or family (registered in
:mod:`hf_fisher.consumers.merge.registry`)."""

from .average import Average
from .dare import Dare
from .fisher import Fisher, FisherTaskVector
from .kfac import KFAC
from .regmean import FisherRegMean, RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties

#: every built-in, in the order ``hf-fisher plugins`` lists them
BUILTINS = (Fisher, FisherTaskVector, Average, TaskArithmetic, Ties, Dare, RegMean, FisherRegMean, KFAC)

__all__ = ["BUILTINS", "KFAC", "Average", "Dare", "Fisher", "FisherRegMean", "FisherTaskVector", "RegMean",
           "TaskArithmetic", "Ties"]
