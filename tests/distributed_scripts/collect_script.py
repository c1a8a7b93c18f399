"""Run under torchrun (2 ranks, gloo, CPU): hf_fisher.collect / FisherCollector on each rank's
share of the samples; every rank writes what it got to OUT (see common.write_fisher).

Usage: torchrun --nproc_per_node=2 collect_script.py OUT  (or run_all.py, which runs it first)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import hf_fisher
from hf_fisher.collection.distributed import DistributedMismatchError

import common as C


def main(out: Path) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    r, k = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = C.tm.llama(torch.float64)
    samples = C.make_samples()
    mine = samples[r::k]  # rank r: samples r, r+k, ...

    for reduction in ("param", "group"):
        f = hf_fisher.collect(model, C.batches_of(mine), reduction=reduction, progress=False)
        C.write_fisher(out, f"{reduction}_rank{r}", f)

    # EMA: each rank's samples in its order (batches of two, rows in order)
    f = hf_fisher.collect(model, C.batches_of(mine), reduction="group", ema_decay=0.7, progress=False)
    C.write_fisher(out, f"ema_rank{r}", f, order=list(range(r, len(samples), k)))

    # uneven shares: rank 0 takes 5 samples, rank 1 the other 3; then rank 1 with none at all
    share = samples[:5] if r == 0 else samples[5:]
    f = hf_fisher.collect(model, C.batches_of(share, 3), reduction="param", progress=False)
    C.write_fisher(out, f"uneven_rank{r}", f)
    share = samples if r == 0 else []
    f = hf_fisher.collect(model, C.batches_of(share), reduction="group", progress=False)
    C.write_fisher(out, f"empty_rank{r}", f)

    # FisherCollector: fisher() twice, with updates in between, never double-counts
    col = hf_fisher.FisherCollector(model, reduction="group")
    col.update(C.collate(mine[:2]), "t")
    first = col.fisher("t")
    col.update(C.collate(mine[2:]), "t")
    second = col.fisher("t")
    again = col.fisher("t")
    assert torch.equal(second[second.names()[0]], again[again.names()[0]])
    C.write_fisher(out, f"twice_first_rank{r}", first)
    C.write_fisher(out, f"twice_rank{r}", second)
    # distributed=False: this rank's own Fisher
    local = col.fisher("t", distributed=False)
    C.write_fisher(out, f"local_rank{r}", local)
    col.close()

    # mismatches raise on every rank, naming the rank and the first difference, without a hang
    errors = {}
    kw = {"params": r"self_attn\.q_proj"} if r == 1 else {}
    try:
        hf_fisher.collect(model, C.batches_of(mine), reduction="param", progress=False, **kw)
    except DistributedMismatchError as e:
        errors["params"] = str(e)
    try:
        hf_fisher.collect(model, C.batches_of(mine), reduction="param" if r == 0 else "group", progress=False)
    except DistributedMismatchError as e:
        errors["reduction"] = str(e)
    dist.barrier()  # the group still works after the errors
    (out / f"errors_rank{r}.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
