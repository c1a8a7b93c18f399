"""Merging two ViT classifiers with their Fishers, and pruning ViT heads and MLP channels.

transformers 5 renames ViT's tensors when it loads a checkpoint (``vit.encoder.layer.0.attention.
attention.query`` on disk is ``vit.layers.0.attention.q_proj`` in the loaded model): a Fisher
collected on the loaded model names the loaded tensors, the merge reads and writes the
checkpoint's; both must meet, for loaded models and for saved folders.
"""

from __future__ import annotations

import pytest
import torch
import vision_models as vm

import hf_fisher
from hf_fisher.consumers.merge.api import merge_with_fisher
from hf_fisher.consumers.prune.core import prune
from hf_fisher.errors import UnsupportedError

FLOOR = 1e-6  # the fisher method's default fisher_floor


def _two_vits():
    a = vm.vit(torch.float32, seed=40)
    b = vm.vit(torch.float32, seed=40)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = [vm.image_batch(4, dtype=torch.float32, seed=3)]
    return a, b, hf_fisher.collect(a, batches, progress=False), hf_fisher.collect(b, batches, progress=False)


def _expected(a, b, fa, fb):
    """θ* = Σ F̃_i θ_i / Σ F̃_i, F̃_i = max(F_i, floor), per element (float64)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out = {}
    for n in pa:
        Fa, Fb = fa[n].double().clamp(min=FLOOR), fb[n].double().clamp(min=FLOOR)
        out[n] = (Fa * pa[n].double() + Fb * pb[n].double()) / (Fa + Fb)
    return out


@pytest.mark.parametrize("saved", [False, True], ids=["loaded", "folders"])
def test_fisher_merge_of_two_vit_classifiers(tmp_path, saved):
    a, b, fa, fb = _two_vits()
    want = _expected(a, b, fa, fb)
    models = [a, b]
    if saved:
        models = []
        for name, m in (("a", a), ("b", b)):
            m.save_pretrained(tmp_path / name)
            models.append(str(tmp_path / name))
    merged = merge_with_fisher(models, [fa, fb], progress=False)
    got = dict(merged.named_parameters())
    assert sorted(got) == sorted(want)
    moved = 0
    for n, w in want.items():
        torch.testing.assert_close(got[n].double(), w, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        moved += int(not torch.equal(got[n], dict(a.named_parameters())[n]))
    assert moved == len(want)  # every tensor is a Fisher-weighted mix, none copied from one model


def test_prune_vit_heads_and_channels_masks_them_and_physical_removal_is_refused():
    model = vm.vit(torch.float32)
    fisher = hf_fisher.collect(model, [vm.image_batch(4, dtype=torch.float32, seed=3)], reduction="group", progress=False)
    result = prune(model, fisher, sparsity=0.25, structured=("heads", "channels"), progress=False)
    kinds = {u["kind"] for u in result.removed}
    assert kinds == {"head", "channel"}
    params = dict(model.named_parameters())
    for u in result.removed:
        l, i = u["layer"], u["index"]
        if u["kind"] == "head":
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert not params[f"vit.layers.{l}.attention.{proj}.weight"][i * 8:(i + 1) * 8].any()
            assert not params[f"vit.layers.{l}.attention.o_proj.weight"][:, i * 8:(i + 1) * 8].any()
        else:
            assert not params[f"vit.layers.{l}.mlp.fc1.weight"][i].any()
            assert not params[f"vit.layers.{l}.mlp.fc2.weight"][:, i].any()
    with pytest.raises(UnsupportedError, match="not 'vit'"):
        prune(vm.vit(torch.float32), fisher, sparsity=0.25, structured=("heads",), physical=True, scope="layer", progress=False)
