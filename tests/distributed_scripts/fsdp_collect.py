"""torchrun --nproc_per_node=2 fsdp_collect.py OUT: hf_fisher.collect and FisherCollector on a
tiny LLaMA sharded with FSDP2 (fully_shard per decoder layer and at the root, gloo on CPU), each
rank on its own share of the samples; writes what every rank got (tests/test_fsdp.py compares)."""

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
from hf_fisher.collection.distributed import rank_seed
from hf_fisher.errors import DistributedMismatchError, HfFisherError, InvalidInputError, UnsupportedError

import common as C


def sharded_llama(**kw):
    model = C.tm.llama(torch.float64, **kw)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def accumulator_numel(collector, task):
    return sum(int(a.state().mean.numel()) + int(a.state().m2.numel()) for a in collector.tasks[task].accumulators.values())


def classification_batches():
    """The samples as 3-class classification batches (right padding, labels [B])."""
    out = []
    for i, b in enumerate(C.batches_of(C.make_samples())):
        b = dict(b)
        b["labels"] = torch.tensor([(2 * i) % 3, (2 * i + 1) % 3])
        out.append(b)
    return out


def write_kfac(out: Path, tag: str, kfac) -> None:
    """Every layer's factors A and G and the counts."""
    tensors = {f"{k}/{n}": getattr(layer, k).contiguous() for n, layer in kfac.layers.items() for k in ("A", "G")}
    save_file(tensors, str(out / f"{tag}.safetensors"))
    c = kfac.counts
    (out / f"{tag}.json").write_text(json.dumps({"counts": {"samples": c.samples, "tokens": c.tokens, "skipped": c.skipped}}))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = C.rank_and_world()
    samples = C.make_samples()
    mine = C.batches_of(samples)[rank::world]  # rank r: batches r, r + world, ...
    # hf_fisher.collect (param) and a FisherCollector (group) on the sharded model
    model = sharded_llama()
    fisher = hf_fisher.collect(model, mine, progress=False)
    C.write_fisher(out, f"fsdp_collect_param_r{rank}", fisher)
    collector = FisherCollector(model)
    collector.collect(mine, "s", progress=False)
    collector.save_fisher("s", out / "fsdp_sharded")  # every rank writes its share of one artifact
    foreign = out / "not_an_artifact"  # a folder with someone else's file: refused on every rank, nothing written
    if rank == 0:
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
    dist.barrier()
    try:
        collector.save_fisher("s", foreign)
    except HfFisherError as e:
        (out / f"fsdp_refused_save_r{rank}.txt").write_text(str(e))
    # resume: the first half, saved sharded, restored by a new collector, then the second half
    first = FisherCollector(model)
    first.collect(mine[:1], "s", progress=False)
    first.save_fisher("s", out / "fsdp_checkpoint")
    resumed = FisherCollector(model)
    resumed.restore("s", hf_fisher.Fisher.from_pretrained(out / "fsdp_checkpoint"))
    resumed.collect(mine[1:], "s", progress=False)
    C.write_fisher(out, f"fsdp_resume_r{rank}", resumed.fisher("s"))
    collector = FisherCollector(model, reduction="group")
    collector.collect(mine, "g", progress=False)
    C.write_fisher(out, f"fsdp_collect_group_r{rank}", collector.fisher("g"))
    # accumulator memory of this rank against the whole
    pc = FisherCollector(model)
    pc.collect(mine[:1], "p", progress=False)
    whole = sum(2 * int(torch.Size(s).numel()) for s in pc.param_shapes.values())
    info = {"accumulator_numel": accumulator_numel(pc, "p"), "whole_numel": whole}
    # max_samples: rank 0 has its 2 samples after one batch and runs rank 1's passes with limit 0, while
    # rank 1 (1 sample, then a right-padded batch: a padding kind it has not checked) still collects
    s = samples
    limited = [C.collate(s[0:2]), C.collate(s[2:4])] if rank == 0 else [C.collate(s[4:5]), C.collate(s[5:7])]
    C.write_fisher(out, f"fsdp_limited_r{rank}", hf_fisher.collect(model, limited, max_samples=2, progress=False))
    # refusals, before any work: options that cannot be honoured, ranks out of step
    for key, kw in (("ema", {"ema_decay": 0.9}), ("keep", {"reduction": "group", "keep_sample_contributions": True}),
                    ("local", {"distributed": False})):
        try:
            FisherCollector(model, **kw)
        except UnsupportedError as e:
            info[f"refused_{key}"] = str(e)
    try:
        FisherCollector(model).collect(mine if rank == 0 else mine[:1], "x", progress=False)
    except DistributedMismatchError as e:
        info["refused_uneven"] = str(e)
    # one rank's batch is bad input (a token id outside the vocabulary): refused on every rank before any
    # pass, the bad rank with its own error, the other naming it; nothing added, and the ranks stay usable
    bad = dict(mine[0])
    if rank == 1:
        bad["input_ids"] = bad["input_ids"].clone()
        bad["input_ids"][0, 0] = 10**6
    one_bad = FisherCollector(model)
    try:
        one_bad.collect([bad], "b", progress=False)
    except (InvalidInputError, DistributedMismatchError) as e:
        info["refused_one_rank"] = f"{type(e).__name__}: {e}"
    info["one_rank_samples_after"] = one_bad.samples_seen("b")
    one_bad.collect(mine[:1], "b", progress=False)
    info["one_rank_samples_then"] = one_bad.samples_seen("b")
    # the other estimators: KFAC on the FSDP2 model is refused; on an unsharded model under torch.distributed
    # its factors are summed over the ranks (distributed=False: this rank's own); the exact true Fisher of a
    # sharded classifier goes through the collector's row owners like the empirical one
    try:
        hf_fisher.collect(model, mine, estimator="kfac", progress=False)
    except UnsupportedError as e:
        info["refused_kfac"] = str(e)
    for tag, kw in (("merged", {}), ("local", {"distributed": False})):
        write_kfac(out, f"kfac_{tag}_r{rank}", hf_fisher.collect(C.tm.llama(torch.float64), mine, estimator="kfac",
                                                                  progress=False, **kw))
    bert = C.tm.bert_classifier(torch.float64)
    for layer in bert.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(bert)
    C.write_fisher(out, f"fsdp_true_exact_r{rank}", hf_fisher.collect(bert, classification_batches()[rank::world],
                                                                      estimator="true", exact=True, progress=False))
    info["rank_seed"] = rank_seed(5)
    (out / f"fsdp_mem_r{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
