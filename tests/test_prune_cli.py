"""``hf-fisher prune`` and ``hf-fisher report`` end to end on a tiny LLaMA saved to disk."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import transformers as tf

import hf_fisher
from hf_fisher.cli import main
from hf_fisher.consumers.prune.core import prune

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cli")
    model = tm.llama(torch.float64, layers=2, seed=4)
    model.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, tm.VOCAB, (n,), generator=g).tolist()} for n in (9, 7, 8, 6, 9, 5)]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = [{"input_ids": torch.tensor([r["input_ids"][:5] for r in rows[i : i + 3]])} for i in (0, 3)]
    fisher = hf_fisher.collect(model, batches, reduction="param", task="calib", progress=False)
    fisher.save_pretrained(root / "fisher")
    return root


def test_prune_physical_matches_the_api(workspace):
    out = workspace / "pruned"
    rc = main(["prune", "--model", str(workspace / "model"), "--fisher", str(workspace / "fisher"), "--sparsity", "0.5",
               "--scope", "layer", "--physical", "--data", str(workspace / "calib.jsonl"), "--batch-size", "3",
               "--dtype", "float64", "--out", str(out), "--no-progress"])
    assert rc == 0
    small = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert small.config.num_attention_heads == 2 and small.config.intermediate_size == 20
    info = json.loads((out / "pruning.json").read_text())
    # the same pruning through the API (the CLI's batches: the calibration file in batches of 3)
    model = tf.AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float64).eval()
    rows = [json.loads(line)["input_ids"] for line in (workspace / "calib.jsonl").read_text().splitlines()]
    from hf_fisher.data import load_samples, make_batches

    batches = make_batches(None, load_samples(workspace / "calib.jsonl"), batch_size=3, max_length=512,
                           task_type="causal_lm", pad_id=0, vocab_size=tm.VOCAB)
    r = prune(model, hf_fisher.Fisher.from_pretrained(workspace / "fisher"), sparsity=0.5, scope="layer",
              physical=True, rescale_batches=batches, progress=False)
    assert info["removed"] == r.removed
    x = torch.tensor([rows[0]])
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, r.model(input_ids=x).logits)


def test_prune_masked_unstructured(workspace):
    out = workspace / "masked"
    assert main(["prune", "--model", str(workspace / "model"), "--fisher", str(workspace / "fisher"), "--sparsity", "0.2",
                 "--structured", "none", "--out", str(out), "--dtype", "float64", "--no-progress"]) == 0
    m = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    w = m.model.layers[0].mlp.down_proj.weight
    assert 0.0 < float((w == 0).double().mean()) < 1.0
    assert json.loads((out / "pruning.json").read_text())["stats"]["achieved_sparsity"] == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--sparsity", "0.3", "--structured", "rows"], "unknown unit"),
        (["--sparsity", "0.3", "--score", "wanda_sp"], "--data"),
        (["--sparsity", "0.3", "--min-per-layer", "-2"], "--min-per-layer"),
        (["--sparsity", "0.3", "--confidence", "3"], "--confidence"),
    ],
)
def test_prune_bad_input_writes_nothing(workspace, capsys, extra, match):
    out = workspace / "never"
    rc = main(["prune", "--model", str(workspace / "model"), "--fisher", str(workspace / "fisher"), "--out", str(out), *extra])
    assert rc != 0 and match in capsys.readouterr().err
    assert not out.exists()


def test_prune_refuses_a_folder_with_other_files(workspace, capsys):
    out = workspace / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["prune", "--model", str(workspace / "model"), "--fisher", str(workspace / "fisher"), "--sparsity", "0.3",
               "--out", str(out)])
    assert rc != 0 and "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_report_cli_writes_csv_and_summary(workspace):
    out = workspace / "report"
    assert main(["report", str(workspace / "fisher"), "--out", str(out)]) == 0
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "layer", "head", "metric", "value"]
    fisher = hf_fisher.Fisher.from_pretrained(workspace / "fisher")
    trace = next(float(r["value"]) for r in rows if r["metric"] == "trace")
    assert trace == fisher.total()
    assert (out / "summary.txt").read_text().strip()


def test_report_cli_bad_input(workspace, capsys):
    rc = main(["report", str(workspace / "fisher"), str(workspace / "fisher"), str(workspace / "fisher"), "--out", str(workspace / "r3")])
    assert rc != 0 and "one or two" in capsys.readouterr().err
    assert not (workspace / "r3").exists()
