"""merge_with_fisher(method="kfac"): the damped KFAC merge equals a dense solve of
Σ λ_i (F_i + δI)(x − θ_i) = 0 built from the factors; equal Fishers give the average; recipes
round-trip; bad inputs are refused before any write."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_kfac import _dense_block

import hf_fisher
from hf_fisher.consumers.merge.api import load_recipe, merge_with_fisher, recipe_to_kwargs
from hf_fisher.errors import InvalidInputError, ModelMismatchError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = [tm.padded_batch([7, 5, 6], seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def pair():
    models = [tm.gpt2(seed=s) for s in (4, 9)]
    data = [[tm.padded_batch([6, 5, 4], seed=s, vocab=models[0].config.vocab_size)] for s in (0, 1)]
    kfacs = [hf_fisher.collect(m, d, estimator="kfac", progress=False) for m, d in zip(models, data)]
    return models, kfacs


def _factor_damped(k, kfacs, lam, damping):
    """The KFAC with every factor damped relative to its scale, (G + √c ḡ I) and (A + √c ā I)
    (ḡ, ā: the λ-weighted mean diagonals of the layer's factors over the models), for the dense reference."""
    def mean_diag(n, attr):
        return sum(l * float((getattr(kk.layers[n], attr) if getattr(kk.layers[n], f"{attr.lower()}_diagonal")
                              else torch.diagonal(getattr(kk.layers[n], attr))).double().mean()) for l, kk in zip(lam, kfacs))

    def add(f, diag, r):
        return f.double() + r if diag else f.double() + r * torch.eye(f.shape[0], dtype=torch.float64)

    layers = {n: dataclasses.replace(L, G=add(L.G, L.g_diagonal, damping ** 0.5 * mean_diag(n, "G")),
                                     A=add(L.A, L.a_diagonal, damping ** 0.5 * mean_diag(n, "A")))
              for n, L in k.layers.items()}
    return SimpleNamespace(layers=layers, param_shapes=k.param_shapes)


def dense_merge(kfacs, models, names, weights, damping, mode):
    lam = [w / sum(weights) for w in weights]
    Ds = [_dense_block(k, names)[0] for k in kfacs]
    n = Ds[0].shape[0]
    diag = sum(l * float(D.diagonal().mean()) for l, D in zip(lam, Ds))
    delta = damping * diag
    if mode == "factor":
        Ds = [_dense_block(_factor_damped(k, kfacs, lam, damping), names)[0] for k in kfacs]
        shift = 0.0
    else:
        shift = delta
    P = [dict(m.named_parameters()) for m in models]
    thetas = [torch.cat([P[i][x].detach().double().reshape(-1) for x in names]) for i in range(len(models))]
    A = sum(l * (D + shift * torch.eye(n, dtype=torch.float64)) for l, D in zip(lam, Ds))
    b = sum(l * (D + shift * torch.eye(n, dtype=torch.float64)) @ t for l, D, t in zip(lam, Ds, thetas))
    x = torch.linalg.solve(A, b)
    out, off = {}, 0
    for name in names:
        k = P[0][name].numel()
        out[name] = x[off : off + k].reshape(P[0][name].shape)
        off += k
    return out


@pytest.mark.parametrize("block", [
    ["transformer.h.1.attn.c_proj.bias", "transformer.h.1.attn.c_proj.weight"],  # Conv1D + bias
    ["transformer.wte.weight"],  # tied: embedding + lm_head Kronecker terms
])
@pytest.mark.parametrize("weights, damping, mode", [([0.5, 0.5], 1e-3, "factor"), ([0.7, 0.3], 1e-1, "factor"),
                                                   ([0.7, 0.3], 1e-1, "exact")])
def test_kfac_merge_equals_the_dense_solve(pair, block, weights, damping, mode):
    models, kfacs = pair
    merged = merge_with_fisher(models, kfacs, method="kfac", weights=weights, kfac_damping=damping,
                               kfac_damping_mode=mode, progress=False)
    want = dense_merge(kfacs, models, block, weights, damping, mode)
    got = dict(merged.named_parameters())
    for name in block:
        torch.testing.assert_close(got[name].detach().double(), want[name], rtol=1e-6, atol=1e-8)


def test_three_models_use_conjugate_gradients(pair):
    models, kfacs = pair
    three = [*models, tm.gpt2(seed=11)]
    k3 = [*kfacs, hf_fisher.collect(three[2], [tm.padded_batch([5, 6], seed=7, vocab=three[2].config.vocab_size)],
                                    estimator="kfac", progress=False)]
    merged = merge_with_fisher(three, k3, method="kfac", kfac_damping=0.1, progress=False)
    block = ["transformer.h.1.attn.c_proj.bias", "transformer.h.1.attn.c_proj.weight"]
    want = dense_merge(k3, three, block, [1 / 3] * 3, 0.1, "factor")
    got = dict(merged.named_parameters())
    for name in block:
        torch.testing.assert_close(got[name].detach().double(), want[name], rtol=1e-6, atol=1e-8)


def test_equal_fishers_give_the_average_and_uncovered_tensors_are_averaged(pair):
    models, kfacs = pair
    merged = merge_with_fisher(models, [kfacs[0], kfacs[0]], method="kfac", progress=False)
    P = [dict(m.named_parameters()) for m in models]
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p.detach(), (P[0][name] + P[1][name]) / 2, rtol=1e-7, atol=1e-9)
    different = merge_with_fisher(models, kfacs, method="kfac", progress=False)
    D = dict(different.named_parameters())
    assert not torch.allclose(D["transformer.h.0.mlp.c_fc.weight"], (P[0]["transformer.h.0.mlp.c_fc.weight"] + P[1]["transformer.h.0.mlp.c_fc.weight"]) / 2)
    ln = "transformer.h.0.ln_1.weight"  # no KFAC layer: the no-Fisher rule (average)
    torch.testing.assert_close(D[ln].detach(), (P[0][ln] + P[1][ln]) / 2)


def test_recipe_round_trip(pair, tmp_path):
    models, kfacs = pair
    paths = []
    for i, (m, k) in enumerate(zip(models, kfacs)):
        m.save_pretrained(tmp_path / f"m{i}")
        k.save_pretrained(tmp_path / f"k{i}")
        paths.append((str(tmp_path / f"m{i}"), str(tmp_path / f"k{i}")))
    out = merge_with_fisher([p[0] for p in paths], [p[1] for p in paths], method="kfac", kfac_damping=0.01,
                            output_dir=tmp_path / "merged", progress=False)
    recipe = load_recipe(out / "mergekit_config.yml")
    assert recipe["merge_method"] == "kfac" and recipe["parameters"]["kfac_damping"] == 0.01
    again = merge_with_fisher(**recipe_to_kwargs(recipe), output_dir=tmp_path / "again", progress=False)
    from safetensors.torch import load_file

    a = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    b = load_file(next((tmp_path / "again").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.name == "again"


def test_bad_inputs_refused_before_writing(pair, tmp_path):
    models, kfacs = pair
    diag = hf_fisher.collect(models[0], [tm.padded_batch([5, 4], seed=3, vocab=models[0].config.vocab_size)], progress=False)
    diag.save_pretrained(tmp_path / "diag")
    with pytest.raises(InvalidInputError, match="not a KFAC artifact"):
        merge_with_fisher(models, [str(tmp_path / "diag"), kfacs[1]], method="kfac", output_dir=tmp_path / "o1", progress=False)
    with pytest.raises(InvalidInputError, match="KFACFisher"):
        merge_with_fisher(models, [diag, kfacs[1]], method="kfac", output_dir=tmp_path / "o2", progress=False)
    with pytest.raises(InvalidInputError, match="kfac_damping"):
        merge_with_fisher(models, kfacs, method="kfac", kfac_damping=0, progress=False)
    with pytest.raises(InvalidInputError, match="kfac_damping_mode"):
        merge_with_fisher(models, kfacs, method="kfac", kfac_damping_mode="both", progress=False)
    with pytest.raises(InvalidInputError, match="KFAC Fisher"):
        merge_with_fisher(models, None, method="kfac", progress=False)
    llama = tm.llama()
    other = hf_fisher.collect(llama, BATCHES, estimator="kfac", progress=False)
    with pytest.raises(ModelMismatchError):
        merge_with_fisher(models, [kfacs[0], other], method="kfac", output_dir=tmp_path / "o3", progress=False)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
