"""Validation of an artifact's values and provenance on load: :class:`ValueCheck` (finite,
non-negative, all zero without samples), the registered-estimator check, the EMA resume state,
and how a ``strict=False`` load records what it let through (``metadata.extra["load_problems"]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from hf_fisher.artifacts.format import describe
from hf_fisher.errors import ArtifactError, InvalidInputError

__all__ = [
    "LOAD_PROBLEMS_KEY",
    "ValueCheck",
    "check_estimator_name",
    "ema_state_problem",
    "known_estimators",
    "record_problems",
    "value_problems",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- value checks
# One home for the rule every reader of stored Fisher data applies (Fisher, FisherReader, the
# KFAC artifact, the Trainer's checkpoint state, and the consumers given an in-memory Fisher):
# a Fisher is finite and non-negative (F = mean_i g_i ⊙ g_i; its variance and per-sample
# contributions too; a KFAC factor is finite with a non-negative diagonal), and it is all zeros
# when it averages over no sample. One NaN would make every merged weight or EWC step NaN; a
# negative value would be clamped to the merge floor and silently ignore that model.

#: the metadata.extra key where a load with strict=False records what it let through
LOAD_PROBLEMS_KEY = "load_problems"


def value_problems(t: torch.Tensor, nonnegative: str, zero: bool) -> dict[str, int]:
    """``{"NaN": n, "Inf": n, "negative": n, "non-zero": n}`` (only the non-zero counts) of ``t``;
    ``nonnegative``: "all" values, the "diagonal" (a square factor) or "none" must be >= 0;
    ``zero``: every value must be 0."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.numel() == 0:
        return {}
    x = t.detach()
    part = torch.diagonal(x) if nonnegative == "diagonal" and x.dim() == 2 else x
    # fast path, one reduction (NaN propagates into both ends, ±Inf shows at one): ~50x quicker
    # than counting, which only runs when something is wrong
    lo, hi = (float(v) for v in x.aminmax())
    ok = math.isfinite(lo) and math.isfinite(hi)
    if ok and nonnegative != "none":
        ok = (lo if part is x else float(part.amin())) >= 0
    if ok and zero:
        ok = lo == 0 and hi == 0
    if ok:
        return {}
    out = {"NaN": int(torch.isnan(x).sum()), "Inf": int(torch.isinf(x).sum())}
    if nonnegative != "none":
        out["negative"] = int((part < 0).sum())
    if zero:
        out["non-zero"] = int(((x != 0) & torch.isfinite(x)).sum())
    return {k: v for k, v in out.items() if v}


class ValueCheck:
    """Collects the invalid values of an artifact's tensors, then refuses them all at once.

    ``check = ValueCheck("Fisher artifact /x", strict=True, samples=n)``; ``check.add(key,
    tensor)`` for each tensor (``nonnegative="diagonal"`` for a square KFAC factor);
    ``check.finish()`` raises an :class:`~hf_fisher.errors.ArtifactError` naming every bad tensor
    (up to 5) with its counts of NaN / Inf / negative values (and non-zero values when
    ``samples == 0``), or with ``strict=False`` logs it as a WARNING and returns the message (the
    caller records it in ``metadata.extra["load_problems"]``).
    """

    def __init__(self, what: str, *, strict: bool = True, samples: int | None = None) -> None:
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        self.what, self.strict, self.samples = what, strict, samples
        self.found: dict[str, tuple[dict[str, int], int]] = {}

    def add(self, key: str, tensor: torch.Tensor, *, nonnegative: str = "all") -> None:
        problems = value_problems(tensor, nonnegative, zero=self.samples == 0)
        if problems:
            self.found[key] = (problems, tensor.numel())

    def message(self) -> str:
        parts = []
        for key, (problems, numel) in list(self.found.items())[:5]:
            counts = ", ".join(f"{n} {kind}" for kind, n in problems.items())
            parts.append(f"tensor {key!r} has {counts} (of {numel} values)")
        more = f"; and {len(self.found) - 5} more tensor(s)" if len(self.found) > 5 else ""
        zero = (" (counts.samples is 0, so every value must be 0)"
                if any("non-zero" in p for p, _ in self.found.values()) else "")
        return (
            f"{self.what} holds invalid values: {'; '.join(parts)}{more}{zero}. A Fisher is finite and "
            "non-negative (the mean of squared gradients; its variance and a KFAC factor's diagonal too), so "
            "the artifact is corrupt or was edited: collect, save or download it again"
        )

    def finish(self) -> str | None:
        if not self.found:
            return None
        msg = self.message()
        if self.strict:
            raise ArtifactError(
                msg + " (to inspect it anyway: hf-fisher show --no-strict, or from_pretrained(..., strict=False), "
                f"which logs a WARNING and records the problem in metadata.extra[{LOAD_PROBLEMS_KEY!r}])"
            )
        logger.warning("%s. Loaded anyway (strict=False); the problem is recorded in metadata.extra[%r]", msg,
                       LOAD_PROBLEMS_KEY)
        return msg


def known_estimators() -> list[str]:
    """The estimator names an artifact may carry: every registered estimator (built-ins and
    plugins, :func:`hf_fisher.plugins.estimators`)."""
    from hf_fisher import plugins

    return sorted(plugins.estimators())


def check_estimator_name(name: str, what: str, *, strict: bool = True) -> str | None:
    """:class:`ArtifactError` (or, with ``strict=False``, a WARNING and the message) when ``name``
    is not a registered estimator."""
    known = known_estimators()
    if name in known:
        return None
    msg = (f"{what} was made by the estimator {name!r}, which is not registered here (known: {known}); "
           "install the plugin that provides it, or the artifact's metadata is corrupt")
    if strict:
        raise ArtifactError(msg + " (to inspect it anyway: hf-fisher show --no-strict, or from_pretrained(..., strict=False))")
    logger.warning("%s. Loaded anyway (strict=False)", msg)
    return msg


def ema_state_problem(metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with the EMA weight sums an EMA Fisher keeps for resuming
    (``metadata.extra.ema_state``: ``weight_sum`` W > 0 and ``weight_sq_sum`` W2 with
    0 < W2 <= W², both finite), or None when absent or valid."""
    ema = (metadata.get("extra") or {}).get("ema_state", metadata.get("ema_state"))
    if ema is None:
        return None
    if not isinstance(ema, Mapping):
        return f"must be an object with weight_sum and weight_sq_sum, got {describe(ema)}"
    values = {}
    for key in ("weight_sum", "weight_sq_sum"):
        v = ema.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"has {key} {describe(v)}, which must be a positive finite number"
        values[key] = float(v)
    if values["weight_sq_sum"] > values["weight_sum"] ** 2 * (1 + 1e-9):
        return (f"has weight_sq_sum {values['weight_sq_sum']!r} > weight_sum² ({values['weight_sum'] ** 2!r}), "
                "which no set of non-negative weights gives")
    return None


def record_problems(metadata: Any, problems: list[str]) -> Any:
    """``metadata`` (a :class:`~hf_fisher.artifacts.metadata.FisherMetadata`) with ``problems`` appended
    to ``extra["load_problems"]`` (a copy; unchanged when there are none)."""
    if not problems:
        return metadata
    extra = dict(metadata.extra)
    extra[LOAD_PROBLEMS_KEY] = list(extra.get(LOAD_PROBLEMS_KEY) or []) + problems
    return replace(metadata, extra=extra)
