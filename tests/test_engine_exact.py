"""hf_fisher.collect against the brute-force reference (tests/reference.py), in float64.

The reference runs every sample alone, unpadded, with plain autograd; the engine runs padded
batches of different sizes and lengths. Agreement to ~1e-6 relative (float64 models) means the
per-sample gradients, the normalisation, the skipping and the statistics are all exact.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import reference as R
import tiny_models as tm

RTOL = 1e-6

MODELS = dict(tm.CAUSAL_LMS)
MODELS["llama_mqa"] = lambda dtype=torch.float64: tm.llama(dtype, kv_heads=1, seed=9)


def causal_batches() -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches (B=3, T=7 and B=5, T=8) with two samples that have no label token."""
    b1 = tm.padded_batch([5, 3, 7], seed=11)
    b1["labels"][1] = -100  # every label ignored: skipped and counted, never a NaN
    b2 = tm.padded_batch([4, 6, 1, 8, 2], seed=12)  # length 1: no label token after the shift
    return [b1, b2]


def samples_of(batches):
    return [s for b in batches for s in R.split_batch(b)]


def check_fisher(fisher, mean, var, n_used, n_skipped, *, tokens=None, rtol=RTOL):
    assert sorted(fisher.names()) == sorted(mean), "Fisher must cover exactly the trainable parameters"
    assert fisher.counts.samples == n_used
    assert fisher.counts.skipped == n_skipped
    if tokens is not None:
        assert fisher.counts.tokens == tokens
    floor_m, floor_v = R.global_floor(mean), R.global_floor(var)
    for name in mean:
        R.assert_close(fisher[name], mean[name], rtol=rtol, floor=floor_m, what=f"mean {name}")
        R.assert_close(fisher.variances[name], var[name], rtol=rtol, floor=floor_v, what=f"variance {name}")


# --------------------------------------------------------------------------- the reference itself


class OneHotLinear(torch.nn.Module):
    """logits = W onehot(id) + b per token (LM), or W mean_t onehot(id_t) + b (classification)."""

    def __init__(self, vocab: int, out: int, pooled: bool):
        super().__init__()
        self.vocab, self.pooled = vocab, pooled
        self.lin = torch.nn.Linear(vocab, out, dtype=torch.float64)
        torch.nn.init.normal_(self.lin.weight, std=0.7)
        torch.nn.init.normal_(self.lin.bias, std=0.3)

    def forward(self, input_ids, **_):
        x = F.one_hot(input_ids, self.vocab).double()
        if self.pooled:
            x = x.mean(1)
        return types.SimpleNamespace(logits=self.lin(x))


def closed_form(model: OneHotLinear, sample, normalization: str, task_type: str):
    """Per-sample C_i from the softmax-CE gradient (p - y) x^T, no autograd."""
    W, b = model.lin.weight.detach(), model.lin.bias.detach()
    ids = sample["input_ids"][0]
    labels = sample["labels"][0]
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    if task_type == "classification":
        xbar = F.one_hot(ids, model.vocab).double().mean(0)
        r = torch.softmax(W @ xbar + b, -1)
        r[labels] -= 1
        gW, gb, n = torch.outer(r, xbar), r, 1
    else:
        pairs = zip(ids[:-1], labels[1:]) if task_type == "causal_lm" else zip(ids, labels)
        n = 0
        for tok, lab in pairs:
            if lab == -100:
                continue
            r = torch.softmax(W[:, tok] + b, -1)
            r[lab] -= 1
            gW[:, tok] += r
            gb += r
            n += 1
        if n == 0:
            return None
    if normalization == "mean":
        gW, gb = gW / n, gb / n
    scale = 1.0 / n if normalization == "token" else 1.0
    return {"lin.weight": gW**2 * scale, "lin.bias": gb**2 * scale}


@pytest.mark.parametrize("normalization", ["mean", "sum", "token"])
@pytest.mark.parametrize("task_type", ["causal_lm", "masked_lm", "classification"])
def test_reference_sanity(task_type, normalization):
    torch.manual_seed(0)
    V = 9
    model = OneHotLinear(V, 4 if task_type == "classification" else V, pooled=task_type == "classification")
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (5, 3, 6, 4):
        ids = torch.randint(0, V, (1, n), generator=g)
        if task_type == "classification":
            labels = torch.randint(0, 4, (1,), generator=g)
        else:
            labels = torch.randint(0, V, (1, n), generator=g)
            labels[0, 1] = -100
        samples.append({"input_ids": ids, "labels": labels})
    if task_type != "classification":
        samples.append({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.full((1, 3), -100)})

    mean, var, n_used, n_skipped = R.reference_fisher(model, samples, normalization=normalization, task_type=task_type)

    expected = [closed_form(model, s, normalization, task_type) for s in samples]
    used = [c for c in expected if c is not None]
    assert (n_used, n_skipped) == (len(used), len(expected) - len(used))
    for name in ("lin.weight", "lin.bias"):
        m = sum(c[name] for c in used) / len(used)
        v = sum((c[name] - m) ** 2 for c in used) / (len(used) - 1)
        R.assert_close(mean[name], m, rtol=1e-12, what=name)
        R.assert_close(var[name], v, rtol=1e-10, what=name)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_collate_roundtrip(side):
    b = tm.padded_batch([4, 1, 6], seed=3, side=side)
    samples = R.split_batch(b)
    assert [s["input_ids"].shape[1] for s in samples] == [4, 1, 6]
    back = R.collate(samples, side=side)
    for key in b:
        assert torch.equal(back[key], b[key]), key
    wider = R.collate(samples, side=side, extra=3)
    assert wider["input_ids"].shape == (3, 9)
    assert [torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(R.split_batch(wider), samples)] == [True] * 3


# --------------------------------------------------------------------------- engine vs reference


@pytest.mark.parametrize("factory", list(MODELS.values()), ids=list(MODELS))
def test_param_fisher_matches_brute_force(collect, factory):
    model = factory()
    batches = causal_batches()
    samples = samples_of(batches)
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples)
    assert (n_used, n_skipped) == (6, 2)
    tokens = sum(R.label_tokens(s) for s in samples)

    fisher = collect(model, batches, reduction="param", progress=False)

    check_fisher(fisher, mean, var, n_used, n_skipped, tokens=tokens)
    assert fisher.reduction == "param"
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert tuple(fisher[name].shape) == tuple(p.shape)
            assert tuple(fisher.param_shapes[name]) == tuple(p.shape)


@pytest.mark.parametrize("normalization", ["sum", "token", "mean"])
def test_normalizations(collect, normalization):
    model = tm.llama()
    batches = causal_batches()
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples_of(batches), normalization=normalization)
    fisher = collect(model, batches, normalization=normalization, progress=False)
    check_fisher(fisher, mean, var, n_used, n_skipped)
    assert fisher.metadata.normalization == normalization


def test_normalizations_relate_as_defined(collect):
    """For one sample, C_sum = n_i^2 C_mean and C_token = n_i C_mean (engine against itself)."""
    model = tm.gpt2()
    name = "transformer.h.0.mlp.c_fc.weight"
    for s in R.split_batch(tm.padded_batch([3, 8], seed=5, ignore_some=False)):
        one = [R.collate([s])]
        n_i = R.label_tokens(s)
        fm, fs, ft = (collect(model, one, normalization=k, progress=False)[name] for k in ("mean", "sum", "token"))
        R.assert_close(fs, fm.double() * n_i**2, rtol=1e-9)
        R.assert_close(ft, fm.double() * n_i, rtol=1e-9)


def test_causal_lm_without_labels(collect):
    """No ``labels``: labels = input_ids with padding ignored."""
    model = tm.qwen2()
    batches = causal_batches()[1:]
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    samples = [{"input_ids": s["input_ids"]} for s in samples_of(no_labels)]
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples)
    fisher = collect(model, no_labels, progress=False)
    check_fisher(fisher, mean, var, n_used, n_skipped, tokens=sum(R.label_tokens(s) for s in samples))


def test_sequence_classification(collect):
    model = tm.bert_classifier()
    b1 = tm.padded_batch([5, 3, 7], seed=21)
    b1["labels"] = torch.tensor([2, 0, 1])
    b2 = tm.padded_batch([6, 4], seed=22)
    b2["labels"] = torch.tensor([1, 1])
    batches = [b1, b2]
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples_of(batches), task_type="classification")
    fisher = collect(model, batches, progress=False)
    check_fisher(fisher, mean, var, n_used, n_skipped)
    assert n_used == 5


def test_masked_lm(collect):
    model = tm.bert_mlm()
    g = torch.Generator().manual_seed(0)
    batches = []
    for seed, lengths in ((31, [6, 4, 8]), (32, [5, 7])):
        b = tm.padded_batch(lengths, seed=seed)
        drop = torch.rand(b["labels"].shape, generator=g) < 0.5
        b["labels"][drop] = -100
        batches.append(b)
    batches[0]["labels"][1] = -100  # no label token: skipped
    batches[1]["labels"][0, 2] = int(batches[1]["input_ids"][0, 2])  # at least one label there
    samples = samples_of(batches)
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples, task_type="masked_lm")
    assert n_skipped == 1 and n_used == 4
    fisher = collect(model, batches, progress=False)
    check_fisher(
        fisher, mean, var, n_used, n_skipped, tokens=sum(R.label_tokens(s, "masked_lm") for s in samples)
    )


@pytest.mark.parametrize(
    "factory,train", [(tm.gpt2, True), (tm.gpt2, False), (tm.lora_llama, True)], ids=["gpt2-train", "gpt2-eval", "lora-train"]
)
def test_model_state_untouched(collect, factory, train):
    """collect leaves parameters, .grad, requires_grad and train/eval flags as they were, and runs
    in eval mode (gpt2 has dropout 0.1: a train-mode pass would not match the eval reference)."""
    model = factory()
    model.train(train)
    flags = {n: m.training for n, m in model.named_modules()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = causal_batches()

    fisher = collect(model, batches, progress=False)

    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None, n
    mean, var, n_used, n_skipped = R.reference_fisher(model, samples_of(batches))
    check_fisher(fisher, mean, var, n_used, n_skipped)
    assert {n: m.training for n, m in model.named_modules()} == flags
