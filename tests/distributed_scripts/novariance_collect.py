"""torchrun --nproc_per_node=2 novariance_collect.py OUT: mean-only accumulation (``variance=False``)
on 2 ranks (gloo, CPU). Without FSDP each rank's accumulators are merged at ``fisher()`` (the mean
only travels); on an FSDP2-sharded model the ranks' batch means meet on the owners of the rows, the
artifact is written sharded without variance, resumed exactly, and a checkpoint of the other
setting is refused. Every rank writes what it got (tests/test_collection_novariance_distributed.py
compares)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import hf_fisher
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.errors import DistributedMismatchError, InvalidInputError

import common as C


def write_mean(out: Path, tag: str, fisher) -> None:
    """``<tag>.safetensors`` (mean/<name>) and ``<tag>.json`` (has_variance, counts, metadata.extra's variance)."""
    save_file({f"mean/{n}": fisher[n].contiguous() for n in fisher.names()}, str(out / f"{tag}.safetensors"))
    c = fisher.counts
    (out / f"{tag}.json").write_text(json.dumps({
        "has_variance": fisher.has_variance, "samples": c.samples, "tokens": c.tokens,
        "variance": fisher.metadata.extra.get("variance"), "world_size": fisher.metadata.extra.get("world_size"),
    }))


def sharded_llama():
    model = C.tm.llama(torch.float64)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def state_bytes(collector, task) -> int:
    return sum(t.numel() * t.element_size() for a in collector.tasks[task].accumulators.values()
               for t in (a._mean, a._m2, a._lo) if t is not None)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    r, k = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mine = C.batches_of(C.make_samples()[r::k])
    info = {}
    model = C.tm.llama(torch.float64)
    for reduction, dtype in (("param", torch.float32), ("group", torch.float64)):
        for variance in (True, False):
            f = hf_fisher.collect(model, mine, reduction=reduction, accumulation_dtype=dtype, variance=variance, progress=False)
            write_mean(out, f"ddp_{reduction}_{variance}_r{r}", f)
    try:  # the ranks disagree on the setting: refused on every rank at the merge
        col = FisherCollector(model, variance=r == 0)
        col.update(mine[0], "x")
        col.fisher("x")
    except DistributedMismatchError as e:
        info["refused_mixed"] = str(e)

    sharded = sharded_llama()
    for variance in (True, False):
        col = FisherCollector(sharded, accumulation_dtype=torch.float32, variance=variance)
        col.collect(mine, "s", progress=False)
        info[f"fsdp_bytes_{variance}"] = state_bytes(col, "s")
        write_mean(out, f"fsdp_{variance}_r{r}", col.fisher("s"))
        if not variance:
            col.save_fisher("s", out / "fsdp_sharded")
    first = FisherCollector(sharded, variance=False)
    first.collect(mine[:1], "s", progress=False)
    first.save_fisher("s", out / "fsdp_checkpoint")
    resumed = FisherCollector(sharded, variance=False)
    resumed.restore("s", hf_fisher.Fisher.from_pretrained(out / "fsdp_checkpoint"))
    resumed.collect(mine[1:], "s", progress=False)
    write_mean(out, f"fsdp_resumed_r{r}", resumed.fisher("s"))
    whole = FisherCollector(sharded, variance=False)
    whole.collect(mine, "s", progress=False)
    write_mean(out, f"fsdp_whole_r{r}", whole.fisher("s"))
    from hf_fisher.collection.fsdp import restore_sharded

    try:
        restore_sharded(FisherCollector(sharded), "s", out / "fsdp_checkpoint")
    except InvalidInputError as e:
        info["refused_resume"] = str(e)
    (out / f"info_r{r}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
