"""Mean-only accumulation (``variance=False``) under torch.distributed: 2 ranks (torchrun, gloo).
The merged mean is bit for bit the one merged with the variance (param float32, group float64)
and equals one process; ranks that disagree on the setting are refused. On an FSDP2-sharded model
the owners' mean is the one kept with the variance, each rank holds 8 bytes per value of its rows
(float32: 12 with the variance), the sharded artifact has no variance, a resume is exact, and a
checkpoint without variance is refused by a collector that keeps it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_fisher

import tiny_models as tm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
from test_distributed import torchrun  # noqa: E402

import common as C  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("novariance")
    torchrun("novariance_collect.py", out)
    return out


def load(out, tag):
    return load_file(str(out / f"{tag}.safetensors")), json.loads((out / f"{tag}.json").read_text())


def assert_bits(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("reduction, dtype", [("param", torch.float32), ("group", torch.float64)])
def test_merged_mean_is_the_mean_with_variance(run, reduction, dtype):
    ref = hf_fisher.collect(tm.llama(torch.float64), C.batches_of(C.make_samples()), reduction=reduction,
                            accumulation_dtype=dtype, progress=False)
    for r in (0, 1):
        mean, meta = load(run, f"ddp_{reduction}_False_r{r}")
        assert_bits(mean, load(run, f"ddp_{reduction}_True_r{r}")[0])
        assert_bits(mean, load(run, f"ddp_{reduction}_False_r0")[0])
        assert meta["has_variance"] is False and meta["variance"] is False and meta["world_size"] == 2
        assert meta["samples"] == ref.counts.samples
        for n in ref.names():
            torch.testing.assert_close(mean[f"mean/{n}"].double(), ref[n].double(), rtol=1e-6, atol=0)


def test_ranks_with_different_settings_are_refused(run):
    for r in (0, 1):
        text = json.loads((run / f"info_r{r}.json").read_text())["refused_mixed"]
        assert "variance is False on rank 1 but True on rank 0" in text, text


def test_fsdp2_mean_only(run):
    whole_numel = sum(p.numel() for p in tm.llama(torch.float64).parameters())
    for r in (0, 1):
        info = json.loads((run / f"info_r{r}.json").read_text())
        assert info["fsdp_bytes_False"] * 12 == info["fsdp_bytes_True"] * 8
        assert info["fsdp_bytes_False"] <= 0.6 * 8 * whole_numel
        mean, meta = load(run, f"fsdp_False_r{r}")
        assert_bits(mean, load(run, f"fsdp_True_r{r}")[0])
        assert meta["has_variance"] is False
        assert_bits(load(run, f"fsdp_resumed_r{r}")[0], load(run, f"fsdp_whole_r{r}")[0])
        assert "cannot resume task 's'" in info["refused_resume"] and "variance=False" in info["refused_resume"]
    art = hf_fisher.Fisher.from_pretrained(run / "fsdp_sharded")
    assert not art.has_variance and art.metadata.extra["variance"] is False
    ref = load(run, "fsdp_False_r0")[0]
    for n in art.names():
        assert torch.equal(art[n], ref[f"mean/{n}"]), n
