"""torchrun --nproc_per_node=2 fsdp_kfac.py OUT: KFAC (``hf_fisher.collect(..., estimator="kfac")``)
on a tiny LLaMA sharded with FSDP2 (fully_shard per decoder layer and at the root, gloo on CPU),
each rank on its own share of the batches; writes every rank's factors and counts
(tests/test_fsdp_kfac.py compares them with one process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_collect import sharded_llama, write_kfac

import hf_fisher
from hf_fisher.collection.distributed import rank_seed
from hf_fisher.collection.fsdp import FSDPSharding
from hf_fisher.errors import DistributedMismatchError, InvalidInputError, NonFiniteError, UnsupportedError

import common as C


def left_padded(batch):
    """``batch`` (right-padded) with every row's padding moved to its left."""
    out = {k: v.clone() for k, v in batch.items()}
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for k in out:
            out[k][i] = batch[k][i].roll(out[k].shape[1] - n)
    return out


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = C.rank_and_world()
    batches = C.batches_of(C.make_samples())
    mine = batches[rank::world]  # rank r: batches r, r + world, ...
    model = sharded_llama()
    info = {"rank_seed": rank_seed(3)}

    def kfac(tag, data, **kw):
        result = hf_fisher.collect(model, data, estimator="kfac", progress=False, **kw)
        write_kfac(out, f"{tag}_r{rank}", result)
        return result

    kfac("empirical", mine)
    kfac("reduce", mine, kfac_approx="reduce")
    kfac("mc", mine, fisher_type="mc", mc_samples=2, seed=3)
    kfac("type2", mine[:1], fisher_type="type-2")
    # uneven: rank 0 has three batches, rank 1 one batch and then one whose labels are all -100 (it counts
    # nothing): rank 1 runs rank 0's passes on that batch and on a replay of it, adding nothing
    empty = dict(batches[3])
    empty["labels"] = torch.full_like(empty["labels"], -100)
    kfac("uneven", batches[:3] if rank == 0 else [batches[3], empty])
    kfac("type2_uneven", batches[:2] if rank == 0 else batches[2:3], fisher_type="type-2")  # rank 1 replays: V passes
    # max_samples (per rank, as the diagonal collectors): rank 0 is done after its first batch and replays it
    # while rank 1 still collects from its second
    kfac("limited", [batches[0], batches[1]] if rank == 0 else [C.collate(C.make_samples()[4:5]), batches[3]], max_samples=2)
    # refusals: before any work, and a batch only rank 1 finds bad (refused on both ranks, no rank left waiting)
    try:
        hf_fisher.collect(model, mine, estimator="kfac", progress=False, distributed=False)
    except UnsupportedError as e:
        info["refused_local"] = str(e)
    bad = dict(mine[0])
    if rank == 1:
        bad["labels"] = bad["labels"].clone()
        bad["labels"][0, -1] = 10**6
    try:
        hf_fisher.collect(model, [mine[1], bad], estimator="kfac", progress=False)
    except (InvalidInputError, DistributedMismatchError) as e:
        info["refused_one_rank"] = f"{type(e).__name__}: {e}"
    try:
        hf_fisher.collect(model, mine if rank == 0 else [], estimator="kfac", progress=False)
    except DistributedMismatchError as e:
        info["refused_stranded"] = str(e)
    # eager attention in float64 gives NaN on left padding (fully masked rows, softmax in float32): rank 1 redoes
    # its left-padded batches one sample at a time, as one process over its batches would, rank 0 running the
    # same number of passes (its own batches right-padded, finite, batched)
    model.set_attn_implementation("eager")
    eager = [batches[0], batches[2]] if rank == 0 else [left_padded(batches[1]), left_padded(batches[3])]
    info["eager_loop_reason"] = kfac("eager", eager).metadata.extra.get("loop_reason")
    kfac("eager_mc", eager, fisher_type="mc", mc_samples=2, seed=3)
    model.set_attn_implementation("sdpa")
    # a check that fails on rank 1 only stops both ranks: rank 1 with its error, rank 0 naming rank 1
    sharding = FSDPSharding(model)
    try:
        sharding.settle(rank != 1, NonFiniteError("rank 1's own error"), 7, "a check")
    except (NonFiniteError, DistributedMismatchError) as e:
        info["settled"] = f"{type(e).__name__}: {e}"
    kfac("after", mine[:1])  # the ranks are still in step after the refusals
    (out / f"kfac_info_r{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
