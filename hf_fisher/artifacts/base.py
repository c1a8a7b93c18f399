"""One mixin that gives every artifact ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

Modelled on huggingface_hub's ``ModelHubMixin``: the public methods are written once, here, and
each artifact class implements only its own pieces:

- ``_save_pretrained(folder, **kwargs)``: write the artifact's files into ``folder`` (an empty
  temporary folder; the mixin makes the write atomic);
- ``_from_pretrained(folder, *, device, strict, **kwargs)``: build the artifact from a local
  folder, checking its structure (config fields, file names, dtypes, shapes), and set ``_root``
  to the folder it read;
- ``_value_check(what, strict)``: a :class:`~hf_fisher.artifacts.values.ValueCheck` over the
  artifact's tensors (the rule every reader of Fisher data applies);
- ``_commit_message()``: the default commit message of :meth:`push_to_hub`;
- ``validate(model)``: does the artifact belong to ``model``;
- class attributes ``artifact_kind`` (its name in messages, e.g. ``"Fisher artifact"``) and
  ``is_own_file`` (a static method: whether a file name belongs to such an artifact).

What the mixin guarantees for every artifact:

- **atomic write** (:func:`hf_fisher.artifacts.atomic.atomic_folder`): files go to a temporary
  folder beside the target, are fsync'ed and renamed into place, so a killed save leaves the old
  or the new artifact, never a mix;
- **one overwrite policy** (:func:`hf_fisher.artifacts.atomic.check_target`): an existing folder
  is replaced only when it holds nothing but files of the same kind of artifact, otherwise an
  :class:`~hf_fisher.errors.ArtifactError` before anything is written;
- **validation on load**: after the structural checks of ``_from_pretrained``, every tensor's
  values (``_value_check``: finite, non-negative, all zero without samples), then, with
  ``model=``, :meth:`validate`; ``strict=False`` loads an artifact with invalid values anyway
  (WARNING, recorded in ``metadata.extra["load_problems"]``) so that it can be inspected;
- **Hub download / upload** (:mod:`hf_fisher.artifacts.hub`): ``from_pretrained`` accepts a local
  folder or a Hub reference ``"user/repo"`` / ``"user/repo:sub/folder"`` (downloaded into the
  Hugging Face cache; ``revision``, ``subfolder``, ``token``, ``cache_dir``); ``push_to_hub``
  saves into a temporary folder and uploads it as ONE commit, arguments and token checked before
  any work.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch

from hf_fisher.artifacts import hub
from hf_fisher.artifacts.atomic import atomic_folder, check_target, leftovers
from hf_fisher.artifacts.values import ValueCheck, record_problems
from hf_fisher.errors import InvalidInputError

__all__ = ["ArtifactHubMixin", "is_hub_source"]

logger = logging.getLogger(__name__)


def is_hub_source(path_or_repo: Any) -> bool:
    """Whether ``from_pretrained`` reads ``path_or_repo`` from the Hub: a string that is a Hub
    reference, with no local file or folder of that name and no backup of an interrupted save
    into such a folder (those are local and restored on load). A reference with a bad subfolder
    counts, so that its error says what is wrong with it."""
    if not isinstance(path_or_repo, str) or os.path.lexists(path_or_repo) or not hub.looks_like_hub_repo(path_or_repo):
        return False
    return not any(lo.kind == "old" for lo in leftovers(path_or_repo.partition(":")[0]))


class ArtifactHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for an artifact class (see the
    module docstring for the pieces a subclass implements and what the mixin guarantees)."""

    #: the artifact's name in messages and logs ("Fisher artifact", "KFAC artifact")
    artifact_kind: ClassVar[str] = "artifact"

    @staticmethod
    def is_own_file(name: str) -> bool:
        """Whether a file name belongs to this kind of artifact (what a save may replace)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the pieces of a subclass
    def _save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        raise NotImplementedError

    @classmethod
    def _from_pretrained(cls, folder: Path, *, device: torch.device | str, strict: bool, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _value_check(self, what: str, strict: bool = True) -> ValueCheck:
        raise NotImplementedError

    def _commit_message(self) -> str:
        return f"Upload {self.artifact_kind} with hf_fisher"

    def validate(self, model: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the public methods
    def check_values(self, what: str | None = None) -> None:
        """:class:`~hf_fisher.errors.ArtifactError` unless every stored tensor has valid values
        (``_value_check``: finite, non-negative, all zero when no sample was counted), naming each
        bad tensor with its counts. Consumers call it before any work; an artifact that passed
        (or was loaded without problems) is not scanned again."""
        if getattr(self, "_values_ok", False):
            return
        self._value_check(what or self._default_what()).finish()
        self._values_ok = True

    def _default_what(self) -> str:
        return f"the {self.artifact_kind} of task {self.metadata.task!r}"  # type: ignore[attr-defined]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write the artifact folder atomically and return its path (``kwargs`` go to the
        artifact's ``_save_pretrained``). An existing folder is replaced only when it holds
        nothing but a previous artifact of this kind (:class:`~hf_fisher.errors.ArtifactError`
        otherwise, before anything is written); the new folder keeps its mode; new folders and
        files get the permissions of the user's umask."""
        what = self.artifact_kind
        target = check_target(save_directory, allowed=type(self).is_own_file, what=what)
        with atomic_folder(target, what=what) as tmp:
            self._save_pretrained(tmp, **kwargs)
        logger.info("saved %s (%d entries) to %s", what, len(self), target)  # type: ignore[arg-type]
        return target

    def push_to_hub(
        self,
        repo_id: str,
        *,
        path_in_repo: str | None = None,
        private: bool = False,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        token: str | None = None,
        api: Any = None,
        **save_kwargs: Any,
    ) -> str:
        """Publish this artifact on the Hugging Face Hub as ONE commit; returns the commit URL (or
        the pull-request URL with ``create_pr=True``).

        The artifact is written by :meth:`save_pretrained` (``save_kwargs``) into a temporary
        folder and uploaded by :func:`hf_fisher.artifacts.hub.push_folder`: to the root of
        ``repo_id`` (created if needed, ``private`` when new), or under ``path_in_repo`` (e.g.
        ``"fisher"`` in the model's own repository: load it back with
        ``from_pretrained("user/model:fisher")``). ``revision``: the branch to commit to (created
        from ``main`` if missing). ``api``: an ``huggingface_hub.HfApi`` (its endpoint and token),
        else ``$HF_ENDPOINT`` / huggingface_hub's default. ``token`` is never written or logged.
        Arguments and the token are checked before anything is written or sent
        (:class:`~hf_fisher.errors.InvalidInputError`); Hub failures are
        :class:`~hf_fisher.errors.ArtifactError`.
        """
        hub.check_push_ready(repo_id, path_in_repo=path_in_repo, revision=revision, create_pr=create_pr,
                             commit_message=commit_message, private=private, token=token, api=api)
        if commit_message is None:
            commit_message = self._commit_message()
        with tempfile.TemporaryDirectory(prefix="hf-fisher-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "artifact", **save_kwargs)
            return hub.push_folder(
                folder, repo_id, path_in_repo=path_in_repo, private=private, revision=revision,
                create_pr=create_pr, commit_message=commit_message, token=token, api=api,
            )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        model: Any = None,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load an artifact written by :meth:`save_pretrained` (safetensors only, no pickle), from
        a local folder or from the Hugging Face Hub.

        ``path_or_repo``: an artifact folder, or a Hub reference ``"user/repo"`` /
        ``"user/repo:sub/folder"`` (or pass ``subfolder=``). A Hub reference is used when no local
        folder of that name exists (nor the backup of an interrupted save into it); it is
        downloaded with :func:`hf_fisher.artifacts.hub.resolve_folder` (``revision``: branch, tag
        or commit sha; ``token``; ``cache_dir``; the Hugging Face cache is reused,
        ``HF_HUB_OFFLINE=1`` loads from it, every Hub failure is an
        :class:`~hf_fisher.errors.ArtifactError` saying what to do). The downloaded folder then
        goes through exactly the checks of a local one: the structure (the artifact's
        ``_from_pretrained``), the values (``_value_check``; ``strict=False`` loads invalid values
        with a WARNING and records them in ``metadata.extra["load_problems"]``), and with
        ``model`` the model match (:meth:`validate`,
        :class:`~hf_fisher.errors.ModelMismatchError`).
        """
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        folder = cls.resolve_folder(path_or_repo, revision=revision, subfolder=subfolder, token=token,
                                    cache_dir=cache_dir)
        obj = cls._from_pretrained(folder, device=device, strict=strict, **kwargs)
        # the folder actually read (a reader may read the backup of an interrupted save instead)
        root = getattr(obj, "_root", folder)
        problem = obj._value_check(f"{cls.artifact_kind} {root}", strict).finish()
        if problem:
            obj.metadata = record_problems(obj.metadata, [problem])
        obj._values_ok = problem is None
        if model is not None:
            obj.validate(model)
        return obj

    @classmethod
    def resolve_folder(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None,
                       subfolder: str | None = None, token: str | None = None,
                       cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Path:
        """The local folder :meth:`from_pretrained` reads, without reading it: a Hub reference is
        downloaded (:func:`hf_fisher.artifacts.hub.resolve_folder`: into the Hugging Face cache,
        ``endpoint`` else ``$HF_ENDPOINT``), a local path is returned with ``subfolder`` joined
        (``revision`` is refused for it: :class:`~hf_fisher.errors.InvalidInputError`)."""
        if is_hub_source(path_or_repo):
            return hub.resolve_folder(path_or_repo, revision=revision, subfolder=subfolder, token=token,
                                      cache_dir=cache_dir, endpoint=endpoint, what=cls.artifact_kind)
        if revision is not None:
            raise InvalidInputError(
                f"revision={revision!r} only applies to Hub references, but {os.fspath(path_or_repo)!r} is a "
                "local path; drop revision= or pass a Hub reference such as 'user/repo:fisher'"
            )
        path = Path(os.fspath(path_or_repo))
        if subfolder is not None:
            path = path / hub.check_repo_path(subfolder, "subfolder")
        return path
