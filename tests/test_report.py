"""The "report" consumer (CSV + summary + plots of one or two Fishers), classify_units, and the
model card's Summary section. Real tiny models (GQA Llama, GPT-2 with fused c_attn), real
collection, real files; the only stand-in is a missing matplotlib."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch

from hf_fisher import analysis, plugins
from hf_fisher.analysis.importance import classify_units
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers import report as report_mod
from hf_fisher.consumers.report import CSV_COLUMNS, PLOTS_HINT, summary_markdown, write_report
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_METRICS = ("group_fisher_q", "group_fisher_k", "group_fisher_v", "group_fisher_o", "head_total")


def batches(seed):
    return [tm.padded_batch([5, 7, 6], seed=seed), tm.padded_batch([4, 6], seed=seed + 10)]


@pytest.fixture(scope="module")
def llama():
    return tm.llama(kv_heads=2)  # 4 query heads, 2 kv-heads


@pytest.fixture(scope="module")
def runs(llama):
    """Group Fishers of two tasks and the parameter-level Fisher of task "a" (same data)."""
    import hf_fisher

    a = hf_fisher.collect(llama, batches(0), reduction="group", task="a", progress=False)
    b = hf_fisher.collect(llama, batches(1), reduction="group", task="b", progress=False)
    a_param = hf_fisher.collect(llama, batches(0), reduction="param", task="a", progress=False)
    return a, b, a_param


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def table(rows, run):
    """``{(layer, head, metric): float(value)}`` of one run."""
    return {(r[1], r[2], r[3]): float(r[4]) for r in rows if r[0] == run}


def by_hand(param_fisher, slices):
    """Σ F over slices, from the parameter-level tensors (independent of slice_value and groups)."""
    return sum(float(param_fisher[s.param][s.index()].sum()) for s in slices)


# ---------------------------------------------------------------------------- one run
def test_single_run_files_and_exact_values(tmp_path, runs):
    a, _, a_param = runs
    out = tmp_path / "rep"
    res = write_report(a, out)
    assert res.out == out and res.notes == []
    expected = {"report.csv", "summary.txt", "heads_qkvo_run1.png", "mlp_per_layer_run1.png", "head_uncertainty_run1.png"}
    assert set(res.files) == expected and {p.name for p in out.iterdir()} == expected
    assert all((out / f).stat().st_size > 0 for f in expected)
    assert (out / "heads_qkvo_run1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    header, rows = read_csv(out / "report.csv")
    assert tuple(header) == CSV_COLUMNS == ("run", "layer", "head", "metric", "value")
    assert all(len(r) == 5 and r[0] == "a" for r in rows)
    t = table(rows, "a")
    assert t[("global", "all", "trace")] == a.total()
    n_params = sum(math.prod(s) for s in a.param_shapes.values())
    assert t[("global", "all", "trace_per_param")] == a.total() / n_params
    assert t[("global", "all", "samples")] == a.counts.samples == 5
    for layer, v in a.per_layer().items():
        assert t[("other" if layer is None else str(layer), "all", "layer_total")] == v
    ci = a.channel_importance()
    for layer in (0, 1):
        assert t[(str(layer), "all", "mlp_total")] == sum(v for (lay, _), v in ci.items() if lay == layer)

    heads = a.head_importance()
    n = a.counts.samples
    tq = float(__import__("scipy").stats.t.ppf(0.975, df=n - 1))
    assert len(heads) == 8
    for h in a.layout.heads():
        L, H, kv = str(h.layer), str(h.head), h.kv_head
        att = f"model.layers.{h.layer}.self_attn."
        # equal to the artifact's values: the head's own groups (Q rows, O columns), its kv-head's K/V groups
        assert t[(L, H, "head_total")] == heads[(h.layer, h.head)]
        assert t[(L, H, "group_fisher_q")] == float(a[att + "q_proj.weight"][h.head])
        assert t[(L, H, "group_fisher_k")] == float(a[att + "k_proj.weight"][kv])
        assert t[(L, H, "group_fisher_v")] == float(a[att + "v_proj.weight"][kv])
        assert t[(L, H, "group_fisher_o")] == float(a[att + "o_proj.weight"][h.head])
        # and, independently, the sums of the parameter-level Fisher over the layout's slices
        for role in "qkvo":
            assert t[(L, H, f"group_fisher_{role}")] == pytest.approx(by_hand(a_param, getattr(h, role)), rel=1e-9)
        q, k, v, o = (t[(L, H, f"group_fisher_{r}")] for r in "qkvo")
        assert t[(L, H, "head_total")] == pytest.approx(q + o + (k + v) * 2 / 4, rel=1e-12)
        # conservative standard-error bound: Σ of the groups' standard errors, K/V scaled by H_kv/H
        se = {name: torch.sqrt(a.variances[att + name] / n) for name in ("q_proj.weight", "k_proj.weight",
                                                                          "v_proj.weight", "o_proj.weight")}
        bound = float(se["q_proj.weight"][h.head] + se["o_proj.weight"][h.head]
                      + (se["k_proj.weight"][kv] + se["v_proj.weight"][kv]) * 0.5)
        assert t[(L, H, "head_total_stderr_bound")] == pytest.approx(bound, rel=1e-12)
        assert t[(L, H, "head_total_ci95_halfwidth_bound")] == pytest.approx(tq * bound, rel=1e-12)

    text = (out / "summary.txt").read_text()
    assert res.summary == text
    for needle in ("Curvature scale", f"trace (sum of all Fisher values) = {a.total():.4e}", "Layers ranked",
                   "Hotspots: top 10 heads", "Hotspots: top 10 MLP channels", "Critical heads", "Compressible heads",
                   "Critical MLP channels", "value > 2 x mean head value", "at most 5 % of the head mass",
                   "se bound", "heads_qkvo_run1.png"):
        assert needle in text, needle
    top = max(heads, key=heads.get)
    assert f"1. layer {top[0]} head {top[1]}: {heads[top]:.4e}" in text
    assert "Comparison" not in text


def test_gpt2_fused_c_attn_slices(tmp_path):
    import hf_fisher

    model = tm.gpt2()
    f = hf_fisher.collect(model, batches(2), reduction="group", task="g", progress=False)
    fp = hf_fisher.collect(model, batches(2), reduction="param", task="g", progress=False)
    res = write_report(f, tmp_path / "gpt2", k=3)
    _, rows = read_csv(tmp_path / "gpt2" / "report.csv")
    t = table(rows, "g")
    heads = f.head_importance()
    for h in f.layout.heads():
        L, H = str(h.layer), str(h.head)
        assert t[(L, H, "head_total")] == heads[(h.layer, h.head)]
        assert {s.param.rsplit(".", 2)[-2] for s in h.q + h.k + h.v} == {"c_attn"}  # fused weight + bias
        for role in "qkvo":
            assert t[(L, H, f"group_fisher_{role}")] == pytest.approx(by_hand(fp, getattr(h, role)), rel=1e-9)
        q, k, v, o = (t[(L, H, f"group_fisher_{r}")] for r in "qkvo")
        assert t[(L, H, "head_total")] == pytest.approx(q + k + v + o, rel=1e-12)  # MHA: every kv-head is its own
    assert "Hotspots: top 3 heads" in res.summary


# ---------------------------------------------------------------------------- two runs
def test_two_runs_from_artifact_folders(tmp_path, runs):
    pa, pb = runs[0].save_pretrained(tmp_path / "fa"), runs[1].save_pretrained(tmp_path / "fb")
    a, b = Fisher.from_pretrained(pa), Fisher.from_pretrained(pb)  # the values as the artifacts hold them
    res = write_report([str(pa), pb], tmp_path / "two", names=["math", "code"])
    assert "heads_scatter.png" in res.files and (tmp_path / "two" / "heads_scatter.png").stat().st_size > 0
    assert {"heads_qkvo_run1.png", "heads_qkvo_run2.png"} <= set(res.files)
    _, rows = read_csv(tmp_path / "two" / "report.csv")
    assert {r[0] for r in rows} == {"math", "code"}
    ta, tb = table(rows, "math"), table(rows, "code")
    assert ta[("global", "all", "trace")] == a.total() and tb[("global", "all", "trace")] == b.total()
    hb = b.head_importance()
    assert all(tb[(str(u[0]), str(u[1]), "head_total")] == v for u, v in hb.items())
    c = analysis.compare(a, b, k=10)
    text = res.summary
    assert 'Comparison: "math" vs "code"' in text
    assert f"cosine {c['cosine']:.4f}, Pearson {c['pearson']:.4f}, Spearman {c['spearman']:.4f}" in text
    assert f"top-10 overlap {c['topk_overlap']:.3f}" in text


def test_without_matplotlib_csv_and_text_still_written(tmp_path, runs, monkeypatch):
    a, b, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "noplots"
    res = write_report([a, b], out)
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "summary.txt"] == sorted(res.files)
    assert any(PLOTS_HINT in n for n in res.notes) and PLOTS_HINT == 'pip install "hf-fisher[plots]"'
    assert PLOTS_HINT in (out / "summary.txt").read_text() and "Comparison" in res.summary
    header, rows = read_csv(out / "report.csv")
    assert tuple(header) == CSV_COLUMNS
    assert {r[0] for r in rows} == {"a", "b"}  # default run names: the tasks
    assert 'Run "a"' in res.summary and 'Run "b"' in res.summary


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(tmp_path, runs, monkeypatch):
    a, b, _ = runs
    out = tmp_path / "out"
    no_layout = a._replace(layout=None)
    not_artifact = tmp_path / "empty"
    not_artifact.mkdir()
    cases = [
        ([a, b, a], {}, "one or two"),
        ([], {}, "one or two"),
        (no_layout, {}, "no model layout"),
        ([a, no_layout], {}, "no model layout"),
        (not_artifact, {}, "not a readable Fisher artifact"),
        ([a, tmp_path / "missing"], {}, "not a folder"),
        (42, {}, "expected a Fisher"),
        ([a, b], {"names": ["x"]}, "names"),
        ([a, b], {"names": ["x", "x"]}, "names must differ"),
        (a, {"k": 0}, "k must be"),
    ]
    for fishers, kwargs, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            write_report(fishers, out, **kwargs)
        assert not out.exists(), (fishers, kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folder either

    # an existing, non-empty out: refused unless overwrite=True (and never when it holds other files)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # plots are not the point here (and are slow)
    first = write_report(a, out, names=["first"])
    (out / "old_plot.png").write_bytes(b"png of an earlier report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InvalidInputError, match="overwrite"):
        write_report(b, out)
    with pytest.raises(InvalidInputError, match="one or two"):  # checked before out is touched
        write_report([a, b, a], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = write_report(b, out, overwrite=True, names=["second"])
    assert second.summary != first.summary and 'Run "second"' in (out / "summary.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "summary.txt"]  # replaced as a whole
    (out / "notes.md").write_text("mine")
    with pytest.raises(InvalidInputError, match="notes.md"):
        write_report(a, out, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and 'Run "second"' in (out / "summary.txt").read_text()


# ---------------------------------------------------------------------------- classify_units
def hand_built(model):
    """Parameter-level Fisher of ``model`` with chosen values: every element 1, except layer 1
    head 2's Q rows (10: dominant head), layer 0's kv-head 0 and its heads 0, 1 (1e-9: near-zero
    heads), layer 0 channel 5 (gate row 100: dominant channel), layer 1 channels 0-3 (1e-9)."""
    mean = {n: torch.ones(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    a0, a1, m0, m1 = ("model.layers.0.self_attn.", "model.layers.1.self_attn.", "model.layers.0.mlp.",
                      "model.layers.1.mlp.")
    mean[a1 + "q_proj.weight"][16:24] = 10.0
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
        mean[a0 + name][0:16 if name == "q_proj.weight" else 8] = 1e-9
    mean[a0 + "o_proj.weight"][:, 0:16] = 1e-9
    mean[m0 + "gate_proj.weight"][5] = 100.0
    for name, axis in (("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)):
        mean[m1 + name].narrow(axis, 0, 4).fill_(1e-9)
    return Fisher(mean, None, reduction="param", groups=None,
                  param_shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
                  counts=Counts(samples=10, tokens=100), metadata=FisherMetadata(task="hand", reduction="param"),
                  layout=plugins.model_layout(model))


def test_classify_units_on_a_hand_built_fisher(llama):
    f = hand_built(llama)
    heads = classify_units(f, unit="heads")
    assert heads.of("critical") == [(1, 2)]
    assert set(heads.of("compressible")) == {(0, 0), (0, 1)}
    assert heads.counts() == {"critical": 1, "compressible": 2, "ordinary": 5}
    th = heads.thresholds
    assert th["rule"] == "factor" and th["critical_factor"] == 2.0 and th["compressible_share"] == 0.05
    assert th["total"] == pytest.approx(sum(f.head_importance().values()))
    assert th["critical_above"] == pytest.approx(2.0 * th["total"] / 8)
    assert th["compressible_mass"] <= 0.05 * th["total"]
    # baseline head: 256 (Q) + 256 (O) + (256 + 256) / 2 (K, V shared by 2 heads); dominant: Q = 2560
    assert heads.values[(0, 2)] == pytest.approx(768.0) and heads.values[(1, 2)] == pytest.approx(3072.0)
    share = classify_units(f, unit="heads", critical_share=0.3)
    assert share.of("critical") == [(1, 2)] and share.thresholds["rule"] == "share"

    ch = classify_units(f, unit="channels", compressible_share=0.005)
    assert ch.of("critical") == [(0, 5)]
    assert set(ch.of("compressible")) == {(1, c) for c in range(4)}
    assert len(ch.labels) == 80 and ch.counts()["ordinary"] == 75

    md = summary_markdown(f, k=3)
    assert "**Critical heads**: 1 of 8" in md and "**Compressible heads**: 2 of 8" in md
    assert "layer 1 head 2 = 3.0720e+03" in md and "**Critical MLP channels**: 1 of 80" in md


def test_classify_units_bad_arguments(runs):
    a = runs[0]
    bad = [
        ({"unit": "layers"}, "unit must be one of"),
        ({"compressible_share": 0.0}, "compressible_share"),
        ({"compressible_share": 1.5}, "compressible_share"),
        ({"critical_share": 1.0}, "critical_share"),
        ({"critical_factor": -1.0}, "critical_factor"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            classify_units(a, **kwargs)
    with pytest.raises(InvalidInputError, match="layout"):
        classify_units(a._replace(layout=None))


# ---------------------------------------------------------------------------- card + registration
def test_artifact_card_has_a_summary_section(tmp_path, runs):
    a = runs[0]
    card = (a.save_pretrained(tmp_path / "art") / "README.md").read_text()
    assert "## Summary" in card and "**Critical heads**" in card and "**Compressible MLP channels**" in card
    assert summary_markdown(a) in card
    plain = (a._replace(layout=None).save_pretrained(tmp_path / "plain") / "README.md").read_text()
    assert "## Summary" not in plain and "## Fisher per layer" in plain


def test_registered_as_consumer():
    seen = {}
    report_mod.hf_fisher_register_consumers(lambda name, fn: seen.setdefault(name, fn))
    assert seen == {"report": write_report}
