"""Folders written atomically: check the target before any work, write into a temporary folder
beside it, rename into place, and clean up after a save that was killed half-way.

One home for the rules every command that writes a folder follows (Fisher artifacts, merged
models, reports):

- :func:`check_target` runs *before* the work: it first repairs what an interrupted earlier save
  of the same target left behind (:func:`recover`) and removes the stale temporary folders of
  saves of *other* targets in the same parent folder (:func:`sweep`), then checks that the target
  is new, empty, or (when allowed) holds only files of the kind being written; that it is not,
  does not contain and is not inside one of the command's *inputs* (``inputs=``: replacing the
  input model's own folder would delete it); and that the folder where it will be created can be
  written to (a probe file is created and removed there). Every refusal is an
  :class:`~hf_fisher.errors.ArtifactError` naming the user's path, raised before any work.
- A target that is a symbolic link to a folder stays a link: the new folder is written beside the
  link's (final) destination and replaces that destination atomically; the link itself is kept.
- :func:`atomic_folder` yields a temporary folder beside the target. When the block succeeds,
  the folder gets the permissions a user's umask gives (folders ``0o777 & ~umask``, files
  ``0o666 & ~umask``; when it replaces an existing folder, the new folder gets the old folder's
  mode), every file and folder in it is fsync'ed, and it replaces the target: one rename for a new
  target; for an existing one ``target -> backup`` then ``temporary -> target``, the parent folder
  fsync'ed after the renames, then the backup removed. When the block fails nothing is left
  behind and an existing target is untouched.
- :func:`recover` (called by :func:`check_target`, :func:`atomic_folder` and by loaders) deals
  with the leftovers of a process that died during a save:

  * a *backup* ``.old-hf-fisher-<target name>-...`` with no target means the process died between
    the two renames of an overwrite: the backup (the previous, complete artifact) is renamed back
    to the target, so the target always holds the old or the new folder, never none;
  * other leftovers of the same target (temporary folders ``.tmp-hf-fisher-<target name>-...``,
    backups next to an existing target) are removed, but only when they are *stale*.

Names and staleness. Temporary and backup folders are named
``<prefix><target name>-<pid>.<host>-<random>``: the target's name (long names are shortened and
hashed) so that cleaning one target never touches another target's folders, and the pid of the
writing process plus a short hash of the host name. A save holds an exclusive ``flock`` on its
temporary folder for as long as it runs (where the file system supports it), and renames happen
under a short ``flock`` on the parent folder. A leftover is stale — safe to remove or restore —
when no live save can own it:

- it is not locked (a running save's temporary folder is), and
- its process is dead on this host, or the folder is older than :data:`STALE_AFTER_S` seconds
  (the process id was reused; a running save keeps its folder locked or, for a backup being
  deleted, recently modified).

Without file locks (some network file systems, Windows) only a dead process on this host makes a
temporary folder stale. Leftovers of *other* targets in the same parent (:func:`sweep`, at every
save) are removed only when they are not locked, their process is dead on this host, and they have
not changed for :data:`STALE_AFTER_S` seconds; a backup of another target only when that target
exists (otherwise it is the previous version of that target, restored at its next load or save). Leftovers of another host or of a running process are kept and reported
(:class:`Recovery.kept`, logged at INFO level).

Test hook: when the environment variable :data:`TEST_KILL_ENV` (``HF_FISHER_TEST_KILL_AT``) equals
one of :data:`KILL_POINTS`, the process kills itself with SIGKILL at that point of a save. It exists
only for the fault-injection tests (tests/test_crash_safety.py); never set it otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hf_fisher.errors import ArtifactError

__all__ = [
    "KILL_POINTS",
    "OLD_PREFIX",
    "STALE_AFTER_S",
    "TEST_KILL_ENV",
    "TMP_PREFIX",
    "Leftover",
    "Recovery",
    "atomic_folder",
    "check_not_input",
    "check_target",
    "check_writable",
    "leftovers",
    "recover",
    "scratch_folder",
    "swap_into_place",
    "sweep",
]

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-hf-fisher-"
OLD_PREFIX = ".old-hf-fisher-"
#: a leftover whose (live-looking) process id is older than this is taken as a reused pid
STALE_AFTER_S = 30.0
#: how long to wait for another save's renames in the same parent folder
LOCK_TIMEOUT_S = 60.0
#: test hook (see the module docstring): the kill point, read from the environment
TEST_KILL_ENV = "HF_FISHER_TEST_KILL_AT"
#: "tmp-created": the temporary folder exists, nothing written; "tmp-complete": the temporary
#: folder is written and fsync'ed, not renamed; "between-renames": an existing target has been
#: moved to its backup, the temporary folder not yet renamed to the target; "after-swap": the new
#: folder is in place, the backup not yet removed.
KILL_POINTS = ("tmp-created", "tmp-complete", "between-renames", "after-swap")

#: predicate on a file name: True when the file belongs to what is being written
Allowed = Callable[[str], bool]

try:  # POSIX advisory locks
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:8]


# ---------------------------------------------------------------------------- public API
def check_target(
    target: str | os.PathLike,
    *,
    allowed: Allowed,
    what: str = "artifact",
    overwrite: bool = True,
    inputs: Iterable[tuple[str, object]] = (),
    flag: str | None = None,
) -> Path:
    """Validate ``target`` before any work; return it as an absolute path (a link is not resolved).

    The one place of the rules every command that writes a folder follows:

    - repairs the leftovers of an interrupted earlier save of ``target`` (:func:`recover`: a
      previous artifact left in its backup is restored, stale temporary folders are removed) and
      removes stale temporary folders of other targets in the same parent (:func:`sweep`);
    - a target that exists must be a folder (or a link to one); it may be replaced when it is
      empty, or when ``overwrite`` and every file in it is ``allowed`` (a previous output of the
      same kind);
    - ``inputs``: ``(label, path)`` pairs of what the command reads (``("--model", "M")``); the
      target may not be, contain or lie inside an existing one (:func:`check_not_input`);
    - the folder where the target will be created is writable (:func:`check_writable`).

    ``flag`` names the argument in messages (``"--out"``, ``"output_dir"``). Raises
    :class:`ArtifactError` naming the problem, the user's path and what to do.
    """
    user = Path(os.path.abspath(os.fspath(target)))
    target = _resolved(user)
    where = f"{flag} {user}" if flag else str(user)
    check_not_input(user, inputs, what=what, flag=flag)
    if target.parent.is_dir():
        rec = recover(target, what=what)
        if rec.backup is not None and not target.exists():
            raise ArtifactError(
                f"an earlier save of the {what} {user} was interrupted and its previous version is in "
                f"{rec.backup}, which could not be moved back ({rec.error}); rename it to {target.name} "
                "by hand, then save again"
            )
        sweep(target.parent)
    if os.path.lexists(target):
        if not target.is_dir():
            raise ArtifactError(f"cannot save the {what} to {where}: a file with that name exists")
        try:
            names = [p.name for p in target.iterdir()]
        except PermissionError as e:
            raise ArtifactError(f"cannot save the {what} to {where}: cannot read it ({e.strerror})") from None
        foreign = sorted(n for n in names if not allowed(n))
        if foreign:
            raise ArtifactError(
                f"refusing to overwrite {where}: it contains files that are not part of a {what} "
                f"({', '.join(foreign[:5])}). Save into a new or empty folder."
            )
        if names and not overwrite:
            raise ArtifactError(f"{where} already holds a {what}; pass overwrite=True (--overwrite) to replace it")
    check_writable(user, what=what, flag=flag)
    return user


def check_writable(target: str | os.PathLike, *, what: str = "artifact", flag: str | None = None) -> Path:
    """The folder where ``target`` (a link: its destination) will be created -- its parent, or the
    nearest existing folder above it -- accepts new entries: a probe file is created there and
    removed. Returns that folder; :class:`ArtifactError` naming ``target`` otherwise."""
    user = Path(os.path.abspath(os.fspath(target)))
    real = _resolved(user)
    where = f"{flag} {user}" if flag else str(user)
    base = real.parent
    while not os.path.lexists(base) and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise ArtifactError(f"cannot write the {what} to {where}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hf-fisher-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactError(
            f"cannot write the {what} to {where}: {base} is not writable ({e.strerror or e}); "
            f"choose another {flag or 'folder'}"
        ) from None
    return base


def check_not_input(
    target: str | os.PathLike, inputs: Iterable[tuple[str, object]], *, what: str = "artifact", flag: str | None = None
) -> None:
    """Refuse a ``target`` that is, contains, or lies inside one of the existing local ``inputs``
    (``(label, path)`` pairs; Hub ids and missing paths are skipped): replacing it would delete
    the input (or write into it). Paths are compared after resolving links."""
    user = Path(os.path.abspath(os.fspath(target)))
    real = Path(os.path.realpath(user))
    where = f"{flag} {user}" if flag else str(user)
    for label, path in inputs:
        if path is None or not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
            continue
        inp = Path(os.path.realpath(path))
        if real == inp:
            how = "is"
        elif inp.is_relative_to(real):
            how = "contains"
        elif real.is_relative_to(inp):
            how = "is inside"
        else:
            continue
        raise ArtifactError(
            f"refusing to write the {what} to {where}: it {how} the input {label} {os.fspath(path)}, which "
            f"{'the new folder would delete' if how != 'is inside' else 'would be changed'}. Choose "
            f"{'another' if not flag else 'another ' + flag} folder outside the inputs."
        )


def sweep(parent: str | os.PathLike) -> list[Path]:
    """Remove the stale leftovers of interrupted saves of *any* target in ``parent``; return them.

    Only folders named by this library (``.tmp-hf-fisher-...``, ``.old-hf-fisher-...``) are
    looked at. A temporary folder is removed when it is not locked, its process is dead on this
    host and it has not changed for :data:`STALE_AFTER_S` seconds (a save that is running keeps its
    folder locked). A backup is removed on the same conditions only when its target exists (the
    leftover of a completed overwrite); a backup without its target is the previous version of that
    target, restored by its next load or save (:func:`recover`), and kept. Never raises.
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        for prefix, kind in ((TMP_PREFIX, "tmp"), (OLD_PREFIX, "old")):
            if not entry.name.startswith(prefix):
                continue
            parsed = _parse_name(entry.name[len(prefix):])
            try:
                if parsed is None or not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            key, pid, host = parsed
            if kind == "old" and not (parent / key).is_dir():
                continue
            lo = _judge(Path(entry.path), kind, pid, host)
            if not (lo.stale and lo.local and _pid_alive(pid) is False and _age(lo.path) > STALE_AFTER_S):
                continue
            shutil.rmtree(lo.path, ignore_errors=True)
            if not os.path.lexists(lo.path):
                removed.append(lo.path)
                logger.info("removed %s, left by an interrupted save (its process %d is dead)", lo.path, pid)
    return removed


def _resolved(path: Path) -> Path:
    """``path``, or where it leads when it is a symbolic link (the link is kept, its destination replaced)."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, what: str = "artifact") -> Iterator[Path]:
    """A temporary folder beside ``target`` that replaces it when the block succeeds.

    A ``target`` that is a link to a folder is kept: its destination is replaced. The parent
    folder is created if needed; :func:`recover` and :func:`sweep` run first. The temporary folder
    is ``.tmp-hf-fisher-<target name>-<pid>.<host>-<random>``, locked for the duration of the
    block. On success: permissions (umask; the old target's mode when one exists), fsync of every
    file and folder, then :func:`swap_into_place`. On any exception (KeyboardInterrupt included)
    the temporary folder is removed and the target is left as it was.
    """
    target = _resolved(Path(os.path.abspath(os.fspath(target))))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(target, what=what)
    sweep(parent)
    tmp = _fresh_name(TMP_PREFIX, target)
    os.mkdir(tmp, 0o777)  # the umask applies: the mode a user's new folder gets
    lock = _lock_folder(tmp)
    try:
        new_mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o777 & ~umask (plus an inherited setgid bit)
        _test_kill_point("tmp-created")
        yield tmp
        _finish(tmp, target, new_mode)
        _test_kill_point("tmp-complete")
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


@contextlib.contextmanager
def scratch_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A working folder beside ``target`` (its parent is created), removed when the block ends.

    For work that builds several atomically saved folders before the final :func:`atomic_folder`
    (it is not locked, so saves may nest inside it). It is named like a temporary folder of this
    library (``.tmp-hf-fisher-<target name>~scratch-<pid>.<host>-<random>``), so that when its
    process is killed, :func:`sweep` removes it at a later save in the same folder once its process
    is dead; never while it runs.
    """
    target = _resolved(Path(os.path.abspath(os.fspath(target))))
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f"{TMP_PREFIX}{_target_key(target.name)}~scratch-{os.getpid()}.{_HOST}-{uuid.uuid4().hex[:12]}"
    os.mkdir(scratch, 0o777)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def swap_into_place(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing an existing one safely.

    Under the parent folder's lock: a new target is one rename. An existing target is renamed to
    a backup ``.old-hf-fisher-<target name>-...``, then ``tmp`` to ``target`` (if that fails the
    backup is renamed back and the error re-raised); the parent folder is fsync'ed; finally the
    backup is removed. A process killed between the two renames leaves the backup, which the
    next save or load restores (:func:`recover`).
    """
    tmp, target = Path(tmp), Path(target)
    parent = target.parent
    with _parent_lock(parent):
        if not target.exists():
            os.replace(tmp, target)
            _fsync_dir(parent)
            return
        aside = _fresh_name(OLD_PREFIX, target)
        os.rename(target, aside)
        _test_kill_point("between-renames")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _fsync_dir(parent)
        _test_kill_point("after-swap")
    if os.path.islink(aside):  # the target was a link to a folder: the link is replaced, not its folder
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)


@dataclass
class Leftover:
    """A temporary (``kind="tmp"``) or backup (``kind="old"``) folder of a save of some target.

    ``pid``: the writing process; ``local``: whether it was written on this host; ``stale``: no
    live save can own it (see the module docstring); ``reason``: why, or why not.
    """

    path: Path
    kind: str
    pid: int
    local: bool
    stale: bool
    reason: str


@dataclass
class Recovery:
    """What :func:`recover` did for one target.

    ``restored``: the backup renamed back to the target (the target was missing); ``backup``: a
    stale backup that should have been restored but could not be (``error`` says why; with
    ``restore=False`` the backup that would have been restored); ``removed``: stale leftovers
    deleted; ``kept``: leftovers left in place because a running save may own them.
    """

    restored: Path | None = None
    backup: Path | None = None
    error: str | None = None
    removed: list[Path] = field(default_factory=list)
    kept: list[Leftover] = field(default_factory=list)


def leftovers(target: str | os.PathLike) -> list[Leftover]:
    """The temporary and backup folders of saves of ``target`` found beside it (newest first).

    Only folders named for this target are listed (another target's folders, and folders of
    other tools, are never touched).
    """
    target = _resolved(Path(os.path.abspath(os.fspath(target))))
    key = _target_key(target.name)
    out: list[Leftover] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return out
    for entry in entries:
        for prefix, kind in ((TMP_PREFIX, "tmp"), (OLD_PREFIX, "old")):
            if not entry.name.startswith(prefix):
                continue
            parsed = _parse_name(entry.name[len(prefix):])
            if parsed is None or parsed[0] != key:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            _, pid, host = parsed
            out.append(_judge(Path(entry.path), kind, pid, host))
    out.sort(key=lambda lo: _age(lo.path))
    return out


def recover(target: str | os.PathLike, *, what: str = "artifact", restore: bool = True, clean: bool = True) -> Recovery:
    """Repair what interrupted saves of ``target`` left beside it; never raises for a leftover.

    Under the parent folder's lock (so no save is between its renames):

    - ``target`` missing and a stale backup exists: the newest backup is renamed to ``target``
      (``restore=True``; logged as a warning) — it is the complete previous artifact of an
      overwrite that died between its two renames. If the rename fails, :attr:`Recovery.backup`
      names the backup and :attr:`Recovery.error` the reason.
    - with ``clean=True``: every other stale leftover of ``target`` is removed (logged at INFO).
    - leftovers that a running save may own are kept (:attr:`Recovery.kept`).
    """
    target = _resolved(Path(os.path.abspath(os.fspath(target))))  # a link: its destination's leftovers
    rec = Recovery()
    if not target.parent.is_dir():
        return rec
    with _parent_lock(target.parent):
        found = leftovers(target)
        stale_old = [lo for lo in found if lo.kind == "old" and lo.stale]
        if not os.path.lexists(target) and stale_old:
            newest = stale_old[0]
            if restore:
                try:
                    os.rename(newest.path, target)
                    _fsync_dir(target.parent)
                except OSError as e:
                    rec.backup, rec.error = newest.path, f"{type(e).__name__}: {e}"
                    logger.warning("could not restore %s to %s: %s", newest.path, target, e)
                else:
                    rec.restored = newest.path
                    logger.warning(
                        "an earlier save of the %s %s was interrupted between its two renames; restored "
                        "the previous version from %s", what, target, newest.path.name,
                    )
            else:
                rec.backup = newest.path
            found = [lo for lo in found if lo is not newest]
    for lo in found:
        if not lo.stale:
            rec.kept.append(lo)
            logger.info("left %s in place: %s", lo.path, lo.reason)
        elif clean:
            shutil.rmtree(lo.path, ignore_errors=True)
            if not os.path.lexists(lo.path):
                rec.removed.append(lo.path)
                logger.info("removed %s, left by an interrupted save of %s (%s)", lo.path.name, target, lo.reason)
            else:
                rec.kept.append(lo)
                logger.info("could not remove %s, left by an interrupted save of %s", lo.path, target)
    return rec


# ---------------------------------------------------------------------------- names
def _target_key(name: str) -> str:
    """The target's name as it appears in its leftovers' names (long names: shortened + hash)."""
    if len(name.encode("utf-8", "surrogatepass")) <= 120:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    short = name
    while len(short.encode("utf-8", "surrogatepass")) > 60:
        short = short[:-1]
    return f"{short}~{digest}"


def _fresh_name(prefix: str, target: Path) -> Path:
    return target.parent / f"{prefix}{_target_key(target.name)}-{os.getpid()}.{_HOST}-{uuid.uuid4().hex[:12]}"


def _parse_name(rest: str) -> tuple[str, int, str] | None:
    """``<key>-<pid>.<host>-<random>`` -> (key, pid, host), or None for a foreign name."""
    parts = rest.rsplit("-", 2)
    if len(parts) != 3:
        return None
    key, owner, token = parts
    pid, dot, host = owner.partition(".")
    if not key or not dot or not pid.isdigit() or not token.isalnum():
        return None
    return key, int(pid), host


# ---------------------------------------------------------------------------- staleness
def _age(path: Path) -> float:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0.0
    return max(0.0, time.time() - max(st.st_mtime, st.st_ctime))


def _pid_alive(pid: int) -> bool | None:
    """True/False on POSIX; None where it cannot be told (Windows)."""
    if os.name != "posix":
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def _locked(path: Path) -> bool | None:
    """Whether a running save holds the folder's lock; None when locks are not supported."""
    fd = _lock_folder(path, busy="busy")
    if fd == "busy":
        return True
    if fd is None:
        return None
    _fcntl.flock(fd, _fcntl.LOCK_UN)
    os.close(fd)
    return False


def _judge(path: Path, kind: str, pid: int, host: str) -> Leftover:
    local = host == _HOST
    locked = _locked(path)
    if locked:
        return Leftover(path, kind, pid, local, False, f"locked by a running save (pid {pid})")
    alive = _pid_alive(pid) if local else None
    age = _age(path)
    if local and alive is False:
        return Leftover(path, kind, pid, local, True, f"its process {pid} is dead")
    if locked is False and age > STALE_AFTER_S:
        return Leftover(path, kind, pid, local, True, f"not locked and {age:.0f} s old (process id {pid} reused)")
    if kind == "old" and alive is not None and age > STALE_AFTER_S:
        # backups are never locked: an old, untouched backup of a live-looking pid is a reused pid
        return Leftover(path, kind, pid, local, True, f"{age:.0f} s old (process id {pid} reused)")
    where = "" if local else " on another host"
    return Leftover(path, kind, pid, local, False, f"it may belong to a running save (process {pid}{where})")


# ---------------------------------------------------------------------------- locks
def _lock_folder(path: Path, busy=None):
    """Hold an exclusive lock on the folder ``path`` (its fd), or None where unsupported;
    ``busy`` when another process holds it."""
    if _fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return busy
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Exclusive lock on the parent folder while renaming in it (short critical sections)."""
    fd = None
    if _fcntl is not None:
        try:
            fd = os.open(parent, os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise ArtifactError(
                            f"another save has held the lock on {parent} for over {LOCK_TIMEOUT_S:.0f} s; "
                            "wait for it to finish and try again"
                        ) from None
                    time.sleep(0.01)
                except OSError:  # locks not supported here (e.g. NFS directories)
                    os.close(fd)
                    fd = None
                    break
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# ---------------------------------------------------------------------------- durability
def _finish(tmp: Path, target: Path, new_mode: int) -> None:
    """Permissions and fsync of the finished temporary folder, deepest entries first.

    ``new_mode`` is the mode ``mkdir`` gave ``tmp`` (``0o777 & ~umask``). Files get ``0o666 &
    ~umask`` (``0o777 & ~umask`` when executable), sub-folders ``0o777 & ~umask``; ``tmp`` itself
    keeps ``new_mode``, or takes the mode of the existing target it replaces.
    """
    base_mode = new_mode & 0o777
    file_mode = base_mode & 0o666
    exec_mode = base_mode
    top_mode = new_mode
    try:
        if target.is_dir():
            top_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        pass
    for root, dirs, files in os.walk(tmp, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = exec_mode if st.st_mode & 0o111 else file_mode
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(path, want)
            _fsync_file(path)
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            if stat.S_IMODE(os.stat(path).st_mode) & 0o777 != base_mode:
                os.chmod(path, base_mode)
            _fsync_dir(Path(path))
    if stat.S_IMODE(os.stat(tmp).st_mode) != top_mode:
        os.chmod(tmp, top_mode)
    _fsync_dir(tmp)


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a folder (its entries); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- test hook
def _test_kill_point(point: str) -> None:
    """Test hook (fault-injection tests only): SIGKILL this process when $HF_FISHER_TEST_KILL_AT == point."""
    if os.environ.get(TEST_KILL_ENV) == point:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
