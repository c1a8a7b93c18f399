"""torchrun --nproc_per_node=2 fsdp_callback.py OUT: FisherCallback on a tiny LLaMA sharded with
FSDP2, driven by a manual training loop that raises the callback events a Trainer raises (a
Trainer cannot shard on CPU: accelerate runs DDP there and wraps a fully_shard model in DDP, which
refuses its DTensor parameters). Learning rate 0 so the reference is the initial model.

Scenarios: training mode over 2 steps with a checkpoint after step 1 (rank r trains on batches
r, r + 2); the same run resumed from that checkpoint; probe mode on the whole probe set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from fsdp_collect import sharded_llama
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_fisher

import common as C


def train(out_dir: Path, batches, callback, *, save_at=(), start=0):
    """Steps ``start..len(batches)-1`` with the Trainer's callback events around each."""
    args = TrainingArguments(str(out_dir), use_cpu=True, ddp_backend="gloo", report_to=[], learning_rate=0.0,
                             save_strategy="no", disable_tqdm=True)
    model = sharded_llama()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    state, control = TrainerState(), TrainerControl()
    state.global_step = start
    callback.on_train_begin(args, state, control, model=model, train_dataloader=None)
    for step in range(start, len(batches)):
        loss = model(**batches[step]).loss
        loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step + 1
        callback.on_step_end(args, state, control, model=model)
        if state.global_step in save_at:
            (out_dir / f"checkpoint-{state.global_step}").mkdir(parents=True, exist_ok=True)
            callback.on_save(args, state, control)
    callback.on_train_end(args, state, control, model=model)
    return model


def main(out: Path) -> None:
    import torch.distributed as dist

    TrainingArguments(str(out), use_cpu=True, ddp_backend="gloo", report_to=[]).world_size  # initialises the group
    rank, world = C.rank_and_world()
    batches = C.batches_of(C.make_samples())
    mine = batches[rank::world]
    info = {}
    cb = hf_fisher.FisherCallback(reduction="param")
    train(out / "run", mine, cb, save_at=(1,))
    C.write_fisher(out, f"cb_train_r{rank}", cb.fisher())
    info["fallback"] = cb.collector.fallback_batches
    info["accumulator_rows"] = {n: a.shape[0] for n, a in cb.collector.tasks["train"].accumulators.items()}
    cb = hf_fisher.FisherCallback(reduction="param")
    train(out / "run", mine, cb, start=1)
    C.write_fisher(out, f"cb_resume_r{rank}", cb.fisher())
    info["resume_restored"] = cb.collector.tasks["train"].samples
    cb = hf_fisher.FisherCallback("probe", probe_data=batches, probe_every_n_steps=1, reduction="group")
    train(out / "probe", mine, cb)
    C.write_fisher(out, f"cb_probe_r{rank}", cb.fisher())
    (out / f"cb_info_r{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
