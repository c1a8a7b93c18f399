"""The two arithmetic conventions of the task-vector methods (``convention="mergekit"`` / ``"hf_fisher"``)."""

from __future__ import annotations

from hf_fisher.errors import InvalidInputError


def check_convention(method, **mergekit_only) -> None:
    """Refuse mergekit's options set under the ``"hf_fisher"`` convention (which cannot honour them)."""
    if method.convention != "hf_fisher":
        return
    bad = sorted(k for k, v in mergekit_only.items() if v is not None)
    if bad:
        raise InvalidInputError(f"method {method.name!r}: option(s) {bad} are mergekit's and need convention='mergekit' "
                                "(convention='hf_fisher' has no such setting)")


class ConventionOptions:
    """Mixin (before :class:`~hf_fisher.consumers.merge.base.MergeMethod` in the bases) for methods
    with a ``convention`` option: the options in ``mergekit_only`` are refused under
    ``convention="hf_fisher"`` when set, and left out of its recipe together with
    ``mergekit_hidden`` (options that never change the numbers, e.g. ``int8_mask``)."""

    mergekit_only: tuple[str, ...] = ()
    mergekit_hidden: tuple[str, ...] = ()

    def __init__(self, **options) -> None:
        super().__init__(**options)
        check_convention(self, **{k: getattr(self, k) for k in self.mergekit_only})

    def parameters(self):
        out = super().parameters()
        if self.convention == "hf_fisher":
            for k in self.mergekit_only + self.mergekit_hidden:
                out.pop(k, None)
        return out
