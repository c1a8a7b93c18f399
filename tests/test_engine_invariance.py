"""Invariances the definitions demand (DESIGN.md section 2), checked in float64:

- reduction="group" is the group reduction of the parameter Fisher (square first, reduce after),
  and its variance is the variance of the per-sample group-reduced contributions;
- padding (more columns, left vs right) changes no number;
- regrouping the same samples into other batches changes no number;
- max_samples keeps exactly the first samples.
"""

from __future__ import annotations

import pytest
import torch

import reference as R
import tiny_models as tm

GROUP_MODELS = {k: tm.CAUSAL_LMS[k] for k in ("llama", "gpt2", "gpt_bigcode", "qwen3", "lora_llama")}


def group_batches():
    b1 = tm.padded_batch([5, 2, 7], seed=41)
    b1["labels"][1] = -100  # skipped
    b2 = tm.padded_batch([6, 4], seed=42)
    return [b1, b2]


def samples_of(batches):
    return [s for b in batches for s in R.split_batch(b)]


def assert_same(f1, f2, *, rtol=1e-9, what=""):
    assert sorted(f1.names()) == sorted(f2.names())
    assert (f1.counts.samples, f1.counts.tokens, f1.counts.skipped) == (
        f2.counts.samples,
        f2.counts.tokens,
        f2.counts.skipped,
    )
    means = {n: f2[n] for n in f2.names()}
    variances = {n: f2.variances[n] for n in f2.names()}
    floor_m, floor_v = R.global_floor(means), R.global_floor(variances)
    for name in f1.names():
        R.assert_close(f1[name], means[name], rtol=rtol, atol_rel=1e-12, floor=floor_m, what=f"{what} mean {name}")
        R.assert_close(
            f1.variances[name], variances[name], rtol=rtol, atol_rel=1e-12, floor=floor_v, what=f"{what} variance {name}"
        )


# --------------------------------------------------------------------------- group == reduced param


@pytest.mark.parametrize("factory", list(GROUP_MODELS.values()), ids=list(GROUP_MODELS))
def test_group_is_reduction_of_param(collect, factory):
    model = factory()
    batches = group_batches()
    fp = collect(model, batches, reduction="param", progress=False)
    fg = collect(model, batches, reduction="group", progress=False)
    assert fg.reduction == "group"
    assert sorted(fg.names()) == sorted(fp.names())
    assert (fg.counts.samples, fg.counts.skipped) == (fp.counts.samples, fp.counts.skipped) == (4, 1)

    contributions = R.per_sample_contributions(model, samples_of(batches))
    ref_mean, _, _, _ = R.mean_and_variance(contributions)
    ref_group_mean = R.reference_group(ref_mean, fg.groups)
    ref_group_var = R.reference_group_variance(contributions, fg.groups)
    floor_m, floor_v = R.global_floor(ref_mean), R.global_floor(ref_group_var)

    for name in fg.names():
        groups = fg.groups[name]
        shape = tuple(fp.param_shapes[name])
        assert groups.axis_size == shape[groups.axis], f"{name}: groups do not cover axis {groups.axis}"
        assert list(fg.group_names(name)) == groups.names
        assert tuple(fg[name].shape) == (groups.num_groups,)
        R.assert_close(fg[name], groups.reduce(fp[name].double()), rtol=1e-6, floor=floor_m, what=f"group {name}")
        R.assert_close(fg[name], ref_group_mean[name], rtol=1e-6, floor=floor_m, what=f"group vs reference {name}")
        # mass preserving: the groups sum to the parameter's total Fisher
        R.assert_close(fg[name].double().sum(), ref_mean[name].sum(), rtol=1e-6, floor=floor_m, what=f"mass {name}")
        R.assert_close(fg.variances[name], ref_group_var[name], rtol=1e-6, floor=floor_v, what=f"group variance {name}")
    # Var(sum over a group) includes within-group covariances, so it is not the reduced
    # element-wise variance: check the test can tell the two apart.
    element_var = R.mean_and_variance(contributions)[1]
    differs = [
        n
        for n in fg.names()
        if not torch.allclose(ref_group_var[n], fg.groups[n].reduce(element_var[n]), rtol=1e-3)
    ]
    assert differs, "reference group variance should differ from the reduced element variance"


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_bigcode"])
def test_padding_invariance(collect, name):
    """Extra padding columns and left vs right padding give the same Fisher (gpt2 and
    gpt_bigcode have absolute position embeddings: left padding must not shift positions)."""
    model = tm.CAUSAL_LMS[name]()
    samples = samples_of([tm.padded_batch([5, 3, 7, 4], seed=51)])
    right = collect(model, [R.collate(samples)], progress=False)
    variants = {
        "right+5": R.collate(samples, extra=5),
        "left": R.collate(samples, side="left"),
        "left+5": R.collate(samples, side="left", extra=5),
    }
    for label, batch in variants.items():
        f = collect(model, [batch], progress=False)
        assert_same(f, right, what=label)
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples)
    for p in mean:
        R.assert_close(right[p], mean[p], rtol=1e-6, floor=R.global_floor(mean), what=p)


# --------------------------------------------------------------------------- batch regrouping


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batch_split_invariance(collect, name):
    model = tm.CAUSAL_LMS[name]()
    samples = samples_of([tm.padded_batch([4, 7, 2, 5, 3, 6], seed=61)])
    one = collect(model, [R.collate(samples)], progress=False)
    split = collect(model, [R.collate(samples[:1]), R.collate(samples[1:3]), R.collate(samples[3:])], progress=False)
    assert one.counts.samples == split.counts.samples == 6
    assert_same(split, one, what="1+2+3")
    # and as a generator of batches (single pass, no len())
    gen = collect(model, (R.collate(samples[i : i + 2]) for i in range(0, 6, 2)), progress=False)
    assert_same(gen, one, what="generator")


# --------------------------------------------------------------------------- max_samples


@pytest.mark.parametrize("max_samples", [2, 4])
def test_max_samples_truncates_exactly(collect, max_samples):
    model = tm.llama()
    batches = [tm.padded_batch([5, 3, 7], seed=71), tm.padded_batch([6, 4, 8], seed=72)]
    samples = samples_of(batches)
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples[:max_samples])
    fisher = collect(model, batches, max_samples=max_samples, progress=False)
    assert fisher.counts.samples == n_used == max_samples
    assert fisher.counts.tokens == sum(R.label_tokens(s) for s in samples[:max_samples])
    for p in mean:
        R.assert_close(fisher[p], mean[p], rtol=1e-6, floor=R.global_floor(mean), what=p)
        R.assert_close(fisher.variances[p], var[p], rtol=1e-6, floor=R.global_floor(var), what=p)
