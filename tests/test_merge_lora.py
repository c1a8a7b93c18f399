"""LoRA merging in delta-W space against dense merges of the merged-in models (merge_and_unload)."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

from hf_fisher.consumers.merge import math as mm
from hf_fisher.consumers.merge.lora import LoraMergeResult, merge_lora_adapters
from hf_fisher.errors import InvalidInputError, ModelMismatchError, UnsupportedError

import tiny_models as tm

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
TARGET_RE = re.compile(r"(q_proj|v_proj|down_proj)\.weight$")


def _adapter(base, seed, **cfg):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # B non-zero: ΔW ≠ 0
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model.eval()


def _collect_dense(model, batches, *, peft_base_layer=False):
    import hf_fisher

    for n, p in model.named_parameters():
        p.requires_grad_(("base_layer.weight" in n) if peft_base_layer else bool(TARGET_RE.search(n)))
    return hf_fisher.collect(model, batches, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tm.llama(layers=1)
    # different r, alpha, rslora and a rank_pattern: every scaling path of peft
    a1 = _adapter(base, 1, r=2, lora_alpha=4)
    a2 = _adapter(base, 2, r=3, lora_alpha=5, use_rslora=False, rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 2})
    a3 = _adapter(base, 3, r=2, lora_alpha=3, use_rslora=True)
    dirs = []
    for i, a in enumerate((a1, a2, a3)):
        d = tmp_path_factory.mktemp(f"adapter{i}")
        a.save_pretrained(d)
        dirs.append(str(d))
    merged = [copy.deepcopy(a).merge_and_unload() for a in (a1, a2, a3)]
    batches = [tm.padded_batch([5, 3, 6], seed=11), tm.padded_batch([4, 7], seed=12)]
    fishers = [_collect_dense(copy.deepcopy(m), batches) for m in merged[:2]]
    # the second model's Fisher collected on the PeftModel (base_layer names) instead
    peft_fisher = _collect_dense(copy.deepcopy(a2), batches, peft_base_layer=True)
    return dict(base=base, peft=(a1, a2, a3), dirs=dirs, merged=merged, fishers=fishers, peft_fisher=peft_fisher, batches=batches)


def _dense_names(model):
    return [n for n, _ in model.named_parameters() if TARGET_RE.search(n)]


def test_peft_base_layer_fisher_is_the_merged_models_fisher(setup):
    # the premise of the name mapping: d l / d W_0 in the PeftModel = d l / d W of the merged-in model
    dense, pf = setup["fishers"][1], setup["peft_fisher"]
    for n in dense.names():
        alias = "base_model.model." + n.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(pf[alias], dense[n], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("fisher_kind", ["dense", "peft_names"])
def test_fisher_merge_into_base_equals_dense_fisher_merge(setup, fisher_kind):
    fishers = list(setup["fishers"]) if fisher_kind == "dense" else [setup["fishers"][0], setup["peft_fisher"]]
    weights = [0.3, 0.7]
    res = merge_lora_adapters(setup["dirs"][:2], fishers, weights=weights, base_model=setup["base"],
                              method="fisher" if fisher_kind == "dense" else "fisher_task_vector",
                              merge_into_base=True, fisher_floor=1e-8)
    assert isinstance(res, LoraMergeResult) and res.kind == "dense" and res.truncation_error == 0.0
    m1, m2 = setup["merged"][:2]
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    names = _dense_names(m1)
    assert sorted(res.tensors) == sorted(names)
    for n in names:
        ref = mm.fisher_weighted([p1[n], p2[n]], [setup["fishers"][0][n], setup["fishers"][1][n]], weights, floor=1e-8)
        torch.testing.assert_close(res.tensors[n], ref, rtol=1e-10, atol=1e-12)
    # the dense model: the merged weights where the adapters act, the base everywhere else
    model = res.to_model()
    base = dict(setup["base"].named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, res.tensors[n] if n in res.tensors else base[n], rtol=0, atol=0)
    assert not any(torch.equal(res.tensors[n], base[n]) for n in names)


def test_average_from_peft_models_and_folders_agree_and_equal_dense_average(setup):
    a = merge_lora_adapters(list(setup["peft"]), None, method="average", merge_into_base=True)  # base from the PeftModel
    b = merge_lora_adapters(setup["dirs"], None, method="average", base_model=setup["base"], merge_into_base=True)
    ms = [dict(m.named_parameters()) for m in setup["merged"]]
    for n in _dense_names(setup["merged"][0]):
        torch.testing.assert_close(a.tensors[n], b.tensors[n], rtol=0, atol=0)
        torch.testing.assert_close(a.tensors[n], mm.weighted_average([m[n] for m in ms], [1, 1, 1]), rtol=1e-12, atol=1e-12)


def test_refactor_full_rank_is_exact_and_loads_in_peft(setup, tmp_path):
    weights = [0.6, 0.4]
    dense = merge_lora_adapters(setup["dirs"][:2], setup["fishers"], weights=weights, base_model=setup["base"], merge_into_base=True)
    lora = merge_lora_adapters(setup["dirs"][:2], setup["fishers"], weights=weights, base_model=setup["base"])
    assert lora.kind == "adapter"
    # an element-wise Fisher merge is full rank: the exact default is min(out, in)
    assert lora.summary["ranks"]["model.layers.0.mlp.down_proj"] == 32
    assert lora.truncation_error < 1e-12 and max(lora.summary["truncation_error"].values()) < 1e-12
    written = lora.write_files(tmp_path)
    assert sorted(written) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(setup["base"]), str(tmp_path)).eval()
    want = dense.to_model()
    batch = setup["batches"][0]
    with torch.no_grad():
        ref = want(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        via = lora.to_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(via, ref, rtol=1e-9, atol=1e-9)
    # the folder's peft model, merged, is the dense merge
    merged = dict(copy.deepcopy(loaded).merge_and_unload().named_parameters())
    for n, t in dense.tensors.items():
        torch.testing.assert_close(merged[n], t, rtol=1e-10, atol=1e-12)


def test_linear_methods_default_rank_is_the_sum_of_ranks_and_exact(setup):
    res = merge_lora_adapters(setup["dirs"], None, method="task_arithmetic", scaling=0.5)
    # q_proj/v_proj: 2 + 3 + 2; down_proj: 2 + 4 (rank_pattern) + 2
    assert res.summary["ranks"]["model.layers.0.self_attn.q_proj"] == 7
    assert res.summary["ranks"]["model.layers.0.mlp.down_proj"] == 8
    assert res.truncation_error < 1e-12
    ms = [dict(m.named_parameters()) for m in setup["merged"]]
    b0 = dict(setup["base"].named_parameters())
    cfg = res.config
    for key in res.summary["modules"]:
        n = key + ".weight"
        A = res.tensors[f"base_model.model.{key}.lora_A.weight"]
        B = res.tensors[f"base_model.model.{key}.lora_B.weight"]
        ref = mm.task_arithmetic(b0[n], [m[n] for m in ms], [1, 1, 1], scaling=0.5) - b0[n]
        r = res.summary["ranks"][key]
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if re.fullmatch(k, key)), cfg["lora_alpha"])
        torch.testing.assert_close(B @ A * (alpha / r), ref, rtol=1e-10, atol=1e-12)


def test_reduced_rank_reports_the_svd_tail(setup, tmp_path):
    res = merge_lora_adapters(setup["dirs"][:2], setup["fishers"], rank=2, base_model=setup["base"])
    full = merge_lora_adapters(setup["dirs"][:2], setup["fishers"], base_model=setup["base"], merge_into_base=True)
    b0 = dict(setup["base"].named_parameters())
    tails = totals = 0.0
    for key, err in res.summary["truncation_error"].items():
        n = key + ".weight"
        delta = full.tensors[n] - b0[n].detach()
        s = torch.linalg.svdvals(delta)
        expected = float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        A = res.tensors[f"base_model.model.{key}.lora_A.weight"]
        B = res.tensors[f"base_model.model.{key}.lora_B.weight"]
        assert A.shape[0] == 2 and res.summary["ranks"][key] == 2
        actual = float((delta - B @ A).norm() / delta.norm())
        assert err > 0.01
        assert abs(err - expected) < 1e-10 and abs(actual - expected) < 1e-8
        tails += float((s[2:] ** 2).sum())
        totals += float((s**2).sum())
    assert abs(res.truncation_error - (tails / totals) ** 0.5) < 1e-10
    res.write_files(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and not cfg["use_rslora"]


def test_dare_in_delta_space_equals_dense_dare(setup):
    res = merge_lora_adapters(setup["dirs"][:2], None, method="dare", drop_p=0.4, seed=7, base_model=setup["base"], merge_into_base=True,
                              convention="hf_fisher")
    ms = [dict(m.named_parameters()) for m in setup["merged"][:2]]
    b0 = dict(setup["base"].named_parameters())
    for n in _dense_names(setup["base"]):
        gens = [mm.tensor_generator(7, n, i) for i in range(2)]
        ref = mm.dare(b0[n], [m[n] for m in ms], [1, 1], p=0.4, generators=gens)
        torch.testing.assert_close(res.tensors[n], ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- refusals
def _write(tmp_path, name, model, **config_changes):
    d = tmp_path / name
    model.save_pretrained(d)
    if config_changes:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_refusals_happen_before_anything_is_written(setup, tmp_path):
    base = setup["base"]
    good = setup["dirs"][0]
    other_targets = _write(tmp_path, "targets", peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"])))
    dora = _write(tmp_path, "dora", setup["peft"][1], use_dora=True)
    fan = _write(tmp_path, "fan", setup["peft"][1], fan_in_fan_out=True)
    other_base = _write(tmp_path, "otherbase", setup["peft"][1], base_model_name_or_path="someone/else")
    first_named = _write(tmp_path, "named", setup["peft"][0], base_model_name_or_path="me/base")
    mts = _write(tmp_path, "mts", setup["peft"][1], modules_to_save=["lm_head"])
    emb = _write(tmp_path, "emb", peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])))
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (ModelMismatchError, "targets different modules", dict(adapters=[good, other_targets], method="average")),
        (UnsupportedError, "use_dora", dict(adapters=[good, dora], method="average")),
        (ModelMismatchError, "fan_in_fan_out", dict(adapters=[good, fan], method="average")),
        (ModelMismatchError, "base_model_name_or_path", dict(adapters=[first_named, other_base], method="average")),
        (UnsupportedError, "modules_to_save", dict(adapters=[good, mts], method="average")),
        (UnsupportedError, "embedding", dict(adapters=[emb, emb], method="average")),
        (UnsupportedError, "lora_A / lora_B", dict(adapters=[good, setup["dirs"][1]], method="fisher",
                                                     fishers=[setup["fishers"][0], _lora_only_fisher(setup)])),
        (InvalidInputError, "one dense-weight Fisher per adapter", dict(adapters=[good, good], method="fisher", fishers=None)),
        (InvalidInputError, "one weight per adapter", dict(adapters=[good, good], method="average", weights=[1.0])),
        (InvalidInputError, "unknown method", dict(adapters=[good, good], method="frankenmerge")),
        (UnsupportedError, "Grams", dict(adapters=[good, good], method="regmean")),
        (InvalidInputError, "rank", dict(adapters=[good, good], method="average", rank=0)),
        (InvalidInputError, "merge_into_base", dict(adapters=[good, good], method="average", rank=2, merge_into_base=True)),
        (InvalidInputError, "adapter_config.json is missing", dict(adapters=[good, str(out)], method="average")),
        (ModelMismatchError, "has shape", dict(adapters=[good, good], method="average", merge_into_base=True, base_model=tm.llama(layers=1, kv_heads=4))),
    ]
    for exc, pattern, kwargs in cases:
        adapters = kwargs.pop("adapters")
        fishers = kwargs.pop("fishers", None)
        with pytest.raises(exc, match=pattern):
            res = merge_lora_adapters(adapters, fishers, base_model=kwargs.pop("base_model", base), **kwargs)
            res.write_files(out)
        assert os.listdir(out) == [], pattern
    # the message names the adapter and the field
    with pytest.raises(UnsupportedError, match=r"adapter 1 \(.*dora.*\): use_dora=True"):
        merge_lora_adapters([good, dora], None, method="average")


def _lora_only_fisher(setup):
    import hf_fisher

    model = copy.deepcopy(setup["peft"][1])
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return hf_fisher.collect(model, setup["batches"][:1], progress=False)


def test_group_fisher_from_folders_and_normalised_fishers(setup, tmp_path):
    import hf_fisher
    from hf_fisher.analysis import expand

    groups = []
    for i, m in enumerate(setup["merged"][:2]):
        m = copy.deepcopy(m)
        for n, p in m.named_parameters():
            p.requires_grad_(bool(TARGET_RE.search(n)))
        f = hf_fisher.collect(m, setup["batches"], reduction="group", progress=False)
        groups.append(f)
        f.save_pretrained(tmp_path / f"f{i}")
    weights = [1.0, 2.0]
    # a Fisher scaled by 1000: normalising each Fisher by its mean over the merged weights undoes it
    big = groups[1]._replace(mean={k: v * 1000 for k, v in groups[1].means.items()}, variance=None)
    res = merge_lora_adapters(setup["dirs"][:2], [str(tmp_path / "f0"), big], weights=weights, base_model=setup["base"],
                              merge_into_base=True, normalize_fishers=True, fisher_floor=1e-12)
    ms = [dict(m.named_parameters()) for m in setup["merged"][:2]]
    names = _dense_names(setup["base"])
    full = [{n: expand(f, n) for n in names} for f in groups]
    means = [sum(float(f[n].sum()) for n in names) / sum(f[n].numel() for n in names) for f in full]
    for n in names:
        ref = mm.fisher_weighted([m[n] for m in ms], [full[i][n] / means[i] for i in range(2)], weights, floor=1e-12)
        torch.testing.assert_close(res.tensors[n], ref, rtol=1e-10, atol=1e-12)
        # the weighting matters: it is not the plain average
        assert not torch.allclose(res.tensors[n], mm.weighted_average([m[n] for m in ms], weights), rtol=1e-6, atol=1e-8)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = tm.gpt2()
    cfg = dict(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, lora_dropout=0.0)
    ads = []
    for seed, r in ((1, 2), (2, 3)):
        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r + 1, **cfg))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        ads.append(m.eval())
    merged = [copy.deepcopy(a).merge_and_unload() for a in ads]
    batch = tm.padded_batch([5, 4], seed=2)
    import hf_fisher

    fishers = []
    for m in merged:
        m = copy.deepcopy(m)
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith(("c_attn.weight", "mlp.c_proj.weight")))
        fishers.append(hf_fisher.collect(m, [batch], progress=False))
    dense = merge_lora_adapters(ads, fishers, merge_into_base=True)
    ms = [dict(m.named_parameters()) for m in merged]
    names = [n for n in ms[0] if n.endswith(("c_attn.weight", "mlp.c_proj.weight"))]
    assert sorted(dense.tensors) == sorted(names) and ms[0][names[0]].shape == (32, 96)  # Conv1D: [in, out]
    for n in names:
        ref = mm.fisher_weighted([m[n] for m in ms], [f[n] for f in fishers], [1, 1], floor=1e-6)
        torch.testing.assert_close(dense.tensors[n], ref, rtol=1e-10, atol=1e-12)
    lora = merge_lora_adapters(ads, fishers)  # PeftModels in, the base taken from them
    assert lora.truncation_error < 1e-12
    lora.write_files(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        ref = dense.to_model()(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        got = loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
