"""Issue 21, pruning: multi-head models prune heads (GPT-2, BERT, LLaMA MHA), the pruning edges
(min_per_layer=0, all-padding / out-of-vocabulary calibration data, keep_tokens, unreachable
sparsity), ``hf-fisher prune`` flag combinations checked before the model is loaded, tokenizer
files carried to pruned outputs, and the converged-model check of the Fisher scores."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_pruning import BATCHES, logits, same, snapshot

import hf_fisher
from hf_fisher.consumers.prune.core import prune
from hf_fisher.errors import EmptyDataError, InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")



# ----------------------------------------------------------------------------- 7: multi-head attention
def _llama_mha(dtype=torch.float64):
    return tm.llama(dtype, kv_heads=4, layers=2, seed=21)


# family -> (factory, output projection of layer l, head size)
FAMILIES = {
    "gpt2": (tm.gpt2, "transformer.h.{}.attn.c_proj", 8),
    "bert": (tm.bert_mlm, "bert.encoder.layer.{}.attention.output.dense", 8),
    "llama_mha": (_llama_mha, "model.layers.{}.self_attn.o_proj", 8),
}


def _zeroed_heads_logits(model, out_proj: str, heads: dict[int, list[int]], hd: int, batch=BATCHES[0]):
    """The unpruned model with the given heads' outputs zeroed (their block of the output
    projection's input set to 0 by a hook): what removing those heads means."""
    handles = []
    for layer, hs in heads.items():
        def pre(mod, args, hs=hs):
            x = args[0].clone()
            for h in hs:
                x[..., h * hd:(h + 1) * hd] = 0
            return (x,) + tuple(args[1:])

        handles.append(model.get_submodule(out_proj.format(layer)).register_forward_pre_hook(pre))
    try:
        return logits(model, batch)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_multi_head_models_prune_heads_and_equal_zeroed_heads(family, scope):
    factory, out_proj, hd = FAMILIES[family]
    m = factory()
    before = snapshot(m)
    r = prune(m, None, sparsity=0.5, structured="heads", score="magnitude", scope=scope, progress=False)
    try:
        heads: dict[int, list[int]] = {}
        for u in r.removed:
            heads.setdefault(u["layer"], []).append(u["index"])
        assert r.stats["removed_units"] == 4 and sum(map(len, heads.values())) == 4  # half of 2 x 4 heads
        if scope == "layer":
            assert {k: len(v) for k, v in heads.items()} == {0: 2, 1: 2}
        assert all(len(v) < 4 for v in heads.values())  # a layer keeps a head (min_per_layer=1)
        got = logits(m)
    finally:
        r.restore()
    assert same(m, before)
    want = _zeroed_heads_logits(m, out_proj, heads, hd)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_multi_head_unit_holds_its_kv_rows():
    m = _llama_mha()
    r = prune(m, None, sparsity=0.5, structured="heads", score="magnitude", scope="layer", progress=False)
    r.restore()
    gone = sorted(u["index"] for u in r.removed if u["layer"] == 0)
    for proj in ("q_proj", "k_proj", "v_proj"):
        mask = r.masks[f"model.layers.0.self_attn.{proj}.weight"]
        for h in range(4):
            assert bool(mask[h * 8:(h + 1) * 8].any()) == (h not in gone), (proj, h)


@pytest.mark.parametrize("family", ["gpt2", "llama_mha"])
def test_default_heads_and_channels_removes_heads_with_a_fisher(family):
    factory, _, _ = FAMILIES[family]
    m = factory()
    data = [tm.padded_batch([6, 5], seed=s, vocab=m.config.vocab_size) for s in range(2)]
    F = hf_fisher.collect(m, data, reduction="group", progress=False)
    # global: heads compete with channels by Fisher per parameter (here channels are cheaper at 50%)
    for scope, sparsity in (("layer", 0.5), ("global", 0.8)):
        r = prune(m, F, sparsity=sparsity, scope=scope, progress=False)
        r.restore()
        kinds = {u["kind"] for u in r.removed}
        assert kinds == {"head", "channel"}, (scope, kinds)


def test_llama_mha_physical_removes_kv_heads_and_equals_zeroed_heads(tmp_path):
    m = _llama_mha()
    F = hf_fisher.collect(m, BATCHES, reduction="group", progress=False)
    before = snapshot(m)
    r = prune(m, F, sparsity=0.5, structured="heads", scope="layer", physical=True, progress=False)
    assert same(m, before)
    heads: dict[int, list[int]] = {}
    for u in r.removed:
        heads.setdefault(u["layer"], []).append(u["index"])
    assert {k: len(v) for k, v in heads.items()} == {0: 2, 1: 2}
    cfg = r.model.config
    assert cfg.num_attention_heads == cfg.num_key_value_heads == 2 and cfg.head_dim == 8
    assert tuple(r.model.model.layers[0].self_attn.k_proj.weight.shape) == (16, 32)
    want = _zeroed_heads_logits(m, "model.layers.{}.self_attn.o_proj", heads, 8)
    torch.testing.assert_close(logits(r.model), want, rtol=1e-9, atol=1e-10)
    r.save_pretrained(tmp_path / "small")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float64).eval()
    torch.testing.assert_close(logits(again), want, rtol=1e-9, atol=1e-10)


def test_llama_mha_default_kfac_with_data_prunes_heads_physically():
    m = _llama_mha()
    masked = prune(m, None, sparsity=0.5, scope="layer", rescale_batches=BATCHES, progress=False)
    want = logits(m)
    masked.restore()
    assert masked.stats["score"] == "kfac" and masked.stats["per_layer"]["0"]["removed"]["head"] == 2
    r = prune(m, None, sparsity=0.5, scope="layer", rescale_batches=BATCHES, physical=True, progress=False)
    assert r.model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(r.model), want, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- edges
@pytest.mark.parametrize("structured", ["heads", "kv_heads", ("kv_heads", "channels")])
@pytest.mark.parametrize("physical", [False, True])
def test_min_per_layer_zero_for_heads_is_refused(structured, physical):
    m = tm.llama(kv_heads=2)
    before = snapshot(m)
    with pytest.raises(InvalidInputError, match="min_per_layer"):
        prune(m, None, sparsity=0.9, structured=structured, score="magnitude", scope="layer", min_per_layer=0,
              physical=physical, progress=False)
    assert same(m, before)


ALL_PAD = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]


@pytest.mark.parametrize("kwargs", [
    dict(score="wanda_sp", calibration_batches=ALL_PAD),
    dict(score="flap", calibration_batches=ALL_PAD, scope="layer"),
    dict(score="taylor1", calibration_batches=ALL_PAD),
    dict(score="taylor2", calibration_batches=ALL_PAD),
    dict(score="mask_fisher", calibration_batches=ALL_PAD),
    dict(score="kfac", calibration_batches=ALL_PAD, scope="layer"),
    dict(score="magnitude", rescale_batches=ALL_PAD, scope="layer"),
    dict(score="taylor1", structured=None, calibration_batches=ALL_PAD),
])
def test_all_padding_calibration_data_is_refused(kwargs):
    m = tm.llama(kv_heads=2)
    before = snapshot(m)
    with pytest.raises(EmptyDataError, match="no real token"):
        prune(m, None, sparsity=0.3, progress=False, **kwargs)
    assert same(m, before)


NO_LABELS = [{"input_ids": torch.tensor([[3, 4, 5, 6]]), "labels": torch.full((1, 4), -100)}]


@pytest.mark.parametrize("score, structured", [
    ("taylor1", "heads"), ("taylor2", "heads"), ("mask_fisher", "heads"), ("kfac", "heads"),
    ("taylor1", None), ("taylor2", None),
])
def test_calibration_data_without_labels_is_refused_by_label_scores(score, structured):
    m = tm.llama(kv_heads=2)
    before = snapshot(m)
    with pytest.raises(EmptyDataError, match="label token"):
        prune(m, None, sparsity=0.3, score=score, structured=structured, scope="layer", calibration_batches=NO_LABELS,
              progress=False)
    assert same(m, before)


NEG = [{"input_ids": torch.tensor([[3, 4, -1]])}]


@pytest.mark.parametrize("kwargs", [
    dict(score="taylor1", calibration_batches=NEG),
    dict(score="kfac", calibration_batches=NEG, scope="layer"),
    dict(score="wanda_sp", calibration_batches=[{"input_ids": torch.tensor([[3, 61]])}]),
    dict(score="magnitude", rescale_batches=NEG, scope="layer"),
])
def test_token_ids_outside_the_vocabulary_are_refused(kwargs):
    m = tm.llama(kv_heads=2)
    before = snapshot(m)
    with pytest.raises(InvalidInputError, match=r"outside the model's vocabulary \[0, 61\)"):
        prune(m, None, sparsity=0.3, progress=False, **kwargs)
    assert same(m, before)


@pytest.mark.parametrize("keep", [[-1], [61], [3, 1000], ["a"], [2.0], 5])
def test_keep_tokens_must_be_token_ids(keep):
    m = tm.llama(kv_heads=2)
    with pytest.raises(InvalidInputError, match="keep_tokens"):
        prune(m, None, sparsity=0.3, structured="vocab", score="magnitude", keep_tokens=keep, progress=False)


def _one_head_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tm.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=16, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("case", ["mqa_kv_heads", "one_head", "min_per_layer_above_heads"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unreachable_sparsity_warns_and_records(case, scope, caplog):
    if case == "mqa_kv_heads":
        m, kw = tm.llama(kv_heads=1), dict(structured="kv_heads")
    elif case == "one_head":
        m, kw = _one_head_llama(), dict(structured="heads")
    else:
        m, kw = tm.llama(kv_heads=2), dict(structured="heads", min_per_layer=5)
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        r = prune(m, None, sparsity=0.5, score="magnitude", scope=scope, progress=False, **kw)
    r.restore()
    assert r.stats["achieved_sparsity"] == 0.0
    assert len(r.stats["warnings"]) == 1 and "not reachable" in r.stats["warnings"][0]
    assert "(0.0%)" in r.stats["warnings"][0]
    assert any(rec.levelno == logging.WARNING and "not reachable" in rec.getMessage() for rec in caplog.records)


def test_reachable_sparsity_has_no_warning():
    m = tm.llama(kv_heads=2)
    r = prune(m, None, sparsity=0.5, score="magnitude", scope="global", progress=False)
    r.restore()
    assert r.stats["warnings"] == []


# ----------------------------------------------------------------------------- CLI flag combinations
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("hf-fisher")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]


@pytest.fixture(scope="module")
def cli_ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prune-cli-bad")
    # valid configs (the checks read them) with weights that are not safetensors: loading them fails,
    # so a refusal about the flags shows that it came before the model was loaded
    for name, cfg in (("llama", tm.llama(torch.float32).config), ("gpt2", tm.gpt2(torch.float32).config)):
        cfg.save_pretrained(root / name)
        (root / name / "model.safetensors").write_bytes(b"\x00" * 64)
    m = tm.llama(torch.float64)
    hf_fisher.collect(m, BATCHES, reduction="group", progress=False, task="t").save_pretrained(root / "fisher")
    (root / "calib.txt").write_text("the cat\na dog\n", encoding="utf-8")
    return root


CLI_CASES = [
    # no --fisher, no --data: the default score is fisher, which reads an artifact
    ([], r"--score fisher reads a Fisher artifact.*--fisher DIR"),
    (["--score", "kfac"], r"--score kfac .*--data FILE"),
    (["--data", "calib.txt", "--score", "kfac"], r"--score kfac .*--scope layer"),
    (["--fisher", "fisher", "--physical"], r"--scope layer"),
    (["--fisher", "fisher", "--physical", "--scope", "layer", "--structured", "none"], r"--structured none"),
    (["--fisher", "fisher", "--score", "obd", "--structured", "heads"], r"--reduction param"),
    (["--fisher", "fisher", "--structured", "none"], r"--reduction param"),
    (["--score", "magnitude", "--min-per-layer", "0"], r"--min-per-layer 0"),
    (["--score", "magnitude", "--confidence", "0.9"], r"--confidence needs --score fisher"),
    (["--data", "calib.txt", "--score", "flap", "--structured", "vocab"], r"--score flap is defined through output"),
    (["--data", "calib.txt", "--score", "magnitude", "--structured", "none"], r"--no-rescale"),
]


@pytest.mark.parametrize("extra, pattern", CLI_CASES)
@pytest.mark.slow
def test_cli_flag_combinations_refused_before_loading(cli_ws, tmp_path, extra, pattern):
    import re

    args = ["prune", "--model", str(cli_ws / "llama"), "--sparsity", "0.3", "--out", str(tmp_path / "out"),
            "--no-progress", *[str(cli_ws / a) if a in ("fisher", "calib.txt") else a for a in extra]]
    proc = subprocess.run([*entry_point(), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-fisher prune: error: "), proc.stderr
    assert re.search(pattern, last), last
    for python_term in ("scope='layer'", "calibration_batches", "fisher=", "structured=", "physical=", "min_per_layer"):
        assert python_term not in last, last
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_physical_on_gpt2_refused_before_loading(cli_ws, tmp_path):
    args = ["prune", "--model", str(cli_ws / "gpt2"), "--sparsity", "0.3", "--score", "magnitude", "--scope", "layer",
            "--physical", "--out", str(tmp_path / "out")]
    proc = subprocess.run([*entry_point(), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no --physical" in proc.stderr and "physical=False" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tokenizer in pruned outputs
LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang"]


@pytest.fixture
def model_folder(tmp_path) -> Path:
    from hf_fisher.demo import word_tokenizer

    m = tm.llama(torch.float64, kv_heads=2, seed=30)
    with torch.no_grad():
        m.model.embed_tokens.weight[3] = 0  # <unk> (special in the tokenizer, not in the config): the cheapest row
        m.lm_head.weight[3] = 0
    m.save_pretrained(tmp_path / "model")
    word_tokenizer(sorted({w for line in LINES for w in line.split()})).save_pretrained(tmp_path / "model")
    (tmp_path / "lines.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return tmp_path / "model"


@pytest.mark.parametrize("physical", [False, True])
def test_pruned_output_carries_the_tokenizer_and_collect_runs_on_it(model_folder, tmp_path, physical):
    from hf_fisher.cli import main

    m = tf.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float64).eval()
    r = prune(m, None, sparsity=0.3, score="magnitude", scope="layer", physical=physical, progress=False)
    out = r.save_pretrained(tmp_path / "pruned")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == (model_folder / "tokenizer.json").read_bytes()
    rc = main(["collect", "--model", str(out), "--data", str(tmp_path / "lines.txt"), "--task", "t",
               "--out", str(tmp_path / "fisher"), "--no-progress", "--dtype", "float64"])
    assert rc == 0 and (tmp_path / "fisher" / "fisher_config.json").is_file()


def test_cli_pruned_output_carries_the_tokenizer(model_folder, tmp_path):
    from hf_fisher.cli import main

    assert main(["prune", "--model", str(model_folder), "--sparsity", "0.3", "--score", "magnitude", "--scope", "layer",
                 "--physical", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert (tmp_path / "p" / "tokenizer.json").read_bytes() == (model_folder / "tokenizer.json").read_bytes()


def test_vocabulary_pruning_keeps_the_tokenizers_special_tokens(model_folder, tmp_path):
    m = tf.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float64).eval()
    assert m.config.unk_token_id is None if hasattr(m.config, "unk_token_id") else True
    r = prune(m, None, sparsity=0.9, structured="vocab", score="magnitude", progress=False)
    r.restore()
    gone = {u["index"] for u in r.removed}
    assert len(gone) == round(0.9 * (tm.VOCAB - 4)) and not gone & {0, 1, 2, 3}
    out = r.save_pretrained(tmp_path / "masked-vocab")  # ids unchanged: the tokenizer still fits
    assert (out / "tokenizer.json").read_bytes() == (model_folder / "tokenizer.json").read_bytes()


def test_physical_vocabulary_pruning_with_a_tokenizer_is_refused(model_folder, tmp_path):
    m = tf.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float64).eval()
    before = snapshot(m)
    with pytest.raises(InvalidInputError, match="tokenizer=False"):
        prune(m, None, sparsity=0.5, structured="vocab", score="magnitude", physical=True, progress=False)
    assert same(m, before)
    r = prune(m, None, sparsity=0.5, structured="vocab", score="magnitude", physical=True, tokenizer=False, progress=False)
    out = r.save_pretrained(tmp_path / "v")
    assert (out / "vocab_map.json").is_file() and not (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_cli_physical_vocabulary_pruning_with_a_tokenizer_refused_before_loading(model_folder, tmp_path):
    (model_folder / "model.safetensors").write_bytes(b"\x00" * 64)  # loading would fail
    args = ["prune", "--model", str(model_folder), "--sparsity", "0.3", "--score", "magnitude", "--structured", "vocab",
            "--physical", "--out", str(tmp_path / "out")]
    proc = subprocess.run([*entry_point(), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--structured vocab with --physical" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 10: a converged (saturated) model
@pytest.fixture(scope="module")
def converged():
    """The demo's copy model trained the demo's way, shorter: its shared base (300 steps on copy
    and reverse), then 100 steps on copy alone (the demo fine-tunes 200 with the Trainer). It
    predicts the copy answers with probability ~1, so its gradients, its empirical and its true
    Fisher vanish."""
    from hf_fisher import demo as D

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = D.tiny_llama(0)
        D.train_base(m, steps=300, seed=0)
        g = torch.Generator().manual_seed(10)
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
        m.train()
        for _ in range(100):
            loss = m(**D.task_batch("copy", D.BATCH_SIZE, g)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    held = D._split(D.task_batch("copy", 64, torch.Generator().manual_seed(1)), 16)
    calib = D._split(D.task_batch("copy", 32, torch.Generator().manual_seed(3)), 16)
    return m.eval(), held, calib


def _held_loss(r, held):
    from hf_fisher import demo as D

    try:
        return D._metrics(r.model, held)[0]
    finally:
        r.restore()


@pytest.mark.slow
def test_converged_model_default_warns_compensates_and_beats_magnitude_and_flap(converged, caplog):
    from hf_fisher import demo as D
    from hf_fisher.consumers.prune.core import SATURATED_LOSS

    m, held, calib = converged
    base = D._metrics(m, calib)[0]
    assert base < SATURATED_LOSS
    with caplog.at_level(logging.WARNING, logger="hf_fisher"):
        r = prune(m, None, sparsity=0.3, scope="layer", rescale_batches=calib, progress=False)
    assert r.stats["score"] == "kfac" and r.stats["compensated"]
    assert any("saturated" in w for w in r.stats["warnings"])
    assert any("compensate=True, not chosen" in w for w in r.stats["warnings"])
    assert sum("saturated" in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records) == 1
    default = _held_loss(r, held)
    flap = _held_loss(prune(m, None, sparsity=0.3, scope="layer", score="flap", calibration_batches=calib, progress=False), held)
    magnitude = _held_loss(prune(m, None, sparsity=0.3, scope="layer", score="magnitude", progress=False), held)
    plain = _held_loss(prune(m, None, sparsity=0.3, scope="layer", rescale_batches=calib, compensate=False, progress=False), held)
    assert default < flap and default < magnitude and default < plain, (default, flap, magnitude, plain)


@pytest.mark.parametrize("chosen", [dict(compensate=False), dict(score="kfac")])
@pytest.mark.slow
def test_converged_model_explicit_choice_is_kept_with_a_warning(converged, chosen):
    m, held, calib = converged
    r = prune(m, None, sparsity=0.3, scope="layer", rescale_batches=calib, progress=False, **chosen)
    r.restore()
    assert not r.stats["compensated"]
    assert len(r.stats["warnings"]) == 1 and "saturated" in r.stats["warnings"][0]


@pytest.mark.slow
def test_converged_model_fisher_artifact_warns(converged, tmp_path):
    m, held, calib = converged
    F = hf_fisher.collect(m, calib, reduction="param", progress=False)
    r = prune(m, F, sparsity=0.5, structured=None, progress=False)
    r.restore()
    assert len(r.stats["warnings"]) == 1
    assert "saturated" in r.stats["warnings"][0] and "score='magnitude'" in r.stats["warnings"][0]
    out = r.save_pretrained(tmp_path / "p")
    assert json.loads((out / "pruning.json").read_text())["stats"]["warnings"] == r.stats["warnings"]


def test_a_model_that_is_not_saturated_gets_no_warning():
    m = tm.llama(kv_heads=2)
    F = hf_fisher.collect(m, BATCHES, reduction="param", progress=False)
    for kw in (dict(), dict(structured=None), dict(scope="layer", rescale_batches=BATCHES)):
        r = prune(m, F, sparsity=0.5, progress=False, **kw)
        r.restore()
        assert r.stats["warnings"] == [] and not r.stats.get("compensated"), kw
