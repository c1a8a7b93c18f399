"""Disk-backed accumulators (``offload_dir``) leave the process's resident memory: after an
update, an export or a restore, the pages of the accumulator files that the process holds
(``Rss`` of their mappings in ``/proc/self/smaps``) are a few slices, not the whole Fisher, and
the numbers are bit for bit those of in-memory accumulators."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_collection_memory_param import assert_same_bits, batches, states, tied_model

import hf_fisher.collection.stats as stats
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.collection.stats import MappedStore, Welford

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not sys.platform.startswith("linux"),
                                reason="reads the resident pages of the mappings from /proc/self/smaps (Linux)")


def resident_bytes(folder: Path) -> int:
    """Resident bytes of this process's mappings of the files under ``folder``."""
    total, inside = 0, False
    prefix = str(folder)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
            inside = len(head) >= 6 and head[5].startswith(prefix)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_disk_backed_collection_keeps_a_few_slices_resident(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "MERGE_CHUNK", 4096, raising=False)
    model = tied_model()
    data = batches(1)
    kw = dict(reduction="param", accumulation_dtype=torch.float32, verify=False)
    col = FisherCollector(model, offload_dir=tmp_path, **kw)
    for b in data[:2]:
        col.update(b)
    folder = col.store.folder
    files = col.store.nbytes
    assert files >= 12 * sum(p.numel() for p in model.parameters())
    assert resident_bytes(folder) <= files // 10  # old code: all of it (every page was written)
    twin = FisherCollector(model, **kw)
    for b in data[:2]:
        twin.update(b)
    assert_same_bits(states(col), states(twin))
    col.save_fisher("default", tmp_path / "out")
    assert resident_bytes(folder) <= files // 10
    fisher = col.fisher()
    assert resident_bytes(folder) <= files // 10
    col.restore("again", fisher)
    assert resident_bytes(folder) <= files // 10
    col.update(data[2])
    twin.update(data[2])
    assert_same_bits(states(col), states(twin))


def test_release_touches_only_the_stores_own_pages(tmp_path):
    """release() of a tensor that is not in a file of the store does nothing (an anonymous page
    dropped would read back as zeros); of one that is, keeps its values."""
    store = MappedStore(tmp_path)
    acc = Welford((3000,), dtype=torch.float64, store=store)
    x = torch.rand(4, 3000, dtype=torch.float64)
    acc.update(x)
    mean = acc.mean.clone()
    plain = torch.rand(3000, dtype=torch.float64)
    before = plain.clone()
    store.release(plain, plain[5:1000], None)
    assert torch.equal(plain, before)
    store.release(acc.mean, acc.m2[100:2000])
    assert torch.equal(acc.mean, mean) and torch.allclose(acc.mean, x.mean(0))
    store.close()
