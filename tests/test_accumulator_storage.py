"""Where the accumulators live: memory-mapped files (offload_dir / MappedStore), bit for bit the
in-memory ones, cleaned up on close and garbage collection; bytes per Fisher value by dtype."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import hf_fisher
from hf_fisher import Fisher
from hf_fisher.collection.stats import EMA, MappedStore, Welford
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

BATCHES = [tm.padded_batch([6, 4, 5], seed=s) for s in range(3)]


def _states(col, task="default"):
    return {n: a.state() for n, a in col.tasks[task].accumulators.items()}


def _equal_states(a, b):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].count == b[n].count
        for f in ("mean", "m2", "mean_lo"):
            x, y = getattr(a[n], f), getattr(b[n], f)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (n, f)


def _numel(col):
    return sum(a.state().mean.numel() for a in col.tasks["default"].accumulators.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_disk_backed_collector_equals_in_memory_bitwise(tmp_path, dtype):
    model = tm.llama(torch.float32)
    mem = hf_fisher.FisherCollector(model, accumulation_dtype=dtype)
    mem.collect(BATCHES, progress=False)
    mem.close()
    disk = hf_fisher.FisherCollector(model, accumulation_dtype=dtype, offload_dir=tmp_path / "acc")
    disk.collect(BATCHES, progress=False)
    _equal_states(_states(disk), _states(mem))
    # every state tensor is a file of the store: 16 (float64) or 12 (compensated float32) bytes per value
    per_value = 16 if dtype == torch.float64 else 12
    folder = disk.store.folder
    assert folder.parent == tmp_path / "acc" and disk.store.nbytes == per_value * _numel(disk)
    for acc in disk.tasks["default"].accumulators.values():
        s = acc.state()
        assert all(t is acc._home[a] for a, t in (("_mean", s.mean), ("_m2", s.m2)))
    a, b = mem.fisher(), disk.fisher()
    assert all(torch.equal(a[n], b[n]) and torch.equal(a.variances[n], b.variances[n]) for n in a.names())
    out = disk.save_fisher("default", tmp_path / "art", max_shard_size=20_000)
    assert all(torch.equal(Fisher.from_pretrained(out)[n], a[n]) for n in a.names())
    disk.close()
    assert not folder.exists()


def test_disk_backed_resume_equals_in_memory(tmp_path):
    model = tm.llama(torch.float32)
    first = hf_fisher.FisherCollector(model)
    first.collect(BATCHES[:2], progress=False)
    ckpt = first.fisher()
    first.close()
    cols = []
    for offload in (None, tmp_path / "acc"):
        col = hf_fisher.FisherCollector(model, offload_dir=offload)
        col.restore("default", ckpt)
        col.collect(BATCHES[2:], progress=False)
        cols.append(col)
    _equal_states(_states(cols[1]), _states(cols[0]))
    assert cols[1].store.nbytes == 16 * _numel(cols[1])
    for col in cols:
        col.close()


def test_mapped_accumulators_equal_in_memory_ones_and_clean_up(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, generator=g, dtype=torch.float64).square()
    store = MappedStore(tmp_path)
    folder = store.folder
    pairs = [
        (Welford((3, 5)), Welford((3, 5), store=store)),
        (Welford((3, 5), dtype=torch.float32), Welford((3, 5), dtype=torch.float32, store=store)),
        (EMA((3, 5), decay=0.9), EMA((3, 5), decay=0.9, store=store)),
    ]
    for mem, disk in pairs:
        for chunk in torch.split(x, [1, 7, 12, 20]):
            mem.update(chunk)
            disk.update(chunk)
        assert torch.equal(mem.mean, disk.mean) and torch.equal(mem.m2, disk.m2)
        assert disk.mean is disk._home["_mean"]  # still the file's tensor after replacing updates
    back = Welford.from_state(pairs[0][0].state(), store=store)
    assert torch.equal(back.mean, pairs[0][0].mean) and back.mean is back._home["_mean"]
    # each tensor's file holds its values
    raw = torch.from_file(str(sorted(folder.glob("*.bin"))[0]), shared=False, size=15, dtype=torch.float64)
    assert torch.equal(raw.view(3, 5), pairs[0][1].mean)
    assert len(list(folder.glob("*.bin"))) == 2 + 3 + 2 + 2
    del pairs, back, store, raw, mem, disk
    gc.collect()
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_offload_dir_refusals_before_any_work(tmp_path):
    model = tm.llama(torch.float32)
    with pytest.raises(InvalidInputError, match="offload_dir"):
        hf_fisher.FisherCollector(model, offload_dir=tmp_path, accumulation_device="meta")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="writable offload_dir"):
        hf_fisher.FisherCollector(model, offload_dir=blocker)
    with pytest.raises(InvalidInputError, match="live on the CPU"):
        Welford((2,), device="meta", store=MappedStore(tmp_path / "s"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s"] and list((tmp_path / "s").iterdir()) == []


def test_failed_batch_leaves_disk_accumulators_as_they_were(tmp_path, monkeypatch):
    from hf_fisher.collection.collector import _MomentsSink

    model = tm.llama(torch.float32)
    col = hf_fisher.FisherCollector(model, offload_dir=tmp_path)
    col.collect(BATCHES[:1], progress=False)
    before = {n: (s.mean.clone(), s.m2.clone()) for n, s in _states(col).items()}
    calls = {"n": 0}
    for meth in ("add", "add_gradients"):
        orig = getattr(_MomentsSink, meth)

        def failing(sink, *args, _orig=orig, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # half-way through the batch's parameters
                raise RuntimeError("interrupted")
            return _orig(sink, *args, **kwargs)

        monkeypatch.setattr(_MomentsSink, meth, failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        col.update(BATCHES[1])
    assert calls["n"] == 3
    for n, s in _states(col).items():
        assert torch.equal(s.mean, before[n][0]) and torch.equal(s.m2, before[n][1])
    folder = col.store.folder
    assert folder.exists()
    col.close()
    assert not folder.exists()


def test_collect_passes_offload_dir(tmp_path):
    model = tm.llama(torch.float32)
    a = hf_fisher.collect(model, BATCHES[:1], offload_dir=tmp_path / "acc", progress=False)
    b = hf_fisher.collect(model, BATCHES[:1], progress=False)
    assert all(torch.equal(a[n], b[n]) for n in b.names())
    assert list((tmp_path / "acc").iterdir()) == []  # removed when the estimator closes its collector


class Storages:
    """Bytes of distinct tensor storages alive at once (by data pointer, freed through finalizers)."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.peak = 0

    def add(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.live:
            self.live[ptr] = st.nbytes()
            weakref.finalize(st, self.live.pop, ptr, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return t


def _tracked(orig, track):
    def wrapped(acc, *args, **kwargs):
        return track.add(orig(acc, *args, **kwargs))
    return wrapped


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_release_exports_without_two_full_copies(monkeypatch, dtype):
    """fisher(release=True): accumulators + exported tensors alive at once stay within the
    accumulators plus one parameter's export (float64 storage: the accumulators' own tensors are
    handed over, nothing is copied); release=False holds both full copies."""
    from hf_fisher.collection import stats

    model = tm.llama(torch.float32)
    peaks = {}
    for release in (False, True):
        col = hf_fisher.FisherCollector(model, storage_dtype=dtype)
        col.collect(BATCHES[:2], progress=False)
        track = Storages()
        accs = col.tasks["default"].accumulators
        acc_bytes = 0
        for a in accs.values():
            s = a.state()
            track.add(s.mean)
            track.add(s.m2)
            acc_bytes += s.mean.nbytes + s.m2.nbytes
        one = max(a.state().mean.numel() for a in accs.values()) * 2 * (dtype or torch.float64).itemsize
        del accs, a, s
        monkeypatch.undo()
        for meth in ("mean_as", "variance_as"):
            monkeypatch.setattr(stats.Welford, meth, _tracked(getattr(stats.Welford, meth), track))
        fisher = col.fisher(release=release)
        for n in fisher.names():  # what the result holds
            track.add(fisher[n])
            track.add(fisher.variances[n])
        peaks[release] = (track.peak, acc_bytes, one)
        if release:
            assert "default" not in col.tasks
            ref = hf_fisher.collect(model, BATCHES[:2], storage_dtype=dtype, progress=False)  # estimators release too
            assert all(torch.equal(ref[n], fisher[n]) and torch.equal(ref.variances[n], fisher.variances[n]) for n in ref.names())
        col.close()
        del fisher
    export_bytes = peaks[False][1] * (dtype or torch.float64).itemsize // 8
    peak, acc_bytes, one = peaks[True]
    assert peak <= acc_bytes + one, (peak, acc_bytes, one)
    if dtype is None:
        assert peak == acc_bytes  # handed over: no copy at all
    assert peaks[False][0] >= acc_bytes + export_bytes


def test_release_keeps_the_ema_state_and_kept_samples():
    """release=True empties the task while exporting: the metadata (EMA weight sums) and the kept
    per-sample contributions are read before, equal to the non-releasing export."""
    model = tm.llama(torch.float32)
    out = []
    for release in (False, True):
        for kw in ({"ema_decay": 0.8}, {"reduction": "group", "keep_sample_contributions": True}):
            col = hf_fisher.FisherCollector(model, **kw)
            col.collect(BATCHES[:2], progress=False)
            out.append(col.fisher(release=release))
            col.close()
    for a, b in zip(out[:2], out[2:]):
        assert a.metadata.to_dict() | {"created_at": None} == b.metadata.to_dict() | {"created_at": None}
        assert all(torch.equal(a[n], b[n]) and torch.equal(a.variances[n], b.variances[n]) for n in a.names())
    assert "ema_state" in out[2].metadata.extra
    assert all(torch.equal(out[1].sample_contributions[n], out[3].sample_contributions[n]) for n in out[1].names())
