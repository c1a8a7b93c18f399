"""KFAC (``hf_fisher.estimators.kfac`` / ``hf_fisher.artifacts.kfac``) against independent references.

- curvlinops' ``KFACLinearOperator`` (the oracle) on a tiny LLaMA's linear layers, float64:
  expand and reduce, empirical, type-2 and MC (same seed: the label draws are the same stream);
  its reductions "mean" / "sum" against our normalisations (the scale conventions);
- where curvlinops cannot go (HF Conv1D, GPT-2's fused c_attn, tied embeddings, padding): a
  brute-force computation of the factors from their definitions, sample by sample, each sample
  alone and unpadded, with plain autograd;
- ``to_diagonal`` / ``matvec`` against dense Kronecker products built index by index,
  ``inverse_vp`` against a dense solve of ``(Σ G ⊗ A + λI)``.

Note: HF LLaMA's RMSNorm computes in float32 even in a float64 model, so gradients flowing
through a norm are rounded to float32 at different scales by curvlinops (mean loss) and by us
(summed loss): G of layers below a norm agree to ~1e-7, not 1e-15.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as tf
from torch import nn

from hf_fisher.artifacts.fisher import Fisher
from hf_fisher.artifacts.kfac import KFACFisher
from hf_fisher.errors import (
    ArtifactError,
    InvalidInputError,
    ModelMismatchError,
    UnsupportedError,
)
from hf_fisher.estimators.kfac import KFACEstimator, hf_fisher_register_estimators

from tiny_models import gpt2, llama, padded_batch

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = r"proj|lm_head"


def _close(mine, ref, rtol=1e-5):
    ref = ref.to(torch.float64)
    torch.testing.assert_close(mine.to(torch.float64), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.fixture(scope="module")
def biased_llama():
    """A tiny LLaMA with biases in attention and MLP (bias-augmented A)."""
    torch.manual_seed(11)
    cfg = tf.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, mlp_bias=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def ids_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 61, (3, 7), generator=g) for _ in range(2)]


class _Logits(nn.Module):
    """What curvlinops sees: logits of the labelled positions as [B, V, T-1] (CrossEntropyLoss's
    class-second layout), targets input_ids[:, 1:]."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(input_ids=x).logits[:, :-1].permute(0, 2, 1)


def _curvlinops(model, batches, *, fisher_type, kfac_approx, reduction="mean", seed=3):
    from curvlinops import KFACLinearOperator

    params = [p for n, p in model.named_parameters() if ("proj" in n or "lm_head" in n)]
    K = KFACLinearOperator(
        _Logits(model), nn.CrossEntropyLoss(reduction=reduction), params, [(x, x[:, 1:]) for x in batches],
        fisher_type=fisher_type, kfac_approx=kfac_approx, separate_weight_and_bias=False,
        check_deterministic=False, seed=seed,
    )
    K.compute_kronecker_factors()
    return K


def _ours(model, batches, **options):
    return KFACEstimator(params=options.pop("params", LINEAR), **options).collect(
        model, [{"input_ids": x} for x in batches], progress=False
    )


# ---------------------------------------------------------------------------- curvlinops oracle
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["empirical", "type-2", "mc"])
def test_factors_equal_curvlinops(biased_llama, ids_batches, fisher_type, kfac_approx):
    K = _curvlinops(biased_llama, ids_batches, fisher_type=fisher_type, kfac_approx=kfac_approx)
    ours = _ours(biased_llama, ids_batches, fisher_type=fisher_type, kfac_approx=kfac_approx, normalization="token", seed=3)
    assert len(ours.layers) == 15  # 7 projections x 2 layers + lm_head
    for name, layer in ours.layers.items():
        assert layer.bias is not None or name == "lm_head"
        _close(layer.A, K._input_covariances["m." + name])
        _close(layer.G, K._gradient_covariances["m." + name])
    assert ours.counts.samples == 6 and ours.counts.tokens == 6 * 6


def test_plain_llama_and_scale_conventions(ids_batches):
    """No biases (A not augmented); curvlinops "sum" = N x ours("sum"); ours("mean") = curvlinops("mean") / R."""
    model = llama()
    N, R = 6, 6
    mean = _curvlinops(model, ids_batches, fisher_type="empirical", kfac_approx="expand")
    total = _curvlinops(model, ids_batches, fisher_type="empirical", kfac_approx="expand", reduction="sum")
    token = _ours(model, ids_batches, normalization="token")
    summed = _ours(model, ids_batches, normalization="sum")
    default = _ours(model, ids_batches)
    for name in token.layers:
        key = "m." + name
        assert token.layers[name].bias is None
        _close(token.layers[name].A, mean._input_covariances[key])
        _close(token.layers[name].G, mean._gradient_covariances[key])
        _close(summed.layers[name].A, total._input_covariances[key])
        _close(N * summed.layers[name].G, total._gradient_covariances[key])
        _close(R * default.layers[name].G, mean._gradient_covariances[key])


def test_mc_approaches_type2(biased_llama, ids_batches):
    """Many draws estimate the type-2 expectation (error shrinks with the draws)."""
    exact = _ours(biased_llama, ids_batches[:1], fisher_type="type-2", params="lm_head|layers.1.mlp.down_proj")
    errs = []
    for k in (1, 64):
        mc = _ours(biased_llama, ids_batches[:1], fisher_type="mc", mc_samples=k, seed=0, params="lm_head|layers.1.mlp.down_proj")
        G, G0 = mc.layers["model.layers.1.mlp.down_proj"].G, exact.layers["model.layers.1.mlp.down_proj"].G
        errs.append(float((G - G0).norm() / G0.norm()))
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.3


# ---------------------------------------------------------------------------- brute force
def _brute(model, batch, *, kfac_approx, normalization="mean"):
    """Factors from the definitions, each sample alone (its real tokens only), plain autograd."""
    from transformers.pytorch_utils import Conv1D

    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}
    acc = {n: {"A": 0.0, "G": 0.0, "M": 0} for n in mods}
    N = 0
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][keep].unsqueeze(0)
        labels = batch["labels"][i][keep].unsqueeze(0)
        tgt = labels[0, 1:]
        n_i = int((tgt != -100).sum())
        if n_i == 0:
            continue
        N += 1
        c = {"mean": 1.0 / n_i**2, "sum": 1.0, "token": 1.0 / n_i}[normalization]
        seen = {}
        hooks = []
        for name, m in mods.items():
            def hook(mod, args, out, name=name, seen=seen):
                out.retain_grad()
                seen[name] = (args[0].detach(), out)
            hooks.append(m.register_forward_hook(hook))
        logits = model(input_ids=ids).logits[0, :-1]
        for h in hooks:
            h.remove()
        ok = tgt != -100
        loss = nn.functional.cross_entropy(logits[ok], tgt[ok], reduction="sum")
        model.zero_grad()
        loss.backward()
        for name, m in mods.items():
            x, out = seen[name]
            g = out.grad[0]  # [T, d_out]
            a = acc[name]
            T = g.shape[0]
            if isinstance(m, nn.Embedding):
                onehot = torch.zeros(T, m.num_embeddings, dtype=torch.float64)
                onehot[torch.arange(T), x[0]] = 1.0
                a["A"] = a["A"] + onehot.sum(0)
                a["M"] += T
                a["G"] = a["G"] + c * sum(torch.outer(g[t], g[t]) for t in range(T))
                continue
            xa = torch.cat([x[0], torch.ones(T, 1, dtype=x.dtype)], dim=1) if m.bias is not None else x[0]
            if kfac_approx == "expand":
                a["A"] = a["A"] + sum(torch.outer(xa[t], xa[t]) for t in range(T))
                a["M"] += T
                a["G"] = a["G"] + c * sum(torch.outer(g[t], g[t]) for t in range(T))
            else:
                abar = xa.mean(0)
                gsum = g.sum(0)
                a["A"] = a["A"] + torch.outer(abar, abar)
                a["M"] += 1
                a["G"] = a["G"] + c * torch.outer(gsum, gsum)
    model.zero_grad(set_to_none=True)
    return {n: (a["A"] / a["M"], a["G"] / N) for n, a in acc.items()}


@pytest.fixture(scope="module")
def gpt2_model():
    return gpt2()


@pytest.fixture(scope="module")
def gpt2_batch():
    batch = padded_batch([6, 4, 5, 3], seed=3)
    batch["labels"][3] = -100  # a sample without any label token: skipped
    return batch


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_gpt2_conv1d_c_attn_and_tied_embeddings_vs_brute_force(gpt2_model, gpt2_batch, kfac_approx):
    """Padded batch (one sample with no label token) vs each sample alone; Conv1D (fused c_attn:
    d_out = 3 x 32, bias-augmented), the tied wte / lm_head weight (two layers, one parameter)."""
    k = KFACEstimator(kfac_approx=kfac_approx).collect(gpt2_model, [gpt2_batch], progress=False)
    ref = _brute(gpt2_model, gpt2_batch, kfac_approx=kfac_approx)
    assert k.layers["transformer.h.0.attn.c_attn"].kind == "conv1d"
    assert k.layers["transformer.h.0.attn.c_attn"].A.shape == (33, 33)
    assert k.layers["transformer.h.0.attn.c_attn"].G.shape == (96, 96)
    assert k.layers["lm_head"].weight == k.layers["transformer.wte"].weight == "transformer.wte.weight"
    assert k.counts.samples == 3  # the 2-token sample has its only label ignored
    for name, layer in k.layers.items():
        A, G = ref[name]
        _close(layer.A, A, rtol=1e-10)
        _close(layer.G, G, rtol=1e-10)


def _dense_block(k: KFACFisher, names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The dense KFAC block over the row-major entries of ``names`` (concatenated), built index
    by index from the factors: F[(p, i), (q, j)] = Σ_layers G[o(p,i), o(q,j)] Ã[c(p,i), c(q,j)]."""
    sizes = [int(torch.Size(k.param_shapes[n]).numel()) for n in names]
    offset = {n: sum(sizes[:i]) for i, n in enumerate(names)}
    D = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for L in k.layers.values():
        if L.weight not in names:
            continue
        A = torch.diag(L.A) if L.a_diagonal else L.A
        G = torch.diag(L.G) if L.g_diagonal else L.G
        # every entry of the layer's parameters as (flat index, output o, input column c)
        entries = []
        shape = k.param_shapes[L.weight]
        for r in range(shape[0]):
            for col in range(shape[1]):
                o, c = (r, col) if L.kind == "linear" else (col, r)
                entries.append((offset[L.weight] + r * shape[1] + col, o, c))
        if L.bias is not None:
            entries += [(offset[L.bias] + o, o, A.shape[0] - 1) for o in range(shape[0] if L.kind == "linear" else shape[1])]
        idx = torch.tensor([e[0] for e in entries])
        o = torch.tensor([e[1] for e in entries])
        c = torch.tensor([e[2] for e in entries])
        D[idx.unsqueeze(1), idx.unsqueeze(0)] += G[o.unsqueeze(1), o.unsqueeze(0)] * A[c.unsqueeze(1), c.unsqueeze(0)]
    return D, names


@pytest.fixture(scope="module")
def gpt2_kfac(gpt2_model, gpt2_batch):
    return KFACEstimator(fisher_type="type-2").collect(gpt2_model, [gpt2_batch], progress=False)


@pytest.mark.parametrize("block", [
    ["transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn.c_proj.bias"],  # Conv1D + bias
    ["transformer.wte.weight"],  # tied: embedding + lm_head terms
])
def test_matvec_to_diagonal_inverse_vp_vs_dense(gpt2_kfac, block):
    k = gpt2_kfac
    D, names = _dense_block(k, block)
    g = torch.Generator().manual_seed(0)
    vec = {n: torch.randn(k.param_shapes[n], generator=g, dtype=torch.float64) for n in names}
    flat = torch.cat([vec[n].flatten() for n in names])
    mv = k.matvec(vec)
    _close(torch.cat([mv[n].flatten() for n in names]), D @ flat, rtol=1e-10)
    diag = k.to_diagonal()
    assert isinstance(diag, Fisher) and diag.reduction == "param" and diag.metadata.estimator == "kfac"
    _close(torch.cat([diag[n].flatten() for n in names]), D.diagonal(), rtol=1e-12)
    lam = 1e-3 * float(D.diagonal().mean())
    sol = k.inverse_vp(vec, damping=lam)
    want = torch.linalg.solve(D + lam * torch.eye(D.shape[0], dtype=torch.float64), flat)
    _close(torch.cat([sol[n].flatten() for n in names]), want, rtol=1e-7)


def test_factor_damping_vs_dense(gpt2_kfac):
    k = gpt2_kfac
    L = k.layers["transformer.h.0.mlp.c_proj"]  # Conv1D [128, 32] + bias
    lam = 1e-2
    r = lam**0.5
    vec = {L.weight: torch.randn(k.param_shapes[L.weight], dtype=torch.float64),
           L.bias: torch.randn(k.param_shapes[L.bias], dtype=torch.float64)}
    sol = k.inverse_vp(vec, damping=lam, damping_mode="factor")
    M = torch.cat([vec[L.weight].t(), vec[L.bias].unsqueeze(1)], dim=1)  # canonical [out, in + 1]
    eye = lambda n: torch.eye(n, dtype=torch.float64)
    want = torch.linalg.solve(L.G + r * eye(L.d_out), M) @ torch.linalg.inv(L.A + r * eye(L.A.shape[0]))
    _close(sol[L.weight], want[:, :-1].t(), rtol=1e-9)
    _close(sol[L.bias], want[:, -1], rtol=1e-9)


def test_padding_and_regrouping_do_not_change_factors():
    """A right- and a left-padded batch with -100 labels equal the same samples one at a time."""
    model = llama()
    right = padded_batch([7, 3, 5], seed=2)
    left = padded_batch([7, 3, 5], seed=2, side="left")
    alone = []
    for i, n in enumerate([7, 3, 5]):
        keep = right["attention_mask"][i].bool()
        alone.append({k: v[i][keep].unsqueeze(0) for k, v in right.items()})
    for approx in ("expand", "reduce"):
        est = KFACEstimator(kfac_approx=approx, params=LINEAR)
        ref = est.collect(model, alone, progress=False)
        for batch in (right, left):
            k = est.collect(model, [batch], progress=False)
            assert k.counts.to_dict() == ref.counts.to_dict()
            for name, layer in k.layers.items():
                _close(layer.A, ref.layers[name].A, rtol=1e-9)
                _close(layer.G, ref.layers[name].G, rtol=1e-9)


def test_diagonal_g_above_logs_and_keeps_the_diagonal(caplog):
    model = llama()
    batch = [torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(4))]
    dense = _ours(model, batch, params="lm_head|down_proj")
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        diag = _ours(model, batch, params="lm_head|down_proj", diagonal_g_above=50)
    assert any("lm_head" in r.getMessage() and "diagonal" in r.getMessage() for r in caplog.records)
    assert diag.layers["lm_head"].g_diagonal and diag.layers["lm_head"].G.shape == (61,)
    assert not diag.layers["model.layers.0.mlp.down_proj"].g_diagonal  # 32 outputs
    _close(diag.layers["lm_head"].G, dense.layers["lm_head"].G.diagonal(), rtol=1e-12)
    _close(diag.to_diagonal()["lm_head.weight"], dense.to_diagonal()["lm_head.weight"], rtol=1e-12)


# ---------------------------------------------------------------------------- artifact
def test_save_load_round_trip(gpt2_kfac, gpt2_model, tmp_path):
    path = gpt2_kfac.save_pretrained(tmp_path / "kfac")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "kfac.safetensors", "kfac_config.json"]
    assert "library_name: hf_fisher" in (path / "README.md").read_text()
    back = KFACFisher.from_pretrained(path, model=gpt2_model)
    assert back.settings == gpt2_kfac.settings and back.counts == gpt2_kfac.counts
    assert back.metadata.normalization == "mean" and back.metadata.estimator == "kfac"
    for name, layer in gpt2_kfac.layers.items():
        b = back.layers[name]
        assert (b.kind, b.weight, b.bias, b.a_diagonal, b.g_diagonal) == (layer.kind, layer.weight, layer.bias, layer.a_diagonal, layer.g_diagonal)
        assert torch.equal(b.A, layer.A) and torch.equal(b.G, layer.G)
    gpt2_kfac.save_pretrained(path)  # overwriting a KFAC artifact is allowed
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt"):
        gpt2_kfac.save_pretrained(path)
    with pytest.raises(ModelMismatchError, match="c_attn.bias: KFAC expects"):
        KFACFisher.from_pretrained(path, model=llama())


def _edit(path, fn):
    cfg = json.loads((path / "kfac_config.json").read_text())
    fn(cfg)
    (path / "kfac_config.json").write_text(json.dumps(cfg))


def test_malformed_artifacts_are_clear_errors(gpt2_kfac, tmp_path):
    from safetensors.torch import load_file, save_file

    good = gpt2_kfac.save_pretrained(tmp_path / "good")
    import shutil

    def copy(name):
        p = tmp_path / name
        shutil.copytree(good, p)
        return p

    with pytest.raises(ArtifactError, match="does not exist"):
        KFACFisher.from_pretrained(tmp_path / "nowhere")
    p = copy("noconfig")
    (p / "kfac_config.json").unlink()
    with pytest.raises(ArtifactError, match="not a KFAC artifact"):
        KFACFisher.from_pretrained(p)
    p = copy("kind")
    _edit(p, lambda c: c["layers"]["lm_head"].update(kind="conv3d"))
    with pytest.raises(ArtifactError, match=r"layers\.lm_head\.kind"):
        KFACFisher.from_pretrained(p)
    p = copy("fishertype")
    _edit(p, lambda c: c["settings"].update(fisher_type="true"))
    with pytest.raises(ArtifactError, match=r"settings\.fisher_type"):
        KFACFisher.from_pretrained(p)
    p = copy("json")
    (p / "kfac_config.json").write_text('{"format_version": 1, "layers": {')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        KFACFisher.from_pretrained(p)
    p = copy("escape")
    _edit(p, lambda c: c.update(tensor_file="../good/kfac.safetensors"))
    with pytest.raises(ArtifactError, match="tensor_file"):
        KFACFisher.from_pretrained(p)
    p = copy("shape")
    t = load_file(str(p / "kfac.safetensors"))
    t["A.lm_head"] = t["A.lm_head"][:-1, :-1].contiguous()
    save_file(t, str(p / "kfac.safetensors"))
    with pytest.raises(ArtifactError, match="'A.lm_head' has shape"):
        KFACFisher.from_pretrained(p)
    p = copy("missing")
    t = load_file(str(p / "kfac.safetensors"))
    del t["G.transformer.wte"]
    save_file(t, str(p / "kfac.safetensors"))
    with pytest.raises(ArtifactError, match="lacks.*G.transformer.wte"):
        KFACFisher.from_pretrained(p)
    p = copy("nan")
    t = load_file(str(p / "kfac.safetensors"))
    t["G.lm_head"][0, 0] = float("nan")
    save_file(t, str(p / "kfac.safetensors"))
    with pytest.raises(ArtifactError, match="NaN"):
        KFACFisher.from_pretrained(p)
    p = copy("paramshape")
    _edit(p, lambda c: c["param_shapes"].update({"transformer.wte.weight": [60, 32]}))
    with pytest.raises(ArtifactError, match="transformer.wte.weight"):
        KFACFisher.from_pretrained(p)
    p = copy("corrupt")
    (p / "kfac.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read tensor file"):
        KFACFisher.from_pretrained(p)


# ---------------------------------------------------------------------------- refused before work
class _Counting:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("options, match", [
    ({"fisher_type": "true"}, "fisher_type"),
    ({"kfac_approx": "diag"}, "kfac_approx"),
    ({"mc_samples": 4}, "only applies to fisher_type='mc'"),
    ({"fisher_type": "mc", "mc_samples": 0}, "mc_samples"),
    ({"normalization": "avg"}, "normalization"),
    ({"diagonal_g_above": -1}, "diagonal_g_above"),
    ({"seed": -3}, "seed"),
])
def test_bad_options_refused(options, match):
    with pytest.raises(InvalidInputError, match=match):
        KFACEstimator(**options)


def test_refused_before_any_forward():
    model = llama()
    counter = _Counting(model)
    batch = [{"input_ids": torch.randint(3, 61, (2, 5))}]
    with pytest.raises(UnsupportedError, match="61 backward passes.*fisher_type='mc'"):
        KFACEstimator(fisher_type="type-2", max_type2_outputs=32).collect(model, batch, progress=False)
    with pytest.raises(InvalidInputError, match="not the weight .* of an nn.Linear"):
        KFACEstimator(params=["model.norm.weight", "lm_head.weight"]).collect(model, batch, progress=False)
    with pytest.raises(InvalidInputError, match="matches no trainable parameter"):
        KFACEstimator(params="nothing_like_this").collect(model, batch, progress=False)
    with pytest.raises(InvalidInputError, match="input_ids"):
        KFACEstimator().collect(model, [{"ids": torch.ones(2, 3, dtype=torch.long)}], progress=False)
    with pytest.raises(InvalidInputError, match="label id"):
        KFACEstimator().collect(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.full((1, 3), 99)}], progress=False)
    assert counter.calls == 0
    counter.handle.remove()


def test_inverse_vp_and_matvec_bad_inputs(gpt2_kfac):
    k = gpt2_kfac
    w = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(InvalidInputError, match="missing.*c_attn.bias"):
        k.inverse_vp({w: torch.zeros(k.param_shapes[w])})
    with pytest.raises(InvalidInputError, match="not covered"):
        k.matvec({"nope": torch.zeros(3)})
    with pytest.raises(InvalidInputError, match="shape"):
        k.matvec({"transformer.wte.weight": torch.zeros(3, 3)})
    with pytest.raises(InvalidInputError, match="damping"):
        k.inverse_vp({"transformer.wte.weight": torch.zeros(k.param_shapes["transformer.wte.weight"])}, damping=0.0)
    with pytest.raises(InvalidInputError, match="tied"):
        k.inverse_vp({"transformer.wte.weight": torch.zeros(k.param_shapes["transformer.wte.weight"])}, damping_mode="factor")


def test_registered_as_plugin_and_skips_non_kronecker_params(caplog):
    got = {}
    hf_fisher_register_estimators(lambda name, cls: got.update({name: cls}))
    assert got == {"kfac": KFACEstimator}
    model = llama()
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        k = KFACEstimator().collect(model, [{"input_ids": torch.randint(3, 61, (2, 5))}], progress=False)
    assert "model.norm.weight" not in k.param_shapes and "model.embed_tokens.weight" in k.param_shapes
    assert any("not in a Kronecker-factored layer" in r.getMessage() for r in caplog.records)
    assert k.layers["model.embed_tokens"].a_diagonal
    assert float(k.layers["model.embed_tokens"].A.sum()) == pytest.approx(1.0)


def test_max_samples_takes_the_first_samples_with_labels():
    model = llama()
    batch = padded_batch([5, 4, 6], seed=9)
    batch["labels"][0] = -100  # no label: not counted, not taken
    k = KFACEstimator(params="lm_head|layers.0.self_attn.q_proj").collect(model, [batch, batch], max_samples=1, progress=False)
    one = {key: v[1:2] for key, v in batch.items()}
    ref = KFACEstimator(params="lm_head|layers.0.self_attn.q_proj").collect(model, [one], progress=False)
    assert k.counts.samples == 1 and k.counts.tokens == ref.counts.tokens
    for name, layer in k.layers.items():
        _close(layer.A, ref.layers[name].A, rtol=1e-9)
        _close(layer.G, ref.layers[name].G, rtol=1e-9)


def test_float32_factors(gpt2_model, gpt2_batch, gpt2_kfac, tmp_path):
    k32 = KFACEstimator(fisher_type="type-2", accumulation_dtype=torch.float32).collect(gpt2_model, [gpt2_batch], progress=False)
    assert k32.metadata.storage_dtype == "float32"
    for name, layer in k32.layers.items():
        assert layer.A.dtype == layer.G.dtype == torch.float32
        _close(layer.G, gpt2_kfac.layers[name].G, rtol=1e-6)
    back = KFACFisher.from_pretrained(k32.save_pretrained(tmp_path / "k32"))
    assert back.layers["lm_head"].G.dtype == torch.float32
    with pytest.raises(InvalidInputError, match="accumulation_dtype"):
        KFACEstimator(accumulation_dtype=torch.float16)


def test_collect_dispatches_to_kfac_and_refuses_diagonal_options():
    import hf_fisher

    from tiny_models import llama, padded_batch

    model = llama()
    batch = padded_batch([5, 4, 3])
    kfac = hf_fisher.collect(model, [batch], estimator="kfac", progress=False)
    assert isinstance(kfac, hf_fisher.KFACFisher)
    direct = KFACEstimator().collect(model, [batch], progress=False)
    assert kfac.counts == direct.counts
    for name in direct.layers:
        assert torch.equal(kfac.layers[name].A, direct.layers[name].A)
        assert torch.equal(kfac.layers[name].G, direct.layers[name].G)
    for bad in ({"reduction": "group"}, {"ema_decay": 0.9}, {"storage_dtype": torch.float16}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            hf_fisher.collect(model, [batch], estimator="kfac", progress=False, **bad)
