"""Publishing to and loading from the Hugging Face Hub (or any Hub-compatible endpoint).

Three helpers, used by :meth:`hf_fisher.artifacts.fisher.Fisher.push_to_hub` /
:meth:`~hf_fisher.artifacts.fisher.Fisher.from_pretrained` and by other modules that accept a model or an
artifact "folder or Hub reference":

- :func:`parse_hub_ref`: ``"user/repo"`` or ``"user/repo:sub/folder"`` → ``(repo_id, subfolder)``.
- :func:`resolve_folder`: a local folder is returned as it is; a Hub reference is downloaded with
  ``huggingface_hub.snapshot_download`` into the Hugging Face cache (only the subfolder's files),
  and offline mode (``HF_HUB_OFFLINE=1``) is served from that cache. Every failure — offline and
  not cached, no such repository / revision / subfolder, credentials refused, Hub unreachable — is
  an :class:`~hf_fisher.errors.ArtifactError` naming the repository, the revision, the endpoint
  and what to do.
- :func:`check_push_ready`: what every path that pushes checks *before its work* (a merge, a
  save): the repository arguments, offline mode off, a token at hand.
- :func:`push_folder`: checks everything first (no request is made for bad input), creates the
  repository if needed and uploads the whole folder as **one** commit (``HfApi.create_commit``),
  optionally as a pull request, and returns the commit (or pull-request) URL.

The endpoint is the ``endpoint`` argument, else the ``HF_ENDPOINT`` environment variable read at
call time, else huggingface_hub's default. Tokens come from the ``token`` argument, else from
huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); hf_fisher never writes a token
into a file or a log message.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError

__all__ = [
    "check_push_args",
    "check_push_ready",
    "hub_endpoint",
    "looks_like_hub_id",
    "looks_like_hub_ref",
    "looks_like_hub_repo",
    "parse_hub_ref",
    "push_folder",
    "repo_id_problem",
    "resolve_folder",
]

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset")
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_NAME_RE = re.compile(_NAME)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_VALID_REF = (
    "a Hub reference looks like 'user/repo' or 'user/repo:sub/folder' (namespace and name of letters, digits, "
    "'-', '_' and '.', each at most 96 characters, not starting or ending with '-' or '.', without '--' or '..')"
)
# what a folder upload leaves out (huggingface_hub's own ignore rules for upload_folder)
_IGNORED_PARTS = (".git", ".cache")


# ---------------------------------------------------------------------------- references
def repo_id_problem(repo_id: Any, *, namespace: bool = True) -> str | None:
    """Why ``repo_id`` is not a valid Hub repository id, ``None`` when it is: hf_fisher's one Hub-id check.

    ``namespace=True`` (artifacts hf_fisher reads from or pushes to the Hub): exactly
    ``'<namespace>/<name>'``; ``namespace=False`` (models, e.g. a card's ``base_model``) also accepts a
    bare ``'<name>'`` such as ``gpt2``. Each part: ASCII letters, digits, ``-``, ``_``, ``.``, at most 96
    characters, not starting or ending with ``-`` or ``.``; no ``--`` or ``..``; not ending in ``.git``
    (the Hub's rules, as in ``huggingface_hub.utils.validate_repo_id``).
    """
    if not isinstance(repo_id, str):
        return f"it is a {type(repo_id).__name__}, not a string"
    if not repo_id:
        return "it is empty"
    slashes = repo_id.count("/")
    if namespace and slashes != 1:
        return "it must be exactly '<namespace>/<name>' (one '/')"
    if slashes > 1:
        return "it must be '<name>' or '<namespace>/<name>' (at most one '/')"
    if not all(_NAME_RE.fullmatch(part) for part in repo_id.split("/")):
        return "it contains characters other than letters, digits, '-', '_', '.' or starts/ends with '-' or '.'"
    if "--" in repo_id or ".." in repo_id:
        return "it contains '--' or '..'"
    if repo_id.endswith(".git"):
        return "it ends with '.git'"
    return None


_repo_id_problem = repo_id_problem  # the old private name


def check_repo_path(value: str, what: str) -> str:
    """``value`` as a clean relative POSIX path inside a repository (InvalidInputError otherwise)."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string (a folder inside the repository), got {type(value).__name__}")
    if "\x00" in value or "\\" in value:
        raise InvalidInputError(f"{what} {value!r} must be a relative POSIX path such as 'fisher' (no '\\' or NUL)")
    if value.startswith("/") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive:
        raise InvalidInputError(f"{what} {value!r} must be relative to the repository root, such as 'fisher'")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidInputError(f"{what} {value!r} must not contain '..': it names a folder inside the repository")
    if parts and parts[0] == ".git":
        raise InvalidInputError(f"{what} {value!r} must not be inside the repository's .git folder")
    return "/".join(parts)


_check_repo_path = check_repo_path  # the old private name


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """Split a Hub reference into ``(repo_id, subfolder)``.

    ``"user/repo"`` → ``("user/repo", None)``; ``"user/repo:sub/folder"`` →
    ``("user/repo", "sub/folder")``. An invalid repository id or subfolder is an
    :class:`~hf_fisher.errors.InvalidInputError` that says what a valid reference looks like.
    """
    if not isinstance(ref, str):
        raise InvalidInputError(f"a Hub reference must be a string, got {type(ref).__name__}; {_VALID_REF}")
    repo_id, sep, subfolder = ref.partition(":")
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise InvalidInputError(f"{ref!r} is not a valid Hub reference: the repository id {repo_id!r} is invalid "
                                f"({problem}); {_VALID_REF}")
    if not sep:
        return repo_id, None
    try:
        sub = check_repo_path(subfolder, "the subfolder")
    except InvalidInputError as e:
        raise InvalidInputError(f"{ref!r} is not a valid Hub reference: {e}; {_VALID_REF}") from None
    if not sub:
        raise InvalidInputError(f"{ref!r} is not a valid Hub reference: the subfolder after ':' is empty; {_VALID_REF}")
    return repo_id, sub


def looks_like_hub_ref(value: Any) -> bool:
    """Whether ``value`` is a string that :func:`parse_hub_ref` accepts (never raises)."""
    if not isinstance(value, str):
        return False
    try:
        parse_hub_ref(value)
    except InvalidInputError:
        return False
    return True


def looks_like_hub_id(value: Any, *, namespace: bool = False) -> bool:
    """Whether ``value`` is a valid Hub repository id (:func:`repo_id_problem`; never raises): by
    default ``"name"`` or ``"owner/name"``, what a model reference such as a card's ``base_model`` may
    be. Artifacts, which hf_fisher publishes, need ``"owner/name"`` (``namespace=True``, :func:`parse_hub_ref`)."""
    return repo_id_problem(value, namespace=namespace) is None


def looks_like_hub_repo(value: Any) -> bool:
    """Whether ``value`` is a string whose part before any ``:`` is a valid ``namespace/name`` repository
    id: meant as a Hub reference (its subfolder is checked by :func:`parse_hub_ref`). Never raises."""
    return isinstance(value, str) and repo_id_problem(value.partition(":")[0]) is None


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to use: ``endpoint``, else ``$HF_ENDPOINT`` (read now), else huggingface_hub's."""
    from huggingface_hub import constants

    value = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value):
        raise InvalidInputError(f"the Hub endpoint must be an http(s) URL such as 'https://huggingface.co', got {value!r}")
    return value.rstrip("/")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Offline mode: huggingface_hub's (read at its import) or ``HF_HUB_OFFLINE`` set since."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _describe_token(token: Any) -> str:
    """Which token was used, without ever showing it."""
    if token is False:
        return "no token (token=False)"
    if isinstance(token, str) and token:
        return "the token passed as token="
    return "the token found by huggingface_hub (HF_TOKEN or `hf auth login`), if any"


# ---------------------------------------------------------------------------- downloads
def resolve_folder(
    ref_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: str | Iterable[str] | None = None,
    what: str = "model",
) -> Path:
    """The local folder holding ``ref_or_path`` (plus ``subfolder``), downloading it if it is on the Hub.

    - An existing local path is returned as it is (``subfolder`` joined; it must exist).
      ``revision`` does not apply to local folders (:class:`~hf_fisher.errors.InvalidInputError`).
    - Otherwise ``ref_or_path`` must be a Hub reference (:func:`parse_hub_ref`; a subfolder may be
      given in the reference or as ``subfolder=``, not both differently). Its files are fetched with
      ``huggingface_hub.snapshot_download`` into the cache (``cache_dir`` or huggingface_hub's),
      only those under the subfolder (``allow_patterns``, relative to the subfolder when there is
      one, narrows further); files already cached are not downloaded again. In offline mode
      (``HF_HUB_OFFLINE=1``) the cache alone is used.

    Returns the folder of the (sub)folder's files: for a Hub reference, inside the cache snapshot
    of the resolved commit. Raises :class:`~hf_fisher.errors.ArtifactError` (naming repository,
    revision, endpoint and what to do) when the repository, revision or subfolder does not exist,
    the credentials are refused, the Hub cannot be reached, or offline mode is on and the files
    are not cached. ``what`` names the thing in messages ("model", "Fisher artifact", ...).
    """
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise InvalidInputError(f"revision must be a non-empty string (branch, tag or commit sha), got {revision!r}")
    if subfolder is not None:
        subfolder = check_repo_path(subfolder, "subfolder") or None
    patterns = _patterns(allow_patterns)

    if isinstance(ref_or_path, os.PathLike) or (isinstance(ref_or_path, str) and os.path.exists(ref_or_path)):
        root = Path(os.fspath(ref_or_path))
        if revision is not None:
            raise InvalidInputError(
                f"revision={revision!r} only applies to Hub references, but {str(root)!r} is a local path; drop "
                "revision= or pass a Hub reference such as 'user/repo'"
            )
        if not root.exists():
            raise ArtifactError(f"the {what} folder {root} does not exist")
        folder = root / subfolder if subfolder else root
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"the {what} path {folder} is a file; pass the folder that holds the {what}'s files")
        if not folder.is_dir():
            raise ArtifactError(
                f"the {what} folder {folder} does not exist" + (f" ({root} has no subfolder {subfolder!r})" if subfolder else "")
            )
        return folder
    if not isinstance(ref_or_path, str):
        raise InvalidInputError(f"expected a local folder or a Hub reference for the {what}, got {type(ref_or_path).__name__}")
    try:
        repo_id, ref_sub = parse_hub_ref(ref_or_path)
    except InvalidInputError as e:
        head, sep, _ = ref_or_path.partition(":")
        if sep and repo_id_problem(head) is None:
            raise  # meant as a Hub reference, with a bad subfolder
        raise ArtifactError(
            f"the {what} {ref_or_path!r} does not exist: there is no local folder of that name, and it is not a "
            f"Hub reference either ({e})"
        ) from None
    if ref_sub and subfolder and ref_sub != subfolder:
        raise InvalidInputError(
            f"two different subfolders: {ref_sub!r} in the reference {ref_or_path!r} and subfolder={subfolder!r}; pass one"
        )
    sub = subfolder or ref_sub
    endpoint = hub_endpoint(endpoint)
    offline = _offline()
    if sub:
        allow = [f"{sub}/{p}" for p in patterns] if patterns else [f"{sub}/*"]
    else:
        allow = patterns
    where = f"{what} {repo_id!r}" + (f" (subfolder {sub!r})" if sub else "") + f" at revision {revision or 'main'!r}"
    local_hint = (
        f" (there is no local folder {ref_or_path!r} either)" if not os.path.isabs(ref_or_path) else ""
    )
    from huggingface_hub import snapshot_download

    logger.info("resolving %s from %s%s", where, endpoint, " (offline: cache only)" if offline else "")
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            token=token,
            endpoint=endpoint,
            allow_patterns=allow,
            local_files_only=offline,
        )
    except Exception as e:
        mapped = _download_error(e, where=where, repo_id=repo_id, revision=revision, endpoint=endpoint,
                                 offline=offline, token=token, cache_dir=cache_dir, local_hint=local_hint)
        if mapped is e:
            raise
        raise mapped from e
    folder = Path(snapshot) / sub if sub else Path(snapshot)
    if not folder.is_dir() or not any(folder.iterdir()):
        commit = Path(snapshot).name
        raise ArtifactError(
            f"{where} on {endpoint} has no files" + (f" under {sub!r}" if sub else "") + f" (commit {commit}). "
            + (f"Check the subfolder name (the {what} may be at the repository root or in another folder), or "
               "the revision." if sub else "Check the repository and the revision.")
        )
    logger.info("resolved %s to %s", where, folder)
    return folder


def _patterns(allow_patterns: str | Iterable[str] | None) -> list[str] | None:
    if allow_patterns is None:
        return None
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    out = list(allow_patterns)
    if not out or not all(isinstance(p, str) and p for p in out):
        raise InvalidInputError(f"allow_patterns must be a non-empty list of glob patterns, got {allow_patterns!r}")
    return out


def _download_error(e: Exception, *, where: str, repo_id: str, revision: str | None, endpoint: str, offline: bool,
                    token: Any, cache_dir: Any, local_hint: str) -> Exception:
    """An :class:`ArtifactError` saying what went wrong and what to do (``e`` itself when unknown)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    if isinstance(e, HfFisherError):
        return e
    if isinstance(e, GatedRepoError):
        return ArtifactError(
            f"cannot download {where} from {endpoint}: the repository is gated. Request access on its page, then "
            f"pass a token of an account with access (token= or `hf auth login`). Used: {_describe_token(token)}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ArtifactError(
            f"cannot download {where}: the repository {repo_id!r} does not exist on {endpoint}, or it is private and "
            f"{_describe_token(token)} has no access to it{local_hint}. Check the name; for a private repository "
            "pass token=... (or log in with `hf auth login` / set HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return ArtifactError(
            f"cannot download {where}: the revision {revision or 'main'!r} does not exist in {repo_id!r} on "
            f"{endpoint}. Pass an existing branch, tag or full commit sha (revision=...)"
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or "").strip()
        if status in (401, 403):
            return ArtifactError(
                f"cannot download {where}: {endpoint} refused the credentials (HTTP {status}"
                + (f": {server}" if server else "") + f"). Used: {_describe_token(token)}. Pass a valid token "
                "with read access to the repository (token=..., HF_TOKEN, or `hf auth login`)"
            )
        return ArtifactError(f"cannot download {where} from {endpoint}: HTTP {status} {server or e}".rstrip())
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if offline:
            return ArtifactError(
                f"cannot load {where}: offline mode is on (HF_HUB_OFFLINE=1) and it is not (completely) in the local "
                f"Hugging Face cache {cache}{local_hint}. Download it once with network access (unset HF_HUB_OFFLINE; endpoint "
                f"{endpoint}), pass the same cache_dir, or pass a local folder"
            )
        return ArtifactError(
            f"cannot download {where}: {endpoint} could not be reached and it is not in the local cache {cache} "
            f"({type(e).__name__}){local_hint}. Check the network and HF_ENDPOINT, or download it once and use HF_HUB_OFFLINE=1"
        )
    if isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith(("httpx", "httpcore")):
        return ArtifactError(f"cannot download {where} from {endpoint}: {type(e).__name__}: {e}")
    if isinstance(e, ValueError) and type(e).__module__.startswith("huggingface_hub"):
        return ArtifactError(f"cannot download {where} from {endpoint}: {e}")
    return e


# ---------------------------------------------------------------------------- uploads
def _folder_files(folder: Path) -> list[tuple[Path, str]]:
    """``[(file, path relative to folder, POSIX)]`` of every file to upload, sorted."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts and (rel.parts[0] in _IGNORED_PARTS or any(p == ".git" for p in rel.parts)):
            continue
        if path.is_file():
            out.append((path, rel.as_posix()))
    return out


def check_push_args(
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    private: bool = False,
) -> str | None:
    """Check the repository arguments of :func:`push_folder` (no request made); returns the clean
    ``path_in_repo`` (``None`` for the repository root). :class:`~hf_fisher.errors.InvalidInputError`
    names what is wrong."""
    if not isinstance(repo_id, str):
        raise InvalidInputError(f"repo_id must be a string such as 'user/fisher-math', got {type(repo_id).__name__}")
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise InvalidInputError(
            f"repo_id {repo_id!r} is not a valid Hub repository id ({problem}); use '<user or organisation>/<name>', "
            "e.g. 'user/fisher-math' (letters, digits, '-', '_', '.'; at most 96 characters each)"
        )
    if repo_type not in REPO_TYPES:
        raise InvalidInputError(f"repo_type must be one of {list(REPO_TYPES)}, got {repo_type!r}")
    sub = check_repo_path(path_in_repo, "path_in_repo") if path_in_repo is not None else ""
    if not isinstance(private, bool):
        raise InvalidInputError(f"private must be True or False, got {private!r}")
    if not isinstance(create_pr, bool):
        raise InvalidInputError(f"create_pr must be True or False, got {create_pr!r}")
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip() or revision != revision.strip():
            raise InvalidInputError(f"revision must be a branch name such as 'main', got {revision!r}")
        if _COMMIT_SHA.fullmatch(revision):
            raise InvalidInputError(f"revision {revision!r} is a commit sha; a push goes to a branch (e.g. 'main')")
        if create_pr and revision != "main":
            raise InvalidInputError(
                f"create_pr=True opens a pull request against the default branch; drop revision={revision!r} "
                "(or push to that branch directly with create_pr=False)"
            )
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise InvalidInputError(f"commit_message must be a non-empty string, got {commit_message!r}")
    return sub or None


def check_push_ready(
    repo_id: str,
    *,
    token: str | bool | None = None,
    api: Any = None,
    path_in_repo: str | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    private: bool = False,
    flag: str = "push_to_hub",
) -> str | None:
    """Everything a push needs, checked before any work and without a request: the repository
    arguments (:func:`check_push_args`, the one Hub-id check), offline mode off (``HF_HUB_OFFLINE``
    / ``TRANSFORMERS_OFFLINE``), and a token: ``token``, else ``api.token``, else
    ``huggingface_hub.get_token()`` (``HF_TOKEN``, ``hf auth login``). Returns the clean
    ``path_in_repo``; :class:`~hf_fisher.errors.InvalidInputError` says what is wrong and what to
    do (``flag`` names the option in messages, e.g. ``--push-to-hub``). The token is never shown.
    """
    sub = check_push_args(repo_id, path_in_repo=path_in_repo, repo_type=repo_type, revision=revision,
                          create_pr=create_pr, commit_message=commit_message, private=private)
    if _offline():
        which = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_true(k)] or ["HF_HUB_OFFLINE"]
        raise InvalidInputError(
            f"{flag} {repo_id!r}: cannot push, offline mode is on ({' / '.join(f'{k}=1' for k in which)}). "
            f"Unset {' and '.join(which)} to push, or drop {flag} and upload the folder later"
        )
    if token is not None and token is not False and not isinstance(token, str):
        raise InvalidInputError(f"token must be a string (or None for huggingface_hub's token), got {type(token).__name__}")
    if not token:
        found = None
        if token is None:
            found = getattr(api, "token", None) if api is not None else None
            if not found:
                from huggingface_hub import get_token

                found = get_token()
        if not found:
            raise InvalidInputError(
                f"{flag} {repo_id!r}: cannot push without a Hugging Face token "
                f"({'token=False was passed' if token is False else 'none passed, none in HF_TOKEN or the login file'}). "
                "Log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass token=... "
                "with write access to the repository"
            )
    return sub


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: Any = None,
    endpoint: str | None = None,
) -> str:
    """Upload every file of ``folder`` to ``repo_id`` (under ``path_in_repo``) as ONE commit.

    Everything is checked before any request (:class:`~hf_fisher.errors.InvalidInputError`): the
    folder exists and holds files, offline mode is off and a token is at hand
    (:func:`check_push_ready`), ``repo_id`` is ``namespace/name``, ``path_in_repo`` is relative
    without ``..``, ``revision`` is a branch (``create_pr`` only against the default branch). Then
    the repository is created if needed (``create_repo(exist_ok=True)``, ``private`` applies to a
    new repository), the branch ``revision`` is created from ``main`` if missing, and all files go
    in one ``HfApi.create_commit`` (files already identical on the Hub are skipped by
    huggingface_hub). Files of ``.git/`` and ``.cache/`` are left out.

    ``api``: an ``huggingface_hub.HfApi`` to use (its endpoint and token); else one is made for
    ``endpoint`` (default: ``$HF_ENDPOINT``, then huggingface_hub's). ``token``: else
    huggingface_hub's usual places; never logged or written anywhere.

    Returns the commit URL, or the pull-request URL with ``create_pr=True``. Failures of the Hub
    (refused credentials, no write access...) are :class:`~hf_fisher.errors.ArtifactError`.
    """
    root = Path(os.fspath(folder)) if isinstance(folder, (str, os.PathLike)) else None
    if root is None:
        raise InvalidInputError(f"folder must be a path, got {type(folder).__name__}")
    sub = check_push_args(repo_id, path_in_repo=path_in_repo, repo_type=repo_type, revision=revision,
                          create_pr=create_pr, commit_message=commit_message, private=private)
    if not root.is_dir():
        raise InvalidInputError(f"cannot push {root}: it is not an existing folder")
    files = _folder_files(root)
    if not files:
        raise InvalidInputError(f"cannot push {root}: the folder holds no files (nothing to commit)")
    check_push_ready(repo_id, token=token, api=api, path_in_repo=path_in_repo, repo_type=repo_type,
                     revision=revision, create_pr=create_pr, commit_message=commit_message, private=private)
    if api is not None and endpoint is not None and api.endpoint.rstrip("/") != endpoint.rstrip("/"):
        raise InvalidInputError(
            f"api (endpoint {api.endpoint}) and endpoint={endpoint!r} disagree; pass one of them"
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    from huggingface_hub import CommitOperationAdd

    prefix = f"{sub}/" if sub else ""
    operations = [CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(path)) for path, rel in files]
    message = commit_message or f"Upload {len(files)} file(s) with hf_fisher"
    target = f"{repo_id}" + (f":{sub}" if sub else "")
    logger.info("pushing %d file(s) from %s to %s on %s%s", len(files), root, target, api.endpoint,
                " as a pull request" if create_pr else f" (branch {revision or 'main'})")
    from huggingface_hub.errors import HfHubHTTPError

    step = "create the repository"
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token)
        if revision not in (None, "main") and not revision.startswith("refs/pr/"):
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True, token=token)
        step = "commit the files"
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
            token=token,
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or "").strip()
        hint = (
            f" Used {_describe_token(token)}: pass a token with write access to the namespace "
            f"{repo_id.split('/')[0]!r} (token=..., HF_TOKEN or `hf auth login`)."
            if status in (401, 403) or "Repository Not Found" in str(e) else ""
        )
        raise ArtifactError(
            f"could not push {root} to {target} on {api.endpoint}: failed to {step} (HTTP {status}"
            + (f": {server}" if server else "") + f").{hint}"
        ) from e
    except (OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"could not push {root} to {target} on {api.endpoint}: failed to {step}: {e}") from e
    url = info.pr_url or info.commit_url
    logger.info("pushed %s to %s: %s", root, target, url)
    return str(url)
