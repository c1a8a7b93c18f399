"""Issue 21, circuits: the sample-conflict test on noise and on planted conflicts, its effect-size
floor and its one set of defaults; QK-OV refusing empty data; the reports' and circuit commands'
plots as a reader sees them."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from hf_fisher.collection.gradients import GradientStore
from hf_fisher.consumers.circuits.conflicts import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE, sample_conflicts

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight")
N = 16


def structured_noise(seed: int, n: int = N, dim: int = 4096, rank: int = 24, decay: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tasks' gradients from ONE mean-zero distribution, independent samples: what real
    per-sample gradients look like to the test (a few dominant directions with a decaying
    spectrum, heavy-tailed sample norms, uneven loadings on the directions, coordinates of very
    different scales), so unrelated samples have cosines far from 0 though nothing conflicts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, rank, generator=g, dtype=torch.float64) / torch.arange(1, rank + 1, dtype=torch.float64) ** decay
    coord = torch.exp(torch.randn(dim, generator=g, dtype=torch.float64))

    def draw():
        z = torch.randn(n, rank, generator=g, dtype=torch.float64)
        z = z * torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64)) * torch.exp(
            0.5 * torch.randn(n, rank, generator=g, dtype=torch.float64))
        return (z @ w.T + 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)) * coord

    return draw(), draw()


def stores(a: torch.Tensor, b: torch.Tensor) -> tuple[GradientStore, GradientStore]:
    half = a.shape[1] // 2

    def store(x, batch):
        return GradientStore({NAMES[0]: x[:, :half].reshape(len(x), -1, 4), NAMES[1]: x[:, half:].reshape(len(x), -1, 4)},
                             [(batch, i) for i in range(len(x))], dtype=x.dtype)

    return store(a, 0), store(b, 1)


@pytest.mark.parametrize("seed", range(8))
def test_pure_noise_gives_no_discovery(seed):
    """Independent samples of one distribution: nothing may be called a conflict (under the
    complete null the FDR is the chance of any discovery, <= alpha; these seeds give none), even
    with the effect-size floor off, though a third of the cosines are below -0.1."""
    a, b = structured_noise(seed)
    r = sample_conflicts(None, *stores(a, b), min_effect_size=0.0, progress=False)
    assert float((r.cosine["overall"] < -0.1).double().mean()) > 0.2  # far from 0: a coordinate null would fire
    assert sum(int(s.sum()) for s in r.significant.values()) == 0
    assert r.claims == [] and r.clusters == [] and r.recommendations["samples"] == []


def large_layer_noise(seed: int, dim: int = 590_000, rank: int = 16, share: float = 0.04):
    """Independent samples of a 590k-coordinate layer (the issue's MiniLM case): isotropic noise
    plus a shared low-rank part carrying ``share`` of the energy, so cosines are near zero
    (sd ~ 0.01) yet eight times wider than a coordinate permutation's (1 / sqrt(dim) ~ 0.0013)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, rank, generator=g) / math.sqrt(rank)

    def draw():
        return (math.sqrt(share) * torch.randn(N, rank, generator=g) @ w.T
                + math.sqrt(1 - share) * torch.randn(N, dim, generator=g))

    return draw(), draw()


def test_near_zero_cosines_of_a_large_layer_are_not_conflicts():
    """The old coordinate-permutation test called about half of these pairs conflicts (mean
    cosine ~ 0); now none, by the test alone and by the effect-size floor."""
    a, b = large_layer_noise(0)
    r = sample_conflicts(None, *stores(a, b), progress=False)
    cos = r.cosine["overall"]
    assert float(cos.abs().max()) < 0.05 and float(cos.std()) > 5 / math.sqrt(590_000)
    assert sum(int(s.sum()) for s in r.significant.values()) == 0
    r0 = sample_conflicts(None, *stores(a, b), min_effect_size=0.0, progress=False)
    assert sum(int(s.sum()) for s in r0.significant.values()) == 0


def plant(a: torch.Tensor, b: torch.Tensor, strength: float = 1.0, row: bool = True):
    """Planted conflicts: four lone pairs, a 3 x 3 cluster (A 8-10 against B 8-10 along one
    direction) and (``row``) sample 14 of A against every sample of B. Returns A, B and the truth."""
    a, b = a.clone(), b.clone()
    truth = torch.zeros(N, N, dtype=torch.bool)
    for i, j in ((0, 3), (2, 7), (4, 1), (6, 12)):
        b[j] = -strength * a[i] * b[j].norm() / a[i].norm() + 0.5 * b[j]
        truth[i, j] = True
    d = a[8] / a[8].norm()
    for i in (8, 9, 10):
        a[i] = d * a[i].norm() + 0.5 * a[i]
    for j in (8, 9, 10):
        b[j] = -strength * d * b[j].norm() + 0.5 * b[j]
    truth[8:11, 8:11] = True
    if row:
        for j in range(N):
            b[j] = b[j] - 1.2 * strength * a[14] * b[j].norm() / a[14].norm()
        truth[14, :] = True
    return a, b, truth


@pytest.mark.parametrize("seed", range(3))
def test_planted_conflicts_are_found_and_nothing_else(seed):
    g = torch.Generator().manual_seed(100 + seed)
    a = torch.randn(N, 8192, generator=g, dtype=torch.float64)
    b = torch.randn(N, 8192, generator=g, dtype=torch.float64)
    a, b, truth = plant(a, b)
    r = sample_conflicts(None, *stores(a, b), progress=False)
    assert torch.equal(r.significant["overall"], truth)
    assert bool((r.cosine["overall"][truth] < -0.3).all())
    clusters = [(c.samples_a, c.samples_b) for c in r.clusters]
    assert clusters == [([0, 2, 4, 6, 8, 9, 10, 14], list(range(N)))]  # sample 14 joins every B sample into one
    samples = {(s["task"], s["sample"]): s["action"] for s in r.recommendations["samples"]}
    assert samples[("A", 14)] == "filter"
    assert any(c.startswith("sample 14 of task A conflicts with sample ") for c in r.claims)


def test_planted_conflicts_in_structured_noise():
    """Planted pairs among structured gradients (about 30 effective directions): they stand out
    of a null whose cosines spread widely (sd ~ 0.25): most are found, the false discoveries
    stay within the FDR."""
    a, b = structured_noise(7, dim=8192, rank=64, decay=0.5)
    a, b, truth = plant(a, b, strength=3.0, row=False)
    r = sample_conflicts(None, *stores(a, b), progress=False)
    assert bool((r.cosine["overall"][truth] < -0.75).all())
    sig = r.significant["overall"]
    found, false = int((sig & truth).sum()), int((sig & ~truth).sum())
    assert found >= 0.8 * int(truth.sum()) and false <= 0.1 * (found + false)  # 11 of 13, 1 false here


def test_the_effect_size_floor_drops_significant_but_tiny_conflicts():
    """A weak planted conflict (cos ~ -0.03) in a large layer is statistically clear; the floor
    (default 0.05) keeps it out, a floor of 0 or 0.02 lets it in."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N, 200_000, generator=g, dtype=torch.float64)
    b = torch.randn(N, 200_000, generator=g, dtype=torch.float64)
    b[5] = b[5] - 0.03 * a[2] * b[5].norm() / a[2].norm()
    sa, sb = stores(a, b)
    r = sample_conflicts(None, sa, sb, progress=False)
    cos = float(r.cosine["overall"][2, 5])
    assert -0.04 < cos < -0.02 and float(r.p_adjusted["overall"][2, 5]) < 1e-6
    assert r.min_effect_size == DEFAULT_MIN_EFFECT_SIZE == 0.05 and not bool(r.significant["overall"].any())
    assert "cosine <= -0.05" in r.recommendations["actions"][0]
    for floor in (0.0, 0.02):
        rf = sample_conflicts(None, sa, sb, min_effect_size=floor, progress=False)
        assert rf.significant["overall"].nonzero().tolist() == [[2, 5]]
    assert json.loads(r.to_json())["min_effect_size"] == 0.05
    assert sample_conflicts(None, sa, sb, min_effect_size=0.04, progress=False).significant["overall"].nonzero().tolist() == []


def test_one_set_of_defaults_for_api_analyze_and_cli():
    from hf_fisher.cli import build_parser
    from hf_fisher.consumers.analyze import AnalysisConfig

    sig = inspect.signature(sample_conflicts).parameters
    assert sig["alpha"].default == DEFAULT_ALPHA and sig["min_effect_size"].default == DEFAULT_MIN_EFFECT_SIZE
    assert "n_permutations" not in sig and "seed" not in sig
    cfg = AnalysisConfig()
    assert (cfg.alpha, cfg.min_effect_size) == (DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE)
    args = build_parser().parse_args(["conflicts", "--model", "m", "--task-a", "a", "--task-b", "b", "--out", "o"])
    assert (args.alpha, args.min_effect_size) == (DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE)
    assert not hasattr(args, "permutations")


def test_analyze_passes_its_alpha_and_floor_to_the_conflicts_stage(tmp_path):
    from hf_fisher.consumers.analyze import analyze

    import tiny_models as tm

    model = tm.llama(kv_heads=2, layers=2)
    tasks = {"a": [tm.padded_batch([7, 5, 6], seed=1)], "b": [tm.padded_batch([6, 8, 4], seed=2)]}
    res = analyze(model, tasks, out=tmp_path / "a",
                  config={"stages": ["conflicts"], "alpha": 0.1, "min_effect_size": 0.2, "progress": False})
    assert res.status == {"conflicts": "ok"}
    data = json.loads((tmp_path / "a" / "conflicts" / "conflicts.json").read_text())
    assert data["alpha"] == 0.1 and data["min_effect_size"] == 0.2


def test_analyze_and_the_api_give_the_same_conflicts(tmp_path):
    """The issue: analyze (200 permutations) and the CLI (1000) disagreed on the same data; now one
    deterministic test with one set of defaults."""
    from hf_fisher.consumers.analyze import analyze

    import tiny_models as tm

    model = tm.llama(kv_heads=2, layers=2)
    tasks = {"a": [tm.padded_batch([7, 5, 6, 8], seed=1)], "b": [tm.padded_batch([6, 8, 4, 5], seed=2)]}
    analyze(model, tasks, out=tmp_path / "x", config={"stages": ["conflicts"], "progress": False})
    data = json.loads((tmp_path / "x" / "conflicts" / "conflicts.json").read_text())
    r = sample_conflicts(model, tasks["a"], tasks["b"], progress=False)
    assert data["p_values"] == {k: v.tolist() for k, v in r.p_values.items()}
    assert data["significant"] == {k: v.tolist() for k, v in r.significant.items()}
    assert (data["alpha"], data["min_effect_size"]) == (DEFAULT_ALPHA, DEFAULT_MIN_EFFECT_SIZE)


def test_cli_refuses_a_bad_floor_before_loading_the_model(tmp_path):
    from test_cli_bad_input import hf_fisher

    (tmp_path / "a.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    (tmp_path / "b.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    for flag, value in (("--min-effect-size", "1.5"), ("--min-effect-size", "-0.1"), ("--permutations", "50")):
        proc = hf_fisher("conflicts", "--model", str(tmp_path / "no-such-model"), "--task-a", "a.jsonl", "--task-b",
                         "b.jsonl", "--out", "out", flag, value, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert flag in proc.stderr and "no-such-model" not in proc.stderr  # before the model folder is looked at
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- empty data


def _empty_cases():
    import tiny_models as tm

    unlabeled = tm.padded_batch([5, 4], seed=9)
    unlabeled["labels"][:] = -100
    all_pad = tm.padded_batch([5, 4], seed=9)
    all_pad["attention_mask"][:] = 0
    del all_pad["labels"]  # labels from input_ids, every position padding
    return {"no batch": [], "all labels -100": [unlabeled], "all padding": [all_pad]}


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("case", ["no batch", "all labels -100", "all padding", "empty store"])
@pytest.mark.parametrize("consumer", ["qkov", "conflicts"])
def test_empty_or_unlabelled_task_is_refused_before_any_work(monkeypatch, consumer, case, side):
    from hf_fisher.collection import gradients as gs
    from hf_fisher.consumers.circuits import conflicts as cf
    from hf_fisher.consumers.circuits import qkov as qk
    from hf_fisher.errors import EmptyDataError

    import tiny_models as tm

    model = tm.llama(kv_heads=2, layers=2)
    good = [tm.padded_batch([7, 5, 6], seed=1)]
    if case == "empty store":
        names = gs.attention_params(model, __import__("hf_fisher").plugins.model_layout(model), None)
        params = dict(model.named_parameters())
        empty = GradientStore({n: torch.zeros((0, *params[n].shape)) for n in names}, [])
        good = gs.store_gradients(model, good, progress=False)
    else:
        empty = _empty_cases()[case]

    def boom(*a, **k):
        raise AssertionError("gradients were computed before the data was checked")

    mod = qk if consumer == "qkov" else cf
    monkeypatch.setattr(mod, "store_gradients", boom)
    fn = qk.qkov_interference if consumer == "qkov" else cf.sample_conflicts
    a, b = (empty, good) if side == "a" else (good, empty)
    with pytest.raises(EmptyDataError, match=f"task {side.upper()}"):
        fn(model, a, b, progress=False)


def test_cli_refuses_an_empty_task_file(tmp_path):
    from test_cli_bad_input import hf_fisher

    import tiny_models as tm

    tm.llama(torch.float32, layers=2).save_pretrained(tmp_path / "model")
    (tmp_path / "a.jsonl").write_text('{"input_ids": [5, 6, 7]}\n')
    (tmp_path / "b.jsonl").write_text("")
    for command in ("qkov", "conflicts"):
        proc = hf_fisher(command, "--model", "model", "--task-a", "a.jsonl", "--task-b",
                         "b.jsonl", "--out", "out", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "b.jsonl" in proc.stderr and not (tmp_path / "out").exists(), proc.stderr


# --------------------------------------------------------------------------- plots a reader sees


def _is_int_ticks(axis):
    locs = list(axis.get_ticklocs())
    return bool(locs) and all(float(x).is_integer() for x in locs)


def _tick_text(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


@pytest.fixture(scope="module")
def qkov_result():
    from hf_fisher.consumers.circuits.qkov import qkov_interference

    import tiny_models as tm

    m = tm.llama(kv_heads=2, layers=2)
    return qkov_interference(m, [tm.padded_batch([5, 7], seed=0)], [tm.padded_batch([6, 4], seed=1)],
                             task_names=("math", "code"), progress=False)


def test_qkov_heatmaps_are_readable(qkov_result, tmp_path):
    from PIL import Image

    figs = qkov_result.heatmap_figures()
    assert list(figs) == ["Q", "K", "V", "O"]
    for block, fig in figs.items():
        ax, cax = fig.axes
        assert "math" in ax.get_title() and "code" in ax.get_title() and f"{block} block" in ax.get_title()
        assert ax.get_xlabel() == "query head" and ax.get_ylabel() == "layer"
        assert _is_int_ticks(ax.xaxis) and _is_int_ticks(ax.yaxis)
        assert _tick_text(ax.xaxis) == ["0", "1", "2", "3"] and _tick_text(ax.yaxis) == ["0", "1"]
        assert "interference score" in cax.get_ylabel()
    paths = qkov_result.save_heatmaps(tmp_path)
    for p in paths:
        w, h = Image.open(p).size
        assert w >= 640 and h >= 400
    assert json.loads(qkov_result.to_json())["task_names"] == ["math", "code"]
    # another title on request
    assert "alpha vs beta" in qkov_result.heatmap_figures(("alpha", "beta"))["Q"].axes[0].get_title()


@pytest.fixture(scope="module")
def wide_runs():
    """Two Fishers of a 6-layer x 12-head LLaMA (72 heads), with variances."""
    import transformers as tf

    import hf_fisher

    import tiny_models as tm

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tm.VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=6,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=64, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).double().eval()
    data = [[tm.padded_batch([5, 7, 6], seed=s)] for s in (0, 1)]
    return [hf_fisher.collect(model, d, reduction="group", task=t, progress=False) for d, t in zip(data, ("math", "code"))]


def test_report_plots_are_readable(wide_runs, tmp_path):
    from PIL import Image

    from hf_fisher.consumers import report as rp

    runs = [rp._analyse(f, f.metadata.task) for f in wide_runs]
    figs = dict(rp.figures(runs, rp._matplotlib()))
    # heat maps: integer head and layer ticks, every colour bar labelled
    heat = figs["heads_qkvo_run1.png"]
    images = [ax for ax in heat.axes if ax.images]
    bars = [ax for ax in heat.axes if not ax.images]
    assert len(images) == 4 and len(bars) == 4
    for ax in images:
        assert _is_int_ticks(ax.xaxis) and _is_int_ticks(ax.yaxis) and ax.get_xlabel() == "query head"
        assert set(_tick_text(ax.yaxis)) == {str(x) for x in range(6)}
    assert all("Σ F over the head's" in ax.get_ylabel() for ax in bars)
    # the uncertainty plot of 72 heads: one readable label per layer (>= 8 pt), a minor tick per head
    unc = figs["head_uncertainty_run1.png"].axes[0]
    assert _tick_text(unc.xaxis) == [f"L{x}" for x in range(6)]
    assert all(t.get_fontsize() >= 8 for t in unc.xaxis.get_ticklabels())
    assert len(unc.xaxis.get_minorticklocs()) + len(unc.xaxis.get_majorticklocs()) == 72  # minor ones at majors drop
    # the scatter: a colour bar labelled "layer" with integer ticks, a legend for y = x
    sc, cbar = figs["heads_scatter.png"].axes
    assert cbar.get_ylabel() == "layer" and _tick_text(cbar.yaxis) == [str(x) for x in range(6)]
    assert _is_int_ticks(cbar.yaxis)
    assert [t.get_text() for t in sc.get_legend().get_texts()] == ["y = x"]
    assert "math" in sc.get_xlabel() and "code" in sc.get_ylabel()
    rp.write_report(wide_runs, tmp_path / "r")
    for name in figs:
        w, h = Image.open(tmp_path / "r" / name).size
        assert w >= 500 and h >= 400


def test_report_small_model_head_ticks_are_integers(tmp_path):
    """4 heads: the old heat maps put head ticks at -0.5, 0, 0.5, ..."""
    import hf_fisher
    from hf_fisher.consumers import report as rp

    import tiny_models as tm

    f = hf_fisher.collect(tm.llama(kv_heads=2), [tm.padded_batch([5, 7, 6], seed=0)], reduction="group", progress=False)
    figs = dict(rp.figures([rp._analyse(f, "a")], rp._matplotlib()))
    for ax in (ax for ax in figs["heads_qkvo_run1.png"].axes if ax.images):
        assert [float(x) for x in ax.get_xticks()] == [0.0, 1.0, 2.0, 3.0]
    unc = figs["head_uncertainty_run1.png"].axes[0]
    assert _tick_text(unc.xaxis)[:2] == ["L0 H0", "L0 H1"] and all(t.get_fontsize() >= 8 for t in unc.xaxis.get_ticklabels())


# --------------------------------------------------------------------------- per-head spectra in the report


def test_report_carries_the_per_head_spectral_metrics(tmp_path):
    import csv

    import hf_fisher
    from hf_fisher.consumers.report import SPECTRAL_METRICS, write_report
    from hf_fisher.consumers.spectrum import spectrum

    import tiny_models as tm

    model = tm.llama(kv_heads=2)
    data = [tm.padded_batch([5, 7, 6], seed=0), tm.padded_batch([4, 6], seed=10)]
    f = hf_fisher.collect(model, data, reduction="group", task="math", progress=False)
    spec = spectrum(model, data, blocks="head", k=1, hutchinson_probes=0, slq_vectors=0)
    res = write_report(f, tmp_path / "r", spectra=[spec])
    with open(tmp_path / "r" / "report.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    got = {(r[1], r[2], r[3]): r[4] for r in rows if r[3].startswith("spectral_")}
    assert len(got) == 2 * 4 * len(SPECTRAL_METRICS)  # 2 layers x 4 heads
    for layer in range(2):
        for head in range(4):
            block = spec.blocks[f"layer{layer}.head{head}"].metrics
            for metric, key in SPECTRAL_METRICS.items():
                value = got[(str(layer), str(head), metric)]
                assert (int(value) if metric == "spectral_rank" else float(value)) == block[key]
    top = max(spec.blocks.items(), key=lambda kv: kv[1].metrics["eigmax"])
    layer, head = top[0].removeprefix("layer").split(".head")
    assert f"1. layer {layer} head {head}: eigmax {top[1].metrics['eigmax']:.4e}" in res.summary
    assert "condition number" in res.summary and "energy(top 8)" in res.summary
    # without spectra the summary says why there are none, and the CSV has no spectral rows
    res2 = write_report(f, tmp_path / "r2")
    assert "not computed: they need per-sample gradients" in res2.summary
    assert "spectral_" not in (tmp_path / "r2" / "report.csv").read_text()


def test_report_refuses_spectra_that_do_not_fit(tmp_path):
    import hf_fisher
    from hf_fisher.consumers.report import write_report
    from hf_fisher.consumers.spectrum import spectrum
    from hf_fisher.errors import InvalidInputError

    import tiny_models as tm

    model = tm.llama(kv_heads=2)
    data = [tm.padded_batch([5, 7, 6], seed=0)]
    f = hf_fisher.collect(model, data, reduction="group", progress=False)
    layers_only = spectrum(model, data, blocks="layer", k=1, hutchinson_probes=0, slq_vectors=0)
    wide = tm.llama(kv_heads=2, layers=3)
    other = spectrum(wide, data, blocks="head", k=1, hutchinson_probes=0, slq_vectors=0)
    for spectra, match in (([layers_only], "no per-head blocks"), ([other], "does not have"),
                           (["x"], "SpectrumResult"), ([None, None], "one SpectrumResult")):
        with pytest.raises(InvalidInputError, match=match):
            write_report(f, tmp_path / "never", spectra=spectra)
        assert not (tmp_path / "never").exists()


def test_analyze_report_has_spectral_rows(tmp_path):
    from hf_fisher.consumers.analyze import analyze

    import tiny_models as tm

    model = tm.llama(kv_heads=2, layers=2)
    tasks = {"a": [tm.padded_batch([7, 5, 6], seed=1)], "b": [tm.padded_batch([6, 8, 4], seed=2)]}
    res = analyze(model, tasks, out=tmp_path / "x", config={"stages": ["fisher", "report"], "progress": False})
    assert res.status == {"fisher": "ok", "report": "ok"}
    text = (tmp_path / "x" / "report" / "report.csv").read_text()
    assert text.count("spectral_eigmax") == 2 * 2 * 4  # two runs x 2 layers x 4 heads
