"""Hub publishing and loading (hf_fisher.artifacts.hub, Fisher.push_to_hub / from_pretrained).

Everything runs the real, unmodified huggingface_hub client against the local Hub-compatible
server of tests/hub_server.py (no mocks, no network); one test, skipped unless
``HF_FISHER_REAL_HUB=1`` and ``HF_TOKEN`` are set, does the same against the real Hub.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest
import torch
from test_fisher_artifact import assert_same, make_fisher

from hf_fisher.artifacts import hub
from hf_fisher.artifacts.fisher import Fisher, FisherReader
from hf_fisher.errors import ArtifactError, InvalidInputError

import tiny_models as tm

pytest_plugins = ["hub_server"]  # the hub_server fixture

# huggingface_hub's LFS upload passes a file object as data= (httpx2 prefers content=)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ARTIFACT_FILES = {"README.md", "fisher.safetensors", "fisher_config.json"}


@pytest.fixture(scope="module")
def llama():
    return tm.llama()


@pytest.fixture(scope="module")
def fisher(llama):
    return make_fisher(llama, seed=1)


def push_count(server, repo_id, revision="main"):
    """Commits on ``revision`` after the repository's creation commit."""
    return len(server.commits(repo_id, revision)) - 1


# ---------------------------------------------------------------------------- references
@pytest.mark.parametrize("ref, expected", [
    ("user/repo", ("user/repo", None)),
    ("user/repo:fisher", ("user/repo", "fisher")),
    ("org-1/my_model.v2:sub/folder/", ("org-1/my_model.v2", "sub/folder")),
])
def test_parse_hub_ref(ref, expected):
    assert hub.parse_hub_ref(ref) == expected


@pytest.mark.parametrize("ref", [
    "repo", "a/b/c", "user/re--po", "user/..repo", "-user/repo", "user/repo.git", "user/re po", "user/repo:",
    "user/repo:../up", "user/repo:/abs", "user/" + "x" * 97, "",
])
def test_parse_hub_ref_rejects_invalid(ref):
    with pytest.raises(InvalidInputError, match=r"user/repo:sub/folder"):
        hub.parse_hub_ref(ref)


# ---------------------------------------------------------------------------- publish + load
def test_push_standalone_is_one_commit_and_loads_back(hub_server, fisher, tmp_path):
    url = fisher.push_to_hub("user/fisher-math", token=hub_server.token)
    history = hub_server.commits("user/fisher-math")
    assert len(history) == 2  # the repository's creation commit, then ONE commit with every file
    push = history[0]
    assert url == f"{hub_server.endpoint}/user/fisher-math/commit/{push.oid}"
    assert set(push.added) == ARTIFACT_FILES and push.deleted == []
    assert "task 'math'" in push.title and "estimator empirical" in push.title
    assert set(hub_server.files("user/fisher-math")) == ARTIFACT_FILES | {".gitattributes"}
    assert push.tree["fisher.safetensors"].is_lfs and not push.tree["fisher_config.json"].is_lfs
    # the LFS object went through batch + signed CDN upload + verify, without the token leaving the Hub
    paths = [(r.method, r.path) for r in hub_server.requests]
    assert ("POST", "/user/fisher-math.git/info/lfs/objects/batch") in paths
    assert ("POST", "/user/fisher-math.git/info/lfs/objects/verify") in paths
    assert hub_server.cdn_requests and not any(r.authorization for r in hub_server.cdn_requests)

    local = fisher.save_pretrained(tmp_path / "local")
    assert hub_server.files("user/fisher-math")["fisher_config.json"] == (local / "fisher_config.json").read_bytes()

    loaded = Fisher.from_pretrained("user/fisher-math", cache_dir=tmp_path / "fresh-cache")
    assert_same(fisher, loaded)
    snapshot = tmp_path / "fresh-cache" / "models--user--fisher-math" / "snapshots" / push.oid
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(ARTIFACT_FILES | {".gitattributes"})


def test_push_under_fisher_of_a_model_repo(hub_server, fisher, llama, tmp_path):
    model_dir = tmp_path / "tiny-llama"
    llama.save_pretrained(model_dir)
    hub.push_folder(model_dir, "user/tiny-llama", token=hub_server.token, commit_message="model")
    url = fisher.push_to_hub("user/tiny-llama", path_in_repo="fisher", token=hub_server.token)
    history = hub_server.commits("user/tiny-llama")
    assert [c.title for c in history[1:]] == ["model", "initial commit"] and push_count(hub_server, "user/tiny-llama") == 2
    assert url.endswith(f"/user/tiny-llama/commit/{history[0].oid}")
    assert set(history[0].added) == {f"fisher/{n}" for n in ARTIFACT_FILES}
    assert {"config.json", "model.safetensors"} <= set(hub_server.files("user/tiny-llama"))

    cache = tmp_path / "cache"
    loaded = Fisher.from_pretrained("user/tiny-llama:fisher", model=llama, cache_dir=cache)
    assert_same(fisher, loaded)
    # only the subfolder was downloaded, not the model weights
    snapshot = cache / "models--user--tiny-llama" / "snapshots" / history[0].oid
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == sorted(
        f"fisher/{n}" for n in ARTIFACT_FILES)
    # subfolder= is the same as the ':fisher' suffix
    assert_same(fisher, Fisher.from_pretrained("user/tiny-llama", subfolder="fisher", cache_dir=cache))
    assert FisherReader(hub.resolve_folder("user/tiny-llama:fisher", cache_dir=cache)).counts == fisher.counts


def test_revision_pinning(hub_server, llama, tmp_path):
    first, second = make_fisher(llama, seed=1), make_fisher(llama, seed=2)
    first.push_to_hub("user/pinned", token=hub_server.token)
    sha1 = hub_server.commits("user/pinned")[0].oid
    second.push_to_hub("user/pinned", token=hub_server.token)
    sha2 = hub_server.commits("user/pinned")[0].oid
    assert sha1 != sha2 and push_count(hub_server, "user/pinned") == 2
    cache = tmp_path / "cache"
    assert_same(first, Fisher.from_pretrained("user/pinned", revision=sha1, cache_dir=cache))
    assert_same(second, Fisher.from_pretrained("user/pinned", cache_dir=cache))
    assert_same(second, Fisher.from_pretrained("user/pinned", revision="main", cache_dir=cache))
    assert not torch.equal(first[first.names()[0]], second[second.names()[0]])


def test_push_to_a_branch(hub_server, llama, tmp_path):
    base, dev = make_fisher(llama, seed=1), make_fisher(llama, seed=3)
    base.push_to_hub("user/branched", token=hub_server.token)
    dev.push_to_hub("user/branched", revision="dev", token=hub_server.token)
    assert push_count(hub_server, "user/branched") == 1 and push_count(hub_server, "user/branched", "dev") == 2
    assert_same(base, Fisher.from_pretrained("user/branched", cache_dir=tmp_path / "c"))
    assert_same(dev, Fisher.from_pretrained("user/branched", revision="dev", cache_dir=tmp_path / "c"))


def test_create_pr(hub_server, llama, tmp_path):
    base, proposed = make_fisher(llama, seed=1), make_fisher(llama, seed=4)
    base.push_to_hub("user/reviewed", token=hub_server.token)
    main_head = hub_server.commits("user/reviewed")[0].oid
    url = proposed.push_to_hub("user/reviewed", create_pr=True, commit_message="Proposed Fisher", token=hub_server.token)
    assert url == f"{hub_server.endpoint}/user/reviewed/discussions/1"
    assert hub_server.commits("user/reviewed")[0].oid == main_head  # main untouched
    pr = hub_server.commits("user/reviewed", "refs/pr/1")
    assert pr[0].title == "Proposed Fisher" and pr[0].parent == main_head
    cache = tmp_path / "cache"
    assert_same(base, Fisher.from_pretrained("user/reviewed", cache_dir=cache))
    assert_same(proposed, Fisher.from_pretrained("user/reviewed", revision="refs/pr/1", cache_dir=cache))


def test_token_from_the_environment_and_existing_repo(hub_server, fisher, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # huggingface_hub's usual place
    fisher.push_to_hub("org/shared", private=True)
    fisher.to(torch.float32).push_to_hub("org/shared", private=True)  # the repository exists: fine
    assert push_count(hub_server, "org/shared") == 2 and hub_server.repo("org/shared").private
    loaded = Fisher.from_pretrained("org/shared", cache_dir=tmp_path / "c")
    assert loaded.metadata.storage_dtype == "float32" and loaded.counts == fisher.counts


# ---------------------------------------------------------------------------- auth and failures
def test_private_repo_and_wrong_tokens(hub_server, fisher, tmp_path):
    fisher.push_to_hub("user/secret", private=True, token=hub_server.token)
    assert hub_server.repo("user/secret").private
    wrong = "hf_wrong_" + uuid.uuid4().hex
    with pytest.raises(ArtifactError) as info:
        Fisher.from_pretrained("user/secret", token=wrong, cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert "refused the credentials (HTTP 401" in msg and "'user/secret'" in msg and hub_server.endpoint in msg
    assert "token=" in msg and wrong not in msg
    with pytest.raises(ArtifactError, match=r"does not exist on .* or it is private .* pass token="):
        Fisher.from_pretrained("user/secret", cache_dir=tmp_path / "c")  # no token at all: the Hub hides it
    with pytest.raises(ArtifactError, match=r"could not push .* write access to the namespace 'user'") as info:
        fisher.push_to_hub("user/secret", token=wrong)
    assert wrong not in str(info.value)
    assert push_count(hub_server, "user/secret") == 1
    assert_same(fisher, Fisher.from_pretrained("user/secret", token=hub_server.token, cache_dir=tmp_path / "c"))


def test_missing_repo_revision_and_subfolder(hub_server, fisher, tmp_path):
    fisher.push_to_hub("user/there", path_in_repo="fisher", token=hub_server.token)
    cache = tmp_path / "c"
    with pytest.raises(ArtifactError, match=r"repository 'user/nowhere' does not exist on http://127\.0\.0\.1:\d+"):
        Fisher.from_pretrained("user/nowhere", cache_dir=cache)
    with pytest.raises(ArtifactError, match=r"revision 'nope' does not exist in 'user/there'.*revision=\.\.\."):
        Fisher.from_pretrained("user/there:fisher", revision="nope", cache_dir=cache)
    with pytest.raises(ArtifactError, match=r"has no files under 'other'.*subfolder name"):
        Fisher.from_pretrained("user/there:other", cache_dir=cache)
    # the repository root holds no artifact (it is under fisher/): the usual local message
    with pytest.raises(ArtifactError, match="fisher_config.json is missing"):
        Fisher.from_pretrained("user/there", cache_dir=cache)


def test_offline_loads_from_cache_and_fails_clearly_when_not_cached(hub_server, fisher, tmp_path):
    fisher.push_to_hub("user/cached", path_in_repo="fisher", token=hub_server.token)
    sha = hub_server.commits("user/cached")[0].oid
    cache = tmp_path / "cache"
    assert_same(fisher, Fisher.from_pretrained("user/cached:fisher", cache_dir=cache))  # fills the cache
    hub_server.clear_requests()
    assert_same(fisher, Fisher.from_pretrained("user/cached:fisher", cache_dir=cache))  # online, cached
    assert hub_server.cdn_requests == [] and not any(
        r.method == "GET" and "/resolve/" in r.path for r in hub_server.requests)  # nothing downloaded again
    hub_server.set_offline(True)
    hub_server.clear_requests()
    assert_same(fisher, Fisher.from_pretrained("user/cached:fisher", cache_dir=cache))
    assert_same(fisher, Fisher.from_pretrained("user/cached:fisher", revision=sha, cache_dir=cache))
    assert hub_server.requests == []  # served from the cache alone
    with pytest.raises(ArtifactError) as info:
        Fisher.from_pretrained("user/cached:fisher", cache_dir=tmp_path / "empty-cache")
    msg = str(info.value)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "'user/cached'" in msg and "'fisher'" in msg
    assert "unset HF_HUB_OFFLINE" in msg and hub_server.endpoint in msg
    assert hub_server.requests == []


def test_offline_env_set_after_import_is_respected(hub_server, fisher, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported (its constant still says online)."""
    fisher.push_to_hub("user/late", token=hub_server.token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_server.clear_requests()
    with pytest.raises(ArtifactError, match="offline mode is on"):
        Fisher.from_pretrained("user/late", cache_dir=tmp_path / "c")
    assert hub_server.requests == []


def test_hf_endpoint_is_read_at_call_time(hub_server, fisher, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub's import-time endpoint points nowhere; HF_ENDPOINT (read at call time) wins
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    fisher.push_to_hub("user/env-endpoint", token=hub_server.token)
    assert push_count(hub_server, "user/env-endpoint") == 1
    assert_same(fisher, Fisher.from_pretrained("user/env-endpoint", cache_dir=tmp_path / "c"))


def test_unreachable_endpoint_is_a_clear_error(hub_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ArtifactError, match=r"http://127\.0\.0\.1:9 could not be reached .* not in the local cache"):
        hub.resolve_folder("user/any", cache_dir=tmp_path / "c", what="Fisher artifact")


def corrupt_counts(folder: Path) -> None:
    cfg = json.loads((folder / "fisher_config.json").read_text())
    cfg["counts"]["samples"] = -1
    (folder / "fisher_config.json").write_text(json.dumps(cfg))


def test_malformed_artifact_on_the_hub_is_the_local_error(hub_server, fisher, tmp_path):
    bad = fisher.save_pretrained(tmp_path / "bad")
    corrupt_counts(bad)
    with pytest.raises(ArtifactError) as local:
        Fisher.from_pretrained(bad)
    hub.push_folder(bad, "user/bad", path_in_repo="fisher", token=hub_server.token)
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError) as remote:
        Fisher.from_pretrained("user/bad:fisher", cache_dir=cache)
    root = hub.resolve_folder("user/bad:fisher", cache_dir=cache)
    assert "field 'counts.samples' must be an integer >= 0, got -1" in str(remote.value)
    assert str(remote.value).replace(str(root), "<artifact>") == str(local.value).replace(str(bad), "<artifact>")
    # an artifact whose tensor file was never uploaded: incomplete, as locally
    (bad / "fisher.safetensors").unlink()
    fisher.save_pretrained(tmp_path / "ok")
    (bad / "fisher_config.json").write_bytes((tmp_path / "ok" / "fisher_config.json").read_bytes())
    hub.push_folder(bad, "user/incomplete", token=hub_server.token)
    with pytest.raises(ArtifactError, match=r"is incomplete: missing tensor file\(s\) \['fisher.safetensors'\]"):
        Fisher.from_pretrained("user/incomplete", cache_dir=cache)


def test_token_is_never_written_or_logged(hub_server, fisher, llama, tmp_path, caplog, capfd, monkeypatch):
    caplog.set_level(logging.DEBUG)
    token = hub_server.token
    save_dir = tmp_path / "model"
    llama.save_pretrained(save_dir)
    hub.push_folder(save_dir, "user/tok", private=True, token=token)
    fisher.push_to_hub("user/tok", path_in_repo="fisher", private=True, token=token)
    Fisher.from_pretrained("user/tok:fisher", token=token, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HF_TOKEN", token)
    Fisher.from_pretrained("user/tok:fisher", cache_dir=tmp_path / "cache2")
    assert any(r.name.startswith("hf_fisher") for r in caplog.records)  # hf_fisher did log
    out, err = capfd.readouterr()
    assert token not in caplog.text and token not in out and token not in err
    assert not any(token.encode() in blob for blob in hub_server.all_stored_bytes())
    for folder in (tmp_path, Path(hub_server.home)):
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def test_bad_input_is_rejected_before_any_request(hub_server, fisher, tmp_path):
    full = fisher.save_pretrained(tmp_path / "art")
    (tmp_path / "empty").mkdir()
    hub_server.clear_requests()
    cases = [
        (lambda: hub.push_folder(full, "not a repo id", token=hub_server.token), "not a valid Hub repository id"),
        (lambda: hub.push_folder(full, "a/b/c", token=hub_server.token), "exactly '<namespace>/<name>'"),
        (lambda: hub.push_folder(full, "user/re--po", token=hub_server.token), "'--' or '..'"),
        (lambda: hub.push_folder(full, "user/x", path_in_repo="../up", token=hub_server.token), "must not contain '..'"),
        (lambda: hub.push_folder(full, "user/x", path_in_repo="a/../../b", token=hub_server.token), "'..'"),
        (lambda: hub.push_folder(full, "user/x", path_in_repo="/abs", token=hub_server.token), "must be relative"),
        (lambda: hub.push_folder(tmp_path / "empty", "user/x", token=hub_server.token), "holds no files"),
        (lambda: hub.push_folder(tmp_path / "missing", "user/x", token=hub_server.token), "not an existing folder"),
        (lambda: hub.push_folder(full, "user/x", revision="dev", create_pr=True, token=hub_server.token),
         "pull request against the default branch"),
        (lambda: hub.push_folder(full, "user/x", revision="a" * 40, token=hub_server.token), "is a commit sha"),
        (lambda: hub.push_folder(full, "user/x", commit_message="", token=hub_server.token), "commit_message"),
        (lambda: fisher.push_to_hub("bad id!", token=hub_server.token), "not a valid Hub repository id"),
        (lambda: fisher.push_to_hub("user/x", path_in_repo="..", token=hub_server.token), "must not contain '..'"),
        (lambda: Fisher.from_pretrained("user/repo:../x"), "must not contain '..'"),
        (lambda: Fisher.from_pretrained(full, revision="main"), "only applies to Hub references"),
        (lambda: hub.resolve_folder("user/repo", subfolder="a", allow_patterns=[]), "allow_patterns"),
        (lambda: hub.resolve_folder("user/repo:a", subfolder="b"), "two different subfolders"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            call()
    assert hub_server.requests == [] and hub_server.repos == {}


def test_local_folders_and_missing_paths(hub_server, fisher, tmp_path):
    full = fisher.save_pretrained(tmp_path / "parent" / "fisher")
    hub_server.clear_requests()
    assert hub.resolve_folder(full) == full
    assert hub.resolve_folder(tmp_path / "parent", subfolder="fisher") == tmp_path / "parent" / "fisher"
    assert_same(fisher, Fisher.from_pretrained(tmp_path / "parent", subfolder="fisher"))
    assert_same(fisher, Fisher.from_pretrained(str(full)))
    with pytest.raises(ArtifactError, match="has no subfolder 'nope'"):
        hub.resolve_folder(tmp_path / "parent", subfolder="nope")
    with pytest.raises(ArtifactError, match="does not exist.*or a Hub reference such as 'user/repo'"):
        Fisher.from_pretrained(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="does not exist: there is no local folder of that name"):
        hub.resolve_folder(str(tmp_path / "missing"))
    assert hub_server.requests == []


def test_model_repo_round_trip_with_transformers(hub_server, tmp_path):
    import transformers as tf

    model = tm.llama(dtype=torch.float32, seed=7)
    model.save_pretrained(tmp_path / "model")
    url = hub.push_folder(tmp_path / "model", "user/tiny-model", token=hub_server.token)
    assert push_count(hub_server, "user/tiny-model") == 1 and "/user/tiny-model/commit/" in url
    cache = tmp_path / "cache"
    loaded = tf.AutoModelForCausalLM.from_pretrained("user/tiny-model", cache_dir=cache).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    folder = hub.resolve_folder("user/tiny-model", cache_dir=cache, what="model")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert hub_server.unknown_routes == []


def test_cache_links_of_a_subfolder_stay_checked(hub_server, fisher, tmp_path):
    """Files of a cached snapshot's subfolder are links into the repo's blobs/ (accepted); a link
    to anywhere else is still rejected, as for a local folder."""
    fisher.push_to_hub("user/links", path_in_repo="fisher", token=hub_server.token)
    root = hub.resolve_folder("user/links:fisher", cache_dir=tmp_path / "c")
    assert (root / "fisher.safetensors").is_symlink()
    assert_same(fisher, Fisher.from_pretrained(root))
    outside = fisher.save_pretrained(tmp_path / "elsewhere")
    (root / "fisher.safetensors").unlink()
    (root / "fisher.safetensors").symlink_to(outside / "fisher.safetensors")
    with pytest.raises(ArtifactError, match=r"field 'tensor_files\[0\]'.*resolves outside the artifact folder"):
        Fisher.from_pretrained("user/links:fisher", cache_dir=tmp_path / "c")


def test_server_speaks_the_hub_api(hub_server, tmp_path):
    """The test server itself, driven by the real client: the endpoints hf_fisher does not call directly."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("user/api", repo_type="dataset", private=True)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("user/api", repo_type="dataset")
    assert info.value.response.status_code == 409
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello")
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 8)
    first = api.upload_folder(repo_id="user/api", repo_type="dataset", folder_path=folder, commit_message="one")
    (folder / "a.txt").write_text("changed")
    api.upload_folder(repo_id="user/api", repo_type="dataset", folder_path=folder, commit_message="two")
    info = api.dataset_info("user/api", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "a.txt", "sub/w.bin"} and info.private
    assert siblings["sub/w.bin"].lfs.size == 2048 and siblings["a.txt"].lfs is None and siblings["a.txt"].size == 7
    top = {f.path: type(f).__name__ for f in api.list_repo_tree("user/api", repo_type="dataset")}
    assert top == {"sub": "RepoFolder", ".gitattributes": "RepoFile", "a.txt": "RepoFile"}
    assert [f.path for f in api.list_repo_tree("user/api", "sub", repo_type="dataset")] == ["sub/w.bin"]
    assert {p.path for p in api.get_paths_info("user/api", ["a.txt", "sub", "nope"], repo_type="dataset")} == {
        "a.txt", "sub"}
    assert api.file_exists("user/api", "sub/w.bin", repo_type="dataset")
    assert not api.file_exists("user/api", "nope.txt", repo_type="dataset")
    assert [c.title for c in api.list_repo_commits("user/api", repo_type="dataset")] == ["two", "one", "initial commit"]
    cache = tmp_path / "cache"

    def get(name, rev=None):
        return Path(hf_hub_download("user/api", name, repo_type="dataset", revision=rev, cache_dir=cache,
                                    token=hub_server.token)).read_bytes()

    assert get("a.txt") == b"changed" and get("a.txt", first.oid) == b"hello"
    assert get("sub/w.bin") == bytes(range(256)) * 8
    with pytest.raises(EntryNotFoundError):
        get("nope.txt")
    api.delete_repo("user/api", repo_type="dataset")
    assert not api.repo_exists("user/api", repo_type="dataset")


# ---------------------------------------------------------------------------- the real Hub
@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("HF_FISHER_REAL_HUB") == "1"),
    reason="talks to the real Hugging Face Hub: set HF_FISHER_REAL_HUB=1 and HF_TOKEN (write access) to run it",
)
def test_real_hub_push_and_pull(fisher, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    api = HfApi(endpoint=endpoint, token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/hf-fisher-test-{uuid.uuid4().hex[:10]}"
    try:
        url = fisher.push_to_hub(repo_id, path_in_repo="fisher", private=True, api=api)
        assert "/commit/" in url
        assert api.model_info(repo_id).private
        files = {f.path for f in api.list_repo_tree(repo_id, recursive=True)}
        assert {f"fisher/{n}" for n in ARTIFACT_FILES} <= files
        loaded = Fisher.from_pretrained(f"{repo_id}:fisher", token=os.environ["HF_TOKEN"], cache_dir=tmp_path / "c")
        assert_same(fisher, loaded)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
