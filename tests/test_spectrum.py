"""Spectra (hf_fisher.consumers.spectrum over hf_fisher.estimators.curvature) against dense matrices built by brute force.

The tiny model is a 1-layer LLaMA (hidden 16, 4 heads, 2 kv-heads: GQA; vocab 17; P = 2512
parameters) in float64. References:

- empirical Fisher: F = (1/N) Σ g_i g_iᵀ with g_i from plain autograd on each sample alone
  (without its padding);
- GGN: (1/N) Σ_i (1/n_i²) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t with J the Jacobian of the sample's
  logits from torch.autograd.functional.jacobian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as tf

import hf_fisher
from hf_fisher.consumers.spectrum import (
    capacity_metrics,
    hutchinson_trace,
    lanczos,
    slq_density,
    spectrum,
)
from hf_fisher.errors import (
    EmptyDataError,
    InvalidInputError,
    NoTrainableParametersError,
    UnsupportedError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 17


def _model(attn="eager", seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, attn_implementation=attn,
    )
    return tf.LlamaForCausalLM(cfg).double().eval()


def _samples():
    g = torch.Generator().manual_seed(1)
    lengths = [6, 4, 3, 5, 5, 2]
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def _batch(seqs, side="right"):
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s):] = s
            mask[i, T - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batches():
    s = _samples()
    return [_batch(s[:3]), _batch(s[3:])]


def _flat_params(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    return names, params


def _logits_of_flat(model, names, params, ids):
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(flat):
        parts = torch.split(flat, sizes)
        pd = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return torch.func.functional_call(model, pd, (ids,), {"use_cache": False}).logits[0]
    return f


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def dense(model):
    """Dense empirical Fisher, per-sample gradients, and dense GGN, by brute force."""
    names, params = _flat_params(model)
    grads, ggn = [], None
    for s in _samples():
        ids = s.view(1, -1)
        logits = model(input_ids=ids, use_cache=False).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], s[1:], reduction="mean")
        g = torch.autograd.grad(loss, params)
        grads.append(torch.cat([x.reshape(-1) for x in g]).detach())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        J = torch.autograd.functional.jacobian(_logits_of_flat(model, names, params, ids), flat, vectorize=True)  # [T, V, P]
        z = logits.detach()[:-1]
        J = J[:-1]
        n = z.shape[0]
        p = torch.softmax(z, -1)
        H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        term = torch.einsum("tvp,tvw,twq->pq", J, H, J) / n**2
        ggn = term if ggn is None else ggn + term
    G = torch.stack(grads)
    N = G.shape[0]
    return {"G": G, "F": G.T @ G / N, "GGN": ggn / N, "names": names, "params": params}


@pytest.fixture(scope="module")
def emp(model):
    return spectrum(model, _batches(), curvature="empirical", k=5, blocks=("layer", "head", "head_qkvo"),
                    return_vectors=True, hutchinson_probes=40, slq_vectors=3, slq_steps=20, seed=3)


@pytest.fixture(scope="module")
def ggn(model):
    return spectrum(model, _batches(), curvature="ggn", k=5, blocks=None, hutchinson_probes=40, slq_vectors=0, seed=4)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# ------------------------------------------------------------------------------ top-k


def test_empirical_top5_equals_dense_eigvalsh(emp, dense):
    ref = torch.linalg.eigvalsh(dense["F"]).flip(0)[:5].numpy()
    assert emp.dim == dense["F"].shape[0] == 2512
    assert emp.n_samples == 6
    assert _rel(emp.eigenvalues, ref) < 1e-6


def test_ggn_top5_equals_dense_eigvalsh(ggn, dense):
    ref = torch.linalg.eigvalsh(dense["GGN"]).flip(0)[:5].numpy()
    assert _rel(ggn.eigenvalues, ref) < 1e-6


def test_eigenvectors_are_eigenvectors_of_dense(emp, dense):
    Fm = dense["F"].numpy()
    for j in range(5):
        v = torch.cat([t.reshape(-1) for t in emp.eigenvector(j).values()]).numpy()
        assert abs(np.linalg.norm(v) - 1) < 1e-8
        assert np.linalg.norm(Fm @ v - emp.eigenvalues[j] * v) < 1e-7 * emp.eigenvalues[0]
    assert set(emp.eigenvector(0)) == set(dense["names"])


def test_empirical_diagonal_is_core_fisher(model, dense):
    # the matrix whose spectrum we take has the core's empirical diagonal Fisher on its diagonal
    fisher = hf_fisher.collect(model, _batches(), progress=False)
    diag = torch.cat([fisher[n].reshape(-1) for n in dense["names"]])
    assert torch.allclose(diag, torch.diagonal(dense["F"]), rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------ traces


def test_hutchinson_within_three_standard_errors(emp, ggn, dense):
    for res, M in ((emp, dense["F"]), (ggn, dense["GGN"])):
        exact = float(torch.trace(M))
        assert res.trace_stderr > 0
        assert abs(res.trace - exact) < 3 * res.trace_stderr
    assert emp.trace_exact == pytest.approx(float(torch.trace(dense["F"])), rel=1e-10)


def test_hutchinson_is_seeded_and_unbiased_on_a_dense_matrix():
    A = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = (A @ A.T).numpy()
    t1, se1, s1 = hutchinson_trace(lambda v: A @ v, 30, 200, seed=5)
    _, _, s2 = hutchinson_trace(lambda v: A @ v, 30, 200, seed=5)
    assert np.array_equal(s1, s2)
    assert abs(t1 - np.trace(A)) < 3 * se1


# ------------------------------------------------------------------------------ SLQ


def test_slq_density_integrates_to_one_and_mean_is_trace_over_dim(emp):
    d = emp.density
    grid, rho = d["grid"], d["density"]
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-6)
    # Gaussian broadening keeps the first moment: ∫ x ρ = quadrature mean
    assert np.trapezoid(grid * rho, grid) == pytest.approx(d["mean"], rel=1e-6, abs=1e-12)
    for w in d["weights"]:
        assert w.sum() == pytest.approx(1.0, abs=1e-12)


def test_slq_mean_equals_hutchinson_with_the_same_probes_and_recovers_eigenvalues():
    A = torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = (A @ A.T).numpy()
    mv = lambda v: A @ v
    t, _, _ = hutchinson_trace(mv, 12, 4, seed=9)
    d = slq_density(mv, 12, vectors=4, steps=12, seed=9)
    assert d["mean"] * 12 == pytest.approx(t, rel=1e-10)
    # a full Krylov space: the quadrature nodes are the exact eigenvalues
    assert np.allclose(np.sort(d["nodes"][0]), np.linalg.eigvalsh(A), rtol=1e-8)


def test_lanczos_basis_stays_orthogonal_on_a_clustered_spectrum():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    lam = np.concatenate([np.full(190, 1e-3), np.linspace(1, 10, 10)])
    A = (Q * lam) @ Q.T
    a, b = lanczos(lambda v: A @ v, rng.standard_normal(200), 60)
    T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    theta = np.linalg.eigvalsh(T)
    # no spurious copies ("ghosts") of the converged top eigenvalue
    assert np.sum(np.abs(theta - 10) < 1e-6) == 1
    assert theta.max() == pytest.approx(10, rel=1e-10)


# ------------------------------------------------------------------------------ blocks


def _head_index(model, dense, layer_head, kv_head):
    """Flat coordinates of head h: its Q rows, its kv-head's K/V rows, its O columns, built
    here from the module shapes (independently of the layout)."""
    names, params = dense["names"], dense["params"]
    hd = 4
    offsets, o = {}, 0
    for n, p in zip(names, params):
        offsets[n] = o
        o += p.numel()
    pre = "model.layers.0.self_attn."
    idx = []
    for proj, rows in (("q_proj", layer_head), ("k_proj", kv_head), ("v_proj", kv_head)):
        w = dict(zip(names, params))[pre + proj + ".weight"]
        grid = torch.arange(w.numel()).view(w.shape)
        idx.append(grid[rows * hd:(rows + 1) * hd].reshape(-1) + offsets[pre + proj + ".weight"])
    w = dict(zip(names, params))[pre + "o_proj.weight"]
    grid = torch.arange(w.numel()).view(w.shape)
    idx.append(grid[:, layer_head * hd:(layer_head + 1) * hd].reshape(-1) + offsets[pre + "o_proj.weight"])
    return torch.cat(idx)


@pytest.mark.parametrize("head", [0, 1, 2, 3])
def test_per_head_block_spectrum_equals_dense_sub_block(model, emp, dense, head):
    kv = head // 2  # GQA: 4 heads, 2 kv-heads
    ix = _head_index(model, dense, head, kv)
    sub = dense["F"][ix][:, ix]
    ref = torch.linalg.eigvalsh(sub).flip(0).numpy()
    blk = emp.blocks[f"layer0.head{head}"]
    assert blk.dim == ix.numel() == 3 * 4 * 16 + 16 * 4
    assert blk.method == "gram"  # N = 6 < 256
    r = blk.metrics["rank"]
    assert r == 6
    assert np.allclose(blk.eigenvalues, ref[:r], rtol=1e-9, atol=1e-14 * ref[0])
    assert np.all(np.abs(ref[r:]) < 1e-10 * ref[0])
    want = capacity_metrics(ref[:r], ix.numel(), n_samples=6)
    for key in ("trace", "eigmax", "condition_number", "energy_r8", "energy_r16", "effective_rank_90", "pac_bayes_complexity"):
        assert blk.metrics[key] == pytest.approx(want[key], rel=1e-8), key
    assert blk.metrics["trace"] == pytest.approx(float(torch.trace(sub)), rel=1e-10)


def test_role_and_layer_blocks(emp, dense):
    F = dense["F"]
    # the two heads of a kv group share their K block
    names = list(emp.blocks)
    assert "layer0.kv_head0.k" in names and "layer0.kv_head1.v" in names and "layer0.kv_head2.k" not in names
    # blocks of one layer + "other" partition the parameters: their traces add up to tr(F)
    total = emp.blocks["layer0"].metrics["trace"] + emp.blocks["other"].metrics["trace"]
    assert total == pytest.approx(float(torch.trace(F)), rel=1e-10)
    # a larger block than N: Gram; a Q slice (64 coordinates, N = 6): Gram too; both exact
    q = emp.blocks["layer0.head1.q"]
    assert q.dim == 64


def test_whole_model_capacity_from_gram_is_exact(emp, dense):
    ref = torch.linalg.eigvalsh(dense["F"]).flip(0).numpy()
    want = capacity_metrics(ref[:6], 2512, n_samples=6)
    assert emp.capacity_source == "gram"
    for key in ("trace", "eigmax", "rank", "condition_number", "effective_rank_90", "entropy_effective_rank", "pac_bayes_complexity"):
        assert emp.capacity[key] == pytest.approx(want[key], rel=1e-8), key
    assert emp.capacity["sharpness"] == pytest.approx(float(ref[0]), rel=1e-9)


# ------------------------------------------------------------------------------ invariance & backends


def test_padding_and_regrouping_do_not_change_the_spectrum(model, emp):
    s = _samples()
    other = spectrum(model, [_batch(s[:2], side="left"), _batch(s[2:5], side="left"), _batch(s[5:])],
                     k=5, blocks=("head",), hutchinson_probes=0, slq_vectors=0)
    assert _rel(other.eigenvalues, emp.eigenvalues) < 1e-9
    assert other.trace_exact == pytest.approx(emp.trace_exact, rel=1e-10)
    for h in range(4):
        a, b = other.blocks[f"layer0.head{h}"], emp.blocks[f"layer0.head{h}"]
        assert np.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)


def test_ggn_padding_invariance(model, ggn):
    # left padding: this model gives NaN logits at fully masked (left-padded) positions, so that
    # batch's products are taken sample by sample (a warning), the others stay batched
    s = _samples()
    other = spectrum(model, [_batch(s[:2], side="left"), _batch(s[2:])], curvature="ggn", k=5, blocks=None,
                     hutchinson_probes=0, slq_vectors=0)
    # LLaMA's RMSNorm rounds through float32 even in a float64 model, so the jvp/vjp products are
    # symmetric to ~1e-8 only: agreement well within the 1e-6 the dense comparison asks for
    assert _rel(other.eigenvalues, ggn.eigenvalues) < 1e-6


def test_engine_per_sample_path_still_gives_signed_gradients(emp):
    # gradient checkpointing puts the engine on its per-sample loop, which hands squares to a
    # sink: the spectrum then takes each sample's signed gradient alone
    m = _model()
    m.gradient_checkpointing_enable()
    res = spectrum(m, _batches(), k=5, blocks=("head",), hutchinson_probes=0, slq_vectors=0)
    assert _rel(res.eigenvalues, emp.eigenvalues) < 1e-9
    assert np.allclose(res.blocks["layer0.head2"].eigenvalues, emp.blocks["layer0.head2"].eigenvalues, rtol=1e-9)


def test_matrix_free_empirical_matches_engine_gradients(model, emp):
    free = spectrum(model, _batches(), k=5, blocks=None, hutchinson_probes=0, slq_vectors=0, max_memory_mb=0.0)
    assert "matrix-free" in free.backend and free.trace_exact is None
    assert _rel(free.eigenvalues, emp.eigenvalues) < 1e-6  # float32 RMSNorm inside jvp/vjp, see above


def test_retained_graphs_give_the_same_products(model):
    from hf_fisher.estimators.curvature import (
        EmpiricalFisherOperator,
        GGNOperator,
        _Problem,
    )

    s = _samples()
    pr = _Problem(model, [_batch(s[:2], side="left"), _batch(s[2:])], params=None, normalization="mean", task_type=None)
    v = np.random.default_rng(0).standard_normal(pr.dim)
    for cls in (GGNOperator, EmpiricalFisherOperator):
        plain, kept = cls(pr), cls(pr, retain_graphs=True)
        a = plain.matvec(v)
        b1, b2 = kept.matvec(v), kept.matvec(v)
        assert np.allclose(a, b1, rtol=1e-12, atol=1e-15 * np.abs(a).max()) and np.array_equal(b1, b2)
        # the right-padded batch, and the two samples of the left-padded one (split by the first operator)
        assert len(kept._backs) == 1 + 2


def test_sdpa_model_switches_to_eager_for_forward_ad_and_restores(dense):
    m = _model(attn="sdpa")
    res = spectrum(m, _batches(), curvature="ggn", k=3, blocks=None, hutchinson_probes=0, slq_vectors=0)
    assert m.config._attn_implementation == "sdpa"
    ref = torch.linalg.eigvalsh(dense["GGN"]).flip(0)[:3].numpy()
    assert _rel(res.eigenvalues, ref) < 1e-6


def test_params_subset_and_json(model, dense):
    res = spectrum(model, _batches(), k=2, params=r"self_attn", blocks=("head",), hutchinson_probes=4, slq_vectors=1, slq_steps=5)
    names = [n for n in dense["names"] if "self_attn" in n]
    assert res.names == names
    o, ix = 0, []
    for n, p in zip(dense["names"], dense["params"]):
        if n in names:
            ix.append(torch.arange(o, o + p.numel()))
        o += p.numel()
    ix = torch.cat(ix)
    ref = torch.linalg.eigvalsh(dense["F"][ix][:, ix]).flip(0)[:2].numpy()
    assert _rel(res.eigenvalues, ref) < 1e-6
    import json

    d = json.loads(res.to_json())
    assert d["curvature"] == "empirical" and len(d["eigenvalues"]) == 2
    assert "layer0.head0" in d["blocks"] and d["trace"]["exact"] == pytest.approx(res.trace_exact)


def test_registered_as_consumer():
    from hf_fisher import plugins
    from hf_fisher.estimators import spectrum as module

    if "hf_fisher.estimators.spectrum" in plugins.BUILTIN_PLUGINS:
        assert plugins.consumers()["spectrum"] is spectrum
        return
    name = plugins.register(module, "test-spectrum-plugin")
    try:
        assert plugins.consumers()["spectrum"] is spectrum
    finally:
        plugins.unregister(name)


def test_sequence_classification_ggn_and_empirical_equal_dense():
    torch.manual_seed(5)
    cfg = tf.LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, num_labels=3, attn_implementation="eager",
    )
    m = tf.LlamaForSequenceClassification(cfg).double().eval()
    seqs = _samples()[:4]
    b = _batch(seqs)
    b["labels"] = torch.tensor([0, 2, 1, 2])
    names, params = _flat_params(m)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
    G, ggn = [], 0
    for s_, y in zip(seqs, b["labels"]):
        ids = s_.view(1, -1)

        def f(x, ids=ids):
            pd = {n: t.view(sh) for n, t, sh in zip(names, torch.split(x, sizes), shapes)}
            return torch.func.functional_call(m, pd, (ids,)).logits[0]
        z = f(flat).detach()
        J = torch.autograd.functional.jacobian(f, flat, vectorize=True)  # [C, P]
        p = torch.softmax(z, -1)
        ggn = ggn + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        G.append(J.T @ (p - torch.nn.functional.one_hot(y, 3).double()))  # d CE / dθ
    G = torch.stack(G)
    for curv, dense_m in (("empirical", G.T @ G / 4), ("ggn", ggn / 4)):
        res = spectrum(m, [b], curvature=curv, k=4, blocks=None, hutchinson_probes=0, slq_vectors=0)
        ref = torch.linalg.eigvalsh(dense_m).flip(0)[:4].numpy()
        assert _rel(res.eigenvalues, ref) < 1e-6, curv


# ------------------------------------------------------------------------------ capacity metrics


def test_capacity_metric_formulas():
    lam = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    m = capacity_metrics(lam, 10, prior_precision=2.0, n_samples=3)
    assert m["trace"] == 16.0 and m["eigmax"] == 8.0 == m["sharpness"]
    assert m["rank"] == 5 and not m["full_rank"] and m["condition_number"] == 8.0
    assert m["energy_r8"] == 1.0 and m["effective_rank_90"] == 4  # 15/16 >= 0.9 > 14/16
    q = lam / 16
    assert m["entropy_effective_rank"] == pytest.approx(math.exp(-(q * np.log(q)).sum()))
    x = 3 * lam / 2.0
    assert m["pac_bayes_complexity"] == pytest.approx(0.5 * float((np.log1p(x) - x / (1 + x)).sum()))
    # the PAC-Bayes term is the Gaussian KL(N(0, (nA + δI)^-1) || N(0, δ^-1 I)) computed densely
    A = np.diag(np.concatenate([lam, np.zeros(5)]))
    S = np.linalg.inv(3 * A + 2.0 * np.eye(10))
    kl = 0.5 * (np.trace(2.0 * S) - 10 - np.linalg.slogdet(2.0 * S)[1])
    assert m["pac_bayes_complexity"] == pytest.approx(kl, rel=1e-12)
    z = capacity_metrics([], 4)
    assert z["rank"] == 0 and math.isnan(z["condition_number"])


# ------------------------------------------------------------------------------ bad input


def test_bad_arguments_fail_before_work(model):
    b = _batches()
    with pytest.raises(InvalidInputError, match="curvature"):
        spectrum(model, b, curvature="hessian")
    with pytest.raises(InvalidInputError, match="k must be"):
        spectrum(model, b, k=0)
    with pytest.raises(InvalidInputError, match="k=3000 must be smaller"):
        spectrum(model, b, k=3000, blocks=None)
    with pytest.raises(InvalidInputError, match="hutchinson_probes"):
        spectrum(model, b, hutchinson_probes=1)
    with pytest.raises(InvalidInputError, match="block kind"):
        spectrum(model, b, blocks=("heads",))
    with pytest.raises(UnsupportedError, match="blocks=None"):
        spectrum(model, b, curvature="ggn", blocks=("head",))
    with pytest.raises(InvalidInputError, match="max_memory_mb"):
        spectrum(model, b, blocks=("head",), max_memory_mb=0.0)
    with pytest.raises(EmptyDataError):
        spectrum(model, [])
    with pytest.raises(EmptyDataError, match="label token"):
        spectrum(model, [{"input_ids": torch.ones((2, 1), dtype=torch.long)}])
    with pytest.raises(InvalidInputError, match="vocabulary"):
        spectrum(model, [{"input_ids": torch.full((1, 3), 99)}])
    with pytest.raises(InvalidInputError, match="matches no trainable"):
        spectrum(model, b, params="nope")
    frozen = _model()
    frozen.requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        spectrum(frozen, b)
