"""What an artifact records besides its tensors: :class:`Counts` (how many samples and tokens it
averages over) and :class:`FisherMetadata` (what was estimated, on what, how). Shared by the
Fisher and the KFAC artifact.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hf_fisher.artifacts.format import dtype_str
from hf_fisher.errors import InvalidInputError

__all__ = ["Counts", "FisherMetadata", "library_version"]


def library_version() -> str:
    """The installed hf_fisher version (recorded in every artifact's metadata)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hf-fisher")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    try:
        import hf_fisher

        return str(getattr(hf_fisher, "__version__", "0.1.0"))
    except Exception:  # pragma: no cover - partially initialised package
        return "0.1.0"


@dataclass
class Counts:
    """How many samples and label tokens the Fisher averages over.

    ``samples``: samples that contributed (n of ``F = mean_i C_i``); ``tokens``: their label
    tokens; ``skipped``: samples with no label token; ``nonfinite``: samples dropped because a
    loss or gradient was NaN/Inf (``on_nonfinite="skip"``).
    """

    samples: int
    tokens: int
    skipped: int = 0
    nonfinite: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                number = operator.index(value) if not isinstance(value, float) else int(value)
            except TypeError:
                raise InvalidInputError(
                    f"Counts.{f.name} must be a non-negative integer, got {value!r} ({type(value).__name__})"
                ) from None
            if number < 0:
                raise InvalidInputError(f"Counts.{f.name} must be a non-negative integer, got {number}")
            setattr(self, f.name, int(number))

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Counts:
        """From ``fisher_config.json``'s ``counts`` (unknown keys ignored; bad values: InvalidInputError)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FisherMetadata:
    """Provenance of an artifact: what was estimated, on what, how. Dtypes are stored as strings.

    Unknown keys met when reading a newer artifact are kept in ``extra``.
    """

    task: str = "default"
    estimator: str = "empirical"
    reduction: str = "param"
    normalization: str = "mean"
    model_name_or_path: str | None = None
    revision: str | None = None
    model_type: str | None = None
    mode: str = "eval"
    accumulation_dtype: str | None = "float64"
    storage_dtype: str | None = None
    library_version: str = field(default_factory=library_version)
    data_description: str | None = None
    ema_decay: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accumulation_dtype = dtype_str(self.accumulation_dtype)
        self.storage_dtype = dtype_str(self.storage_dtype)
        if self.ema_decay is not None:
            self.ema_decay = float(self.ema_decay)
        if self.extra is None:
            self.extra = {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FisherMetadata:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        extra = dict(known.pop("extra", None) or {})
        extra.update(unknown)
        return cls(**known, extra=extra)
