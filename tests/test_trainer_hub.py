"""FisherCallback with ``push_to_hub=True``: the artifact lands in the Trainer's own Hub repo under
``fisher/`` (one commit), against the local Hub-compatible server, with the real client."""

from __future__ import annotations

import torch
from test_trainer import make_samples, train

import hf_fisher

import tiny_models as tm

pytest_plugins = ["hub_server"]  # the hub_server fixture


def test_the_final_artifact_is_pushed_under_fisher(tmp_path, hub_server):
    model = tm.llama(torch.float32)
    cb = hf_fisher.FisherCallback(reduction="group")
    out = tmp_path / "run"
    train(model, make_samples(), out, callbacks=[cb], push_to_hub=True, hub_model_id="user/tiny-run",
          hub_token=hub_server.token, hub_strategy="end")
    files = hub_server.files("user/tiny-run")
    assert {"fisher/fisher_config.json", "fisher/fisher.safetensors", "fisher/README.md"} <= set(files)
    fisher_commits = [c for c in hub_server.commits("user/tiny-run") if "Fisher information" in c.title]
    assert len(fisher_commits) == 1  # one commit with the whole folder
    loaded = hf_fisher.Fisher.from_pretrained("user/tiny-run:fisher", model=model, token=hub_server.token)
    mine = cb.fisher()
    assert loaded.counts == mine.counts
    for name in mine.names():
        assert torch.equal(loaded[name], mine[name])
    # the token is never written into what was published
    assert hub_server.token.encode() not in hub_server.all_stored_bytes()


def test_no_push_without_push_to_hub(tmp_path, hub_server):
    cb = hf_fisher.FisherCallback()
    train(tm.llama(torch.float32), make_samples(), tmp_path / "run", callbacks=[cb])
    assert (tmp_path / "run" / "fisher" / "fisher_config.json").is_file()
    assert not hub_server.requests
