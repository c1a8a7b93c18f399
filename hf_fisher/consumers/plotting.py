"""Small matplotlib helpers shared by the plots of the report and the circuit consumers (matplotlib
is imported by the callers, lazily; these only touch the objects they are given)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["discrete_colormap", "integer_ticks"]


def integer_ticks(axis, labels: Sequence[Any], *, max_ticks: int = 24, fontsize: float | None = None) -> None:
    """Ticks of an image axis at the integer cell positions ``0..len(labels)-1`` with ``labels``:
    all of them up to ``max_ticks``, else every k-th (k the smallest step that fits)."""
    n = len(labels)
    step = max(1, math.ceil(n / max_ticks))
    pos = list(range(0, n, step))
    axis.set_ticks(pos, [str(labels[i]) for i in pos], **({"fontsize": fontsize} if fontsize else {}))


def discrete_colormap(name: str, n: int):
    """``n`` discrete colours of the matplotlib colormap ``name``."""
    from matplotlib import colormaps

    return colormaps[name].resampled(max(n, 1))
