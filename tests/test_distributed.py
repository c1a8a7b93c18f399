"""torch.distributed: real 2-process runs (torchrun, gloo on CPU) against one-process references.

One launch (a module-scoped fixture) of tests/distributed_scripts/run_all.py, which runs
``collect_script.py`` (``hf_fisher.collect`` / ``FisherCollector`` on each rank's share of the
samples) and then ``trainer_script.py`` (a 2-rank DDP ``Trainer`` with ``FisherCallback``:
training mode at learning rate 0, resume, EMA, probe mode). Each rank writes what it got; the tests compare
rank 0 with ``hf_fisher.collect`` over all samples in this process, rank 1 with rank 0 bit for
bit, and the EMA with its definition (each sample weighted as its own rank's EMA weighs it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import hf_fisher
from hf_fisher.collection import distributed as D
from hf_fisher.collection.stats import EMA, Welford
from hf_fisher.errors import InvalidInputError

import reference as R
import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
import common as C  # noqa: E402

TIMEOUT_S = 480  # a launch takes ~20 s on 2 idle cores; generous for a loaded machine


# ------------------------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(SCRIPTS / script), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} did not finish in {TIMEOUT_S} s (a collective waiting on a rank?)\nstderr:\n{(e.stderr or b'')[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{script} failed with exit code {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """One launch for both scripts (run_all.py): starting two processes costs more than their work."""
    out = tmp_path_factory.mktemp("dist")
    torchrun("run_all.py", out)
    return out


@pytest.fixture(scope="module")
def collect_run(dist_run):
    return dist_run


@pytest.fixture(scope="module")
def trainer_run(dist_run):
    return dist_run


def load(out: Path, tag: str):
    t = load_file(str(out / f"{tag}.safetensors"))
    meta = json.loads((out / f"{tag}.json").read_text())
    mean = {k[5:]: v for k, v in t.items() if k.startswith("mean/")}
    var = {k[4:]: v for k, v in t.items() if k.startswith("var/")}
    return SimpleNamespace(mean=mean, var=var, counts=meta["counts"], extra=meta["extra"], meta=meta)


def counts_of(fisher) -> dict:
    c = fisher.counts
    return {"samples": c.samples, "tokens": c.tokens, "skipped": c.skipped, "nonfinite": c.nonfinite}


def assert_same(got, ref_mean, ref_var, *, rtol, ref_counts=None):
    assert sorted(got.mean) == sorted(ref_mean)
    if ref_counts is not None:
        assert got.counts == ref_counts
    floor = 1e-9 * max(float(v.abs().max()) for v in ref_mean.values())
    for name in ref_mean:
        R.assert_close(got.mean[name], ref_mean[name], rtol=rtol, floor=floor, what=f"mean {name}")
        R.assert_close(got.var[name], ref_var[name], rtol=10 * rtol, floor=floor * floor + 1e-30, atol_rel=1e-7, what=f"variance {name}")


def assert_ranks_identical(out: Path, tag: str):
    a, b = load(out, f"{tag}_rank0"), load(out, f"{tag}_rank1")
    assert a.counts == b.counts and a.extra == b.extra
    for name in a.mean:
        assert torch.equal(a.mean[name], b.mean[name]) and torch.equal(a.var[name], b.var[name]), f"{tag}: {name} differs between ranks"
    return a


def one_process(model, samples, reduction, batch=3, **kw):
    f = hf_fisher.collect(model, C.batches_of(samples, batch), reduction=reduction, progress=False, **kw)
    return f, {n: f[n] for n in f.names()}, {n: f.variances[n] for n in f.names()}


def per_sample(model, samples, reduction):
    """C_i of every sample: the Fisher of the sample alone."""
    out = []
    for s in samples:
        f = hf_fisher.collect(model, [C.collate([s])], reduction=reduction, progress=False)
        out.append({n: f[n].double() for n in f.names()})
    return out


def ema_reference(contribs, orders, decay):
    """The merged EMA by its definition: sample k (1-based) of the n_r on rank r weighs
    w = (1-d) d^(n_r-k); mean = Σ w x / Σ w; variance = Σ ŵ (x-mean)² / (1 - Σ ŵ²)."""
    weights, xs = [], []
    for order in orders:
        n = len(order)
        for k, i in enumerate(order, start=1):
            weights.append((1 - decay) * decay ** (n - k))
            xs.append(contribs[i])
    w = torch.tensor(weights, dtype=torch.float64)
    wsum, w2sum = float(w.sum()), float(w.square().sum())
    wn = w / wsum
    mean, var = {}, {}
    for name in xs[0]:
        x = torch.stack([c[name] for c in xs])
        view = (-1,) + (1,) * (x.dim() - 1)
        mu = (wn.view(view) * x).sum(0)
        mean[name] = mu
        var[name] = (wn.view(view) * (x - mu).square()).sum(0) / (1 - float(wn.square().sum()))
    return mean, var, wsum, w2sum


# ------------------------------------------------------------------------------------ collect
@pytest.mark.parametrize("reduction", ["param", "group"])
@pytest.mark.slow
def test_collect_two_ranks_equals_one_process(collect_run, reduction):
    got = assert_ranks_identical(collect_run, reduction)
    f, mean, var = one_process(tm.llama(torch.float64), C.make_samples(), reduction)
    assert_same(got, mean, var, rtol=1e-9, ref_counts=counts_of(f))
    assert got.counts["samples"] == C.N and got.extra["world_size"] == 2


@pytest.mark.slow
def test_uneven_and_empty_ranks(collect_run):
    model, samples = tm.llama(torch.float64), C.make_samples()
    for tag, reduction in (("uneven", "param"), ("empty", "group")):  # 5 + 3 samples; 8 + 0 samples
        got = assert_ranks_identical(collect_run, tag)
        f, mean, var = one_process(model, samples, reduction)
        assert_same(got, mean, var, rtol=1e-9, ref_counts=counts_of(f))


@pytest.mark.slow
def test_collector_fisher_twice_never_double_counts(collect_run):
    model, samples = tm.llama(torch.float64), C.make_samples()
    first = assert_ranks_identical(collect_run, "twice_first")  # ranks' first batches: samples 0..3
    f, mean, var = one_process(model, samples[:4], "group")
    assert_same(first, mean, var, rtol=1e-9, ref_counts=counts_of(f))
    second = assert_ranks_identical(collect_run, "twice")  # then everything, each sample once
    f, mean, var = one_process(model, samples, "group")
    assert_same(second, mean, var, rtol=1e-9, ref_counts=counts_of(f))


@pytest.mark.slow
def test_distributed_false_keeps_each_ranks_own_fisher(collect_run):
    model, samples = tm.llama(torch.float64), C.make_samples()
    for r in (0, 1):
        got = load(collect_run, f"local_rank{r}")
        f, mean, var = one_process(model, samples[r::2], "group")
        assert_same(got, mean, var, rtol=1e-9, ref_counts=counts_of(f))
        assert got.extra["world_size"] == 1 and got.extra["rank"] == r


@pytest.mark.slow
def test_ema_merges_with_each_samples_own_rank_weight(collect_run):
    got = assert_ranks_identical(collect_run, "ema")
    model, samples = tm.llama(torch.float64), C.make_samples()
    orders = [load(collect_run, f"ema_rank{r}").meta["order"] for r in (0, 1)]
    assert orders == [[0, 2, 4, 6], [1, 3, 5, 7]]
    mean, var, w, w2 = ema_reference(per_sample(model, samples, "group"), orders, 0.7)
    assert_same(got, mean, var, rtol=1e-9)
    assert got.counts["samples"] == C.N
    assert got.extra["ema_state"]["weight_sum"] == pytest.approx(w, rel=1e-12)
    assert got.extra["ema_state"]["weight_sq_sum"] == pytest.approx(w2, rel=1e-12)


@pytest.mark.slow
def test_mismatched_ranks_raise_on_every_rank_naming_the_difference(collect_run):
    errors = [json.loads((collect_run / f"errors_rank{r}.json").read_text()) for r in (0, 1)]
    assert errors[0] == errors[1], "every rank raises the same error"
    assert "rank 1" in errors[0]["params"] and "'lm_head.weight'" in errors[0]["params"]
    assert "reduction is 'group' on rank 1 but 'param' on rank 0" in errors[0]["reduction"]
    assert "distributed=False" in errors[0]["params"]


# ------------------------------------------------------------------------------------ Trainer
def _info(out: Path):
    return [json.loads((out / f"info_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_trainer_two_ranks_equals_one_process(trainer_run):
    info = _info(trainer_run)
    seen = [i["train"]["seen"] for i in info]
    assert sorted(seen[0] + seen[1]) == list(range(C.N)), "the distributed sampler gives every sample to one rank once"
    assert all(i["train"]["fallback"] == 0 for i in info), "every micro-batch from the Trainer's own backward"
    got = assert_ranks_identical(trainer_run, "train")
    model, samples = tm.llama(torch.float32), C.make_samples()
    f, mean, var = one_process(model, samples, "param")
    assert_same(got, mean, var, rtol=2e-5, ref_counts=counts_of(f))
    assert got.extra["world_size"] == 2
    # the logs carry the merged counts, on every rank
    assert [i["train"]["logged_samples"] for i in info] == [[4.0, 8.0], [4.0, 8.0]]


@pytest.mark.slow
def test_trainer_checkpoints_hold_the_merged_state_written_by_rank_0_only(trainer_run):
    info = _info(trainer_run)
    run = trainer_run / "run_train"
    assert info[0]["train"]["saves"] == [str(run / "checkpoint-1" / "fisher"), str(run / "checkpoint-2" / "fisher"), str(run / "fisher")]
    assert info[1]["train"]["saves"] == [] and info[1]["probe"]["saves"] == []
    # checkpoint-1: the merged Fisher of the first step's samples of both ranks
    ckpt = hf_fisher.Fisher.from_pretrained(run / "checkpoint-1" / "fisher")
    first = [s for i in info for s in i["train"]["seen"][:2]]
    samples = C.make_samples()
    f, mean, var = one_process(tm.llama(torch.float32), [samples[i] for i in first], "param")
    got = SimpleNamespace(mean={n: ckpt[n] for n in ckpt.names()}, var={n: ckpt.variances[n] for n in ckpt.names()}, counts=counts_of(ckpt))
    assert_same(got, mean, var, rtol=2e-5, ref_counts=counts_of(f))
    assert ckpt.metadata.accumulation_dtype == "float64" and ckpt.metadata.extra["world_size"] == 2


@pytest.mark.slow
def test_trainer_resume_under_two_ranks_equals_uninterrupted(trainer_run):
    info = _info(trainer_run)
    assert [i["resume"]["restored"] for i in info] == [4, 0], "rank 0 restores the merged state, the others start empty"
    whole = assert_ranks_identical(trainer_run, "train")
    resumed = assert_ranks_identical(trainer_run, "resume")
    assert_same(resumed, whole.mean, whole.var, rtol=1e-6, ref_counts=whole.counts)


@pytest.mark.slow
def test_trainer_ema_two_ranks_and_resume(trainer_run):
    info = _info(trainer_run)
    orders = [i["ema"]["seen"] for i in info]
    got = assert_ranks_identical(trainer_run, "tr_ema")
    model, samples = tm.llama(torch.float32), C.make_samples()
    mean, var, w, w2 = ema_reference(per_sample(model, samples, "group"), orders, 0.8)
    assert_same(got, mean, var, rtol=2e-5)
    assert got.extra["ema_state"]["weight_sum"] == pytest.approx(w, rel=1e-12)
    resumed = assert_ranks_identical(trainer_run, "tr_ema_resume")
    assert_same(resumed, got.mean, got.var, rtol=1e-6, ref_counts=got.counts)
    assert resumed.extra["ema_state"]["weight_sum"] == pytest.approx(w, rel=1e-12)
    assert resumed.extra["ema_state"]["weight_sq_sum"] == pytest.approx(w2, rel=1e-12)


@pytest.mark.slow
def test_trainer_probe_mode_two_ranks_equals_one_process(trainer_run):
    got = assert_ranks_identical(trainer_run, "probe")
    model = tm.llama(torch.float32)
    model.load_state_dict(load_file(str(trainer_run / "probe_model.safetensors")))
    samples = C.make_samples()
    probe = C.batches_of(samples[:5], 1) + C.batches_of(samples[5:], 3)
    f = hf_fisher.collect(model, probe, reduction="group", progress=False)
    assert_same(got, {n: f[n] for n in f.names()}, {n: f.variances[n] for n in f.names()}, rtol=1e-6, ref_counts=counts_of(f))
    assert got.extra["probe_step"] == 2 and got.extra["world_size"] == 2
    assert (trainer_run / "run_probe" / "fisher" / "fisher_config.json").is_file()


# ------------------------------------------------------------------------------------ in-process
def test_chan_merge_of_states_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, 4, generator=g, dtype=torch.float64) * 3 + 5
    parts = [x[:4], x[4:4], x[4:9], x[9:]]  # one empty part
    states = []
    for p in parts:
        w = Welford((3, 4)).update(p)
        states.append((w.count, w.mean, w.m2))
    n, mean, m2 = D.merge_welford_states(states)
    one = Welford((3, 4)).update(x)
    assert n == 11
    torch.testing.assert_close(mean, one.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(m2, one.m2, rtol=1e-12, atol=0)
    n2, mean2, m22 = D.merge_welford_states(states[::-1])  # rank order only changes rounding
    torch.testing.assert_close(mean2, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(m22, m2, rtol=1e-12, atol=0)


def test_ema_merge_of_one_rank_is_that_rank_and_weights_add():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    ea, eb = EMA((3,), decay=0.6).update(a), EMA((3,), decay=0.6).update(b)
    st = lambda e: (e.count, e._w, e._w2, e._mean, e._m2)
    n, w, w2, mean, s = D.merge_ema_states([st(ea), (0, 0.0, 0.0, torch.zeros(3), torch.zeros(3))])
    assert (n, w, w2) == (5, ea._w, ea._w2) and torch.equal(mean, ea._mean) and torch.equal(s, ea._m2)
    n, w, w2, mean, s = D.merge_ema_states([st(ea), st(eb)])
    wts = torch.tensor([0.4 * 0.6 ** (4 - k) for k in range(5)] + [0.4 * 0.6 ** (2 - k) for k in range(3)], dtype=torch.float64)
    x = torch.cat([a, b])
    ref = (wts[:, None] * x).sum(0) / wts.sum()
    assert n == 8 and w == pytest.approx(float(wts.sum()), rel=1e-14) and w2 == pytest.approx(float(wts.square().sum()), rel=1e-14)
    torch.testing.assert_close(mean, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, (wts[:, None] * (x - ref).square()).sum(0), rtol=1e-12, atol=1e-15)


def test_not_distributed_by_default_and_distributed_true_needs_a_group():
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    model = tm.llama(torch.float64)
    f = hf_fisher.collect(model, C.batches_of(C.make_samples(2)), progress=False)
    assert "world_size" not in f.metadata.extra
    with pytest.raises(InvalidInputError, match="torch.distributed is not initialised"):
        hf_fisher.FisherCollector(model, distributed=True)
    with pytest.raises(InvalidInputError, match="distributed must be"):
        hf_fisher.FisherCollector(model, distributed="yes")


@pytest.mark.parametrize("what", ["fsdp", "deepspeed", "env"])
def test_fsdp_and_deepspeed_are_refused_at_train_begin(what, monkeypatch, tmp_path):
    args = SimpleNamespace(fsdp="full_shard" if what == "fsdp" else "", deepspeed="ds.json" if what == "deepspeed" else None,
                           output_dir=str(tmp_path), process_index=0)
    if what == "env":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cb = hf_fisher.FisherCallback()
    with pytest.raises(InvalidInputError, match="FSDP" if what == "fsdp" else "DeepSpeed") as e:
        cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=tm.llama(torch.float32))
    assert "plain data parallelism" in str(e.value) and "hf_fisher.collect" in str(e.value)
    assert cb.collector is None, "refused before any work"
