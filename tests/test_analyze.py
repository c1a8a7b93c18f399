"""hf_fisher.analyze: every stage's output in one folder; a failing third-party stage is reported
while the rest completes; two-task stages are skipped with one task; hf-fisher analyze."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import hf_fisher
from hf_fisher import hookimpl, plugins
from hf_fisher.cli import main
from hf_fisher.consumers.analyze import analyze
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def task(lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (3, 8), generator=g)} for _ in range(2)]


TASKS = {"low": task(3, 30, 0), "high": task(30, tm.VOCAB, 1)}


@pytest.fixture
def third_party_stages():
    def broken(ctx):
        raise RuntimeError("this stage is broken on purpose")

    def extra(ctx):
        (ctx.folder("extra") / "hello.txt").write_text("hi")
        return {"tasks": sorted(ctx.tasks), "fishers": sorted(ctx.fishers)}

    @hookimpl
    def hf_fisher_register_consumers(register):
        register("stage.broken", broken)
        register("stage.extra", extra)

    plugin = SimpleNamespace(hf_fisher_register_consumers=hf_fisher_register_consumers)
    name = plugins.register(plugin, name="analysis-stage-test-plugin")
    yield
    plugins.unregister(name)


@pytest.mark.slow
def test_every_stage_writes_its_output_and_a_broken_stage_is_reported(tmp_path, third_party_stages):
    model = tm.llama(torch.float32, layers=2, seed=3)
    res = analyze(model, TASKS, out=tmp_path / "a", config={"progress": False})
    assert res.status.pop("broken") == "failed" and "broken on purpose" in res.errors["broken"]
    assert set(res.status.values()) == {"ok"}, res.errors
    root = tmp_path / "a"
    doc = json.loads((root / "analysis.json").read_text())
    assert list(doc["stages"])[:8] == ["fisher", "importance", "head_categories", "pruning", "conflicts", "qkov", "estimators", "report"]
    assert doc["stages"]["broken"]["status"] == "failed"
    assert doc["results"]["extra"] == {"tasks": ["high", "low"], "fishers": ["high", "low"]}
    for folder in ("fisher-low", "fisher-high"):
        hf_fisher.Fisher.from_pretrained(root / folder)
    assert (root / "report" / "report.csv").exists() and (root / "qkov" / "qkov.json").exists()
    assert (root / "conflicts" / "conflicts.json").exists() and (root / "extra" / "hello.txt").exists()
    assert 0 < doc["results"]["pruning"]["low"]["achieved_sparsity"] < 1
    assert "head_overlap" in doc["results"]["pruning"]
    summary = (root / "summary.txt").read_text()
    assert "broken" in summary and "failed" in summary


def test_one_task_skips_the_two_task_stages(tmp_path):
    model = tm.llama(torch.float32, layers=2, seed=3)
    res = analyze(model, {"low": TASKS["low"]}, out=tmp_path / "b",
                  config={"stages": ["fisher", "pruning", "conflicts", "qkov"], "progress": False})
    assert res.status == {"fisher": "ok", "pruning": "ok", "conflicts": "skipped", "qkov": "skipped"}
    assert "two tasks" in res.errors["conflicts"]


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": {}}, "non-empty"),
    ({"config": {"stages": ["nope"]}}, "unknown stage"),
    ({"config": {"colour": 1}}, "unknown key"),
    ({"config": {"sparsity": 2.0}}, "sparsity"),
])
def test_bad_input_before_any_stage(tmp_path, kwargs, match):
    model = tm.llama(torch.float32, layers=2, seed=3)
    args = {"tasks": TASKS, **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        analyze(model, args.pop("tasks"), out=tmp_path / "c", **args)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_cli_analyze(tmp_path):
    tm.llama(torch.float32, layers=2, seed=3).save_pretrained(tmp_path / "model")
    for name, batches in TASKS.items():
        rows = [{"input_ids": r.tolist()} for b in batches for r in b["input_ids"]]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["analyze", "--model", str(tmp_path / "model"), "--task", f"low={tmp_path / 'low.jsonl'}",
               "--task", f"high={tmp_path / 'high.jsonl'}", "--stages", "fisher,importance,pruning,report",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert {s["status"] for s in doc["stages"].values()} == {"ok"}
    assert main(["analyze", "--model", str(tmp_path / "model"), "--task", "low", "--out", str(tmp_path / "x")]) != 0
    assert not (tmp_path / "x").exists()
