"""Issue 26: what the KFAC-OBS update reconstructs (``prune(obs_target=)``). ``"unpruned"`` (the
default): the unpruned model's output of the layer and its residual stream, from the inputs of the
model pruned so far (Kwon et al.'s target; the update also compensates what earlier layers lost).
``"layer"``: the layer's own output on those inputs (OBS / OBC / SparseGPT; the update compensates
only the units removed in this layer)."""

from __future__ import annotations

import pytest
import torch
from test_prune_default_obs_update import BATCHES
from test_prune_kwon_reference import _removed, trained  # noqa: F401  (the fixture)

from hf_fisher.consumers.prune.core import OBS_TARGET, prune
from hf_fisher.consumers.prune.obs import obs_select
from hf_fisher.consumers.prune.units import Unit
from hf_fisher.errors import InvalidInputError
from hf_fisher.layout import Slice

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_target_scales_are_the_weighted_least_squares_of_the_layer_output():
    """Without a cross Gram (``obs_target="layer"``), the kept units' scales minimise
    ``Σ_t ‖G^½ (Σ_{u∈K} s_u W_{J_u} x_{t,J_u} − W x_t)‖²`` — checked against a brute-force
    weighted least squares over the explicit per-token unit outputs (float64); the full update
    folds them in, ``γ`` a fraction ``1 + γ (s − 1)``."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    X = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    units = [Unit("channel", 0, k, None, (Slice("w", 1, 2 * k, 2 * k + 2),), (Slice("w", 1, 2 * k, 2 * k + 2),), 10)
             for k in range(6)]
    G = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    removed, scales, _ = obs_select(W, 1, "w", units, {"b": 2}, lambda u: "b", X.T @ X, G, True)
    kept = [k for k in range(6) if k not in removed]
    assert len(removed) == 2
    Y = X @ W.T  # [t, out]: the layer's own output
    # per-token outputs of each kept unit, weighted by G^½, stacked as columns of a design matrix
    Z = torch.stack([(X[:, 2 * k : 2 * k + 2] @ W[:, 2 * k : 2 * k + 2].T) * G.sqrt() for k in kept], -1)  # [t, out, K]
    ref = torch.linalg.lstsq(Z.reshape(-1, len(kept)), (Y * G.sqrt()).reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(scales, ref, rtol=1e-9, atol=1e-10)
    assert float((ref - 1).abs().max()) > 1e-3  # a real update
    half = obs_select(W, 1, "w", units, {"b": 2}, lambda u: "b", X.T @ X, G, True, update=0.5)
    assert half[0] == removed
    torch.testing.assert_close(half[1], 1 + 0.5 * (ref - 1), rtol=1e-9, atol=1e-10)


def test_layer_target_is_recorded_and_differs_after_the_first_stage(trained):  # noqa: F811
    """The first stage (layer 0's attention) reads the unpruned inputs and residual stream, so both
    targets remove the same heads and fold the same scales there; later stages differ (the MLP of
    layer 0 reads the pruned attention's output). ``stats["obs_target"]`` records the target."""
    model, calib, _, _ = trained
    first, later = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"
    out = {}
    for target in ("unpruned", "layer"):
        r = prune(model, None, sparsity=0.5, scope="layer", rescale_batches=calib, progress=False, obs_target=target)
        assert r.stats["score"] == "kfac" and r.stats["obs_target"] == target
        w = dict(model.named_parameters())
        out[target] = (w[first].detach().clone(), w[later].detach().clone(), {u for u in _removed(r) if u[0] == 0 and u[1] == "head"})
        r.restore()
    assert out["layer"][2] == out["unpruned"][2] and out["layer"][2]
    torch.testing.assert_close(out["layer"][0], out["unpruned"][0], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(out["layer"][1], out["unpruned"][1])
    r = prune(model, None, sparsity=0.5, scope="layer", rescale_batches=calib, progress=False)
    assert r.stats["obs_target"] == OBS_TARGET == "unpruned"
    r.restore()


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(obs_target="model"), r"obs_target= must be one of 'layer', 'unpruned'"),
    (dict(obs_target="layer", score="wanda_sp"), r"obs_target= .*applies to score='kfac' only, not score='wanda_sp'"),
])
def test_obs_target_refused_before_any_work(kwargs, pattern):
    m = tm.llama(torch.float64)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(InvalidInputError, match=pattern):
        prune(m, None, sparsity=0.3, scope="layer", rescale_batches=BATCHES, progress=False, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
