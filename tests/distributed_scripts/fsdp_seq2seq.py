"""torchrun --nproc_per_node=2 fsdp_seq2seq.py OUT: hf_fisher.collect and a FisherCollector on a tiny
T5 (tests/seq2seq_models.py) sharded with FSDP2 (fully_shard per encoder and decoder block and at the
root, gloo on CPU), each rank on its own padded batches; writes what every rank got
(tests/test_fsdp_seq2seq.py compares with one process)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import hf_fisher
from hf_fisher.collection.collector import FisherCollector

import common as C

S = importlib.import_module("seq2seq_models")  # tests/, on the path once common is imported


def t5_batches():
    """Four padded T5 batches of two samples (sources and targets of different lengths)."""
    model = S.t5()
    return [S.batch(model, src, tgt, seed=k) for k, (src, tgt) in
            enumerate((((3, 5), (2, 4)), ((6, 2), (3, 1)), ((4, 4), (5, 2)), ((2, 7), (1, 3))))]


def sharded_t5():
    model = S.t5(torch.float64)
    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block)
    fully_shard(model)
    return model


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = C.rank_and_world()
    mine = t5_batches()[rank::world]
    model = sharded_t5()
    C.write_fisher(out, f"t5_param_r{rank}", hf_fisher.collect(model, mine, progress=False))
    collector = FisherCollector(model, reduction="group")
    collector.collect(mine, "g", progress=False)
    C.write_fisher(out, f"t5_group_r{rank}", collector.fisher("g"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
