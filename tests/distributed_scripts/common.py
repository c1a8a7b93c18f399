"""Shared by the scripts torchrun launches (tests/test_distributed.py) and by the test itself:
the samples, the batching, and how results are written (safetensors + json, no pickle)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tiny_models, reference

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import reference as R  # noqa: E402
import tiny_models as tm  # noqa: E402

N = 8


def make_samples(n=N, seed=0):
    """``n`` causal-LM samples of different lengths (some with an ignored label token)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(3, tm.VOCAB, (1, 2 + (5 * k + 3) % 7), generator=g)
        labels = ids.clone()
        if ids.shape[1] > 3:
            labels[0, 1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(items):
    """Right padding, labels -100 on the padding."""
    return R.collate([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])


def batches_of(samples, size=2):
    return [collate(samples[i: i + size]) for i in range(0, len(samples), size)]


def write_fisher(out: Path, tag: str, fisher, **info) -> None:
    """``<tag>.safetensors`` (mean/<name>, var/<name>) and ``<tag>.json`` (counts, extra, info)."""
    tensors = {f"mean/{n}": fisher[n].contiguous() for n in fisher.names()}
    tensors.update({f"var/{n}": fisher.variances[n].contiguous() for n in fisher.names()})
    save_file(tensors, str(out / f"{tag}.safetensors"))
    c = fisher.counts
    meta = {
        "counts": {"samples": c.samples, "tokens": c.tokens, "skipped": c.skipped, "nonfinite": c.nonfinite},
        "extra": {k: v for k, v in fisher.metadata.extra.items() if k in ("world_size", "rank", "ema_state", "probe_step")},
        **info,
    }
    (out / f"{tag}.json").write_text(json.dumps(meta))


def rank_and_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
