"""Seq2seq (a tiny T5, tests/seq2seq_models.py) on FSDP2 (``fully_shard`` per encoder and decoder
block and at the root, gloo on CPU): one torchrun launch of
tests/distributed_scripts/fsdp_seq2seq.py, 2 ranks each collecting its own padded batches, against
``hf_fisher.collect`` in this process over all the batches, and against the brute force
(every sample alone, unpadded, through the model's own loss, float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import seq2seq_models as S
import torch

import hf_fisher
from hf_fisher.collection.collector import FisherCollector

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
from fsdp_seq2seq import t5_batches  # noqa: E402
from test_distributed import load, torchrun  # noqa: E402
from test_fsdp import assert_equal_to  # noqa: E402


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_s2s")
    torchrun("fsdp_seq2seq.py", out)
    return out


@pytest.fixture(scope="module")
def reference():
    batches = t5_batches()
    param = hf_fisher.collect(S.t5(torch.float64), batches, progress=False)
    collector = FisherCollector(S.t5(torch.float64), reduction="group")
    collector.collect(batches, "g", progress=False)
    return {"param": param, "group": collector.fisher("g")}


@pytest.mark.parametrize("reduction", ["param", "group"])
@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_t5_collect_equals_one_process(s2s_run, reference, reduction, rank):
    got = load(s2s_run, f"t5_{reduction}_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, reference[reduction])


def test_fsdp_t5_equals_brute_force(s2s_run):
    """The sharded run against the definition (independent of the engine): every sample alone."""
    mean, var, n = S.reference(S.t5(torch.float64), t5_batches())
    got = load(s2s_run, "t5_param_r0")
    assert got.counts["samples"] == n
    for name in mean:
        rel = float((got.mean[name] - mean[name]).norm() / mean[name].norm().clamp_min(1e-300))
        assert rel <= 1e-6, f"mean {name}: relative error {rel:.2e}"
