"""FisherCallback under a real Seq2SeqTrainer (tiny T5, learning rate 0): the collected Fisher
equals hf_fisher.collect over the same samples (each micro-batch by the engine's own pass, one
WARNING naming why, counted in fallback_batches)."""

from __future__ import annotations

import pytest
import seq2seq_models as sm
import torch
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

import hf_fisher

import reference as R
from tiny_models import ListDataset

N = 6


class _PadOnly:
    """What DataCollatorForSeq2Seq needs of a tokenizer: ``pad`` of the sources."""

    padding_side = "right"
    pad_token_id = 1  # BART's; T5 masks the padding all the same
    model_input_names = ("input_ids", "attention_mask")

    def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt", **_):
        T = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(features), T, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            out["labels"] = torch.tensor([f["labels"] for f in features])
        return out


def samples():
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(N):
        src = torch.randint(3, sm.VOCAB, (2 + (3 * k) % 5,), generator=g).tolist()
        tgt = torch.randint(3, sm.VOCAB, (1 + (2 * k + 1) % 4,), generator=g).tolist()
        out.append({"input_ids": src, "attention_mask": [1] * len(src), "labels": tgt})
    return out


@pytest.mark.parametrize("factory", [sm.t5, sm.bart], ids=["t5", "bart"])
def test_seq2seq_trainer_callback_equals_collect(tmp_path, factory):
    model = factory(torch.float32)
    data = samples()
    collator = DataCollatorForSeq2Seq(_PadOnly(), model=model, label_pad_token_id=-100)
    cb = hf_fisher.FisherCallback(reduction="group")
    args = Seq2SeqTrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, learning_rate=0.0, max_steps=N // 2, report_to=[],
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0, save_strategy="no",
    )
    Seq2SeqTrainer(model=model, args=args, train_dataset=ListDataset(data), data_collator=collator, callbacks=[cb]).train()
    fisher = cb.fisher()
    assert cb.collector.fallback_batches == N // 2
    assert fisher.metadata.extra["task_type"] == "seq2seq"
    # the same samples, one at a time, unpadded
    ref = hf_fisher.collect(model, [collator([s]) for s in data], progress=False, reduction="group")
    assert (fisher.counts.samples, fisher.counts.tokens) == (ref.counts.samples, ref.counts.tokens) == (N, sum(len(s["labels"]) for s in data))
    floor = 1e-9 * max(float(ref[n].abs().max()) for n in ref.names())
    for name in ref.names():
        R.assert_close(fisher[name], ref[name], rtol=2e-5, floor=floor, what=name)
