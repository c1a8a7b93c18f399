"""Folders written atomically: check the target before any work, write into a temporary folder
beside it, rename into place.

One home for the rules every command that writes a folder follows (Fisher artifacts, merged
models, reports):

- :func:`check_target` runs *before* the work: the target must be new, empty, or (when allowed)
  hold only files of the kind being written; its parent must be writable.
- :func:`atomic_folder` yields a temporary folder beside the target; when the block succeeds the
  folder replaces the target in one rename (an existing target is moved aside first and restored
  if the second rename fails); when it fails nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import ArtifactError

TMP_PREFIX = ".tmp-hf-fisher-"
OLD_PREFIX = ".old-hf-fisher-"

#: predicate on a file name: True when the file belongs to what is being written
Allowed = Callable[[str], bool]


def check_target(target: str | os.PathLike, *, allowed: Allowed, what: str = "artifact", overwrite: bool = True) -> Path:
    """Validate ``target`` before any work; return it as an absolute path.

    A target that exists must be a folder; it may be replaced when it is empty, or when
    ``overwrite`` and every file in it is ``allowed`` (a previous artifact of the same kind).
    Raises :class:`ArtifactError` naming the problem and what to do.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    if target.exists():
        if not target.is_dir():
            raise ArtifactError(f"cannot save the {what} to {target}: a file with that name exists")
        names = [p.name for p in target.iterdir()]
        foreign = sorted(n for n in names if not allowed(n))
        if foreign:
            raise ArtifactError(
                f"refusing to overwrite {target}: it contains files that are not part of a {what} "
                f"({', '.join(foreign[:5])}). Save into a new or empty folder."
            )
        if names and not overwrite:
            raise ArtifactError(f"{target} already holds a {what}; pass overwrite=True (--overwrite) to replace it")
    return target


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` that replaces it when the block succeeds."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    try:
        yield tmp
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing an existing one safely."""
    if not target.exists():
        os.replace(tmp, target)
        return
    aside = target.parent / f"{OLD_PREFIX}{uuid.uuid4().hex}"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


__all__ = ["check_target", "atomic_folder", "swap_into_place", "TMP_PREFIX", "OLD_PREFIX"]
