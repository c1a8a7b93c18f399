"""validation= for every data-aware merge method (regmean, fisher_regmean, kfac): the grid point
picked is the one with the lowest validation loss, computed here independently for each point by
a plain merge with those settings; Grams / factors are made once (the data is read once); the
per-layer refinement; the recipe and card record the choice; bad validation input is refused
before any work; RegMean's model weights weigh the Grams (a weighted least-squares solution)."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

import hf_fisher
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers.merge.api import RECIPE_NAME, layer_group, merge_with_fisher
from hf_fisher.consumers.merge.regmean import regmean_tensor
from hf_fisher.errors import InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


class OneShot:
    """Batches that may be iterated once (a second pass, e.g. Grams recomputed per grid point,
    raises); ``forbid=True``: any iteration raises (input that must not be touched)."""

    def __init__(self, batches, forbid: bool = False) -> None:
        self.batches, self.forbid, self.passes = list(batches), forbid, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        if self.forbid or self.passes > 1:
            raise AssertionError(f"data iterated (pass {self.passes}) when it should not be")
        return iter(self.batches)


def _finetuned(make, seeds=(11, 12)):
    models = []
    for seed in seeds:
        m = make()
        torch.manual_seed(seed)
        with torch.no_grad():  # fine-tuned from one base: small task vectors
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        models.append(m)
    return models


@pytest.fixture(scope="module")
def llamas():
    return _finetuned(lambda: tm.llama(seed=10))


@pytest.fixture(scope="module")
def gpt2s():
    return _finetuned(lambda: tm.gpt2(seed=4))


def _data(seed, vocab=tm.VOCAB):
    return [tm.padded_batch([6, 5, 4], seed=seed, vocab=vocab)]


def _val(vocab=tm.VOCAB):
    return [[tm.padded_batch([5, 4], seed=s, vocab=vocab)] for s in (21, 22)]


def _fisher(model, seed):
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-3 + 1e-5 for n, p in model.named_parameters()}
    return Fisher(mean, None, reduction="param", groups=None, param_shapes={n: t.shape for n, t in mean.items()},
                  counts=Counts(8, 40), metadata=FisherMetadata(task=f"t{seed}", model_type=model.config.model_type))


def independent_loss(model, validation) -> float:
    """Mean over tasks of the mean batch loss, written out here (labels given in every batch)."""
    with torch.no_grad():
        per_task = [sum(float(model(**b).loss) for b in batches) / len(batches) for batches in validation]
    return sum(per_task) / len(per_task)


# ---------------------------------------------------------------------------- RegMean weights
def test_regmean_coefficients_give_the_weighted_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(t, 5, generator=g, dtype=torch.float64) for t in (9, 12, 7)]
    ws = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in xs]  # Linear [out, in]
    grams = [x.T @ x for x in xs]
    c = [0.2, 0.5, 0.3]
    got = regmean_tensor(ws, grams, alpha=1.0, kind="linear", coefficients=c)
    # min_W Σ_i c_i ||X_i Wᵀ − X_i W_iᵀ||²: least squares on the rows scaled by √c_i
    A = torch.cat([ci ** 0.5 * x for ci, x in zip(c, xs)])
    B = torch.cat([ci ** 0.5 * x @ w.T for ci, x, w in zip(c, xs, ws)])
    ref = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    # equal coefficients are the paper's form exactly; a zero coefficient leaves a model out
    plain = regmean_tensor(ws, grams, alpha=0.5, kind="linear")
    assert torch.equal(regmean_tensor(ws, grams, alpha=0.5, kind="linear", coefficients=[0.5, 0.5, 0.5]), plain)
    two = regmean_tensor(ws[:2], grams[:2], alpha=0.5, kind="linear")
    assert torch.allclose(regmean_tensor(ws, grams, alpha=0.5, kind="linear", coefficients=[1, 1, 0]), two, atol=1e-12)
    with pytest.raises(InvalidInputError, match="coefficients"):
        regmean_tensor(ws, grams, alpha=0.5, kind="linear", coefficients=[1, -1, 1])


# ---------------------------------------------------------------------------- the choice
CASES = {
    "regmean": ("alpha", (0.0, 1.0)),
    "fisher_regmean": ("alpha", (0.0, 1.0)),
    "kfac": ("kfac_damping", (1e-3, 1.0)),
}


def _kwargs(method, models, data):
    if method == "kfac":
        return {"fishers": [hf_fisher.collect(m, d, estimator="kfac", progress=False) for m, d in zip(models, data)]}
    kw = {"data": data}
    if method == "fisher_regmean":
        kw["fishers"] = [_fisher(m, s) for m, s in zip(models, (1, 2))]
    return kw


@pytest.mark.parametrize("method", list(CASES))
def test_validation_picks_the_point_with_the_lowest_independent_loss(llamas, gpt2s, tmp_path, method):
    models = gpt2s if method == "kfac" else llamas
    vocab = models[0].config.vocab_size
    data = [_data(s, vocab) for s in (0, 1)]
    val = _val(vocab)
    knob, values = CASES[method]
    kw = _kwargs(method, models, data)
    grid = {"weight_lean": (0.0, 0.5), knob: values}
    if method == "fisher_regmean":
        grid["fisher_floor"] = (1e-6,)
    once = [OneShot(d) for d in data] if "data" in kw else None
    out = merge_with_fisher(models, method=method, validation=val, validation_grid=grid, output_dir=tmp_path / "v",
                            progress=False, **{**kw, **({"data": once} if once else {})})
    if once:  # the Grams were made once: one pass over each model's data, whatever the number of points
        assert [o.passes for o in once] == [1, 1]
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    chosen = recipe["hf_fisher"]["validation"]["chosen"]
    points = {}
    for w, v in itertools.product(([0.5, 0.5], [0.75, 0.25], [0.25, 0.75]), values):
        m = merge_with_fisher(models, method=method, weights=w, progress=False, **{knob: v}, **kw)
        points[(tuple(w), v)] = independent_loss(m, val)
    best = min(points, key=points.get)
    assert len({round(x, 9) for x in points.values()}) > 1  # the points differ: the choice is not a tie
    assert (tuple(chosen["weights"]), chosen[knob]) == (pytest.approx(best[0]), best[1])
    assert chosen["loss"] == pytest.approx(points[best], rel=1e-9)
    recorded = {(tuple(round(x, 9) for x in e["weights"]), e[knob]): e["loss"]
                for e in recipe["hf_fisher"]["validation"]["losses"]}
    assert len(recorded) == len(points) == recipe["hf_fisher"]["validation"]["points"]
    for (w, v), loss in points.items():  # every point's recorded loss is its independent loss
        assert recorded[(tuple(round(x, 9) for x in w), v)] == pytest.approx(loss, rel=1e-9)
    # the written model is the chosen one; the recipe and card say what was chosen
    assert [e["parameters"]["weight"] for e in recipe["models"]] == pytest.approx(list(best[0]))
    assert recipe["parameters"][{"scaling": "lambda"}.get(knob, knob)] == best[1]  # mergekit's name
    assert recipe["hf_fisher"]["validation"]["grid"][knob] == list(values)
    merged = type(models[0]).from_pretrained(out, dtype=torch.float64).eval()
    assert independent_loss(merged, val) == pytest.approx(points[best], rel=1e-9)
    card = (out / "README.md").read_text()
    assert "Validation-tuned settings" in card and f"{knob} = {best[1]}" in card


# ---------------------------------------------------------------------------- per layer
@pytest.mark.parametrize("method", ["regmean", "kfac"])
def test_per_layer_weights_lower_the_validation_loss_and_are_recorded(llamas, gpt2s, tmp_path, method):
    models = gpt2s if method == "kfac" else llamas
    vocab = models[0].config.vocab_size
    data = [_data(s, vocab) for s in (0, 1)]
    val = _val(vocab)
    kw = _kwargs(method, models, data)
    knob, value = ("kfac_damping", 1e-2) if method == "kfac" else ("alpha", 0.9)
    grid = {"weight_lean": (0.0,), knob: (value,), "layer_lean": (0.5, 1.0)}
    out = merge_with_fisher(models, method=method, validation=val, validation_grid=grid,
                            output_dir=tmp_path / "v", progress=False, **kw)
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    rec = recipe["hf_fisher"]["validation"]
    chosen, layers = rec["chosen"], rec["layers"]
    prefix = "transformer.h" if method == "kfac" else "model.layers"
    assert layers["layers"] == [f"{prefix}.0", f"{prefix}.1"]
    assert layers["points"] == 2 * 2 * 2 == len(layers["losses"])  # 2 layers x 2 leans x 2 models
    assert chosen["grid_loss"] == pytest.approx(rec["losses"][0]["loss"])
    lw = chosen.get("layer_weights") or {}
    assert lw, "no layer improved on the uniform weights"  # with these seeds at least one does
    assert chosen["loss"] < chosen["grid_loss"]
    assert chosen["loss"] == pytest.approx(min(x["loss"] for x in layers["losses"] if x["layer"] == max(lw)))
    # independent: each layer merged with its own weights, everything else with the global ones
    merged = type(models[0]).from_pretrained(out, dtype=torch.float64).eval()
    ref_plain = merge_with_fisher(models, method=method, progress=False, **{knob: value}, **kw).state_dict()
    ref_layer = {g: merge_with_fisher(models, method=method, weights=w, progress=False, **{knob: value}, **kw).state_dict()
                 for g, w in lw.items()}
    for name, t in merged.state_dict().items():
        g = layer_group(name)
        ref = ref_layer[g][name] if g in lw else ref_plain[name]
        assert torch.allclose(t, ref, atol=1e-12, rtol=0), name
    assert independent_loss(merged, val) == pytest.approx(chosen["loss"], rel=1e-9)
    # each model's weight: mergekit's per-tensor list, layer filters first, the global weight last
    for i, entry in enumerate(recipe["models"]):
        weight = entry["parameters"]["weight"]
        assert weight[-1] == {"value": 0.5}
        assert {e["filter"]: e["value"] for e in weight[:-1]} == {f"{g}.": pytest.approx(w[i]) for g, w in lw.items()}


# ---------------------------------------------------------------------------- refused before work
@pytest.mark.parametrize("bad, match", [
    ({"validation": [[{"input_ids": torch.ones(1, 3, dtype=torch.long)}]]}, "one list of batches per model"),
    ({"validation": [[], [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]]}, r"validation\[0\] holds no batch"),
    ({"validation": [["text"], ["text"]]}, r"validation\[0\]\[0\] must be a batch"),
    ({"validation_grid": {"alpha": (0.5, 1.5)}}, r"validation_grid\['alpha'\].*alpha must be in \[0, 1\]"),
    ({"validation_grid": {"layer_lean": (2.0,)}}, r"validation_grid\['layer_lean'\].*\[0, 1\]"),
    ({"validation_grid": {"weight_lean": ()}}, r"validation_grid\['weight_lean'\] is empty"),
    ({"validation_grid": {"damping": (1.0,)}}, "unknown key"),
    ({"validation": None, "validation_grid": {"alpha": (0.5,)}}, "without validation="),
])
def test_bad_validation_input_is_refused_before_any_work(llamas, tmp_path, bad, match):
    val = [[tm.padded_batch([3], seed=1)], [tm.padded_batch([3], seed=2)]]
    kw = {"validation": val, **bad}
    data = [OneShot(_data(s), forbid=True) for s in (0, 1)]  # the Grams are not even started
    with pytest.raises(InvalidInputError, match=match):
        merge_with_fisher(llamas, method="regmean", data=data, output_dir=tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()
