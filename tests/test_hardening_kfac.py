"""Issue 21, items 4 and 6: KFAC covers every layer it can (Falcon's ``FalconLinear`` included),
says so loudly and records the parameters it leaves out, and is exact on float64 eager attention
with left padding (where the padded batch gives NaN).

References: the brute-force factors of tests/test_kfac.py (each sample alone, unpadded, plain
autograd) and curvlinops' ``KFACLinearOperator``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_kfac import _brute, _close
from torch import nn

from hf_fisher.artifacts.kfac import KFACFisher
from hf_fisher.errors import ArtifactError, NonFiniteError, UnsupportedError
from hf_fisher.estimators.kfac import KFACEstimator

from tiny_models import llama, padded_batch

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61

FALCONS = {
    "multi_query": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    "mha_bias_sequential": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
    "new_decoder_gqa": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False),
    "alibi": dict(new_decoder_architecture=False, multi_query=False, alibi=True, bias=True),
}


def falcon(variant: str, *, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=48,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn, **FALCONS[variant],
    )
    return tf.FalconForCausalLM(cfg).double().eval()


def _linear_modules(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _equal_brute(k, model, batch, rtol=1e-10):
    ref = _brute(model, batch, kfac_approx=k.settings["kfac_approx"])
    assert set(k.layers) <= set(ref)
    for name, layer in k.layers.items():
        A, G = ref[name]
        _close(layer.A, A, rtol=rtol)
        _close(layer.G, G, rtol=rtol)


# ---------------------------------------------------------------------------- item 4: Falcon
@pytest.mark.parametrize("variant", list(FALCONS))
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_falcon_every_linear_covered_and_factors_equal_brute_force(variant, kfac_approx):
    """FalconLinear (fused query_key_value, dense, MLP) in every attention variant: covered, and
    the factors of a padded batch equal each sample's alone."""
    model = falcon(variant)
    batch = padded_batch([6, 4, 5], seed=3)
    k = KFACEstimator(kfac_approx=kfac_approx).collect(model, [batch], progress=False)
    assert set(_linear_modules(model)) <= set(k.layers)  # 4 FalconLinear x 2 layers + the tied lm_head
    qkv = k.layers["transformer.h.0.self_attention.query_key_value"]
    assert qkv.kind == "linear" and qkv.G.shape[0] == model.transformer.h[0].self_attention.query_key_value.out_features
    assert set(k.uncovered) == {n for n, _ in model.named_parameters() if "ln" in n or "layernorm" in n}
    covered = set(k.to_diagonal().names())
    assert {f"{n}.weight" for n in _linear_modules(model) if n != "lm_head"} <= covered
    _equal_brute(k, model, batch)


@pytest.mark.parametrize("variant", ["multi_query", "new_decoder_gqa"])
def test_falcon_float32(variant):
    """float32 model: FalconLinear's two-step forward is still checked in float64 and covered."""
    model = falcon(variant).float()
    batch = padded_batch([6, 4, 5], seed=3, side="left")
    k = KFACEstimator().collect(model, [batch], progress=False)
    assert set(_linear_modules(model)) <= set(k.layers)
    ref = _brute(model.double(), batch, kfac_approx="expand")
    for name, layer in k.layers.items():
        _close(layer.A, ref[name][0], rtol=1e-5)
        _close(layer.G, ref[name][1], rtol=1e-4)


def test_falcon_factors_equal_curvlinops():
    """The oracle on FalconLinear layers (equal-length, fully labelled sequences; curvlinops'
    "mean" reduction = our "token" normalisation)."""
    model = falcon("new_decoder_gqa")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, V, (3, 7), generator=g) for _ in range(2)]
    from curvlinops import KFACLinearOperator
    from test_kfac import _Logits

    params = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    K = KFACLinearOperator(
        _Logits(model), nn.CrossEntropyLoss(), params, [(x, x[:, 1:]) for x in batches], fisher_type="type-2",
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False,
    )
    K.compute_kronecker_factors()
    ours = KFACEstimator(fisher_type="type-2", normalization="token", params=r"query_key_value|dense").collect(
        model, [{"input_ids": x} for x in batches], progress=False
    )
    assert len(ours.layers) == 8
    for name, layer in ours.layers.items():
        _close(layer.A, K._input_covariances["m." + name])
        _close(layer.G, K._gradient_covariances["m." + name])


def _coverage_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "kfac_coverage.py"
    spec = importlib.util.spec_from_file_location("kfac_coverage", path)
    cov = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cov)
    return cov


def test_listed_architectures_cover_every_linear_layer():
    """scripts/kfac_coverage.py over the architectures of issue 21: no Linear / Conv1D layer left out."""
    cov = _coverage_script()
    bad = {}
    for name in cov.LISTED:
        total, left, err, _ = cov.report(name)
        if left or err:
            bad[name] = (left, err)
    assert bad == {}


# ---------------------------------------------------------------------------- item 4: uncovered
class _SquaredLinear(nn.Linear):
    """A Linear subclass whose forward is not its affine map (KFAC's factors would be wrong)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.weight, self.bias)


class _TwoStepLinear(nn.Linear):
    """Affine, computed like FalconLinear (matmul, then the bias): covered."""

    def forward(self, x):
        return x @ self.weight.T


def _with_odd_layers():
    model = llama()
    mlp = model.model.layers[0].mlp
    odd = _SquaredLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False).double()
    odd.weight.data.copy_(mlp.down_proj.weight.data)
    mlp.down_proj = odd
    attn = model.model.layers[1].self_attn
    two = _TwoStepLinear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False).double()
    two.weight.data.copy_(attn.o_proj.weight.data)
    attn.o_proj = two
    return model


def test_uncovered_layer_warns_and_is_recorded(tmp_path, caplog):
    model = _with_odd_layers()
    batch = padded_batch([5, 4, 6], seed=1)
    odd = "model.layers.0.mlp.down_proj.weight"
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        k = KFACEstimator().collect(model, [batch], progress=False)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.layers.0.mlp.down_proj" in r.getMessage() and "not the layer's affine map" in r.getMessage() for r in warned)
    assert any("KFAC covers" in r.getMessage() and "left out" in r.getMessage() for r in warned)
    assert "_SquaredLinear" in k.uncovered[odd] and "model.layers.1.self_attn.o_proj" in k.layers
    assert odd not in k.param_shapes and "model.norm.weight" in k.uncovered
    assert "uncovered=6" in repr(k)  # down_proj + 5 RMSNorm weights
    _equal_brute(k, model, batch)  # the two-step Linear's factors are right

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fisher.artifacts"):
        diag = k.to_diagonal()
    assert odd not in diag.names() and diag.metadata.extra["uncovered"] == k.uncovered
    assert any("uncovered" in r.getMessage() and odd in r.getMessage() for r in caplog.records)

    path = k.save_pretrained(tmp_path / "k")
    assert json.loads((path / "kfac_config.json").read_text())["uncovered"] == k.uncovered
    card = (path / "README.md").read_text()
    assert "Not covered" in card and "| model.layers.0.mlp.down\\_proj.weight | \\_SquaredLinear" in card
    back = KFACFisher.from_pretrained(path, model=model)
    assert back.uncovered == k.uncovered and "uncovered=6" in repr(back)

    # named explicitly: refused, not left out
    with pytest.raises(UnsupportedError, match="down_proj.*affine map"):
        KFACEstimator(params=[odd]).collect(model, [batch], progress=False)


def test_uncovered_field_on_disk(tmp_path):
    model = llama()
    k = KFACEstimator(params=r"proj|norm").collect(model, [padded_batch([4, 3], seed=0)], progress=False)
    assert set(k.uncovered) == {n for n, _ in model.named_parameters() if "norm" in n}
    path = k.save_pretrained(tmp_path / "k")

    def edit(fn):
        cfg = json.loads((path / "kfac_config.json").read_text())
        fn(cfg)
        (path / "kfac_config.json").write_text(json.dumps(cfg))

    edit(lambda c: c.pop("uncovered"))  # an artifact written before the field existed
    assert KFACFisher.from_pretrained(path).uncovered == {}
    edit(lambda c: c.update(uncovered={"model.layers.0.self_attn.q_proj.weight": "x"}))
    with pytest.raises(ArtifactError, match="uncovered lists parameters a layer covers"):
        KFACFisher.from_pretrained(path)
    edit(lambda c: c.update(uncovered={"model.norm.weight": 3}))
    with pytest.raises(ArtifactError, match="uncovered"):
        KFACFisher.from_pretrained(path)


def test_nothing_left_out_means_no_warning(caplog):
    model = llama()
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        k = KFACEstimator(params=r"proj|lm_head").collect(model, [padded_batch([4, 3], seed=0)], progress=False)
    assert k.uncovered == {} and "uncovered" not in repr(k)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_only_norm_scales_left_out_is_info_not_warning(caplog):
    """Vector parameters (norm scales) are outside KFAC by design: recorded, logged at INFO, no WARNING."""
    model = llama()
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        k = KFACEstimator().collect(model, [padded_batch([4, 3], seed=0)], progress=False)
    assert k.uncovered and all(model.get_parameter(p).dim() == 1 for p in k.uncovered)
    assert "model.norm.weight" in k.uncovered
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in caplog.records if r.levelno == logging.INFO and "KFAC covers" in r.getMessage()]


# ---------------------------------------------------------------------------- item 6: eager + left padding
def _model(arch, attn):
    if arch == "falcon":
        return falcon("new_decoder_gqa", attn=attn)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn,
    )
    return tf.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("arch", ["llama", "falcon"])
@pytest.mark.parametrize("fisher_type", ["empirical", "type-2"])
def test_float64_eager_left_padding_equals_reference(arch, fisher_type, caplog):
    """The real cause: eager attention takes its softmax in float32, where the float64 mask value
    finfo(float64).min is -inf; the fully masked rows of left padding are NaN and reach the real
    tokens through the next layer (0 x NaN). Such a batch is redone sample by sample (exact);
    batches before it are kept, unpadded batches stay batched."""
    model = _model(arch, "eager")
    right = padded_batch([7, 3, 5], seed=5)
    left = padded_batch([7, 3, 5], seed=2, side="left")
    full = padded_batch([7, 7], seed=7)  # no padding
    out = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
    assert not bool(torch.isfinite(out).all())  # the model itself gives NaN on this batch
    batches = [right, left, full, left]
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        k = KFACEstimator(fisher_type=fisher_type).collect(model, batches, progress=False)
    assert "non-finite" in k.metadata.extra["loop_reason"] and "batch 1" in k.metadata.extra["loop_reason"]
    assert sum("one sample at a time" in r.getMessage() for r in caplog.records) == 1
    assert k.counts.samples == 11
    if fisher_type == "empirical":  # the brute force: every sample alone, unpadded
        merged = {key: torch.cat([b[key] for b in batches]) for key in ("input_ids", "attention_mask", "labels")}
        _equal_brute(k, model, merged)
    else:  # each sample alone, unpadded, through the batched path (equal to curvlinops' type-2 in test_kfac)
        from hf_fisher.engine.per_sample import alone

        singles = [alone(b, i) for b in batches for i in range(b["input_ids"].shape[0])]
        ref = KFACEstimator(fisher_type=fisher_type).collect(model, singles, progress=False)
        assert "loop_reason" not in ref.metadata.extra
        for name, layer in k.layers.items():
            _close(layer.A, ref.layers[name].A, rtol=1e-10)
            _close(layer.G, ref.layers[name].G, rtol=1e-10)


def test_nonfinite_sample_alone_still_refused():
    """A sample that is non-finite alone too (a NaN embedding row it uses) is an error naming it."""
    model = _model("llama", "eager")
    batch = padded_batch([5, 3, 4], seed=2, side="left")
    tok = int(batch["input_ids"][2, -1])
    with torch.no_grad():
        model.model.embed_tokens.weight[tok] = float("nan")
    bad = [i for i in range(3) if bool((batch["input_ids"][i][batch["attention_mask"][i].bool()] == tok).any())]
    with pytest.raises(NonFiniteError, match=f"sample {bad[0]} of batch 0 .* also alone"):
        KFACEstimator().collect(model, [batch], progress=False)



def test_deepseek_four_dimensional_layer_input_equals_curvlinops():
    """DeepSeek's kv_b_proj reads a [batch, 1, seq, rank] latent: factored per token like any
    other layer (it used to refuse the whole collection), equal to curvlinops."""
    from curvlinops import KFACLinearOperator
    from test_kfac import _Logits

    model = _coverage_script().build("deepseek_v3")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, V, (3, 6), generator=g) for _ in range(2)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers." in n]
    assert any("kv_b_proj" in n for n in names)
    K = KFACLinearOperator(
        _Logits(model), nn.CrossEntropyLoss(), [model.get_submodule(n).weight for n in names],
        [(x, x[:, 1:]) for x in batches], fisher_type="type-2", kfac_approx="expand",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    K.compute_kronecker_factors()
    ours = KFACEstimator(fisher_type="type-2", normalization="token", params=[f"{n}.weight" for n in names]).collect(
        model, [{"input_ids": x} for x in batches], progress=False
    )
    assert sorted(ours.layers) == sorted(names)
    for name, layer in ours.layers.items():
        _close(layer.A, K._input_covariances["m." + name], rtol=1e-6)
        _close(layer.G, K._gradient_covariances["m." + name], rtol=1e-6)


def test_mamba_dt_proj_used_outside_its_forward_is_recorded():
    """Jamba's Mamba mixer uses dt_proj's weight outside dt_proj's forward: left out, said so."""
    model = _coverage_script().build("jamba")
    k = KFACEstimator().collect(model, [padded_batch([5, 4], seed=0)], progress=False)
    why = k.uncovered["model.layers.0.mamba.dt_proj.weight"]
    assert "used outside the layer's forward" in why and "model.layers.0.mamba.dt_proj.weight" not in k.to_diagonal().names()


class _TiedHead(nn.Module):
    """An output projection reading the embedding table directly (not through a module)."""

    def __init__(self, embedding):
        super().__init__()
        self.table = [embedding]  # not a submodule: the weight is used outside the embedding's forward

    @property
    def weight(self):  # what get_output_embeddings() readers expect
        return self.table[0].weight

    def forward(self, h):
        return nn.functional.linear(h, self.table[0].weight)


def test_weight_also_used_outside_its_layer_is_not_half_covered(caplog):
    """The embedding's lookup is a factored layer, but its table is also the output projection
    (read directly): factors of the lookup alone would be silently wrong. Left out and said so;
    refused when named."""
    model = llama()
    model.lm_head = _TiedHead(model.model.embed_tokens)
    batch = padded_batch([5, 4], seed=0)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        k = KFACEstimator().collect(model, [batch], progress=False)
    assert "outside the layer's forward" in k.uncovered["model.embed_tokens.weight"]
    assert "model.embed_tokens" not in k.layers and "model.layers.0.mlp.down_proj" in k.layers
    assert any("model.embed_tokens" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    _equal_brute(k, model, batch)
    with pytest.raises(UnsupportedError, match="embed_tokens.weight is also used outside"):
        KFACEstimator(params=["model.embed_tokens.weight"]).collect(model, [batch], progress=False)
