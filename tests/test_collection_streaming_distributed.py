"""The streaming commit (``atomic_batches=False``) under torch.distributed: 2 ranks (torchrun,
gloo). Without FSDP each rank's accumulators are its own and merged at ``fisher()``: streaming
gives the merged Fisher of atomic batches bit for bit, equal to one process over all samples. On
an FSDP2-sharded model it is refused before any work on every rank (the ranks' batch moments meet
after the whole batch there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import hf_fisher

import tiny_models as tm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
from test_distributed import assert_same, counts_of, load, torchrun  # noqa: E402

import common as C  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("streaming")
    torchrun("streaming_collect.py", out)
    return out


def assert_bits(a, b):
    assert sorted(a.mean) == sorted(b.mean) and a.counts == b.counts
    for name in a.mean:
        assert torch.equal(a.mean[name], b.mean[name]) and torch.equal(a.var[name], b.var[name]), name


@pytest.mark.parametrize("reduction, dtype", [("param", torch.float32), ("group", torch.float64)])
def test_streaming_on_two_ranks_is_atomic_bit_for_bit(run, reduction, dtype):
    batches = C.batches_of(C.make_samples())
    ref = hf_fisher.collect(tm.llama(torch.float64), batches, reduction=reduction, accumulation_dtype=dtype, progress=False)
    for r in (0, 1):
        stream = load(run, f"{reduction}_stream_r{r}")
        assert_bits(stream, load(run, f"{reduction}_atomic_r{r}"))
        assert_bits(stream, load(run, f"{reduction}_stream_r0"))
        assert stream.extra["world_size"] == 2
        assert_same(stream, {n: ref[n] for n in ref.names()}, {n: ref.variances[n] for n in ref.names()},
                    rtol=1e-6, ref_counts=counts_of(ref))


def test_streaming_collector_two_tasks_on_two_ranks(run):
    """One collector, two tasks in turn, the merged Fisher asked twice: atomic bits, on both ranks."""
    for r in (0, 1):
        for task in ("a", "b"):
            assert_bits(load(run, f"tasks_{task}_stream_r{r}"), load(run, f"tasks_{task}_atomic_r{r}"))
            assert_bits(load(run, f"tasks_{task}_stream_r{r}"), load(run, f"tasks_{task}_stream_r0"))
        assert_bits(load(run, f"tasks_a_again_stream_r{r}"), load(run, f"tasks_a_stream_r{r}"))
    a, b = load(run, "tasks_a_stream_r0"), load(run, "tasks_b_stream_r0")
    assert a.counts["samples"] + b.counts["samples"] == C.N


@pytest.mark.parametrize("what", ["collector", "collect"])
def test_fsdp2_refused_on_every_rank(run, what):
    for r in (0, 1):
        text = (run / f"fsdp_{what}_r{r}.txt").read_text()
        assert "atomic_batches=False is not supported on an FSDP2-sharded model" in text, text
