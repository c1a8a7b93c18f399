"""A float32 (compensated) accumulator keeps its low-order part through a merge across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_fisher.collection.distributed import merge_accumulators
from hf_fisher.collection.stats import Welford


def _stream(acc: Welford, seed: int, batches: int = 200) -> Welford:
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        x = torch.rand(4, 64, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-4, 4, (1, 64), generator=g)
        acc.update(x)
    return acc


def test_compensated_welford_merged_over_a_gloo_group_keeps_mean_lo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc = _stream(Welford((64,), dtype=torch.float32), seed=0)
        ref = _stream(Welford((64,), dtype=torch.float64), seed=0)
        assert acc.compensated and bool((acc.state().mean_lo != 0).any())  # there is a low-order part to keep
        merged, counters = merge_accumulators({"w": acc}, {"samples": acc.count})
        out = merged["w"]
        assert out.compensated and out.count == acc.count and counters == {"samples": acc.count}
        # hi + lo survives bit for bit: the merge of one rank is that rank
        torch.testing.assert_close(out.mean_as(torch.float64), acc.mean_as(torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(out.m2, acc.m2, rtol=0, atol=0)
        # and stays within float32's unit roundoff of the float64 stream (dropping lo costs more)
        rel = ((out.mean_as(torch.float64) - ref.mean) / ref.mean).abs().max().item()
        assert rel <= 2 ** -24, rel
    finally:
        dist.destroy_process_group()
