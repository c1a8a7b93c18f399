"""Streaming commit (``FisherCollector(atomic_batches=False)``, issue 23: the full-depth 1B param
Fisher in float32 within 24 GB).

With atomic batches (the default) every parameter's batch moments are staged until the whole
batch succeeded; streaming merges each parameter's moments into its accumulator as soon as the
backward has produced them all (row blocks and sample chunks included) and frees them. These
tests show that the accumulators are the same bits either way on batches that succeed (param and
group, float32 and float64, disk-backed, several batches and tasks), that nothing is staged at
the end of a streaming backward and the peak is lower, and what happens on every way a batch can
fail: undone exactly where the accumulators were empty before it (a task's first batch: the
engine's redos after its first-batch checks still work), else a PartialBatchError naming the
batch, after which the collector refuses every use. Combinations that cannot be honoured are
refused before any work.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_collection_memory_param import (
    LiveBytes,
    _nan_for_sample_1,
    assert_same_bits,
    batches,
    numel,
    states,
    tied_model,
)
from test_engine_first_batch import _MixSamples, _ruled, _with_rule
from test_hardening_engine import MissingRule

import hf_fisher
import hf_fisher.collection.stats as stats
from hf_fisher.collection.collector import FisherCollector, _MomentsSink
from hf_fisher.engine.per_sample import PerSampleEngine
from hf_fisher.errors import InvalidInputError, NonFiniteError, PartialBatchError, UnsupportedError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = "model.embed_tokens.weight"  # tied: reduced last, after every other parameter was merged


def data_two_tasks():
    """Batches of 3 and of 1 sample, one right-padded (its padding kind is checked when it comes),
    for two tasks in turn."""
    padded = tm.padded_batch([9, 4, 7], seed=5)
    three, one = batches(3, count=2), batches(1, count=2)
    return [("a", three[0]), ("b", one[0]), ("a", padded), ("b", three[1]), ("a", one[1])]


def run(model, data, **kw):
    """{task: accumulator state} after feeding ``data`` (task, batch) to one collector; and the
    collector. Records, at every commit, how many parameters the sink still held."""
    col = FisherCollector(model, **kw)
    held = []
    commit = col._new_sink().commit

    def spy(accumulators):
        held.append(len(col._moments_sink.pending) + len(col._moments_sink.batch))
        commit(accumulators)

    col._moments_sink.commit = spy
    for task, b in data:
        col.update(b, task)
    return {t: states(col, t) for t in col.tasks}, col, held


@pytest.fixture
def undone(monkeypatch):
    """The number of parameters whose merges each successful undo of a streaming sink took back."""
    counts: list[int] = []
    undo = _MomentsSink._undo

    def spy(sink):
        n = len(sink.merged)
        ok = undo(sink)
        if ok and n:
            counts.append(n)
        return ok

    monkeypatch.setattr(_MomentsSink, "_undo", spy)
    return counts


def assert_same_tasks(a, b):
    assert a.keys() == b.keys()
    for t in a:
        assert_same_bits(a[t], b[t])


# --------------------------------------------------------------------------- same bits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [None, 0.6, 0.1], ids=["whole", "sample-chunks", "row-blocks"])
def test_param_streaming_is_bit_for_bit_atomic(dtype, budget):
    """Several batches (3 samples, 1 sample, right padding) into two tasks: the same accumulator
    bits and counts. ``memory_budget_mb`` 0.6 splits the tied embedding's batch into one-sample
    chunks (a batch-level Welford), 0.1 into row blocks too. At the commit the streaming sink
    holds nothing: every parameter was merged during the backward (atomic: every one staged)."""
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="param", accumulation_dtype=dtype, memory_budget_mb=budget)
    atomic, a_col, a_held = run(model, data, **kw)
    streamed, s_col, s_held = run(model, data, atomic_batches=False, **kw)
    assert_same_tasks(atomic, streamed)
    for t in atomic:
        assert (s_col.tasks[t].samples, s_col.tasks[t].tokens) == (a_col.tasks[t].samples, a_col.tasks[t].tokens)
    assert s_held == [0] * len(data)
    assert a_held == [len(list(model.parameters()))] * len(data)
    assert not s_col._moments_sink.spare  # nothing parameter-sized kept between batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disk_backed_streaming_is_bit_for_bit_atomic(dtype, tmp_path):
    """``offload_dir`` (memory-mapped accumulators) with row blocks: the bits of atomic batches
    in memory, and the artifacts written from them are identical."""
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="param", accumulation_dtype=dtype, memory_budget_mb=0.1)
    atomic, a_col, _ = run(model, data, **kw)
    streamed, s_col, _ = run(model, data, atomic_batches=False, offload_dir=tmp_path / "acc", **kw)
    assert_same_tasks(atomic, streamed)
    a, s = a_col.fisher("a"), s_col.fisher("a")
    for name in a.names():
        assert torch.equal(a[name], s[name]) and torch.equal(a.variances[name], s.variances[name]), name
    s_col.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_streaming_is_bit_for_bit_atomic(dtype):
    """Group reduction, with the kept per-sample contributions (taken at the commit): the same."""
    model = tied_model()
    data = data_two_tasks()
    kw = dict(reduction="group", accumulation_dtype=dtype, keep_sample_contributions=True)
    atomic, a_col, _ = run(model, data, **kw)
    streamed, s_col, s_held = run(model, data, atomic_batches=False, **kw)
    assert_same_tasks(atomic, streamed)
    assert s_held == [0] * len(data)
    a, s = a_col.fisher("b"), s_col.fisher("b")
    for name in a.names():
        assert torch.equal(a.sample_contributions[name], s.sample_contributions[name]), name


def test_collect_and_true_fisher_take_the_option():
    """``hf_fisher.collect(..., atomic_batches=False)``: the empirical and the true Fisher (whose
    contributions come through ``add_contributions``) are the bits of atomic batches."""
    model = tied_model()
    data = batches(3) + batches(1)
    for extra in ({}, {"estimator": "true", "seed": 3}):
        kw = dict(progress=False, accumulation_dtype=torch.float32, **extra)
        a = hf_fisher.collect(model, data, **kw)
        s = hf_fisher.collect(model, data, atomic_batches=False, **kw)
        for name in a.names():
            assert torch.equal(a[name], s[name]) and torch.equal(a.variances[name], s.variances[name]), (extra, name)


# --------------------------------------------------------------------------- memory
def _small_vocab_model():
    """The layers hold most of the parameters (vocabulary 256), as at real depth."""
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return tf.Qwen2ForCausalLM(cfg).float().eval()


def test_streaming_lowers_the_steady_peak(monkeypatch):
    """Live bytes over a steady one-sample update in float32, per Fisher value: atomic batches
    hold the accumulators (12) plus every parameter's staged moments (4) at the end of the
    backward; streaming holds one parameter's. Measured: atomic 16.7, streaming 14.6."""
    monkeypatch.setattr(stats, "MERGE_CHUNK", 4096, raising=False)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(3, 256, (1, 16), generator=g)), "labels": ids.clone()} for _ in range(2)]
    peaks = {}
    for atomic in (True, False):
        model = _small_vocab_model()
        n = numel(model)
        track = LiveBytes()
        with track:
            col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float32, verify=False, atomic_batches=atomic)
            col.update(data[0])
            assert 12 * n <= track.current <= 12.2 * n
            track.restart_peak()
            col.update(data[1])
            peaks[atomic] = track.peak / n
    assert peaks[False] <= 15.2, peaks
    assert peaks[False] <= peaks[True] - 1.5, peaks


# --------------------------------------------------------------------------- failing batches
def _reduction_order(model, batch, **kw):
    col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float32, verify=False, **kw)
    order = []
    complete = _MomentsSink.complete

    def spy(sink, name):
        order.append(name)
        complete(sink, name)

    _MomentsSink.complete = spy
    try:
        col.update(batch)
    finally:
        _MomentsSink.complete = complete
    return order


def _streaming(model, **kw):
    return FisherCollector(model, reduction="param", accumulation_dtype=torch.float32, verify=False, atomic_batches=False, **kw)


def test_a_failure_before_any_merge_is_an_ordinary_error(monkeypatch):
    """A non-finite gradient in the first parameter the backward reduces: nothing was merged, so
    the NonFiniteError is the atomic one, the task is as before bit for bit, and collection goes on."""
    model = tied_model()
    data = batches(3)
    first = _reduction_order(model, data[0])[0]
    assert first != EMBED
    col = _streaming(model)
    col.update(data[0])
    before = states(col)
    seen = _nan_for_sample_1(monkeypatch, model, first)
    with pytest.raises(NonFiniteError, match="sample 1"):
        col.update(data[1])
    monkeypatch.undo()
    assert seen == {"batched": 1, "alone": 1}
    assert_same_bits(states(col), before)
    col.update(data[2])
    twin = _streaming(model)
    twin.update(data[0])
    twin.update(data[2])
    assert_same_bits(states(col), states(twin))


def _assert_unusable(col, model, tmp_path, pattern):
    b = batches(1)[0]
    calls = {
        "update": lambda: col.update(b),
        "collect": lambda: col.collect([b], progress=False),
        "fisher": lambda: col.fisher(),
        "save_fisher": lambda: col.save_fisher("default", tmp_path / "out"),
        "merged_state": lambda: col.merged_state("default"),
        "add_contributions": lambda: col.add_contributions("default", {}, None),
        "attach_training": lambda: col.attach_training(),
        "restore": lambda: col.restore("default", None),
    }
    for what, call in calls.items():
        with pytest.raises(PartialBatchError, match=pattern):
            call()
        assert not (tmp_path / "out").exists(), what
    col.close()


def test_a_failure_after_merges_makes_the_collector_unusable(monkeypatch, tmp_path):
    """The tied embedding, reduced last, has a non-finite gradient in batch 1: every other
    parameter is merged already. PartialBatchError (from the failure), naming the batch, the task
    and atomic batches; every later use is refused the same way (nothing written)."""
    model = tied_model()
    data = batches(3)
    col = _streaming(model)
    col.update(data[0], "math")
    seen = _nan_for_sample_1(monkeypatch, model, EMBED)
    with pytest.raises(PartialBatchError) as info:
        col.update(data[1], "math")
    monkeypatch.undo()
    assert seen["batched"] == 1
    msg = str(info.value)
    for part in ("batch 1 of task 'math'", "non-finite gradient of model.embed_tokens.weight for sample(s) [1]",
                 "atomic_batches=True", f"{len(list(model.parameters())) - 1} of {len(list(model.parameters()))} parameters"):
        assert part in msg, msg
    assert info.value.__cause__ is not None
    _assert_unusable(col, model, tmp_path, "cannot be used any more: batch 1 of task 'math'")


def test_a_failing_first_batch_of_a_task_is_undone_exactly(monkeypatch, undone):
    """Task b's first batch fails after merges (embedding last): its accumulators were empty, so
    they are zeroed again -- the exact undo. The error is the atomic one, task a is untouched, and
    the collector goes on as if the batch never came."""
    model = tied_model()
    data = batches(3, count=4)
    add_gradients, alone = _MomentsSink.add_gradients, PerSampleEngine.gradient_alone
    col = _streaming(model)
    col.update(data[0], "a")
    a_before = states(col, "a")
    seen = _nan_for_sample_1(monkeypatch, model, EMBED)
    with pytest.raises(NonFiniteError, match="sample 1"):
        col.update(data[1], "b")
    _MomentsSink.add_gradients, PerSampleEngine.gradient_alone = add_gradients, alone
    assert seen == {"batched": 1, "alone": 1}
    assert undone == [len(list(model.parameters())) - 1]  # every parameter but the embedding was merged
    assert all(a.count == 0 for a in col.tasks["b"].accumulators.values())
    assert all(not t.any() for s in states(col, "b").values() for t in s.values())
    assert_same_bits(states(col, "a"), a_before)
    col.update(data[2], "b")
    col.update(data[3], "a")
    twin = _streaming(model)
    twin.update(data[0], "a")
    twin.update(data[2], "b")
    twin.update(data[3], "a")
    for t in "ab":
        assert_same_bits(states(col, t), states(twin, t))


def _nan_in_batched_pass_only(monkeypatch, param):
    """The batched pass gives sample 1 a NaN gradient of ``param`` (as NaN at padded positions
    would); the sample alone is finite: the engine redoes the batch on the per-sample path."""
    add_gradients = _MomentsSink.add_gradients

    def poisoned(sink, name, gradients, **kwargs):
        if name == param and gradients.shape[0] == 3:
            gradients = gradients.clone()
            gradients[1].view(-1)[0] = float("nan")
            kwargs["owned"] = True
        return add_gradients(sink, name, gradients, **kwargs)

    monkeypatch.setattr(_MomentsSink, "add_gradients", poisoned)


def test_batched_pass_nan_redo_on_the_first_batch_is_exact(monkeypatch, undone):
    """Batch 0 (a fresh task) is redone on the per-sample path after the embedding's NaN, every
    other parameter being merged by then: undone, redone, the same bits as atomic batches."""
    model = tied_model()
    data = batches(3)
    results = []
    for atomic in (True, False):
        with monkeypatch.context() as m:
            _nan_in_batched_pass_only(m, EMBED)
            col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float32, atomic_batches=atomic)
            col.update(data[0])
        assert col.engine.loop_mode
        col.update(data[1])
        results.append(states(col))
    assert_same_bits(*results)
    assert undone == [len(list(model.parameters())) - 1]


def test_batched_pass_nan_redo_on_a_later_batch_is_refused(monkeypatch, tmp_path):
    model = tied_model()
    data = batches(3)
    col = _streaming(model)
    col.update(data[0])
    _nan_in_batched_pass_only(monkeypatch, EMBED)
    with pytest.raises(PartialBatchError, match=r"batch 1 of task 'default' failed \(non-finite gradient of model.embed_tokens"):
        col.update(data[1])
    monkeypatch.undo()
    _assert_unusable(col, model, tmp_path, "batch 1 of task 'default'")


def test_first_batch_check_redo_is_exact_and_after_restore_refused(tmp_path, undone):
    """A wrong rule on one parameter: the first batch's check moves it to the vector-Jacobian path
    and redoes the batch. In a fresh task the merges are undone: the same bits as atomic batches.
    A new collector restored from a checkpoint runs the check on a task that is not empty: the
    redo cannot be honoured, PartialBatchError."""
    name = "model.layers.1.mlp.down_proj.weight"
    data = [tm.padded_batch([7, 3, 5], seed=1), tm.padded_batch([4, 6, 2], seed=2)]

    def both():
        out = []
        for atomic in (True, False):
            model = _ruled(tm.llama(torch.float64), "model.layers.1.mlp.down_proj")
            col = FisherCollector(model, reduction="param", atomic_batches=atomic)
            for b in data:
                col.update(b)
            assert set(col.engine.vjp_reasons) == {name}
            out.append((states(col), col.fisher(), model))
        return out

    (a, fisher, model), (s, _, _) = _with_rule(MissingRule(), both)
    assert_same_bits(a, s)
    assert undone == [len(list(model.parameters()))]  # the check comes after every parameter was merged

    def restored():
        col = FisherCollector(model, reduction="param", atomic_batches=False)
        col.restore("default", fisher)
        with pytest.raises(PartialBatchError, match="per-sample gradients need|vector-Jacobian"):
            col.update(data[0])
        return col

    col = _with_rule(MissingRule(), restored)
    _assert_unusable(col, model, tmp_path, "batch 0 of task 'default'")


def test_padding_check_failing_on_a_later_batch_is_refused(tmp_path):
    """A model whose samples see each other, first batch one unpadded sample (nothing to check):
    the check of batch 1 switches to the per-sample path after the batch was merged. Atomic
    batches redo it; streaming refuses, naming the reason."""
    def model():
        m = tm.llama(torch.float64)
        m.model.norm = _MixSamples(m.model.norm)
        return m

    one = tm.padded_batch([6], seed=4)
    two = {k: v[:, :5] for k, v in tm.padded_batch([5, 5], seed=5).items()}
    atomic = FisherCollector(model(), reduction="param")
    atomic.update(one)
    atomic.update(two)
    assert atomic.engine.loop_mode
    m = model()
    col = FisherCollector(m, reduction="param", atomic_batches=False)
    col.update(one)
    with pytest.raises(PartialBatchError, match="alone, without padding"):
        col.update(two)
    _assert_unusable(col, m, tmp_path, "batch 1")


@pytest.mark.parametrize("budget", [None, 0.1], ids=["whole", "row-blocks"])
def test_float32_overflow_redo_in_the_sink_is_exact(monkeypatch, budget):
    """Finite contributions whose float32 column sums overflow (3 x 2.25e38): the sink redoes the
    chunk in float64 before anything is merged; streaming gives the atomic bits."""
    model = tied_model()
    data = batches(3)
    add_gradients = _MomentsSink.add_gradients

    def huge(sink, name, gradients, **kwargs):
        if name in (EMBED, "model.layers.0.mlp.up_proj.weight"):
            gradients = torch.full_like(gradients, 1.5e19)
            kwargs["owned"] = True
        return add_gradients(sink, name, gradients, **kwargs)

    monkeypatch.setattr(_MomentsSink, "add_gradients", huge)
    results = []
    for atomic in (True, False):
        col = FisherCollector(model, reduction="param", accumulation_dtype=torch.float64, verify=False,
                              memory_budget_mb=budget, atomic_batches=atomic)
        for b in data:
            col.update(b)
        results.append(states(col))
    assert_same_bits(*results)
    assert torch.isfinite(results[1][EMBED]["m2"]).all() and results[1][EMBED]["mean"].max() > 1e38


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_any_exception_after_merges(monkeypatch, tmp_path, error):
    """An exception in the engine after merges (here while the embedding is reduced): an Exception
    becomes a PartialBatchError from it; a KeyboardInterrupt stays itself. Unusable either way."""
    model = tied_model()
    data = batches(1)
    col = _streaming(model)
    col.update(data[0])
    add_gradients = _MomentsSink.add_gradients

    def boom(sink, name, gradients, **kwargs):
        if name == EMBED:
            raise error("out of something")
        return add_gradients(sink, name, gradients, **kwargs)

    monkeypatch.setattr(_MomentsSink, "add_gradients", boom)
    with pytest.raises(PartialBatchError if error is RuntimeError else KeyboardInterrupt) as info:
        col.update(data[1])
    monkeypatch.undo()
    if error is RuntimeError:
        assert isinstance(info.value.__cause__, RuntimeError) and "RuntimeError: out of something" in str(info.value)
    _assert_unusable(col, model, tmp_path, "batch 1 of task 'default' failed")


# --------------------------------------------------------------------------- refused up front
@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(on_nonfinite="skip"), "cannot be combined with on_nonfinite='skip'"),
        (dict(ema_decay=0.9), "cannot be combined with ema_decay"),
    ],
    ids=["skip", "ema"],
)
def test_combinations_that_cannot_be_honoured_are_refused(kw, pattern):
    model = tied_model()
    with pytest.raises(InvalidInputError, match=pattern):
        FisherCollector(model, atomic_batches=False, **kw)
    with pytest.raises(InvalidInputError, match=pattern):
        hf_fisher.collect(model, batches(1), atomic_batches=False, progress=False, **kw)
    FisherCollector(model, atomic_batches=True, **kw)  # the default takes them


def test_bad_values_and_other_estimators_are_refused():
    model = tied_model()
    with pytest.raises(InvalidInputError, match="atomic_batches must be True or False, got 'no'"):
        FisherCollector(model, atomic_batches="no")
    with pytest.raises(InvalidInputError, match="estimator='kfac' has no option atomic_batches"):
        hf_fisher.collect(model, batches(1), estimator="kfac", atomic_batches=False, progress=False)
    col = FisherCollector(model, atomic_batches=False)
    with pytest.raises(InvalidInputError, match=r"attach_training\(\) needs atomic batches"):
        col.attach_training()
    assert not col.tasks  # nothing started


def test_fsdp2_model_is_refused(tmp_path):
    """On an FSDP2-sharded model the ranks' batch moments meet after the whole batch (a
    collective): streaming is refused before any work (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tm.llama(torch.float64)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(UnsupportedError, match="atomic_batches=False is not supported on an FSDP2-sharded model"):
            FisherCollector(model, atomic_batches=False)
        with pytest.raises(UnsupportedError, match="FSDP2"):
            hf_fisher.collect(model, [tm.padded_batch([5, 3])], atomic_batches=False, progress=False)
    finally:
        dist.destroy_process_group()
