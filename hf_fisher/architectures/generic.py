"""Built-in fallback adapter (``trylast``): any ``nn.Module``, no heads or MLP structure.

Groups follow the generic rules of :mod:`hf_fisher.architectures.builder`: one group per output
channel for ``nn.Linear`` (weight rows, bias entries) and HF ``Conv1D`` (weight columns, bias
entries), one per vocabulary row for ``nn.Embedding``, one group for anything else. ``attention``
and ``mlp`` are empty; ``num_layers`` is ``config.num_hidden_layers`` when the model has it, else
the number of distinct layer indices in the parameter names.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from hf_fisher.architectures.builder import LayoutBuilder
from hf_fisher.hookspecs import hookimpl
from hf_fisher.layout import ModelLayout

logger = logging.getLogger(__name__)

ADAPTER = "generic"
MODEL_TYPES = ("*",)  # any model no other adapter describes

_logged_model_types: set[str | None] = set()
_lock = threading.Lock()


def _log_once(model_type: str | None, model: Any) -> None:
    with _lock:
        if model_type in _logged_model_types:
            return
        _logged_model_types.add(model_type)
    what = model_type if model_type is not None else f"<{type(model).__name__} without config>"
    logger.info(
        "no adapter for model type %s; using generic per-output-channel groups (Fisher per parameter and per output "
        "channel are exact; heads and MLP channels are not described, so head importance, head pruning and QK-OV need "
        "an adapter: see plugins/README.md to write one)", what,
    )


def reset_log_once() -> None:
    """Forget which model types were already logged (for tests)."""
    with _lock:
        _logged_model_types.clear()


@hookimpl(trylast=True)
def hf_fisher_model_layout(model: Any) -> ModelLayout:
    """Generic per-output-channel layout of ``model`` (never None)."""
    b = LayoutBuilder(model, adapter=ADAPTER)
    _log_once(b.model_type, model)
    return b.build()
