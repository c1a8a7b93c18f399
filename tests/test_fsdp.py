"""FSDP2 (``fully_shard``, gloo on CPU): real 2-process runs against one-process references.

One torchrun launch of tests/distributed_scripts/fsdp_collect.py: a tiny LLaMA sharded per decoder
layer and at the root, each rank collecting its own batches (rank r: batches r, r + 2, ...).
The tests compare what every rank got with ``hf_fisher.collect`` over all the batches in this
process, check that each rank's accumulators hold about half of the whole, that the sharded
artifact written by both ranks loads as one Fisher equal to the one-process artifact, that a
collection resumed from such an artifact is exact, and that what cannot run in step is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import hf_fisher
from hf_fisher.collection.collector import FisherCollector
from hf_fisher.collection.fsdp import row_range

import reference as R
import tiny_models as tm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
from test_distributed import load, torchrun  # noqa: E402

import common as C  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_collect.py", out)
    return out


@pytest.fixture(scope="module")
def reference():
    batches = C.batches_of(C.make_samples())
    param = hf_fisher.collect(tm.llama(torch.float64), batches, progress=False)
    collector = FisherCollector(tm.llama(torch.float64), reduction="group")
    collector.collect(batches, "g", progress=False)
    return {"param": param, "group": collector.fisher("g")}


def assert_equal_to(got_mean, got_var, counts, ref):
    assert sorted(got_mean) == sorted(ref.names())
    assert counts == {"samples": ref.counts.samples, "tokens": ref.counts.tokens, "skipped": ref.counts.skipped,
                      "nonfinite": ref.counts.nonfinite}
    for name in ref.names():
        R.assert_close(got_mean[name], ref[name], rtol=RTOL, what=f"mean {name}")
        R.assert_close(got_var[name], ref.variances[name], rtol=RTOL, floor=1e-30, what=f"variance {name}")


@pytest.mark.parametrize("reduction", ["param", "group"])
@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_collect_equals_one_process(fsdp_run, reference, reduction, rank):
    got = load(fsdp_run, f"fsdp_collect_{reduction}_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, reference[reduction])


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_max_samples_ranks_stay_in_step(fsdp_run, rank):
    s = C.make_samples()
    ref = hf_fisher.collect(tm.llama(torch.float64), [C.collate(s[0:2]), C.collate(s[4:5]), C.collate(s[5:6])], progress=False)
    got = load(fsdp_run, f"fsdp_limited_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, ref)


def test_fsdp_accumulators_hold_own_rows(fsdp_run):
    whole = None
    total = 0
    for rank in (0, 1):
        info = json.loads((fsdp_run / f"fsdp_mem_r{rank}.json").read_text())
        whole = info["whole_numel"]
        assert info["accumulator_numel"] <= 0.6 * whole, info
        total += info["accumulator_numel"]
    assert total == whole  # the ranks' blocks tile the whole, nothing twice


def test_fsdp_sharded_artifact_loads_as_one(fsdp_run, reference, tmp_path):
    folder = fsdp_run / "fsdp_sharded"
    index = json.loads((folder / "fisher.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["fisher-00001-of-00002.safetensors", "fisher-00002-of-00002.safetensors"]
    got = hf_fisher.Fisher.from_pretrained(folder)
    ref = reference["param"]
    assert got.metadata.extra["world_size"] == 2 and got.reduction == "param"
    assert_equal_to(got.means, got.variances, {"samples": got.counts.samples, "tokens": got.counts.tokens,
                                               "skipped": got.counts.skipped, "nonfinite": got.counts.nonfinite}, ref)
    one = hf_fisher.Fisher.from_pretrained(ref.save_pretrained(tmp_path / "one"))
    assert got.param_shapes == one.param_shapes and got.groups == one.groups
    # the model card, written by rank 0 from the shards: the same per-layer table as one process's card
    from hf_fisher.artifacts import cards

    card = (folder / "README.md").read_text()
    assert "| extra.world\\_size | 2 |" in card and (tmp_path / "one" / "README.md").exists()
    for row in cards.layer_rows(one):
        assert f"| {row['layer']} | {row['total']} | {row['share']} |" in card, row


def test_fsdp_sharded_save_refused_on_every_rank(fsdp_run):
    for rank in (0, 1):
        assert "not_an_artifact" in (fsdp_run / f"fsdp_refused_save_r{rank}.txt").read_text()
    assert sorted(p.name for p in (fsdp_run / "not_an_artifact").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_resume_exact(fsdp_run, reference, rank):
    got = load(fsdp_run, f"fsdp_resume_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, reference["param"])


def test_fsdp_refusals(fsdp_run):
    for rank in (0, 1):
        info = json.loads((fsdp_run / f"fsdp_mem_r{rank}.json").read_text())
        assert "ema_decay" in info["refused_ema"]
        assert "keep_sample_contributions" in info["refused_keep"]
        assert "distributed=False" in info["refused_local"]
        assert "same number of batches" in info["refused_uneven"] and "[1]" in info["refused_uneven"]


def test_fsdp_one_rank_bad_batch_refused_on_every_rank(fsdp_run):
    """A batch only rank 1 finds bad: rank 1 raises its own input error, rank 0 an error naming rank 1
    (neither waits in a collective the other never joins); nothing is added and both go on."""
    infos = [json.loads((fsdp_run / f"fsdp_mem_r{rank}.json").read_text()) for rank in (0, 1)]
    assert infos[1]["refused_one_rank"].startswith("InvalidInputError") and "vocabulary" in infos[1]["refused_one_rank"]
    assert infos[0]["refused_one_rank"].startswith("DistributedMismatchError") and "[1]" in infos[0]["refused_one_rank"]
    for info in infos:
        assert info["one_rank_samples_after"] == 0
        assert info["one_rank_samples_then"] > 0


def _kfac_factors(kfac):
    return {f"{k}/{n}": getattr(layer, k) for n, layer in kfac.layers.items() for k in ("A", "G")}


@pytest.mark.parametrize("rank", [0, 1])
def test_kfac_under_torch_distributed_sums_the_ranks(fsdp_run, rank):
    """KFAC on an unsharded model under torch.distributed: by default every rank gets the factors of
    every rank's batches (one process over all of them); distributed=False: its own batches only."""
    from safetensors.torch import load_file

    batches = C.batches_of(C.make_samples())
    for tag, mine in (("merged", batches), ("local", batches[rank::2])):
        ref = hf_fisher.collect(tm.llama(torch.float64), mine, estimator="kfac", progress=False)
        got = load_file(str(fsdp_run / f"kfac_{tag}_r{rank}.safetensors"))
        counts = json.loads((fsdp_run / f"kfac_{tag}_r{rank}.json").read_text())["counts"]
        assert counts == {"samples": ref.counts.samples, "tokens": ref.counts.tokens, "skipped": ref.counts.skipped}
        want = _kfac_factors(ref)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            R.assert_close(got[name], t, rtol=1e-10, what=f"{tag} {name}")


def test_kfac_runs_on_an_fsdp_model(fsdp_run):
    """KFAC on the FSDP2 model is no longer refused (its factors: tests/test_fsdp_kfac.py)."""
    for rank in (0, 1):
        info = json.loads((fsdp_run / f"fsdp_mem_r{rank}.json").read_text())
        assert "refused_kfac" not in info


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_true_fisher_exact_equals_one_process(fsdp_run, rank):
    from fsdp_collect import classification_batches

    ref = hf_fisher.collect(tm.bert_classifier(torch.float64), classification_batches(), estimator="true", exact=True,
                            progress=False)
    got = load(fsdp_run, f"fsdp_true_exact_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, ref)


def test_rank_seed_keeps_rank_zero_and_separates_the_others(fsdp_run):
    """Monte Carlo draws (true Fisher, KFAC mc): rank 0 and one process draw from the user's seed,
    other ranks from a stream of their own (the same seed everywhere would repeat the draws)."""
    from hf_fisher.collection.distributed import rank_seed

    seeds = [json.loads((fsdp_run / f"fsdp_mem_r{rank}.json").read_text())["rank_seed"] for rank in (0, 1)]
    assert seeds[0] == 5 == rank_seed(5) and seeds[1] != 5


def test_row_range_tiles_like_torch_chunk():
    for rows in (0, 1, 5, 7, 61, 64):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            blocks = [row_range(rows, r, world) for r in range(world)]
            assert [hi - lo for lo, hi in blocks][: len(chunks)] == [len(c) for c in chunks]
            assert sum(hi - lo for lo, hi in blocks) == rows


# ------------------------------------------------------------------------------------ FisherCallback
@pytest.fixture(scope="module")
def callback_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_cb")
    torchrun("fsdp_callback.py", out)
    return out


@pytest.fixture(scope="module")
def free_reference():
    """Training mode in one process: the same loop on the unsharded model, with the callback's
    collector attached to its backward (the free path), and the engine's own pass."""
    batches = C.batches_of(C.make_samples())
    model = tm.llama(torch.float64)
    model.train()
    collector = FisherCollector(model, train_mode=True)
    ext = collector.attach_training("train")
    for b in batches:
        model(**b).loss.backward()
        ext.finish()
        model.zero_grad()
    ext.detach()
    return collector.fisher("train"), hf_fisher.collect(model, batches, progress=False, train_mode=True)


@pytest.mark.parametrize("tag", ["cb_train", "cb_resume"])
@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_callback_training_mode_equals_one_process(callback_run, free_reference, tag, rank):
    free, own_pass = free_reference
    got = load(callback_run, f"{tag}_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, free)  # the same free path, unsharded: to float64 rounding
    # and the engine's own pass over the same samples (the free path's loss-scale estimate rounds at ~1e-7)
    for name in own_pass.names():
        rel = float((got.mean[name] - own_pass[name]).norm() / own_pass[name].norm())
        assert rel <= 1e-6, f"mean {name}: relative error {rel:.2e} against the engine's own pass"
    info = json.loads((callback_run / f"cb_info_r{rank}.json").read_text())
    assert info["fallback"] == 0
    if tag == "cb_resume":  # rank 0 restored the counters of step 1 (both ranks: 2 batches of 2)
        assert info["resume_restored"] == (4 if rank == 0 else 0) + 2


def test_fsdp_callback_artifacts_sharded(callback_run, free_reference):
    for folder in (callback_run / "run" / "checkpoint-1" / "fisher", callback_run / "run" / "fisher"):
        assert (folder / "fisher.safetensors.index.json").is_file()
    final = hf_fisher.Fisher.from_pretrained(callback_run / "run" / "fisher")
    free, _ = free_reference
    assert final.metadata.extra["world_size"] == 2 and final.counts.samples == free.counts.samples
    for name in free.names():
        R.assert_close(final[name], free[name], rtol=RTOL, what=f"mean {name}")
    rows = json.loads((callback_run / "cb_info_r0.json").read_text())["accumulator_rows"]
    assert rows["model.layers.0.self_attn.q_proj.weight"] == 16 and rows["lm_head.weight"] == 31  # of 32 and 61


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_callback_probe_mode(callback_run, reference, rank):
    got = load(callback_run, f"cb_probe_r{rank}")
    assert_equal_to(got.mean, got.var, got.counts, reference["group"])
