"""torchrun --nproc_per_node=2 streaming_collect.py OUT: the streaming commit
(``atomic_batches=False``) on 2 ranks (gloo, CPU). Each rank collects its share of the samples
with atomic batches and with streaming, the Fisher merged over the ranks; and an FSDP2-sharded
model, on which streaming is refused on every rank before any work. Every rank writes what it
got (tests/test_collection_streaming_distributed.py compares)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import hf_fisher
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.errors import UnsupportedError

import common as C


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    r, k = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = C.tm.llama(torch.float64)
    mine = C.batches_of(C.make_samples()[r::k])  # rank r: samples r, r+k, ...
    for reduction, dtype in (("param", torch.float32), ("group", torch.float64)):
        for atomic in (True, False):
            f = hf_fisher.collect(model, mine, reduction=reduction, accumulation_dtype=dtype, atomic_batches=atomic,
                                  progress=False)
            C.write_fisher(out, f"{reduction}_{'atomic' if atomic else 'stream'}_r{r}", f)
    # two tasks on one collector, the merged Fisher asked twice (fisher() never changes this rank's accumulators)
    for atomic in (True, False):
        col = FisherCollector(model, accumulation_dtype=torch.float32, atomic_batches=atomic)
        kind = "atomic" if atomic else "stream"
        for i, b in enumerate(mine):
            col.update(b, "ab"[i % 2])
        C.write_fisher(out, f"tasks_a_{kind}_r{r}", col.fisher("a"))
        C.write_fisher(out, f"tasks_a_again_{kind}_r{r}", col.fisher("a"))
        C.write_fisher(out, f"tasks_b_{kind}_r{r}", col.fisher("b"))

    sharded = C.tm.llama(torch.float64)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    for what, call in (("collector", lambda: FisherCollector(sharded, atomic_batches=False)),
                       ("collect", lambda: hf_fisher.collect(sharded, mine, atomic_batches=False, progress=False))):
        try:
            call()
            (out / f"fsdp_{what}_r{r}.txt").write_text("accepted")
        except UnsupportedError as e:
            (out / f"fsdp_{what}_r{r}.txt").write_text(str(e))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
