"""Merging through the Hub, with the real huggingface_hub client against the local Hub-compatible
server: models and Fisher artifacts pulled by repo id (``repo`` / ``repo:subfolder``), the merged
model pushed as one commit, then downloaded into a fresh cache and loaded with transformers."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from test_merging import _fisher
from transformers import AutoModelForCausalLM

from hf_fisher.artifacts.hub import push_folder
from hf_fisher.consumers.merge.api import merge_with_fisher
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytest_plugins = ["hub_server"]  # the hub_server fixture
pytestmark = pytest.mark.usefixtures("one_thread")


def _publish(tmp_path, hub_server):
    """Two fine-tuned tiny LLaMAs, each with its Fisher under fisher/ of its own repo."""
    models = []
    for k, seed in enumerate((11, 12)):
        m = tm.llama(seed=10)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m.save_pretrained(tmp_path / f"m{k}")
        _fisher(m, k + 1).push_to_hub(f"user/task-{k}", path_in_repo="fisher", token=hub_server.token)
        push_folder(tmp_path / f"m{k}", f"user/task-{k}", token=hub_server.token)
        models.append(m)
    return models


def test_merge_from_hub_ids_and_push(tmp_path, hub_server):
    models = _publish(tmp_path, hub_server)
    local = merge_with_fisher(models, [_fisher(models[0], 1), _fisher(models[1], 2)], progress=False)
    out = merge_with_fisher(
        ["user/task-0", "user/task-1"], ["user/task-0:fisher", "user/task-1:fisher"],
        output_dir=tmp_path / "merged", push_to_hub="user/merged", token=hub_server.token, progress=False,
    )
    assert out == tmp_path / "merged"
    commits = hub_server.commits("user/merged")
    files = hub_server.files("user/merged")
    assert {"config.json", "model.safetensors", "mergekit_config.yml", "README.md"} <= set(files)
    assert len(commits) == 2  # the repository's creation, then one commit with every file
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model_relation == "merge"
    assert sorted(card.data.base_model) == ["user/task-0", "user/task-1"]
    assert {"merge", "hf-fisher"} <= set(card.data.tags)
    # a fresh cache: the pushed model downloads and loads, and equals the merge of the local models
    pulled = AutoModelForCausalLM.from_pretrained("user/merged", cache_dir=tmp_path / "fresh-cache", token=hub_server.token)
    for name, tensor in local.state_dict().items():
        assert torch.allclose(pulled.state_dict()[name].double(), tensor.double(), atol=1e-12, rtol=0), name


def test_bad_push_target_is_refused_before_any_work(tmp_path, hub_server):
    models = _publish(tmp_path, hub_server)
    before = len(hub_server.requests)
    with pytest.raises(InvalidInputError, match="path_in_repo"):
        merge_with_fisher(models, [_fisher(models[0], 1), _fisher(models[1], 2)], output_dir=tmp_path / "out",
                          push_to_hub="user/merged", path_in_repo="../up", progress=False)
    assert not (tmp_path / "out").exists()
    assert len(hub_server.requests) == before
