"""`hf-fisher merge RECIPE.yaml --out DIR`: the written recipe reproduces the merge, bad recipes
are refused naming the key (before torch is imported, nothing written), and the merged model's
card parses with huggingface_hub.ModelCard and carries mergekit-compatible metadata."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_fisher import cli
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers.merge.api import RECIPE_NAME, merge_with_fisher
from hf_fisher.consumers.merge.card import merged_card

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def _fisher(model, seed):
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.01 for n, p in model.named_parameters()}
    return Fisher(mean, None, reduction="param", groups=None, param_shapes={n: t.shape for n, t in mean.items()},
                  counts=Counts(2, 2), metadata=FisherMetadata(task=f"task{seed}", model_type="llama"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for i, seed in enumerate((1, 2)):
        m = tm.llama(seed=seed)
        m.save_pretrained(root / f"m{i}")
        _fisher(m, seed).save_pretrained(root / f"f{i}")
    tm.llama(seed=3).save_pretrained(root / "base")
    return root


@pytest.mark.parametrize("method", ["fisher", "dare"])
def test_recipe_round_trip(inputs, tmp_path, method):
    kw = {"fishers": [inputs / "f0", inputs / "f1"]} if method == "fisher" else {"base_model": inputs / "base", "seed": 5}
    first = merge_with_fisher([inputs / "m0", inputs / "m1"], method=method, weights=[0.25, 0.75],
                              output_dir=tmp_path / "api", progress=False, **kw)
    recipe = yaml.safe_load((first / RECIPE_NAME).read_text())
    assert recipe["merge_method"] == method
    assert [e["parameters"]["weight"] for e in recipe["models"]] == [0.25, 0.75]
    code = cli.main(["merge", str(first / RECIPE_NAME), "--out", str(tmp_path / "cli"), "--no-progress"])
    assert code == 0
    a, b = load_file(str(first / "model.safetensors")), load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((tmp_path / "cli" / RECIPE_NAME).read_text())["parameters"] == recipe["parameters"]


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda r: r.pop("merge_method"), "'merge_method' is missing"),
        (lambda r: r.update(merge_method="soup"), "'merge_method' must be one of"),
        (lambda r: r.update(extra=1), "'extra' is not a known key"),
        (lambda r: r.update(models=r["models"][:1]), "'models' must be a list of at least two"),
        (lambda r: r["models"][1]["parameters"].update(weight="heavy"), r"'models\[1\].parameters.weight' must be a number"),
        (lambda r: r["models"][0]["parameters"].update(fishr="x"), r"'models\[0\].parameters.fishr' is not a known key"),
        (lambda r: r["parameters"].update(fisher_floor="tiny"), "'parameters.fisher_floor' must be of type"),
        (lambda r: r["parameters"].update(florr=1), "'parameters.florr' is not a known parameter"),
        (lambda r: r.update(dtype="int8"), "'dtype' must be a floating dtype"),
        (lambda r: r["models"][0].update(model="./nowhere/model"), "does not exist"),
    ],
)
def test_bad_recipes_are_refused_naming_the_key(inputs, tmp_path, capsys, mutate, pattern):
    recipe = {
        "merge_method": "fisher",
        "models": [{"model": str(inputs / f"m{i}"), "parameters": {"weight": 0.5, "fisher": str(inputs / f"f{i}")}}
                   for i in range(2)],
        "parameters": {"fisher_floor": 1e-6},
    }
    mutate(recipe)
    path = _write(tmp_path / "r.yaml", recipe)
    assert cli.main(["merge", str(path), "--out", str(tmp_path / "out")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "hf-fisher merge: error:" in err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_bad_recipe_files(tmp_path, capsys):
    assert cli.main(["merge", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == cli.EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["merge", str(_write(tmp_path / "bad.yaml", "models: [a, b")), "--out", str(tmp_path / "o")]) == cli.EXIT_ERROR
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["merge", str(_write(tmp_path / "list.yaml", "- 1\n")), "--out", str(tmp_path / "o")]) == cli.EXIT_ERROR
    assert "must be a mapping" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_recipe_is_refused_before_torch_is_imported(tmp_path):
    path = _write(tmp_path / "r.yaml", {"merge_method": "soup", "models": []})
    code = (
        "import sys\nfrom hf_fisher import cli\n"
        f"rc = cli.main(['merge', {str(path)!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "assert rc == 2, rc\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_card_metadata_parses_with_modelcard(inputs, tmp_path):
    from huggingface_hub import ModelCard

    out = merge_with_fisher([inputs / "m0", inputs / "m1"], [inputs / "f0", inputs / "f1"], output_dir=tmp_path / "o",
                            progress=False)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model_relation"] == "merge"
    assert {"merge", "hf-fisher", "fisher"} <= set(data["tags"])
    assert "base_model" not in data or not data["base_model"]  # local inputs are not Hub ids
    text = card.text
    assert "Matena" in text and "Raffel 2022" in text and "merge\\_method: fisher" not in text
    assert str(inputs / "m0").replace("_", "\\_") in text and "f0" in text
    assert "```yaml" in text and "merge_method: fisher" in text
    # Hub inputs become base_model (all of them); local ones stay in the body
    recipe = yaml.safe_load((out / RECIPE_NAME).read_text())
    recipe["models"][0]["model"] = "org/model-a"
    recipe["models"][1]["model"] = "org/model-b"
    recipe["merge_method"] = "ties"
    recipe["base_model"] = "org/base"
    hub = merged_card(recipe)
    path = tmp_path / "hub.md"
    hub.save(path)
    d = ModelCard.load(path).data.to_dict()
    assert d["base_model"] == ["org/model-a", "org/model-b", "org/base"]
    assert "ties" in d["tags"] and "Yadav et al. 2023" in ModelCard.load(path).text
    # user text cannot break out of the recipe block or the table
    recipe["models"][0]["model"] = "evil```\n# Injected | cell"
    text = merged_card(recipe).text
    assert "\n# Injected" not in text.split("## Recipe")[0]
    fence = text.split("## Recipe")[1].split("yaml\n")[0].strip().splitlines()[-1]
    assert len(fence) >= 4 and set(fence) == {"`"}


def _parsers(parser, path="hf-fisher"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_merge_options_have_help():
    parsers = dict(_parsers(cli.build_parser()))
    merge = parsers["hf-fisher merge"]
    for action in merge._actions:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action.option_strings
    assert cli.main(["merge", "--help"]) == 0
