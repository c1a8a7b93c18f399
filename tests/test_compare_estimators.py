"""compare_estimators: every method on the same data, numbers checked against the methods run alone."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import hf_fisher
from hf_fisher.cli import main
from hf_fisher.consumers.compare_estimators import METHODS, compare_estimators
from hf_fisher.demo import word_tokenizer
from hf_fisher.errors import EmptyDataError, InvalidInputError

import tiny_models as tm


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tm.VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.randint(3, tm.VOCAB, (2, 5), generator=g)}]


@pytest.fixture(scope="module")
def model():
    return tm.llama(torch.float64)


@pytest.fixture(scope="module")
def comparison(model):
    return compare_estimators(model, iter(_batches()), progress=False)  # an iterator: materialised once


def test_every_method_runs_and_traces_match_the_methods_alone(model, comparison):
    assert [r["method"] for r in comparison.rows] == list(METHODS)
    assert all(r["status"] == "ok" and r["error"] is None for r in comparison.rows)
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] >= 0 for r in comparison.rows)
    emp = hf_fisher.collect(model, _batches(), reduction="group", progress=False)
    assert comparison.row("empirical")["trace"] == pytest.approx(emp.total(), rel=1e-12)
    kf = hf_fisher.collect(model, _batches(), estimator="kfac", progress=False)
    assert comparison.row("kfac")["trace"] == pytest.approx(kf.to_diagonal().total(), rel=1e-12)
    true = hf_fisher.collect(model, _batches(), estimator="true", reduction="group", progress=False)
    assert comparison.row("true")["trace"] == pytest.approx(true.total(), rel=1e-12)  # same seed, same draws
    spec = comparison.row("spectrum")
    assert spec["details"]["trace_exact"] == pytest.approx(emp.total(), rel=1e-9)  # tr F = sum of its diagonal
    assert spec["trace"] is not None and spec["trace_stderr"] > 0
    assert len(spec["top_eigenvalues"]) == 5 and spec["top_eigenvalues"] == sorted(spec["top_eigenvalues"], reverse=True)
    assert spec["condition_number"] >= 1
    assert comparison.row("empirical")["top_eigenvalues"] is None


def test_kfac_eigenvalues_are_the_factor_products(comparison):
    kf = comparison.results["kfac"]
    lam = []
    for e in kf.eigendecompose().values():
        lam.append(torch.outer(e.g, e.a).reshape(-1))
    lam = torch.cat(lam).sort(descending=True).values
    row = comparison.row("kfac")
    assert row["top_eigenvalues"] == pytest.approx(lam[:5].tolist(), rel=1e-12)
    pos = lam[lam > 10 * lam.numel() * torch.finfo(torch.float64).eps * lam[0]]
    assert row["condition_number"] == pytest.approx(float(pos[0] / pos[-1]), rel=1e-12)


def test_agreement(comparison):
    for m in ("empirical", "true", "kfac"):
        p = comparison.pair(m, m)
        assert p["pearson"] == pytest.approx(1.0) and p["spearman"] == pytest.approx(1.0) and p["topk_overlap"] == 1.0
    p = comparison.pair("kfac", "empirical")
    assert -1 <= p["pearson"] <= 1 and 0 <= p["topk_overlap"] <= 1 and p["k"] == 20 and p["unit"] == "group"
    assert len(comparison.agreement) == 6  # 3 diagonal methods: 3 self pairs + 3 pairs; spectrum has no diagonal


def test_a_failing_method_is_reported_and_the_others_still_run(model):
    r = compare_estimators(model, _batches(), methods=["empirical", "true", "kfac"], progress=False,
                           options={"true": {"mc_samples": 0}})
    bad = r.row("true")
    assert bad["status"] == "failed" and "mc_samples" in bad["error"] and bad["trace"] is None
    assert r.row("empirical")["status"] == "ok" and r.row("kfac")["status"] == "ok"
    assert {(p["a"], p["b"]) for p in r.agreement} == {("empirical", "empirical"), ("empirical", "kfac"), ("kfac", "kfac")}
    md = r.to_markdown()
    assert "failed" in md and "mc_samples" in md


def test_markdown_and_json_name_every_method(comparison, tmp_path):
    md = comparison.to_markdown()
    for m in METHODS:
        assert f"| {m} |" in md
    d = json.loads(comparison.to_json(tmp_path / "c.json"))
    assert [r["method"] for r in d["rows"]] == list(METHODS)
    assert json.loads((tmp_path / "c.json").read_text()) == d
    assert d["rows"][0]["trace"] == pytest.approx(comparison.rows[0]["trace"])


def test_param_reduction(model):
    r = compare_estimators(model, _batches(), methods="empirical,kfac", reduction="param", progress=False)
    p = r.pair("empirical", "kfac")
    assert p["unit"] == "element" and p["num_elements"] > 1000
    assert r.row("empirical")["trace"] == pytest.approx(hf_fisher.collect(model, _batches(), progress=False).total())


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["empirical", "lanczos"]}, "unknown method"),
    ({"methods": []}, "non-empty"),
    ({"methods": ["kfac", "kfac"]}, "more than once"),
    ({"k": 0}, "k must be"),
    ({"reduction": "layer"}, "reduction"),
    ({"methods": ["empirical"], "options": {"kfac": {}}}, "not among the methods"),
])
def test_bad_arguments_are_refused_before_work(model, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        compare_estimators(model, _batches(), progress=False, **kwargs)


def test_empty_data(model):
    with pytest.raises(EmptyDataError):
        compare_estimators(model, [], progress=False)


def test_registered_as_consumer():
    from hf_fisher.consumers import compare_estimators as mod

    seen = {}
    mod.hf_fisher_register_consumers(lambda name, fn: seen.setdefault(name, fn))
    assert seen == {"compare_estimators": compare_estimators}


LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang", "cats and dogs play in the park"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    m = tm.llama(torch.float32)
    m.save_pretrained(root / "tiny-llama")
    word_tokenizer(sorted({w for line in LINES for w in line.split()})).save_pretrained(root / "tiny-llama")
    (root / "lines.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return root


def test_cli_end_to_end(workspace, capsys):
    out = workspace / "cmp.json"
    code = main(["compare-estimators", "--model", str(workspace / "tiny-llama"), "--data", str(workspace / "lines.txt"),
                 "--methods", "empirical,kfac,spectrum", "--batch-size", "2", "--k", "3", "--top-k", "5",
                 "--json", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    for m in ("empirical", "kfac", "spectrum"):
        assert f"| {m} | ok |" in text
    d = json.loads(out.read_text())
    assert [r["method"] for r in d["rows"]] == ["empirical", "kfac", "spectrum"]
    assert len(d["rows"][2]["top_eigenvalues"]) == 3 and d["agreement"][0]["k"] == 5
    assert math.isclose(d["rows"][0]["trace"], d["rows"][2]["details"]["trace_exact"], rel_tol=1e-5)


def test_cli_bad_methods_refused_before_loading(workspace, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(workspace / "tiny-llama", broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # loading it would fail differently
    args = ["compare-estimators", "--model", str(broken), "--data", str(workspace / "lines.txt"), "--no-progress"]
    assert main([*args, "--methods", "empirical,lanczos"]) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and "lanczos" in err and "could not load" not in err
    assert main([*args, "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err
    assert main([*args, "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--methods", "empirical"]) == 2  # a good --methods reaches the weights: they are broken
    assert "could not load" in capsys.readouterr().err
