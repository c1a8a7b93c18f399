"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

The *unmodified* ``huggingface_hub`` client talks to it as it talks to https://huggingface.co:
``create_repo`` / ``delete_repo``, ``create_commit`` / ``upload_folder`` (preupload, LFS batch +
upload + verify, ndjson commit), branches and pull requests (``create_pr`` → ``refs/pr/N``),
``repo_info`` / ``model_info`` (siblings, sha), ``list_repo_tree``, ``get_paths_info``,
``list_repo_commits``, ``list_repo_refs``, and ``hf_hub_download`` / ``snapshot_download``
(``HEAD``/``GET`` on ``/resolve/``, by branch or commit sha, with the headers the client relies
on: ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``, ``Location``).

Two listening sockets on 127.0.0.1 (port 0, so pytest-xdist workers never collide):

- the **Hub** (``server.endpoint``): the API and ``/resolve/``;
- a **CDN** (another port, hence another origin, like the Hub's S3/CloudFront): LFS objects are
  uploaded to it by signed ``PUT`` URLs that the LFS batch endpoint hands out, and ``/resolve/``
  of an LFS file answers ``302`` with a signed ``Location`` on it. As with the real Hub, the
  client does not send its token there (``server.cdn_requests`` records whether it did).

Storage is in memory: repositories with their commits (each commit a full tree), branches and
pull-request refs; regular files as bytes, LFS files as pointers to an object store keyed by
sha256. Every request is recorded (``server.requests``) so that a test can assert that *no*
request was made. Auth: ``Authorization: Bearer <token>``; ``server.token`` is valid for the
namespace ``user`` (and the organisation ``org``). Private repositories are visible only to
their namespace's token; a wrong token gets ``401 Invalid credentials`` on private repositories
and on every write (``strict_tokens=True``: on every request, as the real Hub does).

Use the :func:`hub_server` fixture (import it into a test module, or list this module in
``pytest_plugins``): it starts a fresh server per test, points ``huggingface_hub`` at it
(``HF_ENDPOINT`` and the constants the client read at import time), gives the test its own
``HF_HOME``/cache/token path, disables Xet (``HF_HUB_DISABLE_XET``, so uploads take the LFS
path) and turns offline mode off — ``server.set_offline(True)`` turns it back on.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["Commit", "HubServer", "RecordedRequest", "RepoEntry", "hub_server"]

LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy", "*.npz",
    "*.pkl", "*.pickle", "*.zip", "*.gz", "*.tar", "*.zst", "*.parquet", "*.arrow", "*.model", "*.tflite",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """git's object id of a blob: ``sha1(b"blob <size>\\0" + content)``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class RepoEntry:
    """A file of a commit's tree: regular (``content``) or LFS (``lfs_sha256``, content in the store)."""

    size: int
    oid: str  # git blob id (of the content, or of the LFS pointer)
    content: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def pointer_size(self) -> int | None:
        return len(lfs_pointer(self.lfs_sha256, self.size)) if self.lfs_sha256 else None


@dataclass
class Commit:
    """One commit: its full tree and what it changed relative to its parent."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    tree: dict[str, RepoEntry]
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)  # name ("main", "refs/pr/1") -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return URL_PREFIX[self.repo_type] + self.repo_id


@dataclass(frozen=True)
class RecordedRequest:
    """A request the server received (``authorization`` is only whether the header was present)."""

    role: str  # "hub" or "cdn"
    method: str
    path: str
    query: str
    authorization: bool


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class HubServer:
    """The server: state, the two listening sockets, and helpers for assertions.

    ``tokens`` maps a token to ``(user, [namespaces it may write and read privately])``; by
    default one random token for the user ``user`` (also member of ``org``), as ``.token``.
    ``lfs_verify``: whether the LFS batch answer asks the client to call the verify endpoint.
    """

    def __init__(self, *, strict_tokens: bool = False, lfs_verify: bool = True) -> None:
        self.token = "hf_test_" + secrets.token_hex(16)
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {self.token: ("user", ("user", "org"))}
        self.strict_tokens = strict_tokens
        self.lfs_verify = lfs_verify
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.cdn_requests: list[RecordedRequest] = []
        self.unknown_routes: list[str] = []
        self.server_errors: list[str] = []
        self._secret = secrets.token_bytes(16)
        self._lock = threading.RLock()
        self._counter = 0
        self._servers: list[ThreadingHTTPServer] = []
        self._connections: set[Any] = set()  # open client sockets, closed by stop()
        self._threads: list[threading.Thread] = []
        self._monkeypatch = None
        self.endpoint = ""
        self.cdn_endpoint = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubServer:
        for role in ("hub", "cdn"):
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            httpd.daemon_threads = True
            httpd.block_on_close = False
            httpd.hub = self  # type: ignore[attr-defined]
            httpd.role = role  # type: ignore[attr-defined]
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            if role == "hub":
                self.endpoint = url
            else:
                self.cdn_endpoint = url
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(httpd)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (a kept-alive connection of the client's
        pool must not reach this server's state from a later test that gets the same port)."""
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_offline(self, offline: bool = True) -> None:
        """Turn huggingface_hub's offline mode on/off for the rest of the test (env and constant)."""
        from huggingface_hub import constants

        mp = self._monkeypatch
        if mp is None:
            raise RuntimeError("set_offline needs the hub_server fixture (it owns the monkeypatch)")
        if offline:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("TRANSFORMERS_OFFLINE", "1")
        else:
            mp.delenv("HF_HUB_OFFLINE", raising=False)
            mp.delenv("TRANSFORMERS_OFFLINE", raising=False)
        mp.setattr(constants, "HF_HUB_OFFLINE", offline)

    # ------------------------------------------------------------------ assertions
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repository (``KeyError`` if it does not exist)."""
        return self.repos[(repo_type, repo_id)]

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The history of ``revision``, newest first (the creation commit last)."""
        repo = self.repo(repo_id, repo_type)
        out, oid = [], self._resolve_rev(repo, revision)
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` of every file at ``revision``."""
        repo = self.repo(repo_id, repo_type)
        tree = repo.commits[self._resolve_rev(repo, revision)].tree
        return {path: self._content(entry) for path, entry in sorted(tree.items())}

    def all_stored_bytes(self) -> list[bytes]:
        """Every blob the server holds (regular files of every commit and all LFS objects)."""
        out = list(self.lfs_objects.values())
        for repo in self.repos.values():
            for commit in repo.commits.values():
                out += [e.content for e in commit.tree.values() if e.content is not None]
                out.append(f"{commit.title}\n{commit.message}".encode())
        return out

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.cdn_requests.clear()

    # ------------------------------------------------------------------ state helpers
    def _content(self, entry: RepoEntry) -> bytes:
        return entry.content if entry.content is not None else self.lfs_objects[entry.lfs_sha256]

    def _sign(self, what: str) -> str:
        return hmac.new(self._secret, what.encode(), hashlib.sha256).hexdigest()

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, RepoEntry], title: str, message: str,
                    author: str, added: list[str], deleted: list[str]) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps([repo.repo_id, parent, title, message, sorted((p, e.oid) for p, e in tree.items()),
                        self._counter, time.time_ns()]).encode()
        ).hexdigest()
        commit = Commit(digest, parent, title, message, _now(), author, tree, added, deleted)
        repo.commits[digest] = commit
        return commit

    def create_repo_direct(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repository without HTTP (its first commit holds ``.gitattributes``, as on the Hub)."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private, _now())
            tree = {".gitattributes": RepoEntry(len(GITATTRIBUTES), git_blob_oid(GITATTRIBUTES), GITATTRIBUTES)}
            commit = self._new_commit(repo, None, tree, "initial commit", "", repo.namespace, [".gitattributes"], [])
            repo.branches["main"] = commit.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def _resolve_rev(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        matches = [oid for oid in repo.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
        raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _is_lfs_path(self, repo: Repo, head: str, path: str, size: int, sample: bytes) -> bool:
        attributes = repo.commits[head].tree.get(".gitattributes")
        patterns = LFS_PATTERNS
        if attributes is not None and attributes.content is not None:
            patterns = tuple(
                line.split()[0] for line in attributes.content.decode(errors="replace").splitlines()
                if "filter=lfs" in line and line.split()
            )
        name = path.rsplit("/", 1)[-1]
        return (
            size > LFS_SIZE_THRESHOLD
            or b"\0" in sample
            or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-fisher-test-hub/1.0"

    # ------------------------------------------------------------------ plumbing
    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def role(self) -> str:
        return self.server.role  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr logging
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0] or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        record = RecordedRequest(self.role, method, split.path, split.query,
                                 self.headers.get("Authorization") is not None)
        with self.hub._lock:
            (self.hub.requests if self.role == "hub" else self.hub.cdn_requests).append(record)
        self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            if self.role == "cdn":
                self._cdn(method, segments)
            else:
                self._route(method, segments)
        except _Error as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message, **e.body}, status=e.status, headers=headers, method=method)
        except Exception as e:
            import traceback

            self.hub.server_errors.append(f"{method} {self.path}: {traceback.format_exc()}")
            self._json({"error": f"test server error: {e!r}"}, status=500, method=method)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/octet-stream", method: str = "GET") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None, method: str = "GET",
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type, method)

    def _body_json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise _Error(400, "request body is not valid JSON") from None

    # ------------------------------------------------------------------ auth
    def _user(self) -> tuple[str | None, tuple[str, ...], bool]:
        """(user, namespaces, token_was_invalid) for the request's bearer token."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None, (), False
        scheme, _, token = auth.partition(" ")
        known = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if known is None:
            if self.hub.strict_tokens:
                raise _Error(401, INVALID_CREDENTIALS)
            return None, (), True
        return known[0], known[1], False

    def _need_user(self) -> tuple[str, tuple[str, ...]]:
        user, namespaces, invalid = self._user()
        if user is None:
            raise _Error(401, INVALID_CREDENTIALS if invalid else "You must be authenticated to do this (pass a token)")
        return user, namespaces

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        user, namespaces, invalid = self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        if write:
            if user is None:
                raise _Error(401, INVALID_CREDENTIALS if invalid else "You must be authenticated to write")
            if repo is None:
                raise _Error(404, "Repository not found", "RepoNotFound")
            if repo.namespace not in namespaces:
                raise _Error(403, f"You don't have the rights to write to {repo_id}")
            return repo
        if repo is None:
            raise _Error(404, "Repository not found", "RepoNotFound")
        if repo.private and repo.namespace not in namespaces:
            if invalid:
                raise _Error(401, INVALID_CREDENTIALS)
            raise _Error(401, "Repository not found", "RepoNotFound")  # the Hub hides private repos
        return repo

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, s: list[str]) -> None:
        hub = self.hub
        if s[:1] == ["api"]:
            rest = s[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo()
            if method == "DELETE" and rest == ["repos", "delete"]:
                return self._delete_repo()
            if method == "POST" and rest == ["validate-yaml"]:
                return self._validate_yaml()
            if method == "GET" and rest == ["whoami-v2"]:
                user, namespaces = self._need_user()
                return self._json({"type": "user", "name": user, "fullname": user,
                                   "orgs": [{"name": n} for n in namespaces if n != user],
                                   "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type, repo_id, tail = REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                return self._repo_api(method, repo_type, repo_id, tail)
        # git-lfs: /<prefix><ns>/<name>.git/info/lfs/objects/(batch|verify)
        repo_type, s2 = ("dataset", s[1:]) if s[:1] == ["datasets"] else ("space", s[1:]) if s[:1] == ["spaces"] \
            else ("model", s)
        if len(s2) == 6 and s2[1].endswith(".git") and s2[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{s2[0]}/{s2[1][:-4]}"
            return self._lfs_batch(repo_type, repo_id) if s2[5] == "batch" else self._lfs_verify(repo_type, repo_id)
        if len(s2) >= 5 and s2[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, repo_type, f"{s2[0]}/{s2[1]}", s2[3], "/".join(s2[4:]))
        with hub._lock:
            hub.unknown_routes.append(f"{method} {self.path}")
        raise _Error(404, f"test hub: no route for {method} {self.path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, tail: list[str]) -> None:
        if method == "GET" and (not tail or (len(tail) == 2 and tail[0] == "revision")):
            return self._info(repo_type, repo_id, tail[1] if tail else "main")
        if method == "GET" and tail and tail[0] == "tree" and len(tail) >= 2:
            return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]))
        if method == "POST" and len(tail) == 2 and tail[0] == "paths-info":
            return self._paths_info(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
            return self._preupload(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "commit":
            return self._commit(repo_type, repo_id, tail[1])
        if method == "GET" and len(tail) == 2 and tail[0] == "commits":
            return self._list_commits(repo_type, repo_id, tail[1])
        if method == "GET" and tail == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method in ("POST", "DELETE") and len(tail) >= 2 and tail[0] == "branch":
            return self._branch(method, repo_type, repo_id, "/".join(tail[1:]))
        if method == "PUT" and tail == ["settings"]:
            repo = self._repo(repo_type, repo_id, write=True)
            body = self._body_json() or {}
            if "private" in body:
                repo.private = bool(body["private"])
            return self._json({})
        with self.hub._lock:
            self.hub.unknown_routes.append(f"{method} {self.path}")
        raise _Error(404, f"test hub: no route for {method} {self.path}")

    # --- repos
    def _create_repo(self) -> None:
        user, namespaces = self._need_user()
        body = self._body_json() or {}
        name, namespace = body.get("name"), body.get("organization") or user
        repo_type = body.get("type") or "model"
        if not name or repo_type not in URL_PREFIX:
            raise _Error(400, "invalid repo name or type")
        if namespace not in namespaces:
            raise _Error(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                raise _Error(409, f"You already created this {repo_type} repo", body={"url": url})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            self.hub.create_repo_direct(repo_id, repo_type=repo_type, private=private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        user, namespaces = self._need_user()
        body = self._body_json() or {}
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        with self.hub._lock:
            repo = self.hub.repos.get((repo_type, repo_id))
            if repo is None:
                raise _Error(404, "Repository not found", "RepoNotFound")
            if repo.namespace not in namespaces:
                raise _Error(403, f"You don't have the rights to delete {repo_id}")
            del self.hub.repos[(repo_type, repo_id)]
        self._json({})

    def _validate_yaml(self) -> None:
        body = self._body_json() or {}
        content = str(body.get("content", ""))
        errors = []
        if content.startswith("---"):
            lines = content.splitlines()
            if "---" not in [line.rstrip() for line in lines[1:]]:
                errors.append({"message": "the YAML metadata block is not closed by a '---' line"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, status=400)
        self._json({"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self.hub._resolve_rev(repo, revision)
        commit = repo.commits[oid]
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit.tree.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=e.size, blobId=e.oid)
                if e.is_lfs:
                    sib["lfs"] = {"size": e.size, "sha256": e.lfs_sha256, "pointerSize": e.pointer_size}
            siblings.append(sib)
        self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo.namespace,
            "sha": oid, "lastModified": commit.date, "createdAt": repo.created, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    # --- trees
    def _entry_json(self, path: str, e: RepoEntry) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.is_lfs:
            out["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": e.pointer_size}
        return out

    @staticmethod
    def _folders(tree: dict[str, RepoEntry]) -> set[str]:
        out = set()
        for path in tree:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self.hub._resolve_rev(repo, revision)
        tree = repo.commits[oid].tree
        folders = self._folders(tree)
        path = path.strip("/")
        if path and path not in folders:
            raise _Error(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": oid})
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        items = [{"type": "directory", "oid": hashlib.sha1(d.encode() + oid.encode()).hexdigest(), "size": 0,
                  "path": d} for d in sorted(folders) if wanted(d)]
        items += [self._entry_json(p, e) for p, e in sorted(tree.items()) if wanted(p)]
        self._json(items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self.hub._resolve_rev(repo, revision)
        tree = repo.commits[oid].tree
        form = parse_qs(self.body.decode())
        paths = form.get("paths", [])
        if not paths and self.body.strip().startswith(b"{"):
            paths = list((self._body_json() or {}).get("paths", []))
        folders = self._folders(tree)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(self._entry_json(p, tree[p]))
            elif p in folders:
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode() + oid.encode()).hexdigest(),
                            "size": 0, "path": p})
        self._json(out)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        self.hub._resolve_rev(repo, revision)
        items = [{"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                  "authors": [{"user": c.author}]} for c in self.hub.commits(repo_id, revision, repo_type)]
        self._json(items)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                    for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
        prs = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo.branches.items() if n.startswith("refs/pr/")]
        self._json({"branches": branches, "tags": [], "converts": [], "pullRequests": prs})

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        with self.hub._lock:
            if method == "DELETE":
                if branch not in repo.branches or branch == "main":
                    raise _Error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                del repo.branches[branch]
                return self._json({})
            if branch in repo.branches:
                raise _Error(409, f"Reference already exists: refs/heads/{branch}")
            start = (self._body_json() or {}).get("startingPoint") or "main"
            repo.branches[branch] = self.hub._resolve_rev(repo, start)
        self._json({})

    # --- uploads
    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        head = self.hub._resolve_rev(repo, "main" if create_pr and revision not in repo.branches else revision)
        tree = repo.commits[head].tree
        files = []
        for f in (self._body_json() or {}).get("files", []):
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample", ""))
            lfs = size > 0 and self.hub._is_lfs_path(repo, head, path, size, sample)
            existing = tree.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing.lfs_sha256 if existing.is_lfs else existing.oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote_oid})
        self._json({"files": files, "commitOid": head})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self._repo(repo_type, repo_id, write=True)
        body = self._body_json() or {}
        if body.get("operation") != "upload":
            raise _Error(400, "this test hub only implements LFS uploads through the batch API")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                sig = self.hub._sign(f"put:{oid}:{size}")
                actions: dict[str, Any] = {"upload": {
                    "href": f"{self.hub.cdn_endpoint}/upload/{oid}?size={size}&sig={sig}", "header": {}}}
                if self.hub.lfs_verify:
                    actions["verify"] = {
                        "href": f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify",
                        "header": {}}
                item["actions"] = actions
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        self._repo(repo_type, repo_id, write=True)
        body = self._body_json() or {}
        data = self.hub.lfs_objects.get(str(body.get("oid")))
        if data is None or len(data) != int(body.get("size", -1)):
            raise _Error(404, f"LFS object {body.get('oid')} was not uploaded (or has another size)")
        self._json({"message": "Everything is fine"})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        repo = self._repo(repo_type, repo_id, write=True)
        user, _ = self._need_user()
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Error(400, "a commit payload starts with a header line")
        header = lines[0]["value"]
        with hub._lock:
            if revision not in repo.branches:  # commits (and PRs) go on top of an existing branch
                raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            base = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and parent != base:
                raise _Error(412, f"parentCommit {parent} is not the head of {revision} ({base})")
            tree = dict(repo.commits[base].tree)
            added, deleted = [], []
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = str(value.get("path", "")).strip("/")
                if not path or any(part in ("", ".", "..") for part in path.split("/")):
                    raise _Error(400, f"invalid path in commit: {value.get('path')!r}")
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else str(value["content"]).encode()
                    tree[path] = RepoEntry(len(content), git_blob_oid(content), content)
                    added.append(path)
                elif key == "lfsFile":
                    oid = value["oid"]
                    data = hub.lfs_objects.get(oid)
                    if data is None:
                        raise _Error(422, f"LFS object {oid} for {path} was never uploaded")
                    if value.get("size") is not None and int(value["size"]) != len(data):
                        raise _Error(422, f"LFS object {oid} has size {len(data)}, the commit says {value['size']}")
                    tree[path] = RepoEntry(len(data), git_blob_oid(lfs_pointer(oid, len(data))), None, oid)
                    added.append(path)
                elif key == "deletedFile":
                    if path not in tree:
                        raise _Error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                    deleted.append(path)
                elif key == "deletedFolder":
                    gone = [p for p in tree if p.startswith(path + "/")]
                    for p in gone:
                        del tree[p]
                    deleted += gone
                else:
                    raise _Error(400, f"unknown commit operation {key!r}")
            commit = hub._new_commit(repo, base, tree, header.get("summary") or "", header.get("description") or "",
                                     user, added, deleted)
            pr_url = None
            if create_pr:
                number = max(repo.pull_requests, default=0) + 1
                ref = f"refs/pr/{number}"
                repo.pull_requests[number] = {"ref": ref, "target": revision, "title": commit.title}
                repo.branches[ref] = commit.oid
                pr_url = f"{hub.endpoint}/{repo.url_path}/discussions/{number}"
            else:
                repo.branches[revision] = commit.oid
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": f"{hub.endpoint}/{repo.url_path}/commit/"
                    f"{commit.oid}", "pullRequestUrl": pr_url, "hookOutput": ""})

    # --- downloads
    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id)
        oid = self.hub._resolve_rev(repo, revision)
        entry = repo.commits[oid].tree.get(filename)
        if entry is None:
            raise _Error(404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            sha = entry.lfs_sha256
            location = f"{self.hub.cdn_endpoint}/blob/{sha}?sig={self.hub._sign(f'get:{sha}')}"
            headers.update({"Location": location, "ETag": f'"{entry.oid}"', "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(entry.size)})
            return self._send(302, b"", headers, method=method)
        headers["ETag"] = f'"{entry.oid}"'
        self._send_content(method, entry.content or b"", headers)

    def _send_content(self, method: str, content: bytes, headers: dict[str, str]) -> None:
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[len("bytes="):].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(content) - 1
            if start >= len(content):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"}, method=method)
            part = content[start:end + 1]
            headers = {**headers, "Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(content)}"}
            return self._send(206, part, headers, method=method)
        self._send(200, content, headers, method=method)

    # ------------------------------------------------------------------ the CDN
    def _cdn(self, method: str, s: list[str]) -> None:
        hub = self.hub
        sig = self.query.get("sig", [""])[0]
        if method == "PUT" and len(s) == 2 and s[0] == "upload":
            oid, size = s[1], int(self.query.get("size", ["-1"])[0])
            if not hmac.compare_digest(sig, hub._sign(f"put:{oid}:{size}")):
                raise _Error(403, "bad or missing upload signature")
            data = self.body
            if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
                raise _Error(400, f"uploaded content does not match sha256 {oid} / size {size}")
            with hub._lock:
                hub.lfs_objects[oid] = data
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        if method in ("GET", "HEAD") and len(s) == 2 and s[0] == "blob":
            sha = s[1]
            if not hmac.compare_digest(sig, hub._sign(f"get:{sha}")) or sha not in hub.lfs_objects:
                raise _Error(403, "bad signature or unknown object")
            return self._send_content(method, hub.lfs_objects[sha], {"ETag": f'"{sha}"'})
        with hub._lock:
            hub.unknown_routes.append(f"cdn {method} {self.path}")
        raise _Error(404, f"test cdn: no route for {method} {self.path}")


def point_client_at(server: HubServer, monkeypatch: pytest.MonkeyPatch, home: os.PathLike) -> None:
    """Make the in-process huggingface_hub client talk to ``server`` with a private HF_HOME ``home``.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET`` and the cache
    paths into ``huggingface_hub.constants`` at import time, so both the environment (for code that
    reads it at call time, e.g. hf_fisher) and the constants are patched.
    """
    from huggingface_hub import constants

    home = os.fspath(home)
    cache = os.path.join(home, "hub")
    env = {
        "HF_ENDPOINT": server.endpoint, "HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN_PATH": os.path.join(home, "token"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE",
              "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(k, raising=False)
    patched = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": home, "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": os.path.join(home, "assets"), "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"), "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
    }
    for k, v in patched.items():
        monkeypatch.setattr(constants, k, v, raising=False)
    # transformers keeps one shared HfApi (``transformers.utils.hub.hf_api()``, used by the
    # Trainer's Hub pushes) with the endpoint of the moment it was made: start it afresh
    import sys

    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        monkeypatch.setattr(tf_hub, "_hf_api", None)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A fresh :class:`HubServer` for one test, with huggingface_hub pointed at it (see the module docs).

    Attributes for tests: ``.endpoint``, ``.token`` (valid for ``user/*`` and ``org/*``),
    ``.commits(repo_id, revision)``, ``.files(repo_id, revision)``, ``.requests``, ``.cdn_requests``,
    ``.set_offline(bool)``, ``.home`` (this test's HF_HOME) and ``.cache_dir``.
    """
    server = HubServer().start()
    home = tmp_path_factory.mktemp("hf_home")
    point_client_at(server, monkeypatch, home)
    server._monkeypatch = monkeypatch
    server.home = home  # type: ignore[attr-defined]
    server.cache_dir = home / "hub"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
    assert not server.server_errors, "the test hub failed:\n" + "\n".join(server.server_errors)

