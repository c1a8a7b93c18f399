"""The architecture zoo (tests/extra_models.py) against the brute-force reference (tests/reference.py).

Every family is run on padded, variable-length batches and must (1) match the one-sample-at-a-time
reference in means and variances and (2) do so on the batched path (one forward/backward per
batch, ``metadata.extra["per_sample_path"] == "batched"``), except where the model itself gives
NaN at padded positions: then the engine must notice, fall back to the per-sample path, record why,
and still be exact. Also: the padding invariant directly (RoBERTa family), the fail-closed check
on a NaN batch gradient, rule selection for subclasses, and BERT's tied masked-LM bias.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import hf_fisher
from hf_fisher.engine import per_sample as PS
from hf_fisher.engine import rules as RU

import extra_models as em
import reference as R
import tiny_models as tm

# float64 models: the engine and the reference differ only by float64 rounding (~1e-15), plus the
# float32 ops some float64 models still run inside (Gemma's RMSNorm casts to float32), which
# stay far below 1e-6.
RTOL_F64, ATOL_REL_F64 = 1e-6, 1e-9
# float32 models: batched and one-sample forwards round differently in float32 (eps 1.2e-7 of the
# gradient scale, summed over O(10) ops; measured worst ~1e-6 relative to a tensor's largest
# entry), while the reference accumulates in float64. rtol 1e-4 keeps two orders of margin on the
# large entries; entries far below their tensor's maximum carry that absolute rounding, hence an
# absolute tolerance of 1e-5 of the tensor's maximum. A missing, double-counted or misattributed
# part is an error of order 1.
RTOL_F32, ATOL_REL_F32 = 1e-4, 1e-5

MODELS = dict(em.ZOO, deberta_v3_cls=em.deberta_v3_classifier)
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
# padding sides of each family (decoders: right and left; encoders: right), as the factories
# return them (test_zoo_sides checks); a table so that collecting the tests builds no model
DECODERS = {"cohere", "gemma", "gemma2", "gemma3", "opt", "mixtral", "qwen2_moe", "qwen3_moe"}
SIDES = {name: em.BOTH if name in DECODERS else em.RIGHT for name in MODELS}
# float64 cases where the MODEL gives NaN at padded positions (transformers' float64 masks: the
# mask's float64 minimum becomes -inf in a float32 softmax): per-sample path expected
NAN_PADDING_F64 = {("modernbert_mlm", "right"), ("gemma2", "left"), ("gemma3", "left")}
# the same families in float32, where they must be batched
FLOAT32_CASES = [("modernbert_mlm", "right"), ("gemma2", "right"), ("gemma2", "left"), ("gemma3", "left")]


def build(name, dtype=None):
    factory = MODELS[name]
    return factory() if dtype is None else factory(dtype)


def tolerances(model):
    dtype = next(model.parameters()).dtype
    return (RTOL_F64, ATOL_REL_F64) if dtype == torch.float64 else (RTOL_F32, ATOL_REL_F32)


def pad_id_of(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def make_batches(model, task, side="right", plan=((1, [5, 3, 7]), (2, [6, 4, 2]))):
    """Padded variable-length batches with the task's labels (padding labelled -100)."""
    pad = pad_id_of(model)
    out = []
    for seed, lengths in plan:
        b = tm.padded_batch(lengths, seed=seed, pad_id=pad, side=side)
        assert not (b["input_ids"][b["attention_mask"].bool()] == pad).any()  # real tokens never pad
        if task == "masked_lm":
            g = torch.Generator().manual_seed(100 + seed)
            b["labels"][torch.rand(b["labels"].shape, generator=g) < 0.5] = -100
            for i in range(len(lengths)):  # at least one label per sample
                j = int(b["attention_mask"][i].nonzero()[0])
                b["labels"][i, j] = b["input_ids"][i, j]
        elif task == "classification":
            b["labels"] = (torch.arange(len(lengths)) + seed) % model.config.num_labels
        out.append(b)
    return out


def samples_of(batches):
    return [s for b in batches for s in R.split_batch(b)]


def check_exact(fisher, model, task, samples):
    """Means, variances and counts of ``fisher`` against the brute force over ``samples``."""
    rtol, atol_rel = tolerances(model)
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples, task_type=task)
    assert sorted(fisher.names()) == sorted(mean), "Fisher must cover exactly the trainable parameters"
    assert (fisher.counts.samples, fisher.counts.skipped) == (n_used, n_skipped) == (len(samples), 0)
    if task != "classification":
        assert fisher.counts.tokens == sum(R.label_tokens(s, task) for s in samples)
    floor_m, floor_v = R.global_floor(mean), R.global_floor(var)
    for name in mean:
        R.assert_close(fisher[name], mean[name], rtol=rtol, atol_rel=atol_rel, floor=floor_m, what=f"mean {name}")
        R.assert_close(
            fisher.variances[name], var[name], rtol=rtol, atol_rel=atol_rel, floor=floor_v, what=f"variance {name}"
        )
    return mean


def path_of(fisher):
    return fisher.metadata.extra["per_sample_path"]


# --------------------------------------------------------------------------- 1. the zoo, batched


def _cases():
    cases = []
    for name in MODELS:
        for side in SIDES[name]:
            if (name, side) in NAN_PADDING_F64:
                continue
            cases.append(pytest.param(name, None, side, id=f"{name}-{side}"))
    for name, side in FLOAT32_CASES:
        cases.append(pytest.param(name, torch.float32, side, id=f"{name}_f32-{side}"))
    return cases


def test_zoo_sides():
    for name in MODELS:
        _, task, sides = build(name)
        assert tuple(sides) == SIDES[name], name
        assert (task == "causal_lm") == (name in DECODERS), name


@pytest.mark.parametrize("name,dtype,side", _cases())
def test_zoo_exact_on_batched_path(name, dtype, side):
    model, task, _ = build(name, dtype)
    batches = make_batches(model, task, side)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    assert "loop_reason" not in fisher.metadata.extra
    if not name.startswith("deberta"):  # DeBERTa's batch-shared calls: see test_deberta_vjp_params_...
        # every parameter from its exact per-layer rule, none left to the batched-vjp fallback
        assert not fisher.metadata.extra.get("vjp_params"), sorted(fisher.metadata.extra["vjp_params"])
    check_exact(fisher, model, task, samples_of(batches))
    for pname, p in model.named_parameters():
        assert tuple(fisher[pname].shape) == tuple(p.shape), pname


def _model_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# what the batched pass makes non-finite: ModernBERT's logits are NaN at padded positions only (finite
# loss, NaN batch gradient); Gemma 2 / 3's NaN reach the real positions too (non-finite loss)
NAN_WHERE = {"modernbert_mlm": "gradient", "gemma2": "loss", "gemma3": "loss"}


@pytest.mark.parametrize("name,side", sorted(NAN_PADDING_F64), ids=[f"{n}-{s}" for n, s in sorted(NAN_PADDING_F64)])
def test_model_nan_at_padding_goes_to_per_sample_path(name, side):
    """float64 ModernBERT (right) and Gemma 2 / 3 (left): the model's own padded forward is
    non-finite for padded samples; the engine redoes the batch one sample at a time, exactly."""
    model, task, _ = build(name)
    batches = make_batches(model, task, side)
    # the premise: the model itself is non-finite on the padded batch (not the engine), and
    # finite on every sample alone
    logits = _model_logits(model, batches[0])
    real = batches[0]["attention_mask"].bool()
    assert not torch.isfinite(logits).all()
    assert bool(torch.isfinite(logits[real]).all()) == (NAN_WHERE[name] == "gradient")
    for s in R.split_batch(batches[0]):
        assert torch.isfinite(model(input_ids=s["input_ids"]).logits.detach()).all()
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert path_of(fisher) == "loop"
    reason = fisher.metadata.extra["loop_reason"]
    assert "non-finite" in reason and f"non-finite {NAN_WHERE[name]}" in reason, reason
    assert "vjp_params" not in fisher.metadata.extra
    check_exact(fisher, model, task, samples_of(batches))


# --------------------------------------------------------------------------- 1b. group reduction

GROUP_CASES = [
    ("bert_mlm", "right"), ("gemma", "left"), ("opt", "left"), ("deberta_v2_cls", "right"), ("cohere", "right"),
    ("mixtral", "right"), ("qwen2_moe", "left"), ("qwen3_moe", "right"),
]


@pytest.mark.parametrize("name,side", GROUP_CASES, ids=[f"{n}-{s}" for n, s in GROUP_CASES])
def test_zoo_group_reduction(name, side):
    model, task, _ = build(name)
    batches = make_batches(model, task, side)
    samples = samples_of(batches)
    fisher = hf_fisher.collect(model, batches, reduction="group", progress=False)
    assert fisher.reduction == "group"
    assert path_of(fisher) == "batched", fisher.metadata.extra.get("loop_reason")
    contributions = R.per_sample_contributions(model, samples, task_type=task)
    mean, _, n_used, _ = R.mean_and_variance(contributions)
    assert fisher.counts.samples == n_used == len(samples)
    assert sorted(fisher.names()) == sorted(mean)
    gmean = R.reference_group(mean, fisher.groups)
    gvar = R.reference_group_variance(contributions, fisher.groups)
    floor_m, floor_v = R.global_floor(gmean), R.global_floor(gvar)
    for pname in mean:
        assert fisher[pname].shape == (fisher.groups[pname].num_groups,)
        R.assert_close(fisher[pname], gmean[pname], rtol=RTOL_F64, floor=floor_m, what=f"group mean {pname}")
        R.assert_close(fisher.variances[pname], gvar[pname], rtol=RTOL_F64, floor=floor_v, what=f"group variance {pname}")
        # the reduction is a sum: mass preserved
        assert float(fisher[pname].double().sum()) == pytest.approx(float(mean[pname].sum()), rel=1e-6, abs=floor_m)
    if name in MOE:  # per expert: the group Fisher's expert totals are the expert slices of the param Fisher
        experts = fisher.expert_importance()
        assert experts
        for (layer, e), total in experts.items():
            prefix = f"model.layers.{layer}.mlp.experts."
            by_hand = float(mean[prefix + "gate_up_proj"][e].sum() + mean[prefix + "down_proj"][e].sum())
            assert total == pytest.approx(by_hand, rel=1e-9)


# --------------------------------------------------------------------------- 1c. DeBERTa's shared calls


def _deberta_expected_vjp(model, name):
    """The parameters of DeBERTa's batch-shared calls on the relative-position embeddings."""
    layers = range(model.config.num_hidden_layers)
    if name == "deberta_v2_cls":  # separate positional projections
        projections = ("pos_key_proj", "pos_query_proj")
        extra = []
    else:  # share_att_key: the content projections also project the positions; norm_rel_ebd LayerNorm
        projections = ("key_proj", "query_proj")
        extra = ["deberta.encoder.LayerNorm.weight", "deberta.encoder.LayerNorm.bias"]
    shared = {
        f"deberta.encoder.layer.{i}.attention.self.{proj}.{w}" for i in layers for proj in projections for w in ("weight", "bias")
    }
    return shared | set(extra), "deberta.encoder.rel_embeddings.weight"


@pytest.mark.parametrize("name", ["deberta_v2_cls", "deberta_v3_cls"])
def test_deberta_vjp_params_are_the_shared_position_calls(name):
    model, task, _ = build(name)
    batches = make_batches(model, task)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert path_of(fisher) == "batched"
    vjp = fisher.metadata.extra["vjp_params"]
    shared, rel = _deberta_expected_vjp(model, name)
    assert set(model.state_dict()) >= shared | {rel}  # the names exist (the test is not vacuous)
    assert set(vjp) == shared | {rel}
    for pname in shared:
        assert "shared by the batch" in vjp[pname], (pname, vjp[pname])
    assert vjp[rel]  # rel_embeddings.weight is read as a tensor, outside any module call
    check_exact(fisher, model, task, samples_of(batches))


# --------------------------------------------------------------------------- 2. padding invariant


def _rotated(samples, k):
    return samples[k:] + samples[:k]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["roberta_mlm", "xlm_roberta_cls"])
def test_roberta_padding_invariant_per_sample(name, side):
    """RoBERTa positions are padding_idx + 1, 2, ... counted over the input ids: inside a padded
    batch (with or without extra padding columns, either side), each sample must get exactly the
    contribution it gets alone without padding. Sample k's contribution in the batch is read as
    the Fisher of the batch rotated to put it first, with max_samples=1 (the whole batch still
    runs forward and backward)."""
    model, task, _ = build(name)
    pad = pad_id_of(model)
    assert pad == model.config.pad_token_id == 1
    (batch,) = make_batches(model, task, "right", plan=((3, [5, 2, 7]),))
    samples = R.split_batch(batch)
    contributions = R.per_sample_contributions(model, samples, task_type=task)
    names = sorted(contributions[0])
    for k, s in enumerate(samples):
        alone = hf_fisher.collect(model, [R.collate([s], pad_id=pad)], reduction="param", progress=False)
        assert alone.counts.samples == 1
        floor = R.global_floor(contributions[k])
        for pname in names:
            R.assert_close(alone[pname], contributions[k][pname], rtol=RTOL_F64, floor=floor, what=f"alone {k} {pname}")
        for extra in (0, 3):
            padded = R.collate(_rotated(samples, k), side=side, extra=extra, pad_id=pad)
            assert not padded["attention_mask"].bool().all()
            inside = hf_fisher.collect(model, [padded], reduction="param", max_samples=1, progress=False)
            assert inside.counts.samples == 1
            if task == "classification" and side == "left" and padded["attention_mask"][0, 0] == 0:
                # the classification head reads position 0 (the <s> token), which left padding makes a
                # pad: the model itself is not padding invariant; the engine's padding check (the
                # first sample alone vs in the batch) catches it and uses the per-sample path
                assert path_of(inside) == "loop"
                assert "alone, without padding" in inside.metadata.extra["loop_reason"]
            else:
                assert path_of(inside) == "batched", inside.metadata.extra.get("loop_reason")
            for pname in names:
                R.assert_close(
                    inside[pname], alone[pname], rtol=RTOL_F64, floor=floor, what=f"sample {k} extra={extra} {pname}"
                )


@pytest.mark.parametrize("factory", [em.xlm_roberta_classifier, em.bert_classifier], ids=["xlm_roberta_cls", "bert_cls"])
def test_left_padded_classifier_with_unpadded_first_sample(factory):
    """A classifier head reading position 0 reads a pad under left padding: the model is not
    padding invariant there. The padding check must probe the most padded sample (here sample 1,
    not the unpadded sample 0) and send the batch to the per-sample path."""
    model, task, _ = factory(torch.float64)
    batch = tm.padded_batch([7, 3, 5], seed=1, pad_id=pad_id_of(model), side="left")
    batch["labels"] = torch.tensor([0, 1, 2])
    fisher = hf_fisher.collect(model, [batch], reduction="param", progress=False)
    assert path_of(fisher) == "loop"
    assert "alone, without padding" in fisher.metadata.extra["loop_reason"]
    check_exact(fisher, model, task, R.split_batch(batch))


# --------------------------------------------------------------------------- 3. fail closed on NaN


def test_gemma2_sliding_window_nan_batch_falls_back():
    """sliding_window=2 with right padding longer than the window: the padded positions of the
    short samples get fully masked attention rows, whose NaN the next layer spreads over the whole
    sample (0 * NaN), so the batched pass is non-finite for the padded samples although every
    sample is finite alone. The engine must not use that batch: per-sample path, exact."""
    model, task, _ = em.gemma2(torch.float64, sliding_window=2)
    batch = tm.padded_batch([9, 3, 4], seed=5, pad_id=pad_id_of(model))
    finite = torch.isfinite(_model_logits(model, batch)).all(-1).all(-1)
    assert finite.tolist() == [True, False, False]  # the premise: the padded samples are NaN in the batch
    fisher = hf_fisher.collect(model, [batch], reduction="param", progress=False)
    assert path_of(fisher) == "loop"
    assert "non-finite" in fisher.metadata.extra["loop_reason"]
    check_exact(fisher, model, task, R.split_batch(batch))


def _noise(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mismatch_fails_on_nonfinite_and_passes_equal():
    tol = 1e-6
    ref = {"a": _noise(0, 4, 5), "b": _noise(1, 7)}
    assert PS.mismatch({k: v.clone() for k, v in ref.items()}, ref, tol) is None
    for bad in (float("nan"), float("inf")):
        ref_bad = {"a": ref["a"].clone(), "b": ref["b"].clone()}
        ref_bad["b"][3] = bad
        hit = PS.mismatch(ref, ref_bad, tol)  # NaN in the batch gradient (ref)
        assert hit is not None and hit[0] == "b"
        hit = PS.mismatch(ref_bad, ref, tol)  # NaN in the captured parts (mine)
        assert hit is not None and hit[0] == "b"


def test_mismatch_tolerates_rounding_noise_of_a_zero_gradient_but_not_a_missing_half():
    tol = 1e-6
    big = {f"w{i}": _noise(i, 10, 10) for i in range(3)}  # gradient scale ~1
    ref = dict(big, key_bias=1e-9 * _noise(10, 10))  # exact gradient 0: rounding noise only
    mine = dict({k: v * (1 + 1e-12) for k, v in big.items()}, key_bias=1e-9 * _noise(11, 10))
    assert PS.mismatch(mine, ref, tol) is None
    # a zero parameter absent from mine counts as zero: still only noise
    assert PS.mismatch({k: v for k, v in mine.items() if k != "key_bias"}, ref, tol) is None
    # a parameter missing half its gradient is caught, with relative error 0.5 / 1.5
    half = dict(mine, w1=0.5 * ref["w1"])
    key, rel = PS.mismatch(half, ref, tol)
    assert key == "w1" and rel == pytest.approx(1 / 3, rel=1e-9)
    # also for a parameter far smaller than the model's gradient scale
    small = dict(big, tiny=1e-3 * _noise(12, 10))
    key, _ = PS.mismatch(dict(small, tiny=0.5 * small["tiny"]), small, tol)
    assert key == "tiny"
    # and for noise that is large compared to the rounding of the model's gradient scale
    key, _ = PS.mismatch(dict(mine, key_bias=1e-3 * _noise(13, 10)), ref, tol)
    assert key == "key_bias"


def test_first_batch_check_through_random_directions_catches_one_missing_row():
    """The first batch's check compares the summed parts with autograd's batch gradient through
    k fixed Gaussian directions (``PerSampleEngine._verify_probe``): exact totals pass; totals
    missing one row of one matrix (its largest, ~0.28 of its norm here) are caught and named; the
    directions come from their own generator (the global RNG is untouched)."""
    from hf_fisher.collection.collector import FisherCollector

    model = tm.llama(torch.float32)
    state = torch.get_rng_state()
    engine = FisherCollector(model, reduction="group").engine
    batch = tm.padded_batch([6, 4], seed=3)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    params = [t.param for t in engine.targets]
    grads = dict(zip(map(id, params), torch.autograd.grad(out.loss, params)))

    def totals(g):
        out = {}
        for t in engine.targets:
            probe = engine._verify_probe(t.param)
            out[id(t.param)] = g[id(t.param)] if probe is None else g[id(t.param)] @ probe
        return out

    engine._totals = totals(grads)
    bad, _ = engine.check_totals(grads)
    assert bad is None
    assert torch.equal(torch.get_rng_state(), state)
    assert any(engine._verify_probe(p) is not None for p in params)  # matrices are projected
    w = model.model.layers[0].mlp.down_proj.weight
    assert engine._verify_probe(w) is not None
    g = grads[id(w)]
    row = int(g.norm(dim=1).argmax())
    broken = dict(grads)
    broken[id(w)] = g.clone()
    broken[id(w)][row] = 0
    assert float(g[row].norm() / g.norm()) > 0.1
    engine._totals = totals(broken)
    bad, _ = engine.check_totals(grads)
    assert bad is not None and bad[0] == id(w)


# --------------------------------------------------------------------------- 4. rule selection


class DoubledLinear(nn.Linear):
    """Overrides forward: the Linear rule would give a gradient off by a factor of 2."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainLinear(nn.Linear):
    """Keeps nn.Linear's forward."""


def test_rule_for_subclasses():
    rules = hf_fisher.plugins.grad_rules()
    assert isinstance(rules[nn.Linear], RU.LinearRule) and isinstance(rules[nn.Embedding], RU.EmbeddingRule)
    overriding = RU.rule_for(DoubledLinear(3, 2), rules)
    assert type(overriding) is RU.FuncRule
    assert not isinstance(overriding, RU.LinearRule)
    assert RU.rule_for(PlainLinear(3, 2), rules) is rules[nn.Linear]
    assert RU.rule_for(nn.Linear(3, 2), rules) is rules[nn.Linear]
    gemma, _, _ = em.gemma()
    emb = gemma.model.embed_tokens
    assert type(emb).__name__ == "GemmaTextScaledWordEmbedding" and type(emb).forward is not nn.Embedding.forward
    assert isinstance(RU.rule_for(emb, rules), RU.EmbeddingRule)


class TinyCausalLM(nn.Module):
    """Embedding -> DoubledLinear -> causal mean over the real tokens -> PlainLinear head."""

    def __init__(self, vocab=tm.VOCAB, d=8):
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Embedding(vocab, d)
        self.mix = DoubledLinear(d, d)
        self.head = PlainLinear(d, vocab)
        self.double()

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.embed(input_ids)
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1).to(h.dtype)
        h = torch.tanh(self.mix(h)) * m
        ctx = h.cumsum(1) / m.cumsum(1).clamp(min=1)
        return types.SimpleNamespace(logits=self.head(ctx + h))


@pytest.mark.parametrize("side", ["right", "left"])
def test_overriding_subclass_exact_on_batched_path(side):
    model = TinyCausalLM()
    rules = hf_fisher.plugins.grad_rules()
    assert type(RU.rule_for(model.mix, rules)) is RU.FuncRule
    batches = [tm.padded_batch([5, 3, 7], seed=1, side=side), tm.padded_batch([6, 4, 2], seed=2, side=side)]
    fisher = hf_fisher.collect(model, batches, reduction="param", task_type="causal_lm", progress=False)
    assert path_of(fisher) == "batched"
    assert not fisher.metadata.extra.get("vjp_params")
    check_exact(fisher, model, "causal_lm", samples_of(batches))


# --------------------------------------------------------------------------- 5. BERT's tied MLM bias


def test_bert_mlm_tied_bias_owned_by_decoder_only():
    model, task, _ = em.bert_mlm()
    preds = model.cls.predictions
    assert preds.bias is preds.decoder.bias
    owned = PS.owned_parameters(model)
    owners = [n for n, m in model.named_modules() if id(preds.bias) in owned.get(id(m), set())]
    assert owners == ["cls.predictions.decoder"]
    assert id(preds.decoder.weight) in owned[id(preds.decoder)]
    # (exactness and the batched path of bert_mlm are asserted in test_zoo_exact_on_batched_path;
    # here the bias alone, where double counting would give 4x)
    batches = make_batches(model, task)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert path_of(fisher) == "batched"
    check_exact(fisher, model, task, samples_of(batches))
    # the tied parameter is one entry of the artifact, under one of its two names
    assert len({"cls.predictions.bias", "cls.predictions.decoder.bias"} & set(fisher.names())) == 1
