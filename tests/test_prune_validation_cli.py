"""``hf-fisher prune --validation FILE``: the criterion chosen on held-out data, printed and saved
in pruning.json; its mistakes refused before the model is loaded (exit code 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fisher.cli import main

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_validation_cli")
    tm.llama(torch.float64, layers=2, seed=4).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    for name, n in (("calib", 6), ("val", 4)):
        rows = [{"input_ids": torch.randint(3, tm.VOCAB, (8,), generator=g).tolist()} for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _args(ws, out, *extra):
    return ["prune", "--model", str(ws / "model"), "--sparsity", "0.5", "--scope", "layer", "--data",
            str(ws / "calib.jsonl"), "--batch-size", "3", "--dtype", "float64", "--out", str(out), "--no-progress", *extra]


def test_validation_choice_is_printed_and_saved(workspace, capsys):
    out = workspace / "pruned"
    assert main(_args(workspace, out, "--validation", str(workspace / "val.jsonl"))) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "pruning.json").read_text())["stats"]["validation"]
    assert len(rec["candidates"]) == 10
    assert rec["chosen"]["validation_loss"] == min(c["validation_loss"] for c in rec["candidates"])
    assert f"Validation chose score {rec['chosen']['score']}" in printed


@pytest.mark.parametrize("extra, pattern", [
    (["--validation", "VAL", "--score", "kfac"], "drop --score"),
    (["--validation", "missing.jsonl"], "expected an existing .txt or .jsonl"),
])
def test_validation_mistakes_refused_before_the_model(workspace, tmp_path, capsys, extra, pattern):
    extra = [str(workspace / "val.jsonl") if e == "VAL" else str(tmp_path / e) if e.endswith(".jsonl") else e for e in extra]
    out = tmp_path / "out"
    assert main(_args(workspace, out, *extra)) == 2
    assert pattern in capsys.readouterr().err
    assert not out.exists()


def test_validation_needs_data(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(workspace / "model"), "--sparsity", "0.5", "--scope", "layer", "--validation",
            str(workspace / "val.jsonl"), "--out", str(out)]
    assert main(args) == 2
    assert "pass --data FILE too" in capsys.readouterr().err
    assert not out.exists()


def test_validation_holdout_chooses_on_the_last_quarter_of_the_data(workspace, capsys):
    out = workspace / "pruned_holdout"
    assert main(_args(workspace, out, "--validation", "holdout", "--batch-size", "1")) == 0  # 6 batches: 2 held out
    printed = capsys.readouterr().out
    rec = json.loads((out / "pruning.json").read_text())["stats"]["validation"]
    assert rec["source"] == "held-out calibration batches" and rec["held_out"] == [4, 5] and rec["of"] == 6
    assert "held-out --data batch(es), --validation holdout chose score" in printed
