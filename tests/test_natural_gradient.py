"""scale_by_fisher (hf_fisher.consumers.natural_gradient): exact against hand computation."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers.natural_gradient import natural_gradient, scale_by_fisher
from hf_fisher.errors import InvalidInputError, ModelMismatchError, UnsupportedError
from hf_fisher.layout import GroupRun, ParamGroups


def _param_fisher():
    mean = {
        "a.weight": torch.tensor([[1.0, 4.0, 0.25], [9.0, 0.0, 2.0]], dtype=torch.float64),
        "b.bias": torch.tensor([0.5, 8.0], dtype=torch.float64),
    }
    return Fisher(mean, None, reduction="param", groups=None, param_shapes={k: v.shape for k, v in mean.items()},
                  counts=Counts(samples=3, tokens=9), metadata=FisherMetadata(reduction="param"))


def _group_fisher():
    # a.weight [2, 3] in two row groups; b.bias [4] in groups of sizes 1 and 3
    groups = {
        "a.weight": ParamGroups(0, (GroupRun("row", 2, 1),)),
        "b.bias": ParamGroups(0, (GroupRun("first", 1, 1), GroupRun("rest", 1, 3))),
    }
    mean = {"a.weight": torch.tensor([6.0, 3.0], dtype=torch.float64), "b.bias": torch.tensor([2.0, 12.0], dtype=torch.float64)}
    return Fisher(mean, None, reduction="group", groups=groups, param_shapes={"a.weight": (2, 3), "b.bias": (4,)},
                  counts=Counts(samples=3, tokens=9), metadata=FisherMetadata(reduction="group"))


def test_diagonal_natural_gradient_by_hand():
    F = _param_fisher()
    v = {"a.weight": torch.tensor([[2.0, 2.0, 1.0], [3.0, 5.0, -4.0]], dtype=torch.float32), "b.bias": torch.tensor([1.0, -2.0])}
    out = scale_by_fisher(v, F, damping=1.0)
    want_a = torch.tensor([[2 / 2.0, 2 / 5.0, 1 / 1.25], [3 / 10.0, 5 / 1.0, -4 / 3.0]])
    assert out["a.weight"].dtype == torch.float32
    assert torch.allclose(out["a.weight"], want_a, rtol=1e-7)
    assert torch.allclose(out["b.bias"], torch.tensor([1 / 1.5, -2 / 9.0]), rtol=1e-7)
    # power 1/2: whitening g / sqrt(F + eps)
    half = scale_by_fisher(v, F, damping=1.0, power=0.5)
    assert torch.allclose(half["b.bias"], torch.tensor([1 / 1.5**0.5, -2 / 3.0]), rtol=1e-7)
    # power -1: Fisher-weighted vector
    fw = scale_by_fisher({"b.bias": torch.tensor([1.0, -2.0], dtype=torch.float64)}, F, damping=0.0, power=-1.0)
    assert torch.equal(fw["b.bias"], torch.tensor([0.5, -16.0], dtype=torch.float64))


def test_group_fisher_expanded_to_slices():
    F = _group_fisher()
    v = {"a.weight": torch.ones(2, 3, dtype=torch.float64), "b.bias": torch.ones(4, dtype=torch.float64)}
    mean = scale_by_fisher(v, F, damping=0.0)
    # "mean": each element gets F_g / |g| (row group of a [2, 3] weight has 3 elements)
    assert torch.equal(mean["a.weight"], torch.tensor([[1 / 2.0] * 3, [1 / 1.0] * 3], dtype=torch.float64))
    assert torch.allclose(mean["b.bias"], torch.tensor([1 / 2.0, 1 / 4.0, 1 / 4.0, 1 / 4.0], dtype=torch.float64))
    total = scale_by_fisher(v, F, damping=0.0, group_expand="sum")
    assert torch.allclose(total["b.bias"], torch.tensor([1 / 2.0, 1 / 12.0, 1 / 12.0, 1 / 12.0], dtype=torch.float64))


def test_model_like_vectors():
    F = _param_fisher()
    m = torch.nn.Module()
    m.a = torch.nn.Linear(3, 2)
    m.b = torch.nn.Module()
    m.b.bias = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    # named_parameters gives a.weight, a.bias, b.bias; a.bias is not in the Fisher
    m.a.bias.requires_grad_(False)
    out = scale_by_fisher(m, F, damping=1.0, source="param")
    assert set(out) == {"a.weight", "b.bias"}
    assert torch.allclose(out["b.bias"], torch.tensor([1 / 1.5, 2 / 9.0]))
    (m.a.weight.sum() * 2).backward()
    g = scale_by_fisher(m, F, damping=1.0, source="grad")
    assert set(g) == {"a.weight"}  # b.bias has no .grad
    assert torch.allclose(g["a.weight"], 2 / (F["a.weight"].float() + 1.0))
    with pytest.raises(InvalidInputError, match="source='grad'"):
        scale_by_fisher(m, F)


def test_consumer_form_and_registration():
    from hf_fisher import plugins
    from hf_fisher.consumers import natural_gradient as module

    F = _param_fisher()
    v = {"b.bias": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    assert torch.equal(natural_gradient(F, v, damping=0.0)["b.bias"], scale_by_fisher(v, F, damping=0.0)["b.bias"])
    if "hf_fisher.consumers.natural_gradient" in plugins.BUILTIN_PLUGINS:
        assert plugins.consumers()["natural_gradient"] is natural_gradient
        return
    name = plugins.register(module, "test-natural-gradient-plugin")
    try:
        assert plugins.consumers()["natural_gradient"] is natural_gradient
    finally:
        plugins.unregister(name)


class _KFACLike:
    """A stand-in with the KFAC artifact's ``inverse_vp`` (a real object, no mock): an explicit
    per-parameter SPD matrix A_p acting on the flattened vector."""

    def __init__(self, mats):
        self.mats = mats

    def inverse_vp(self, vector, *, damping=0.0, power=1.0):
        out = {}
        for n, t in vector.items():
            A = self.mats[n] + damping * torch.eye(self.mats[n].shape[0], dtype=torch.float64)
            lam, U = torch.linalg.eigh(A)
            out[n] = (U @ torch.diag(lam.pow(-power)) @ U.T @ t.reshape(-1).double()).view(t.shape)
        return out


class _KFACNoPower(_KFACLike):
    """An ``inverse_vp`` without a power argument."""

    def inverse_vp(self, vector, *, damping=0.0):
        return _KFACLike.inverse_vp(self, vector, damping=damping, power=1.0)


def test_delegates_to_inverse_vp():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    k = _KFACLike({"w": A})
    v = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    out = scale_by_fisher(v, k, damping=0.5)
    assert torch.allclose(out["w"], torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=torch.float64), v["w"]))
    no_power = _KFACNoPower({"w": A})
    assert torch.allclose(scale_by_fisher(v, no_power, damping=0.5)["w"], out["w"])
    with pytest.raises(UnsupportedError, match="only power=1"):
        scale_by_fisher(v, no_power, power=0.5)


def test_delegates_to_the_kfac_artifact():
    kfac = pytest.importorskip("hf_fisher.estimators.kfac")
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import tiny_models

    model = tiny_models.llama(torch.float64, layers=1)
    ids = torch.randint(3, tiny_models.VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    k = kfac.KFACEstimator(params=r"mlp\.").collect(model, [{"input_ids": ids}], progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    p = dict(model.named_parameters())[name]
    v = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)}
    out = scale_by_fisher(v, k, damping=0.1)
    want = k.inverse_vp(v, damping=0.1)[name]
    assert out[name].dtype == torch.float32
    assert torch.allclose(out[name], want.float(), rtol=1e-6)
    with pytest.raises(UnsupportedError, match="only power=1"):
        scale_by_fisher(v, k, damping=0.1, power=0.5)


def test_bad_inputs():
    F = _param_fisher()
    good = {"b.bias": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(ModelMismatchError, match="does not cover.*c.weight"):
        scale_by_fisher({"c.weight": torch.ones(2)}, F)
    with pytest.raises(ModelMismatchError, match=r"shape \(3,\).*\(2,\)"):
        scale_by_fisher({"b.bias": torch.ones(3)}, F)
    with pytest.raises(InvalidInputError, match="non-positive"):
        scale_by_fisher({"a.weight": torch.ones(2, 3)}, F, damping=0.0)  # a.weight has a zero
    with pytest.raises(InvalidInputError, match="damping"):
        scale_by_fisher(good, F, damping=-1.0)
    with pytest.raises(InvalidInputError, match="power"):
        scale_by_fisher(good, F, power=float("nan"))
    with pytest.raises(InvalidInputError, match="group_expand"):
        scale_by_fisher(good, F, group_expand="max")
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        scale_by_fisher({"b.bias": [1.0, 2.0]}, F)
    with pytest.raises(InvalidInputError, match="floating point"):
        scale_by_fisher({"b.bias": torch.ones(2, dtype=torch.long)}, F)
    with pytest.raises(InvalidInputError, match="empty"):
        scale_by_fisher({}, F)
    with pytest.raises(InvalidInputError, match="hf_fisher.Fisher"):
        scale_by_fisher(good, {"b.bias": torch.ones(2)})
    with pytest.raises(InvalidInputError, match="dict"):
        scale_by_fisher(torch.ones(2), F)
    with pytest.raises(InvalidInputError, match="damping_mode"):
        scale_by_fisher(good, F, damping_mode="exact")
