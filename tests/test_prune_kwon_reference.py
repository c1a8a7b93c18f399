"""hf_fisher's structured pruning against a plain, independent Kwon et al. 2022 (mask Fisher,
lowest units within the same per-layer counts, least-squares mask tuning layer by layer:
tests/kwon_reference.py), and ``validation=`` choosing the criterion on held-out data.

Issue 26: at identical counts the product's ``mask_fisher`` + rescale was worse than a plain
Kwon+LSQ, because its rescale reconstructed the output of the *pruned-so-far* model (its own
corrupted inputs) instead of the unpruned layer's output and residual stream."""

from __future__ import annotations

import json

import kwon_reference as K
import pytest
import torch
import transformers as tf

from hf_fisher.consumers.prune.core import prune
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def _language(n: int, T: int, seed: int, V: int = 32) -> torch.Tensor:
    """Sequences of a fixed order-2 random language (each pair of tokens allows 3 next tokens)."""
    rule = torch.randint(0, V, (V, V, 3), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, T, dtype=torch.long)
    x[:, :2] = torch.randint(0, V, (n, 2), generator=g)
    for t in range(2, T):
        x[:, t] = rule[x[:, t - 2], x[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return x


def _batches(x: torch.Tensor, size: int) -> list[dict]:
    return [{"input_ids": x[i : i + size], "labels": x[i : i + size]} for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA (4 query heads over 2 kv-heads, MLP 64) trained on the language, in float64;
    calibration, validation and held-out test batches from disjoint seeds."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = _language(1024, 24, 1)
    g = torch.Generator().manual_seed(2)
    for _ in range(150):
        b = train[torch.randint(0, len(train), (32,), generator=g)]
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    model = model.double().eval()
    return model, _batches(_language(48, 24, 3), 16), _batches(_language(64, 24, 5), 32), _batches(_language(128, 24, 4), 64)


def _counts(result) -> dict[int, tuple[int, int]]:
    return {int(k): (v["removed"].get("head", 0), v["removed"].get("channel", 0)) for k, v in result.stats["per_layer"].items()}


def _removed(result) -> set[tuple]:
    return {(u["layer"], u["kind"], u["index"]) for u in result.removed}


def _ref_removed(masks: K.Masks) -> set[tuple]:
    out = set()
    for l in range(len(masks.layers)):
        out |= {(l, "head", int(h)) for h in (masks.head[l] == 0).nonzero().flatten()}
        out |= {(l, "channel", int(c)) for c in (masks.chan[l] == 0).nonzero().flatten()}
    return out


@pytest.mark.parametrize("make", [lambda: tm.llama(torch.float64, kv_heads=2, layers=2, seed=3),
                                  lambda: tm.gpt2(torch.float64, seed=5)], ids=["llama-gqa", "gpt2-fused-c_attn"])
def test_mask_fisher_with_rescale_is_plain_kwon(make):
    """Same units and the same pruned model (loss on the calibration tokens and on other tokens)
    as the plain procedure with Kwon's reconstruction of the unpruned layer output + residual
    stream on the pruned-so-far inputs; fails on the rescale that fitted the pruned model's own output."""
    m = make()
    g = torch.Generator().manual_seed(0)
    calib = _batches(torch.randint(3, tm.VOCAB, (12, 10), generator=g), 4)
    other = _batches(torch.randint(3, tm.VOCAB, (8, 10), generator=g), 8)
    r = prune(m, None, sparsity=0.5, structured=("heads", "channels"), score="mask_fisher", scope="layer",
              rescale_batches=calib, progress=False)
    try:
        got = (K.loss_with(m, calib, None), K.loss_with(m, other, None))
    finally:
        r.restore()
    tuned, zero_one, _ = K.kwon_prune(m, calib, _counts(r), lsq="kwon", balance_groups=True)
    assert _removed(r) == _ref_removed(zero_one)
    want = (K.loss_with(m, calib, tuned), K.loss_with(m, other, tuned))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert all(e["residual"] for e in r.stats["rescaled"])


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_rescale_and_validation_choice_not_worse_than_plain_kwon(trained, sparsity):
    """On a trained model, at the default's own per-layer counts: mask_fisher + rescale's held-out
    loss is at most the plain Kwon+LSQ's (either variant of its least squares: reconstruction on
    the pruned-so-far inputs, or fit on the unpruned inputs); the criterion ``validation=`` picks
    has a validation loss at most the plain procedure's."""
    model, calib, val, test = trained
    r = prune(model, None, sparsity=sparsity, scope="layer", rescale_batches=calib, progress=False)
    counts = _counts(r)
    r.restore()
    r = prune(model, None, sparsity=sparsity, score="mask_fisher", scope="layer", rescale_batches=calib, progress=False)
    assert _counts(r) == counts
    mask_fisher = K.loss_with(model, test, None)
    r.restore()
    r = prune(model, None, sparsity=sparsity, scope="layer", rescale_batches=calib, validation=val, progress=False)
    chosen_val = K.loss_with(model, val, None)
    r.restore()
    Ih, Ic = K.mask_fisher(model, calib)
    zero_one = K.select(K.layers_of(model), Ih, Ic, counts, balance_groups=True)
    tuned = {lsq: K.tune(model, calib, zero_one, lsq=lsq) for lsq in ("kwon", "unpruned")}
    plain = {lsq: K.loss_with(model, test, t) for lsq, t in tuned.items()}
    plain_val = min(K.loss_with(model, val, t) for t in tuned.values())
    assert mask_fisher <= min(plain.values()) + 1e-9, (mask_fisher, plain)
    assert chosen_val <= plain_val + 1e-9, (chosen_val, plain_val)


def test_validation_picks_the_lowest_validation_loss_and_records_it(trained, caplog):
    model, calib, val, _ = trained
    from hf_fisher.consumers.merge.api import validation_loss

    full = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level("WARNING", logger="hf_fisher.consumers.prune.core"):
        r = prune(model, None, sparsity=0.4, scope="layer", rescale_batches=calib, validation=val, progress=False)
    rec = r.stats["validation"]
    losses = {(c["score"], c["rescale"], c["compensate"]): c["validation_loss"] for c in rec["candidates"]}
    assert set(losses) == {(s, r, c) for s, r in (("kfac", True), ("mask_fisher", True), ("flap", False), ("wanda_sp", False),
                                                  ("wanda_sp", True)) for c in (False, True)}
    assert rec["chosen"]["validation_loss"] == min(losses.values())
    assert (r.stats["score"], r.stats["compensated"]) == (rec["chosen"]["score"], rec["chosen"]["compensate"])
    assert validation_loss(model, [val]) == pytest.approx(rec["chosen"]["validation_loss"], rel=1e-12)
    assert any("validation chose" in m for m in caplog.messages)
    json.dumps(r.stats)  # saved in pruning.json
    r.restore()
    assert all(torch.equal(a, b) for a, b in zip(full, model.parameters()))
    # a score given: validation decides the bias compensation only
    r = prune(model, None, sparsity=0.4, score="mask_fisher", scope="layer", rescale_batches=calib, validation=val,
              progress=False)
    assert {(c["score"], c["compensate"]) for c in r.stats["validation"]["candidates"]} == {("mask_fisher", False), ("mask_fisher", True)}
    r.restore()


def test_validation_refusals_before_any_work(trained):
    model, calib, val, _ = trained
    full = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidInputError, match="leave one unset"):
        prune(model, None, sparsity=0.4, score="kfac", compensate=False, scope="layer", rescale_batches=calib,
              validation=val, progress=False)
    with pytest.raises(InvalidInputError, match="validation"):
        prune(model, None, sparsity=0.4, scope="layer", rescale_batches=calib, validation=[{"ids": 1}], progress=False)
    with pytest.raises(InvalidInputError, match="no candidate"):  # no calibration data: no criterion to choose
        prune(model, None, sparsity=0.4, scope="layer", validation=val, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full, model.parameters()))


def test_post_norm_blocks_are_rescaled_without_the_residual_term_and_say_so():
    """BERT adds the residual before its LayerNorm: no residual term, a recorded warning."""
    m = tm.bert_mlm(torch.float64)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(5, tm.VOCAB, (4, 8), generator=g)} for _ in range(2)]
    r = prune(m, None, sparsity=0.5, structured=("heads", "channels"), score="magnitude", scope="layer",
              rescale_batches=calib, progress=False)
    try:
        assert r.stats["rescaled"] and not any(e["residual"] for e in r.stats["rescaled"])
        assert any("not a pre-norm residual block" in w for w in r.stats["warnings"])
    finally:
        r.restore()
