"""Mean-only accumulation (``FisherCollector(variance=False)``, issue 23: the full-depth 1B param
Fisher in float32 within 24 GB RAM).

Without ``M2`` the accumulators hold 8 bytes per Fisher value (float32 ``hi`` + ``lo``; float64
mean) instead of 12 / 16. These tests show that the mean is bit for bit the one kept with the
variance (param and group, float32 and float64, disk-backed, several batches and tasks, atomic
and streaming batches, sample chunks and row blocks), the bytes per value from the tensors' sizes,
that the disk-backed store makes no M2 file, the artifacts (``fisher``, ``save_fisher``, sharded)
without variance and the metadata, the checkpoint refusals across settings, and what cannot be
honoured refused before any work.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_collection_memory_param import batches, tied_model
from test_collection_streaming import data_two_tasks

import hf_fisher
from hf_fisher import Fisher
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.collection.stats import MappedStore, Welford
from hf_fisher.errors import InvalidInputError, UnsupportedError

pytestmark = pytest.mark.usefixtures("one_thread")


def run(model, data, **kw):
    col = FisherCollector(model, **kw)
    for task, b in data:
        col.update(b, task)
    return col


def states(col):
    return {t: {n: a.state_dict() for n, a in s.accumulators.items()} for t, s in col.tasks.items()}


def assert_same_mean(full, mean_only, extra=frozenset({"m2"})):
    """Every state tensor of ``mean_only`` equals ``full``'s bit for bit, and ``full`` has ``extra`` more."""
    assert full.keys() == mean_only.keys()
    for t in full:
        assert full[t].keys() == mean_only[t].keys()
        for n, s in full[t].items():
            m = mean_only[t][n]
            assert set(s) - set(m) == extra and set(m) <= set(s), (t, n, sorted(s), sorted(m))
            for k in m:
                assert torch.equal(s[k], m[k]), (t, n, k)


# --------------------------------------------------------------------------- same mean
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "streaming"])
@pytest.mark.parametrize("budget", [None, 0.1], ids=["whole", "row-blocks"])
def test_param_mean_is_bit_for_bit_the_mean_with_variance(dtype, atomic, budget):
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="param", accumulation_dtype=dtype, memory_budget_mb=budget, atomic_batches=atomic)
    full, only = run(model, data, **kw), run(model, data, variance=False, **kw)
    assert_same_mean(states(full), states(only))
    for t in full.tasks:
        assert (only.tasks[t].samples, only.tasks[t].tokens) == (full.tasks[t].samples, full.tasks[t].tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "streaming"])
def test_group_mean_is_bit_for_bit_with_kept_contributions(dtype, atomic):
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="group", accumulation_dtype=dtype, atomic_batches=atomic, keep_sample_contributions=True)
    full, only = run(model, data, **kw), run(model, data, variance=False, **kw)
    assert_same_mean(states(full), states(only))
    a, b = full.fisher("a"), only.fisher("a")
    assert not b.has_variance and b.sample_contributions is not None
    for n in a.names():
        assert torch.equal(a[n], b[n]) and torch.equal(a.sample_contributions[n], b.sample_contributions[n]), n


@pytest.mark.parametrize("dtype, files", [(torch.float32, 2), (torch.float64, 1)])
def test_disk_backed_mean_only_makes_no_m2_file(dtype, files, tmp_path):
    """``offload_dir``: the mean's files only (float32: hi and lo; float64: the mean), the same bits
    as in memory with the variance, and the same artifact mean."""
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="param", accumulation_dtype=dtype, memory_budget_mb=0.1)
    full = run(model, data, **kw)
    only = run(model, data, variance=False, atomic_batches=False, offload_dir=tmp_path / "acc", **kw)
    assert_same_mean(states(full), states(only))
    params = len(list(model.parameters()))
    assert len(list(only.store.folder.glob("*.bin"))) == files * params * len(only.tasks)
    per_value = only.store.nbytes / (sum(p.numel() for p in model.parameters()) * len(only.tasks))
    assert per_value == 8
    a, b = full.fisher("b"), only.fisher("b")
    for n in a.names():
        assert torch.equal(a[n], b[n]), n
    only.close()


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("dtype, with_var, without", [(torch.float32, 12, 8), (torch.float64, 16, 8)])
def test_accumulator_bytes_per_value(dtype, with_var, without):
    model = tied_model()
    values = sum(p.numel() for p in model.parameters())
    for variance, expected in ((True, with_var), (False, without)):
        col = run(model, [("t", batches(2, count=1)[0])], accumulation_dtype=dtype, variance=variance)
        accs = col.tasks["t"].accumulators.values()
        held = sum(t.numel() * t.element_size() for a in accs for t in (a._mean, a._m2, a._lo) if t is not None)
        assert held == expected * values, (variance, held / values)


# --------------------------------------------------------------------------- artifacts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_artifacts_without_variance(dtype, tmp_path):
    model = tied_model()
    data = data_two_tasks()
    full, only = run(model, data, accumulation_dtype=dtype), run(model, data, accumulation_dtype=dtype, variance=False)
    ref = full.fisher("a", dtype=torch.float64)
    f = only.fisher("a", dtype=torch.float64)
    assert not f.has_variance and f.variances == {}
    assert f.metadata.extra["variance"] is False and "variance" not in ref.metadata.extra
    for n in ref.names():
        assert torch.equal(ref[n], f[n]), n
    for shard in ("10GB", "20KB"):  # one file; many shards with an index
        out = only.save_fisher("a", tmp_path / shard, dtype=torch.float64, max_shard_size=shard)
        loaded = Fisher.from_pretrained(out)
        assert not loaded.has_variance and loaded.metadata.extra["variance"] is False
        assert json.loads((out / "fisher_config.json").read_text())["has_variance"] is False
        for n in ref.names():
            assert torch.equal(loaded[n], ref[n]), n
    assert len(list((tmp_path / "20KB").glob("fisher-*.safetensors"))) > 1
    released = only.fisher("b", release=True)  # hands over its own tensors when the dtype matches
    assert not released.has_variance and "b" not in only.tasks
    for n in released.names():
        assert torch.equal(released[n], full.fisher("b")[n]), n


def test_consumers_that_need_the_variance_refuse_it():
    from hf_fisher.analysis.uncertainty import unit_intervals

    model = tied_model()
    f = run(model, [("t", batches(3, count=1)[0])], reduction="group", variance=False).fisher("t")
    with pytest.raises(InvalidInputError, match="variance"):
        unit_intervals(f, method="t")


# --------------------------------------------------------------------------- resume
def test_resume_with_the_same_setting_is_exact_and_across_settings_refused(tmp_path):
    model = tied_model()
    data = [("t", b) for b in batches(2, count=3)]
    whole = run(model, data, variance=False)
    part = run(model, data[:2], variance=False)
    ckpt = part.fisher("t")
    resumed = FisherCollector(model, variance=False)
    resumed.restore("t", ckpt)
    resumed.update(data[2][1], "t")
    assert_same_mean(states(whole), states(resumed), extra=set())  # float64 artifact: exact
    full = FisherCollector(model)
    with pytest.raises(InvalidInputError, match="no variance .*variance=False"):
        full.restore("t", ckpt)
    with pytest.raises(InvalidInputError, match="keeps the mean only"):
        FisherCollector(model, variance=False).restore("t", run(model, data[:1]).fisher("t"))
    assert "t" not in full.tasks


def test_welford_mean_only_state_and_refusals():
    x = torch.randn(7, 5, dtype=torch.float64).square()
    full, only = Welford(dtype=torch.float32), Welford(dtype=torch.float32, variance=False)
    for chunk in (x[:3], x[3:4], x[4:]):
        full.update(chunk)
        only.update(chunk)
    assert torch.equal(full.mean, only.mean) and torch.equal(full.state().mean_lo, only.state().mean_lo)
    assert only.state().m2 is None and "m2" not in only.state_dict() and only._m2 is None
    for call in (lambda: only.m2, lambda: only.variance(), lambda: only.stderr()):
        with pytest.raises(UnsupportedError, match="variance=False"):
            call()
    with pytest.raises(UnsupportedError, match="mean-only"):
        Welford(dtype=torch.float32).merge(only)
    back = Welford.from_state_dict(only.state_dict(), dtype=torch.float32)
    assert not back.has_variance and torch.equal(back.mean, only.mean)
    with pytest.raises(InvalidInputError, match="variance=False"):
        Welford.from_state_dict(only.state_dict(), dtype=torch.float32, variance=True)
    with pytest.raises(InvalidInputError, match="variance=True"):
        Welford.from_state_dict(full.state_dict(), dtype=torch.float32, variance=False)
    merged = Welford(dtype=torch.float32, variance=False).merge(full)  # dropping M2 on purpose is fine
    assert torch.equal(merged.mean, full.mean)


def test_mapped_store_holds_no_m2(tmp_path):
    store = MappedStore(tmp_path)
    w = Welford((4, 3), dtype=torch.float64, store=store, variance=False)
    w.update_shifted_(2, torch.ones(4, 3, dtype=torch.float64), None)
    assert len(list(store.folder.glob("*.bin"))) == 1 and store.nbytes == 8 * 12
    store.close()


# --------------------------------------------------------------------------- options
def test_options_refused_before_any_work():
    model = tied_model()
    with pytest.raises(InvalidInputError, match="variance=False cannot be combined with ema_decay"):
        FisherCollector(model, variance=False, ema_decay=0.9)
    with pytest.raises(InvalidInputError, match="variance must be True"):
        FisherCollector(model, variance="no")
    with pytest.raises(InvalidInputError, match="variance=False cannot be combined with ema_decay"):
        hf_fisher.collect(model, batches(2, count=1), variance=False, ema_decay=0.9, progress=False)
    with pytest.raises(InvalidInputError, match="variance"):
        hf_fisher.collect(model, batches(2, count=1), estimator="kfac", variance=False, progress=False)


@pytest.mark.parametrize("estimator", ["empirical", "true"])
def test_collect_passes_the_option(estimator):
    model = tied_model()
    kw = dict(estimator=estimator, reduction="group", progress=False, **({"seed": 3} if estimator == "true" else {}))
    ref = hf_fisher.collect(model, batches(2, count=2), **kw)
    f = hf_fisher.collect(model, batches(2, count=2), variance=False, **kw)
    assert ref.has_variance and not f.has_variance
    assert f.metadata.estimator == estimator
    for n in ref.names():
        assert torch.equal(ref[n], f[n]), n

