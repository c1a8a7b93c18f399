"""merge_with_fisher: every method against a dense reference written out in the test, the Fisher
rules (floor, zero Fisher, equal Fishers, group broadcast, normalisation, parameters without a
Fisher), validation tuning, and the checks that refuse a merge before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers.merge.api import DEFAULT_GRID, merge_with_fisher, validation_loss
from hf_fisher.errors import ArtifactError, InvalidInputError, ModelMismatchError
from hf_fisher.layout import GroupRun, ParamGroups

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- fixtures
def _fisher(model, seed, *, zero=(), scale=1.0, skip=(), model_type="llama"):
    g = torch.Generator().manual_seed(seed)
    mean = {}
    for n, p in model.named_parameters():
        if n in skip:
            continue
        f = torch.rand(p.shape, generator=g, dtype=torch.float64) * scale + 0.01
        if n in zero:
            f.zero_()
        mean[n] = f
    return Fisher(mean, None, reduction="param", groups=None, param_shapes={n: t.shape for n, t in mean.items()},
                  counts=Counts(8, 40), metadata=FisherMetadata(task=f"t{seed}", model_type=model_type))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = tm.llama(seed=10)
    models = []
    for seed in (11, 12):
        m = tm.llama(seed=10)
        torch.manual_seed(seed)
        with torch.no_grad():  # fine-tuned from the base: small task vectors
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        models.append(m)
    paths = {}
    for name, m in (("base", base), ("a", models[0]), ("b", models[1])):
        m.save_pretrained(root / name)
        paths[name] = root / name
    return {"root": root, "base": base, "models": models, "paths": paths}


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _out_tensors(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _close(a, b, tol=1e-12):
    assert a.shape == b.shape
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=0), float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------- Fisher merging
def test_fisher_merge_equals_dense_reference(zoo, tmp_path):
    a, b = zoo["models"]
    fa, fb = _fisher(a, 1), _fisher(b, 2)
    fa.save_pretrained(tmp_path / "fa")
    w = [0.3, 0.7]
    out = merge_with_fisher([zoo["paths"]["a"], b], [tmp_path / "fa", fb], weights=w, output_dir=tmp_path / "out",
                            fisher_floor=1e-6, progress=False)
    assert out == tmp_path / "out"
    got = _out_tensors(out)
    sa, sb = _sd(a), _sd(b)
    assert set(got) == set(sa)
    for n in sa:
        fa_, fb_ = fa[n].clamp_min(1e-6), fb[n].clamp_min(1e-6)
        ref = (w[0] * fa_ * sa[n] + w[1] * fb_ * sb[n]) / (w[0] * fa_ + w[1] * fb_)
        _close(got[n], ref)
        assert got[n].dtype == torch.float64
    # a written model loads and is the returned model of the in-memory path
    model = merge_with_fisher([a, b], [fa, fb], weights=w, progress=False)
    for n, p in model.state_dict().items():
        _close(p, got[n], 0)


def test_equal_fishers_give_the_plain_average(zoo):
    a, b = zoo["models"]
    f = _fisher(a, 3)
    model = merge_with_fisher([a, b], [f, f], weights=[2.0, 1.0], progress=False)
    sa, sb = _sd(a), _sd(b)
    for n, p in model.state_dict().items():
        _close(p, (2 * sa[n] + sb[n]) / 3)


def test_zero_fisher_takes_the_other_models_value(zoo):
    a, b = zoo["models"]
    name = "model.layers.0.self_attn.q_proj.weight"
    fa = _fisher(a, 4, zero=[name])
    fb = _fisher(b, 5)
    model = merge_with_fisher([a, b], [fa, fb], fisher_floor=1e-12, progress=False)
    got = model.state_dict()[name]
    _close(got, _sd(b)[name], 1e-9)
    assert not torch.allclose(got, _sd(a)[name], atol=1e-3)


def test_all_fishers_vanish_gives_the_weighted_average(zoo):
    a, b = zoo["models"]
    name = "model.layers.1.mlp.up_proj.weight"
    fa, fb = _fisher(a, 6, zero=[name]), _fisher(b, 7, zero=[name])
    model = merge_with_fisher([a, b], [fa, fb], weights=[0.25, 0.75], progress=False)
    _close(model.state_dict()[name], 0.25 * _sd(a)[name] + 0.75 * _sd(b)[name])


def test_group_fishers_broadcast_to_their_slices(zoo):
    a, b = zoo["models"]
    shapes = {n: tuple(p.shape) for n, p in a.named_parameters()}
    groups = {}
    for n, s in shapes.items():
        if len(s) == 2:  # two runs of unequal row blocks along axis 0
            half = s[0] // 2
            groups[n] = ParamGroups(0, (GroupRun("lo", 1, half), GroupRun("row", s[0] - half, 1)))
        else:
            groups[n] = ParamGroups.single(0, s[0])
    fis = []
    for seed in (8, 9):
        g = torch.Generator().manual_seed(seed)
        mean = {n: torch.rand(pg.num_groups, generator=g, dtype=torch.float64) + 0.1 for n, pg in groups.items()}
        fis.append(Fisher(mean, None, reduction="group", groups=groups, param_shapes=shapes, counts=Counts(4, 4),
                          metadata=FisherMetadata(reduction="group", model_type="llama")))
    floor = 1e-3  # active for the spread values of large groups: the test tells F_g / |g| from F_g
    model = merge_with_fisher([a, b], fis, fisher_floor=floor, progress=False)
    sa, sb = _sd(a), _sd(b)
    per_param = {}
    for n, s in shapes.items():
        per = []
        for f in fis:  # by hand: element (r, c) of group g gets F_g / (number of elements of g)
            v = f[n]
            e = torch.empty(s, dtype=torch.float64)
            if len(s) == 2:
                half = s[0] // 2
                e[:half] = v[0] / (half * s[1])
                for r in range(half, s[0]):
                    e[r] = v[1 + r - half] / s[1]
            else:
                e[:] = v[0] / s[0]
            per.append(e.clamp_min(floor))
        ref = (per[0] * sa[n] + per[1] * sb[n]) / (per[0] + per[1])
        _close(model.state_dict()[n], ref)
        per_param[n] = per[0]
    # a group Fisher next to a parameter-level one: both are per-element Fishers
    fb = _fisher(b, 40, scale=1e-2)
    mixed = merge_with_fisher([a, b], [fis[0], fb], fisher_floor=floor, progress=False).state_dict()
    for n in shapes:
        y = fb[n].clamp_min(floor)
        _close(mixed[n], (per_param[n] * sa[n] + y * sb[n]) / (per_param[n] + y))


def test_normalisation_removes_a_global_scale(zoo):
    a, b = zoo["models"]
    fa, fb = _fisher(a, 10), _fisher(b, 11)
    fb_big = _fisher(b, 11, scale=1000.0)
    # fb_big = 1000 * (fb - 0.01) + 0.01: not a pure scale; build an exact multiple instead
    fb_big = Fisher({n: t * 1000.0 for n, t in fb.items()}, None, reduction="param", groups=None,
                    param_shapes=fb.param_shapes, counts=fb.counts, metadata=fb.metadata)
    plain = merge_with_fisher([a, b], [fa, fb], normalize_fishers=True, progress=False, fisher_floor=1e-12).state_dict()
    scaled = merge_with_fisher([a, b], [fa, fb_big], normalize_fishers=True, progress=False, fisher_floor=1e-12).state_dict()
    raw = merge_with_fisher([a, b], [fa, fb_big], progress=False, fisher_floor=1e-12).state_dict()
    n = "model.layers.0.mlp.down_proj.weight"
    _close(plain[n], scaled[n], 1e-12)
    assert not torch.allclose(raw[n], plain[n], atol=1e-6)
    # the reference: divide each Fisher by its global mean
    ma = sum(float(t.sum()) for _, t in fa.items()) / sum(t.numel() for _, t in fa.items())
    mb = sum(float(t.sum()) for _, t in fb.items()) / sum(t.numel() for _, t in fb.items())
    x, y = fa[n] / ma, fb[n] / mb
    _close(plain[n], (x * _sd(a)[n] + y * _sd(b)[n]) / (x + y))


def test_parameters_without_fisher_use_the_logged_rule(zoo, tmp_path, caplog):
    a, b = zoo["models"]
    skip = ["model.norm.weight", "lm_head.weight"]
    fa, fb = _fisher(a, 12, skip=skip), _fisher(b, 13, skip=skip[:1])
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        out = merge_with_fisher([a, b], [fa, fb], weights=[0.4, 0.6], output_dir=tmp_path / "o", progress=False)
    text = caplog.text
    assert "2 tensor(s) have no Fisher" in text and "model.norm.weight" in text and "lm_head.weight" in text
    got = _out_tensors(out)
    for n in skip:
        _close(got[n], 0.4 * _sd(a)[n] + 0.6 * _sd(b)[n])
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["hf_fisher"]["no_fisher"]["rule"] == "average"
    assert sorted(recipe["hf_fisher"]["no_fisher"]["tensors"]) == sorted(skip)
    first = merge_with_fisher([a, b], [fa, fb], no_fisher_rule="first", progress=False).state_dict()
    _close(first["model.norm.weight"], _sd(a)["model.norm.weight"], 0)
    with pytest.raises(InvalidInputError, match="no Fisher in every model"):
        merge_with_fisher([a, b], [fa, fb], no_fisher_rule="error", output_dir=tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


def test_fisher_task_vector_reference(zoo):
    a, b = zoo["models"]
    base = zoo["base"]
    fa, fb = _fisher(a, 14), _fisher(b, 15)
    model = merge_with_fisher([a, b], [fa, fb], method="fisher_task_vector", base_model=zoo["paths"]["base"],
                              weights=[0.5, 0.5], progress=False)
    s0, sa, sb = _sd(base), _sd(a), _sd(b)
    for n in sa:
        x, y = fa[n].clamp_min(1e-6), fb[n].clamp_min(1e-6)
        _close(model.state_dict()[n], s0[n] + (x * (sa[n] - s0[n]) + y * (sb[n] - s0[n])) / (x + y))


# ---------------------------------------------------------------------------- baselines
def test_average_and_task_arithmetic_references(zoo):
    a, b = zoo["models"]
    s0, sa, sb = _sd(zoo["base"]), _sd(a), _sd(b)
    avg = merge_with_fisher([a, b], method="average", weights=[1, 3], progress=False).state_dict()
    ta = merge_with_fisher([a, b], method="task_arithmetic", base_model=zoo["base"], weights=[1.0, 0.5],
                           scaling=0.7, progress=False).state_dict()
    for n in sa:
        _close(avg[n], (sa[n] + 3 * sb[n]) / 4)
        _close(ta[n], s0[n] + 0.7 * ((sa[n] - s0[n]) + 0.5 * (sb[n] - s0[n])))


def _ties_reference(base, thetas, weights, density, scaling):
    taus = []
    for w, t in zip(weights, thetas):
        tau = (t - base) * w
        k = round(density * tau.numel())
        flat = tau.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        taus.append(torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape))
    sign = torch.sign(sum(taus))
    num = sum(torch.where((torch.sign(t) == sign) & (t != 0), t, torch.zeros_like(t)) for t in taus)
    cnt = sum(((torch.sign(t) == sign) & (t != 0)).double() for t in taus)
    return base + scaling * num / cnt.clamp_min(1)


def test_ties_reference(zoo):
    a, b = zoo["models"]
    s0, sa, sb = _sd(zoo["base"]), _sd(a), _sd(b)
    got = merge_with_fisher([a, b], method="ties", base_model=zoo["base"], density=0.3, scaling=0.9,
                            convention="hf_fisher", progress=False).state_dict()
    for n in sa:
        _close(got[n], _ties_reference(s0[n], [sa[n], sb[n]], [1.0, 1.0], 0.3, 0.9))


def test_dare_is_seeded_and_drops_with_rate_p(zoo):
    a = zoo["models"][0]
    s0, sa = _sd(zoo["base"]), _sd(a)
    kw = {"method": "dare", "base_model": zoo["base"], "drop_p": 0.6, "convention": "hf_fisher", "progress": False}
    one = merge_with_fisher([a, a], seed=3, weights=[1.0, 0.0], **kw).state_dict()
    again = merge_with_fisher([a, a], seed=3, weights=[1.0, 0.0], **kw).state_dict()
    other = merge_with_fisher([a, a], seed=4, weights=[1.0, 0.0], **kw).state_dict()
    n = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(one[n], again[n])
    assert not torch.equal(one[n], other[n])
    tau = sa[n] - s0[n]
    delta = one[n] - s0[n]
    kept = delta != 0
    _close(delta[kept], tau[kept] / 0.4, 1e-12)  # kept entries rescaled by 1 / (1 - p)
    assert abs(1 - kept.double().mean().item() - 0.6) < 0.05  # about p dropped


# ---------------------------------------------------------------------------- validation tuning
def _val_batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, tm.VOCAB, (2, 8), generator=g)} for _ in range(2)]


@pytest.mark.parametrize("method", ["task_arithmetic", "fisher"])
def test_validation_picks_the_grid_point_with_the_smallest_loss(zoo, tmp_path, caplog, method):
    a, b = zoo["models"]
    val = [_val_batches(1), _val_batches(2)]
    if method == "fisher":
        fis = [_fisher(a, 30, scale=1e-3), _fisher(b, 31, scale=1e-3)]
        kw, grid = {"fishers": fis}, {"weight_lean": (0.0, 0.5), "fisher_floor": (1e-6, 10.0)}
        weight_grid, knob, knob_grid = ([0.5, 0.5], [0.75, 0.25], [0.25, 0.75]), "fisher_floor", (1e-6, 10.0)
    else:
        kw, grid = {"base_model": zoo["base"]}, {"weight_lean": (0.0, 0.5), "scaling": (0.5, 1.0)}
        # weights uniform (all 1) or leaning 0.5 to one model, times n = 2
        weight_grid, knob, knob_grid = ([1.0, 1.0], [1.5, 0.5], [0.5, 1.5]), "scaling", (0.5, 1.0)
    with caplog.at_level(logging.INFO, logger="hf_fisher"):
        out = merge_with_fisher([a, b], method=method, validation=val, validation_grid=grid,
                                output_dir=tmp_path / "v", progress=False, **kw)
    assert "validation picked" in caplog.text
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    chosen = recipe["hf_fisher"]["validation"]["chosen"]
    best = None  # evaluate the grid by hand
    for w in weight_grid:
        for k in knob_grid:
            m = merge_with_fisher([a, b], method=method, weights=w, progress=False, **{knob: k}, **kw)
            loss = validation_loss(m, val)
            if best is None or loss < best[0]:
                best = (loss, w, k)
    assert chosen["weights"] == pytest.approx(best[1]) and chosen[knob] == best[2]
    assert chosen["loss"] == pytest.approx(best[0], rel=1e-9)
    assert [e["parameters"]["weight"] for e in recipe["models"]] == pytest.approx(best[1])
    assert recipe["parameters"][{"scaling": "lambda"}.get(knob, knob)] == best[2]  # mergekit's name
    assert "Validation-tuned settings" in (out / "README.md").read_text()
    losses = {round(x["loss"], 12) for x in recipe["hf_fisher"]["validation"]["losses"]}
    assert len(losses) > 1  # the grid points differ: the choice is not a tie
    assert set(DEFAULT_GRID) == {"weight_lean", "scaling", "fisher_floor", "alpha", "kfac_damping", "layer_lean",
                                 "weight_shrink"}


# ---------------------------------------------------------------------------- checks before work
def _edit_folder(src: Path, dst: Path, edit):
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mismatches_are_refused_before_anything_is_written(zoo, tmp_path):
    a, b = zoo["models"]
    pa, pb = zoo["paths"]["a"], zoo["paths"]["b"]
    out = tmp_path / "out"
    other = tm.llama(layers=3)
    other_path = tmp_path / "three"
    other.save_pretrained(other_path)
    missing = _edit_folder(pb, tmp_path / "missing", lambda sd: sd.pop("model.norm.weight"))
    reshaped = _edit_folder(pb, tmp_path / "reshaped",
                            lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(31, dtype=torch.float64)))
    fa, fb = _fisher(a, 1), _fisher(b, 2)
    cases = [
        (([pa, other_path], None, {"method": "average"}), ModelMismatchError, "num_hidden_layers"),
        (([pa, missing], None, {"method": "average"}), ModelMismatchError, "different tensors.*model.norm.weight"),
        (([pa, reshaped], None, {"method": "average"}), ModelMismatchError, "model.norm.weight.*shape"),
        (([pa, pb], [fa, _fisher(other, 3)], {}), ModelMismatchError, "does not have"),
        (([pa, pb], [fa, _fisher(b, 3, model_type="gpt2")], {}), ModelMismatchError, "'gpt2' model"),
        (([pa, pb], [fa], {}), InvalidInputError, "1 Fishers for 2 models"),
        (([pa, pb], None, {}), InvalidInputError, "needs fishers"),
        (([pa, pb], None, {"method": "ties"}), InvalidInputError, "needs base_model"),
        (([pa, pb], None, {"method": "nope"}), InvalidInputError, "method must be one of"),
        (([pa, pb], [fa, fb], {"weights": [1.0]}), InvalidInputError, "1 weights for 2 models"),
        (([pa, pb], [fa, fb], {"dtype": "int8"}), InvalidInputError, "dtype"),
        (([pa], None, {"method": "average"}), InvalidInputError, "at least two"),
        (([pa, pb], None, {"method": "average", "wieghts": [1, 2]}), InvalidInputError, "unknown keyword.*wieghts"),
        (([pa, pb], [fa, fb], {"no_fisher_rule": "zero"}), InvalidInputError, "no_fisher_rule must be one of"),
        (([pa, pb], None, {"method": "regmean"}), InvalidInputError, "needs data="),
    ]
    for (models, fishers, kw), err, pattern in cases:
        with pytest.raises(err, match=pattern):
            merge_with_fisher(models, fishers, output_dir=out, progress=False, **kw)
        assert not out.exists(), pattern
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-hf-fisher")]


def test_tokenizer_mismatch_refused_unless_allowed(zoo, tmp_path):
    import shutil

    pa, pb = tmp_path / "ta", tmp_path / "tb"
    shutil.copytree(zoo["paths"]["a"], pa)
    shutil.copytree(zoo["paths"]["b"], pb)
    for folder, extra in ((pa, "x"), (pb, "y")):
        vocab = {f"t{i}": i for i in range(tm.VOCAB - 1)} | {extra: tm.VOCAB - 1}
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []}))
    out = tmp_path / "out"
    with pytest.raises(ModelMismatchError, match="tokenizer vocabulary"):
        merge_with_fisher([pa, pb], method="average", output_dir=out, progress=False)
    assert not out.exists()
    merge_with_fisher([pa, pb], method="average", output_dir=out, allow_tokenizer_mismatch=True, progress=False)
    assert (out / "tokenizer.json").read_text() == (pa / "tokenizer.json").read_text()


def test_output_folder_rules(zoo, tmp_path):
    a, b = zoo["models"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a previous merge output"):
        merge_with_fisher([a, b], method="average", output_dir=busy, progress=False)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    out = tmp_path / "again"
    merge_with_fisher([a, b], method="average", output_dir=out, progress=False)
    first = _out_tensors(out)
    merge_with_fisher([a, b], method="average", weights=[1, 0], output_dir=out, progress=False)  # replaces a merge
    _close(_out_tensors(out)["model.norm.weight"], _sd(a)["model.norm.weight"], 0)
    assert not torch.equal(first["model.norm.weight"], _out_tensors(out)["model.norm.weight"])


# ---------------------------------------------------------------------------- RegMean (dispatch)
def test_fisher_regmean_dispatch(zoo):
    regmean = pytest.importorskip("hf_fisher.consumers.merge.regmean")
    a, b = zoo["models"]
    fa, fb = _fisher(a, 20), _fisher(b, 21)
    data = [_val_batches(3), _val_batches(4)]
    got = merge_with_fisher([a, b], [fa, fb], method="fisher_regmean", data=data, alpha=0.8, progress=False).state_dict()
    grams = [regmean.collect_input_grams(m, d, progress=False) for m, d in zip((a, b), data)]
    sa, sb = _sd(a), _sd(b)
    lin = "model.layers.0.mlp.down_proj.weight"
    ga, gb = grams[0].grams[lin], grams[1].grams[lin]

    def reg(g):
        return 0.8 * g + 0.2 * torch.diag(torch.diag(g))

    ref = torch.linalg.solve(reg(ga) + reg(gb), reg(ga) @ sa[lin].T + reg(gb) @ sb[lin].T).T
    _close(got[lin], ref, 1e-8)
    norm = "model.norm.weight"  # not a Linear: Fisher merged
    x, y = fa[norm].clamp_min(1e-6), fb[norm].clamp_min(1e-6)
    _close(got[norm], (x * sa[norm] + y * sb[norm]) / (x + y))
