"""``hf-fisher collect`` on an encoder-decoder with a (source, target) file: TSV and JSONL give
the Fisher of hf_fisher.collect on the same tokenized pairs; a bad file exits 2 before any work,
nothing written."""

from __future__ import annotations

import json

import pytest
import seq2seq_models as sm
import torch

from hf_fisher import Fisher, collect
from hf_fisher.cli import main
from hf_fisher.data import load_samples, make_seq2seq_batches
from hf_fisher.demo import word_tokenizer

PAIRS = [("the cat sat", "le chat"), ("a dog ran in the park", "un chien"), ("the bird", "un oiseau chante")]
WORDS = sorted({w for s, t in PAIRS for w in f"{s} {t}".split()})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    model = sm.t5(torch.float32)
    model.save_pretrained(d)
    word_tokenizer(WORDS).save_pretrained(d)
    return d


def write(path, kind):
    if kind == "tsv":
        path.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    else:
        path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    return path


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_collect_cli_reads_source_target_pairs(folder, tmp_path, kind, capsys):
    data = write(tmp_path / f"pairs.{kind}", kind)
    out = tmp_path / "out"
    rc = main(["collect", "--model", str(folder), "--data", str(data), "--task", "mt", "--out", str(out),
               "--reduction", "param", "--batch-size", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr()
    got = Fisher.from_pretrained(out)
    tok = word_tokenizer(WORDS)
    batches = make_seq2seq_batches(tok, load_samples(data), batch_size=2, max_length=512, pad_id=0)
    assert batches[0]["labels"].shape != batches[0]["input_ids"].shape
    model = sm.t5(torch.float32)
    model.load_state_dict(type(model).from_pretrained(folder).state_dict())
    ref = collect(model, batches, progress=False)
    assert got.counts.samples == 3 and got.counts.tokens == ref.counts.tokens
    assert got.metadata.extra["task_type"] == "seq2seq"
    for name in ref.names():
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "content, message",
    [
        ("the cat\n", "two tab-separated columns"),
        ("the cat\t\n", "non-empty"),
        ("a\tb\tc\n", "found 3"),
    ],
)
def test_bad_tsv_exits_2_before_any_work(folder, tmp_path, content, message, capsys):
    data = tmp_path / "bad.tsv"
    data.write_text(content)
    out = tmp_path / "out"
    rc = main(["collect", "--model", str(folder), "--data", str(data), "--task", "mt", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert not out.exists() or not any(out.iterdir())


def test_text_file_for_seq2seq_model_exits_2(folder, tmp_path, capsys):
    data = tmp_path / "plain.txt"
    data.write_text("the cat sat\n")
    out = tmp_path / "out"
    rc = main(["collect", "--model", str(folder), "--data", str(data), "--task", "mt", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "(source, target) pairs" in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_jsonl_pair_exits_2(folder, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"source": "the cat", "target": 3}) + "\n")
    rc = main(["collect", "--model", str(folder), "--data", str(data), "--task", "mt", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "'source' and 'target' must both be strings" in capsys.readouterr().err


def test_speech_encoder_decoder_refused_before_loading(tmp_path, capsys):
    """Whisper is a seq2seq model the API takes (input_features), not the text-pair CLI: refused
    from its config alone (the weights are not even valid)."""
    folder = tmp_path / "whisper"
    sm.whisper(torch.float32).config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    data = write(tmp_path / "pairs.tsv", "tsv")
    out = tmp_path / "out"
    rc = main(["collect", "--model", str(folder), "--data", str(data), "--task", "mt", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not take text" in err and "input_features" in err
    assert not out.exists() or not any(out.iterdir())
