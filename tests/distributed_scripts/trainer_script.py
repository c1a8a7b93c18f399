"""Run under torchrun (2 ranks, CPU DDP over gloo): transformers.Trainer with FisherCallback.

Scenarios (every rank writes what it got to OUT, see common.write_fisher):
- train: training mode, learning rate 0, a checkpoint after each step; per-rank sample order,
  log history and every save_pretrained call recorded;
- resume: the same run resumed from checkpoint-1;
- ema / ema_resume: the same with ema_decay;
- probe: probe mode (learning rate 1e-2), the whole probe set given to every rank; rank 0
  writes the final weights so that the test can compute the reference.

Usage: torchrun --nproc_per_node=2 trainer_script.py OUT  (or run_all.py, which runs it second)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

import hf_fisher

import common as C

SEEN: list[int] = []
SAVES: list[str] = []


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = [dict(s, idx=i) for i, s in enumerate(samples)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def collate(items):
    SEEN.extend(int(it["idx"]) for it in items)
    return C.collate(items)


def _record_saves():
    original = hf_fisher.Fisher.save_pretrained

    def save_pretrained(self, folder, *a, **kw):
        SAVES.append(str(folder))
        return original(self, folder, *a, **kw)

    hf_fisher.Fisher.save_pretrained = save_pretrained


def run(out_dir, samples, callback, *, lr=0.0, save=False, resume=None):
    args = TrainingArguments(
        str(out_dir), per_device_train_batch_size=2, learning_rate=lr, max_steps=2, report_to=[], logging_steps=1,
        use_cpu=True, ddp_backend="gloo", remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
        save_strategy="steps" if save else "no", save_steps=1, dataloader_num_workers=0,
    )
    model = C.tm.llama(torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(samples), data_collator=collate, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    _record_saves()
    r, k = C.rank_and_world()
    samples = C.make_samples()
    info: dict = {}

    SEEN.clear(), SAVES.clear()
    cb = hf_fisher.FisherCallback(reduction="param")
    trainer = run(out / "run_train", samples, cb, save=True)
    C.write_fisher(out, f"train_rank{r}", cb.fisher())
    info["train"] = {
        "seen": list(SEEN), "saves": list(SAVES), "fallback": cb.collector.fallback_batches,
        "logged_samples": [e.get("fisher/samples") for e in trainer.state.log_history if "loss" in e],
    }

    SEEN.clear(), SAVES.clear()
    cb = hf_fisher.FisherCallback(reduction="param")
    run(out / "run_train", samples, cb, resume=str(out / "run_train" / "checkpoint-1"))
    C.write_fisher(out, f"resume_rank{r}", cb.fisher())
    info["resume"] = {"seen": list(SEEN), "restored": int(cb.collector.tasks["train"].samples) - len(SEEN)}

    SEEN.clear(), SAVES.clear()
    cb = hf_fisher.FisherCallback(reduction="group", ema_decay=0.8)
    run(out / "run_ema", samples, cb, save=True)
    C.write_fisher(out, f"tr_ema_rank{r}", cb.fisher())
    info["ema"] = {"seen": list(SEEN)}
    cb = hf_fisher.FisherCallback(reduction="group", ema_decay=0.8)
    run(out / "run_ema", samples, cb, resume=str(out / "run_ema" / "checkpoint-1"))
    C.write_fisher(out, f"tr_ema_resume_rank{r}", cb.fisher())

    SEEN.clear(), SAVES.clear()
    probe = C.batches_of(samples[:5], 1) + C.batches_of(samples[5:], 3)  # 6 batches of sizes 1,1,1,1,1,3
    cb = hf_fisher.FisherCallback("probe", probe_data=probe, probe_every_n_steps=1, reduction="group")
    trainer = run(out / "run_probe", samples, cb, lr=1e-2)
    C.write_fisher(out, f"probe_rank{r}", cb.fisher())
    info["probe"] = {"saves": list(SAVES)}
    if r == 0:
        save_file({n: p.detach().contiguous() for n, p in trainer.model.state_dict().items()}, str(out / "probe_model.safetensors"))

    (out / f"info_rank{r}.json").write_text(json.dumps(info))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
