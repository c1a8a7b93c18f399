"""The demo's pieces that need no training: its two tasks, its vocabulary, its --out rules.

The end-to-end run (every stage on small options) is tests/test_cli.py::test_demo_trains_collects_and_saves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_fisher import demo
from hf_fisher.cli import main


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("task", demo.TASKS)
def test_task_batches_score_the_answer_only(task):
    b = demo.task_batch(task, 5, torch.Generator().manual_seed(0))
    ids, labels = b["input_ids"], b["labels"]
    span = demo.SPAN
    assert ids.shape == (5, 2 * span + 2) and (ids[:, 0] == 1).all()
    assert (ids[:, span + 1] == demo.SEPARATORS[task]).all()
    x, answer = ids[:, 1 : span + 1], ids[:, span + 2 :]
    assert torch.equal(answer, x if task == "copy" else x.flip(1))
    assert ((x >= demo.FIRST_CONTENT_ID) & (x < demo.VOCAB)).all()
    assert (labels[:, : span + 2] == -100).all() and torch.equal(labels[:, span + 2 :], answer)
    # copy_batch is the copy task's
    if task == "copy":
        assert torch.equal(demo.copy_batch(5, torch.Generator().manual_seed(0))["input_ids"], ids)


def test_the_word_tokenizer_encodes_the_demo_data():
    tok = demo.word_tokenizer(demo.demo_words())
    b = demo.task_batch("reverse", 2, torch.Generator().manual_seed(1))
    line = demo._data_lines([b]).splitlines()[0]
    assert "~" in line.split() and tok(line)["input_ids"] == b["input_ids"][0].tolist()
    assert len(tok) == demo.VOCAB


@pytest.mark.parametrize(
    "inside, name",
    [("copy", "notes.md"), ("copy/fisher", "notes.md"), ("report", "thesis.tex"), ("merged-fisher", "mine.py"),
     ("fisher-copy", "notes.md")],
)
def test_a_foreign_file_in_a_demo_folder_is_refused_before_training(tmp_path, capsys, inside, name):
    out = tmp_path / "demo"
    (out / inside).mkdir(parents=True)
    (out / inside / name).write_text("mine", encoding="utf-8")
    before = tree(tmp_path)
    assert main(["demo", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "refusing to overwrite" in captured.err and name in captured.err
    assert "Training" not in captured.out and tree(tmp_path) == before


def test_task_steps_are_checked_before_training(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--task-steps", "0"]) == 2
    captured = capsys.readouterr()
    assert "--task-steps must be >= 1" in captured.err and "Training" not in captured.out
    assert list(tmp_path.iterdir()) == []
