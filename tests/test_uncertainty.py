"""Kept per-sample group contributions (collect(..., keep_sample_contributions=True)) and the
unit intervals of hf_fisher.analysis.uncertainty, checked against a brute-force reference (one sample at
a time, plain autograd, tests/reference.py) and direct scipy.stats calls on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file, save_file

import hf_fisher
from hf_fisher import plugins
from hf_fisher.analysis import uncertainty
from hf_fisher.artifacts.fisher import Fisher
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.errors import ArtifactError, InvalidInputError

import reference as ref
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

LEVEL = 0.9
N_RESAMPLES = 999


def _batches():
    a = tm.padded_batch([5, 7, 3, 6], seed=1)
    a["labels"][2] = -100  # a sample without label tokens: skipped, not kept
    b = tm.padded_batch([6, 4, 8, 5], seed=2, side="left")
    return [a, b]


@pytest.fixture(scope="module")
def model():
    return tm.llama(kv_heads=2)


@pytest.fixture(scope="module")
def reference(model):
    """Per-sample param-level C_i (float64) of every sample, None for the skipped one."""
    samples = [s for b in _batches() for s in ref.split_batch(b)]
    return ref.per_sample_contributions(model, samples)


@pytest.fixture(scope="module")
def layout(model):
    return plugins.model_layout(model)


@pytest.fixture(scope="module")
def ref_groups(reference, layout):
    """``{param: [n, num_groups]}`` float64: the reference C_i reduced by the layout's ParamGroups."""
    used = [c for c in reference if c is not None]
    return {name: torch.stack([layout.groups[name].reduce(c[name]) for c in used]) for name in used[0]}


@pytest.fixture(scope="module")
def fisher64(model):
    return hf_fisher.collect(model, _batches(), reduction="group", keep_sample_contributions=True,
                             storage_dtype=torch.float64, progress=False)


@pytest.fixture(scope="module")
def fisher32(model):
    return hf_fisher.collect(model, _batches(), reduction="group", keep_sample_contributions=True, progress=False)


def _ref_head_values(reference, layout) -> dict:
    """``{(layer, head): [n]}`` from the param-level reference, slice by slice (no group code)."""
    used = [c for c in reference if c is not None]
    out = {}
    for att in layout.attention:
        share = att.num_kv_heads / att.num_heads
        for h in att.heads:
            def mass(slices, c):
                return sum(float(c[s.param][s.index()].sum()) for s in slices)
            out[(h.layer, h.head)] = np.array(
                [mass(h.q, c) + mass(h.o, c) + (mass(h.k, c) + mass(h.v, c)) * share for c in used]
            )
    return out


def _ref_channel_values(reference, layout) -> dict:
    used = [c for c in reference if c is not None]
    return {
        (block.layer, ch): np.array([sum(float(c[s.param][s.index()].sum()) for s in block.slices(ch)) for c in used])
        for block in layout.mlp for ch in range(block.num_channels)
    }


# ---------------------------------------------------------------------------- kept contributions
def test_kept_contributions_mean_is_the_fisher(fisher32):
    f = fisher32
    assert f.counts.samples == 7 and f.counts.skipped == 1
    assert set(f.sample_contributions) == set(f.names())
    for name in f.names():
        s = f.sample_contributions[name]
        assert s.dtype == torch.float32 and s.device.type == "cpu"
        assert tuple(s.shape) == (7, f.groups[name].num_groups)
        ref.assert_close(s.double().mean(0), f[name], rtol=1e-6, atol_rel=1e-6, what=name)


def test_kept_contributions_equal_brute_force_reference_in_sample_order(fisher64, ref_groups):
    f = fisher64
    for name in f.names():
        s = f.sample_contributions[name]
        assert s.dtype == torch.float64
        ref.assert_close(s, ref_groups[name], rtol=1e-9, atol_rel=1e-9, what=name)
        ref.assert_close(s.mean(0), f[name], rtol=1e-12, atol_rel=1e-12, what=name)


def test_max_samples_keeps_only_the_used_samples(model, ref_groups):
    f = hf_fisher.collect(model, _batches(), reduction="group", keep_sample_contributions=True,
                          storage_dtype=torch.float64, max_samples=5, progress=False)
    assert f.counts.samples == 5
    for name in f.names():
        ref.assert_close(f.sample_contributions[name], ref_groups[name][:5], rtol=1e-9, atol_rel=1e-9, what=name)


def test_not_kept_by_default(model, tmp_path):
    f = hf_fisher.collect(model, _batches()[:1], reduction="group", progress=False)
    assert f.sample_contributions is None
    path = f.save_pretrained(tmp_path / "art")
    assert "sample_contributions_file" not in json.loads((path / "fisher_config.json").read_text())
    assert not (path / "sample_contributions.safetensors").exists()
    assert Fisher.from_pretrained(path).sample_contributions is None


def test_restore_and_true_estimator_keep_them_too(model, ref_groups):
    a, b = _batches()
    first = FisherCollector(model, reduction="group", keep_sample_contributions=True, storage_dtype=torch.float64)
    first.update(a, "t")
    resumed = FisherCollector(model, reduction="group", keep_sample_contributions=True, storage_dtype=torch.float64)
    resumed.restore("t", first.fisher("t"))
    resumed.update(b, "t")
    f = resumed.fisher("t")
    for name in f.names():
        ref.assert_close(f.sample_contributions[name], ref_groups[name], rtol=1e-9, atol_rel=1e-9, what=name)
    with pytest.raises(InvalidInputError, match="no per-sample"):
        resumed.restore("u", hf_fisher.collect(model, [a], reduction="group", progress=False))
    true = hf_fisher.collect(model, [a], estimator="true", reduction="group", keep_sample_contributions=True,
                             storage_dtype=torch.float64, progress=False)
    for name in true.names():
        ref.assert_close(true.sample_contributions[name].mean(0), true[name], rtol=1e-12, atol_rel=1e-12, what=name)


def test_param_reduction_refused_before_any_work(model):
    def batches():
        raise AssertionError("batches were read")
        yield  # pragma: no cover

    with pytest.raises(InvalidInputError, match="reduction='group'"):
        hf_fisher.collect(model, batches(), reduction="param", keep_sample_contributions=True, progress=False)
    with pytest.raises(InvalidInputError, match="too big"):
        FisherCollector(model, reduction="param", keep_sample_contributions=True)
    with pytest.raises(InvalidInputError, match="ema_decay"):
        hf_fisher.collect(model, batches(), reduction="group", ema_decay=0.9, keep_sample_contributions=True, progress=False)
    with pytest.raises(InvalidInputError, match="distributed"):
        hf_fisher.collect(model, batches(), reduction="group", distributed=True, keep_sample_contributions=True, progress=False)


def test_derived_fishers_keep_or_drop_the_contributions(fisher32):
    f64 = fisher32.to(torch.float64)
    assert f64.sample_contributions[f64.names()[0]].dtype == torch.float64
    assert fisher32.normalized("global").sample_contributions is None  # the means changed


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bitwise(fisher32, tmp_path):
    path = fisher32.save_pretrained(tmp_path / "art")
    cfg = json.loads((path / "fisher_config.json").read_text())
    assert cfg["sample_contributions_file"] == "sample_contributions.safetensors"
    g = Fisher.from_pretrained(path)
    for name in fisher32.names():
        a, b = fisher32.sample_contributions[name], g.sample_contributions[name]
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # saving again over the artifact replaces it (the extra file is part of the artifact)
    fisher32.save_pretrained(path)


def test_broken_sample_file_raises_artifact_error(fisher32, tmp_path):
    path = fisher32.save_pretrained(tmp_path / "art")
    file = path / "sample_contributions.safetensors"
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name][:-1].clone()}, str(file))
    with pytest.raises(ArtifactError, match=r"\[counts.samples, num_groups\]"):
        Fisher.from_pretrained(path)
    save_file({k: v for k, v in tensors.items() if k != name}, str(file))
    with pytest.raises(ArtifactError, match="missing"):
        Fisher.from_pretrained(path)
    file.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Fisher.from_pretrained(path)


# ---------------------------------------------------------------------------- intervals
def test_t_intervals_for_groups_match_scipy_t(fisher64, ref_groups):
    out = uncertainty.unit_intervals(fisher64, "groups", level=LEVEL, method="t")
    n = fisher64.counts.samples
    q = scipy.stats.t.ppf(0.5 + LEVEL / 2, df=n - 1)
    name = "model.layers.1.self_attn.k_proj.weight"
    x = ref_groups[name].numpy()
    for g in range(x.shape[1]):
        r = out[(name, g)]
        half = q * x[:, g].std(ddof=1) / math.sqrt(n)
        assert r.method == "t"
        assert r.value == pytest.approx(x[:, g].mean(), rel=1e-9)
        assert (r.lower, r.upper) == pytest.approx((x[:, g].mean() - half, x[:, g].mean() + half), rel=1e-8)
    lo, hi = hf_fisher.analysis.confidence_interval(fisher64, name, LEVEL)
    assert [out[(name, g)].lower for g in range(x.shape[1])] == lo.tolist()
    assert [out[(name, g)].upper for g in range(x.shape[1])] == hi.tolist()


def test_bootstrap_intervals_match_direct_scipy_calls(fisher64, ref_groups, reference, layout):
    """Per-sample unit values equal the reference's; BCa and percentile intervals equal direct
    scipy.stats.bootstrap calls. BCa's bias correction counts bootstrap means below the observed
    mean, which ties (resamples that permute the sample) make sensitive to the last bit of the
    data, so BCa is compared on the library's own per-sample values, the percentile interval
    (continuous in the data) on the independent reference values."""
    units = {
        "groups": {(n, g): ref_groups[n][:, g].numpy() for n in ("model.layers.0.self_attn.v_proj.weight", "lm_head.weight") for g in (0, 1)},
        "heads": _ref_head_values(reference, layout),
        "channels": dict(list(_ref_channel_values(reference, layout).items())[:6]),
    }
    for unit, ref_values in units.items():
        keys = list(ref_values)
        u_lib = uncertainty.per_sample_unit_values(fisher64, unit, keys=keys)
        np.testing.assert_allclose(u_lib, np.stack([ref_values[k] for k in keys]), rtol=1e-9, atol=0)
        for method, data in (("BCa", dict(zip(keys, u_lib))), ("percentile", ref_values)):
            out = uncertainty.unit_intervals(fisher64, unit, level=LEVEL, method="bootstrap", n_resamples=N_RESAMPLES,
                                             seed=3, bootstrap_method=method)
            for key, u in data.items():
                r = out[key]
                ci = scipy.stats.bootstrap((u,), np.mean, confidence_level=LEVEL, n_resamples=N_RESAMPLES,
                                           random_state=3, method=method).confidence_interval
                assert r.method == f"bootstrap-{method}"
                assert r.value == pytest.approx(u.mean(), rel=1e-9), (unit, key)
                assert r.lower < r.value < r.upper, (unit, key)
                assert (r.lower, r.upper) == pytest.approx((ci.low, ci.high), rel=1e-7 if method == "percentile" else 1e-12), (unit, method, key)


def test_percentile_bootstrap_and_auto(fisher32, reference, layout):
    heads = _ref_head_values(reference, layout)
    out = uncertainty.unit_intervals(fisher32, "heads", level=LEVEL, n_resamples=N_RESAMPLES, bootstrap_method="percentile")
    for key, u in heads.items():
        ci = scipy.stats.bootstrap((u,), np.mean, confidence_level=LEVEL, n_resamples=N_RESAMPLES, random_state=0, method="percentile").confidence_interval
        assert out[key].method == "bootstrap-percentile"  # auto: contributions are kept
        assert (out[key].lower, out[key].upper) == pytest.approx((ci.low, ci.high), rel=1e-5)
    no_samples = fisher32._replace(sample_contributions=None)
    assert {r.method for r in uncertainty.unit_intervals(no_samples, "heads").values()} == {"t-conservative"}


def test_conservative_head_interval_is_at_least_the_exact_t_interval(model, fisher64, reference, layout):
    out = uncertainty.unit_intervals(fisher64, "heads", level=LEVEL, method="t")
    n = fisher64.counts.samples
    q = scipy.stats.t.ppf(0.5 + LEVEL / 2, df=n - 1)
    for key, u in _ref_head_values(reference, layout).items():
        r = out[key]
        assert r.method == "t-conservative"
        assert r.value == pytest.approx(u.mean(), rel=1e-9)
        exact_half = q * u.std(ddof=1) / math.sqrt(n)
        half = (r.upper - r.lower) / 2
        assert half >= exact_half * (1 - 1e-9), key
    # and the same for channels, and for a parameter-level Fisher (Σ over elements of their sds)
    param = hf_fisher.collect(model, _batches(), progress=False)
    chans = uncertainty.unit_intervals(fisher64, "channels", level=LEVEL, method="t")
    pchans = uncertainty.unit_intervals(param, "channels", level=LEVEL)
    for key, u in _ref_channel_values(reference, layout).items():
        exact_half = q * u.std(ddof=1) / math.sqrt(n)
        assert (chans[key].upper - chans[key].lower) / 2 >= exact_half * (1 - 1e-9), key
        assert pchans[key].method == "t-conservative" and pchans[key].value == pytest.approx(u.mean(), rel=1e-9)
        assert (pchans[key].upper - pchans[key].lower) / 2 >= (chans[key].upper - chans[key].lower) / 2 * (1 - 1e-9), key


def test_bad_input(fisher32):
    with pytest.raises(InvalidInputError, match=r"\(0, 1\)"):
        uncertainty.unit_intervals(fisher32, level=1.0)
    with pytest.raises(InvalidInputError, match="unknown unit"):
        uncertainty.unit_intervals(fisher32, "experts")
    with pytest.raises(InvalidInputError, match="unknown method"):
        uncertainty.unit_intervals(fisher32, method="jackknife")
    bare = fisher32._replace(variance=None, sample_contributions=None)
    with pytest.raises(InvalidInputError, match="neither variances nor per-sample"):
        uncertainty.unit_intervals(bare)
    with pytest.raises(InvalidInputError, match="keep_sample_contributions=True"):
        uncertainty.unit_intervals(fisher32._replace(sample_contributions=None), method="bootstrap")
    with pytest.raises(InvalidInputError, match="layout"):
        uncertainty.unit_intervals(fisher32._replace(layout=None), "heads")
    with pytest.raises(InvalidInputError, match="n_resamples"):
        uncertainty.unit_intervals(fisher32, n_resamples=0)
