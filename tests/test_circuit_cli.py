"""``hf-fisher qkov`` and ``hf-fisher conflicts`` end to end on a tiny LLaMA saved to disk."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fisher.cli import main

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit_cli")
    tm.llama(torch.float32, layers=2, seed=2).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    for name, lo, hi in (("a", 3, 30), ("b", 30, tm.VOCAB)):
        rows = [{"input_ids": torch.randint(lo, hi, (n,), generator=g).tolist()} for n in (8, 6, 7, 5)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(workspace, command, out, *extra):
    return main([command, "--model", str(workspace / "model"), "--task-a", str(workspace / "a.jsonl"),
                 "--task-b", str(workspace / "b.jsonl"), "--out", str(out), "--batch-size", "2", "--no-progress", *extra])


def test_qkov_cli_writes_json_and_heatmaps(workspace):
    out = workspace / "qkov"
    assert run(workspace, "qkov", out, "--layers", "1", "--head-categories") == 0
    data = json.loads((out / "qkov.json").read_text())
    assert data["top"] and {"layer", "head", "block"} <= set(data["top"][0])
    assert all(row["layer"] == 1 for row in data["top"])
    assert "by_category" in data and "head_categories" in data
    assert sorted(p.name for p in out.glob("qkov_*.png"))  # the plots extra is installed in the test environment


def test_conflicts_cli_writes_json_and_claims(workspace):
    out = workspace / "conflicts"
    assert run(workspace, "conflicts", out, "--groups", "layer") == 0
    data = json.loads((out / "conflicts.json").read_text())
    assert "claims" in data and (out / "claims.txt").exists()


@pytest.mark.parametrize("extra, match", [
    (["--layers", "x"], "--layers"),
    (["--memory-budget-mb", "0"], "--memory-budget-mb"),
])
def test_bad_input_writes_nothing(workspace, capsys, extra, match):
    out = workspace / "never"
    assert run(workspace, "qkov", out, *extra) != 0
    assert match in capsys.readouterr().err and not out.exists()


def test_missing_task_file_names_the_flag(workspace, capsys):
    out = workspace / "never2"
    rc = main(["conflicts", "--model", str(workspace / "model"), "--task-a", str(workspace / "nope.jsonl"),
               "--task-b", str(workspace / "b.jsonl"), "--out", str(out)])
    assert rc != 0 and "--task-a" in capsys.readouterr().err and not out.exists()
