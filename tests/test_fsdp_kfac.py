"""KFAC on an FSDP2 model (``fully_shard``, gloo on CPU): one torchrun launch of
tests/distributed_scripts/fsdp_kfac.py (2 ranks, a tiny LLaMA sharded per decoder layer and at the
root, rank r on batches r, r + 2, ...) against ``hf_fisher.collect(..., estimator="kfac")`` in this
process on the unsharded model.

The factors are summed over the ranks and normalised by the global counts, so they equal one
process over every rank's samples: "empirical" (expand and reduce), "type-2", uneven batch counts
and a batch that counts nothing (the rank runs the others' passes, adding nothing), ``max_samples``.
"mc" draws rank r's labels from ``rank_seed(seed)`` of rank r (rank 0: ``seed`` itself), so its G
is the sample-weighted mean of one process per rank's batches with that rank's seed; A does not
depend on the draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_fisher

import reference as R
import tiny_models as tm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
from test_distributed import torchrun  # noqa: E402

import common as C  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_kfac")
    torchrun("fsdp_kfac.py", out)
    return out


def one_process(batches, **kw):
    return hf_fisher.collect(tm.llama(torch.float64), batches, estimator="kfac", progress=False, **kw)


def factors(kfac) -> dict[str, torch.Tensor]:
    return {f"{k}/{n}": getattr(layer, k) for n, layer in kfac.layers.items() for k in ("A", "G")}


def got_of(out: Path, tag: str, rank: int):
    counts = json.loads((out / f"{tag}_r{rank}.json").read_text())["counts"]
    return load_file(str(out / f"{tag}_r{rank}.safetensors")), counts


def assert_factors(got, want, what):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        R.assert_close(got[name], t, rtol=RTOL, what=f"{what} {name}")


def counts_of(kfac) -> dict:
    return {"samples": kfac.counts.samples, "tokens": kfac.counts.tokens, "skipped": kfac.counts.skipped}


BATCHES = C.batches_of(C.make_samples())
EMPTY = {**BATCHES[3], "labels": torch.full_like(BATCHES[3]["labels"], -100)}
SAMPLES = C.make_samples()
CASES = {  # tag: (one process's batches, options)
    "empirical": (BATCHES, {}),
    "reduce": (BATCHES, {"kfac_approx": "reduce"}),
    "type2": (BATCHES[:2], {"fisher_type": "type-2"}),
    "uneven": (BATCHES[:3] + [BATCHES[3], EMPTY], {}),
    "type2_uneven": (BATCHES[:3], {"fisher_type": "type-2"}),
    "limited": ([BATCHES[0], C.collate(SAMPLES[4:5]), BATCHES[3]], {"max_samples": 4}),
    "after": (BATCHES[:2], {}),
}


@pytest.mark.parametrize("tag", sorted(CASES))
@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_kfac_equals_one_process(kfac_run, tag, rank):
    batches, kw = CASES[tag]
    ref = one_process(batches, **kw)
    got, counts = got_of(kfac_run, tag, rank)
    assert counts == counts_of(ref)
    assert_factors(got, factors(ref), tag)


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_kfac_mc_follows_rank_seeds(kfac_run, rank):
    """mc, 2 draws, seed 3: A equals one process over all the batches; G the mean, weighted by the
    samples, of one process per rank (its batches, its rank_seed(3))."""
    seeds = [json.loads((kfac_run / f"kfac_info_r{r}.json").read_text())["rank_seed"] for r in (0, 1)]
    assert seeds[0] == 3 and seeds[1] != 3
    kw = {"fisher_type": "mc", "mc_samples": 2}
    per_rank = [one_process(BATCHES[r::2], seed=seeds[r], **kw) for r in (0, 1)]
    whole = one_process(BATCHES, seed=3, **kw)
    got, counts = got_of(kfac_run, "mc", rank)
    assert counts == counts_of(whole)
    assert_factors(got, mc_reference(per_rank, whole), "mc")
    # the draws matter: one process with seed 3 over all batches draws rank 1's labels differently
    name = next(iter(whole.layers))
    assert not torch.allclose(got[f"G/{name}"], whole.layers[name].G, rtol=1e-3)


def mc_reference(per_rank, whole) -> dict[str, torch.Tensor]:
    """A of one process over all the batches (``whole``: it does not depend on the draws), G the
    mean of the ranks' one-process G weighted by their samples."""
    n = [k.counts.samples for k in per_rank]
    want = {}
    for name, layer in whole.layers.items():
        want[f"A/{name}"] = layer.A
        want[f"G/{name}"] = sum(k.layers[name].G * n_r for k, n_r in zip(per_rank, n)) / sum(n)
    return want


def test_fsdp_kfac_refusals(kfac_run):
    infos = [json.loads((kfac_run / f"kfac_info_r{r}.json").read_text()) for r in (0, 1)]
    for info in infos:
        assert "distributed=False" in info["refused_local"] and "FSDP2" in info["refused_local"]
        assert "[1] have no batch at all" in info["refused_stranded"]
    # a batch only rank 1 finds bad: rank 1 its own error, rank 0 one naming rank 1, before any pass
    assert infos[1]["refused_one_rank"].startswith("InvalidInputError") and "outside the model" in infos[1]["refused_one_rank"]
    assert infos[0]["refused_one_rank"].startswith("DistributedMismatchError") and "[1]" in infos[0]["refused_one_rank"]



def test_fsdp_kfac_settle_stops_every_rank(kfac_run):
    infos = [json.loads((kfac_run / f"kfac_info_r{r}.json").read_text()) for r in (0, 1)]
    assert infos[1]["settled"] == "NonFiniteError: rank 1's own error"
    assert infos[0]["settled"].startswith("DistributedMismatchError: batch 7: a check failed on rank(s) [1]")


def left_padded(batch):
    from fsdp_kfac import left_padded as f

    return f(batch)


def eager_llama():
    model = tm.llama(torch.float64)
    model.set_attn_implementation("eager")
    return model


def eager_batches():
    return [[BATCHES[0], BATCHES[2]], [left_padded(BATCHES[1]), left_padded(BATCHES[3])]]


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_kfac_nonfinite_padded_batches_redone_in_step(kfac_run, rank):
    """Eager attention in float64 gives NaN on rank 1's left-padded batches: rank 1 redoes them one
    sample at a time (as one process does), rank 0 runs the same passes adding nothing; the factors
    equal one process over all four batches, and "mc" still draws each rank's labels as one process
    over its own batches with its rank seed would."""
    per_rank = eager_batches()
    model = eager_llama()
    left = per_rank[1][0]
    assert not bool(torch.isfinite(model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits).all())
    ref = hf_fisher.collect(model, per_rank[0] + per_rank[1], estimator="kfac", progress=False)
    assert "non-finite" in ref.metadata.extra["loop_reason"]
    got, counts = got_of(kfac_run, "eager", rank)
    assert counts == counts_of(ref)
    assert_factors(got, factors(ref), "eager")
    reasons = [json.loads((kfac_run / f"kfac_info_r{r}.json").read_text())["eager_loop_reason"] for r in (0, 1)]
    assert "one sample at a time" in reasons[1] and "another rank" in reasons[0]
    seeds = [json.loads((kfac_run / f"kfac_info_r{r}.json").read_text())["rank_seed"] for r in (0, 1)]
    kw = {"fisher_type": "mc", "mc_samples": 2}
    singles = [hf_fisher.collect(model, per_rank[r], estimator="kfac", progress=False, seed=seeds[r], **kw) for r in (0, 1)]
    got, counts = got_of(kfac_run, "eager_mc", rank)
    assert counts == counts_of(ref)
    assert_factors(got, mc_reference(singles, ref), "eager mc")
