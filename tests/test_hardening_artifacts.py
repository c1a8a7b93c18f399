"""Issue 21, artifacts: invalid values in a Fisher / KFAC artifact, the merge inputs, the cards.

Every reader refuses a Fisher that is not finite and non-negative (naming the tensor and the
count) before any work or write; ``strict=False`` reads it with a WARNING and records it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata, FisherReader
from hf_fisher.errors import ArtifactError, InvalidInputError

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
BAD = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5}
WORD = {"nan": "NaN", "inf": "Inf", "negative": "negative"}
TARGET = "model.layers.0.mlp.down_proj.weight"


def hf_fisher(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("hf-fisher")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180)


def make_fisher(model, seed=0, *, variance=True, samples=4, bad=None, count=3, kind="mean"):
    """A param Fisher of ``model`` with positive values; ``bad``: ``count`` entries of TARGET's
    ``kind`` tensor set to NaN / Inf / a negative number."""
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.01 for n, p in model.named_parameters()}
    var = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()} if variance else None
    if bad is not None:
        t = (mean if kind == "mean" else var)[TARGET]
        t.view(-1)[:count] = BAD[bad]
    return Fisher(mean, var, reduction="param", groups=None, param_shapes={n: t.shape for n, t in mean.items()},
                  counts=Counts(samples, 10 * samples),
                  metadata=FisherMetadata(task=f"t{seed}", model_type=model.config.model_type))


@pytest.fixture(scope="module")
def llama():
    return tm.llama(seed=1)


def _names_tensor_and_count(err: str, bad: str, count: int = 3, kind: str = "mean") -> None:
    assert f"'{kind}.{TARGET}'" in err, err
    assert f"{count} {WORD[bad]}" in err, err


# ---------------------------------------------------------------------------- item 1: readers
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", ["mean", "variance"])
def test_from_pretrained_refuses_invalid_values(tmp_path, llama, bad, kind):
    folder = make_fisher(llama, bad=bad, kind=kind).save_pretrained(tmp_path / "f")
    with pytest.raises(ArtifactError) as e:
        Fisher.from_pretrained(folder)
    _names_tensor_and_count(str(e.value), bad, kind=kind)
    assert "strict=False" in str(e.value)


@pytest.mark.parametrize("bad", list(BAD))
def test_reader_refuses_invalid_values(tmp_path, llama, bad):
    folder = make_fisher(llama, bad=bad).save_pretrained(tmp_path / "f")
    reader = FisherReader(folder)  # opening reads no tensor
    with pytest.raises(ArtifactError) as e:
        reader.get(TARGET)
    _names_tensor_and_count(str(e.value), bad)
    with pytest.raises(ArtifactError) as e:
        reader.check_values()
    _names_tensor_and_count(str(e.value), bad)
    with pytest.raises(ArtifactError):
        Fisher.open_tensor(folder, TARGET)
    other = next(n for n in reader.names() if n != TARGET)
    assert torch.isfinite(reader.get(other)).all()  # the good tensors stay readable one by one


def test_sharded_reader_refuses_invalid_values(tmp_path, llama):
    folder = make_fisher(llama, bad="nan").save_pretrained(tmp_path / "f", max_shard_size=20_000)
    assert (folder / "fisher.safetensors.index.json").is_file()
    with pytest.raises(ArtifactError) as e:
        FisherReader(folder).check_values()
    _names_tensor_and_count(str(e.value), "nan")


def test_strict_false_warns_and_records(tmp_path, llama, caplog):
    folder = make_fisher(llama, bad="nan").save_pretrained(tmp_path / "f")
    with caplog.at_level(logging.WARNING, logger="hf_fisher.artifacts"):
        f = Fisher.from_pretrained(folder, strict=False)
    assert any(r.levelno == logging.WARNING and TARGET in r.getMessage() for r in caplog.records)
    problems = f.metadata.extra["load_problems"]
    assert len(problems) == 1 and f"'mean.{TARGET}' has 3 NaN" in problems[0]
    assert torch.isnan(f[TARGET]).sum() == 3  # the values as stored
    with pytest.raises(ArtifactError, match="3 NaN"):  # consumers still refuse it
        f.check_values()
    reader = FisherReader(folder, strict=False)
    with caplog.at_level(logging.WARNING, logger="hf_fisher.artifacts"):
        reader.check_values()
    assert "load_problems" in reader.metadata.extra


def test_good_artifact_loads(tmp_path, llama):
    f = make_fisher(llama)
    back = Fisher.from_pretrained(f.save_pretrained(tmp_path / "f"))
    assert "load_problems" not in back.metadata.extra
    assert all(torch.equal(back[n], f[n]) for n in f.names())
    FisherReader(tmp_path / "f").check_values()


def _corrupt(file: Path, key: str, fn) -> None:
    """Rewrite one tensor of a safetensors file in place (keeps the file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    fn(tensors[key])
    save_file(tensors, str(file), metadata=meta)


@pytest.fixture(scope="module")
def kfac_folder(tmp_path_factory):
    import hf_fisher

    model = tm.gpt2(seed=4)
    kf = hf_fisher.collect(model, [tm.padded_batch([6, 5, 4], seed=0, vocab=model.config.vocab_size)],
                           estimator="kfac", progress=False)
    return kf.save_pretrained(tmp_path_factory.mktemp("kfac") / "k"), model


@pytest.mark.parametrize("bad", list(BAD))
def test_kfac_reader_refuses_invalid_factors(tmp_path, kfac_folder, bad):
    import shutil

    from hf_fisher.artifacts.kfac import KFAC_WEIGHTS_NAME, KFACFisher

    folder = Path(shutil.copytree(kfac_folder[0], tmp_path / "k"))
    key = "A.transformer.h.0.mlp.c_fc"

    def put(t):  # the diagonal (a negative off-diagonal entry is allowed)
        t.diagonal()[:2] = BAD[bad]
    _corrupt(folder / KFAC_WEIGHTS_NAME, key, put)
    with pytest.raises(ArtifactError) as e:
        KFACFisher.from_pretrained(folder)
    assert f"'{key}'" in str(e.value) and f"2 {WORD[bad]}" in str(e.value), str(e.value)
    loose = KFACFisher.from_pretrained(folder, strict=False)
    assert "load_problems" in loose.metadata.extra
    with pytest.raises(ArtifactError):  # merging it refuses before any work
        from hf_fisher.consumers.merge.kfac import load_kfac
        load_kfac(loose)


def test_kfac_negative_off_diagonal_is_fine(tmp_path, kfac_folder):
    import shutil

    from hf_fisher.artifacts.kfac import KFAC_WEIGHTS_NAME, KFACFisher

    folder = Path(shutil.copytree(kfac_folder[0], tmp_path / "k"))
    key = "A.transformer.h.0.mlp.c_fc"

    def put(t):
        t[0, 1] = t[1, 0] = -abs(float(t[0, 1])) - 1e-3
    _corrupt(folder / KFAC_WEIGHTS_NAME, key, put)
    KFACFisher.from_pretrained(folder)


# ---------------------------------------------------------------------------- item 1: consumers
@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for i, seed in enumerate((1, 2)):
        m = tm.llama(seed=seed)
        m.save_pretrained(root / f"m{i}")
        make_fisher(m, seed).save_pretrained(root / f"f{i}")
        for bad in BAD:
            make_fisher(m, seed, bad=bad).save_pretrained(root / f"f{i}-{bad}")
    return root


@pytest.mark.parametrize("bad", list(BAD))
def test_merge_api_refuses_invalid_fisher_before_writing(merge_inputs, tmp_path, bad):
    from hf_fisher.consumers.merge.api import merge_with_fisher

    r = merge_inputs
    for fishers in ([r / "f0", r / f"f1-{bad}"], [r / "f0", Fisher.from_pretrained(r / f"f1-{bad}", strict=False)]):
        with pytest.raises(ArtifactError) as e:
            merge_with_fisher([r / "m0", r / "m1"], fishers, output_dir=tmp_path / "out", progress=False)
        _names_tensor_and_count(str(e.value), bad)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["nan", "negative"])
@pytest.mark.slow
def test_merge_cli_exits_2_with_nothing_written(merge_inputs, tmp_path, bad):
    r = merge_inputs
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(r / "m0"), "parameters": {"weight": 0.5, "fisher": str(r / "f0")}},
        {"model": str(r / "m1"), "parameters": {"weight": 0.5, "fisher": str(r / f"f1-{bad}")}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = hf_fisher("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("hf-fisher merge: error:") and "Traceback" not in proc.stderr
    _names_tensor_and_count(proc.stderr, bad)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.slow
def test_show_refuses_nan(merge_inputs, tmp_path):
    proc = hf_fisher("show", str(merge_inputs / "f1-nan"), cwd=tmp_path)
    assert proc.returncode == 2 and "nan" not in proc.stdout.lower(), proc.stdout
    _names_tensor_and_count(proc.stderr, "nan")


def test_lora_merge_refuses_invalid_fisher(tmp_path):
    import copy

    import peft

    from hf_fisher.consumers.merge.api import merge_with_fisher
    from hf_fisher.consumers.merge.lora import merge_lora_adapters

    base = tm.llama(layers=1)
    dirs = []
    for seed in (1, 2):
        a = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["down_proj"], r=2, lora_alpha=4))
        a.save_pretrained(tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    good, bad = make_fisher(base, 1), make_fisher(base, 2, bad="nan")
    bad.save_pretrained(tmp_path / "bad")
    with pytest.raises(ArtifactError, match="3 NaN"):
        merge_lora_adapters(dirs, [good, tmp_path / "bad"], base_model=base, merge_into_base=True)
    with pytest.raises(ArtifactError, match="3 NaN"):
        merge_with_fisher(dirs, [good, bad], base_model=base, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ewc_and_ewc_trainer_refuse_invalid_fisher(tmp_path):
    from transformers import TrainingArguments

    from hf_fisher.consumers.ewc import EWCPenalty
    from hf_fisher.integrations.ewc_trainer import EWCTrainer

    model = tm.llama(torch.float32)
    for bad in BAD:
        fisher = make_fisher(model, bad=bad)
        with pytest.raises(ArtifactError) as e:
            EWCPenalty(fisher, model, lam=1.0)
        _names_tensor_and_count(str(e.value), bad)
        args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
        with pytest.raises(ArtifactError):
            EWCTrainer(model=model, args=args, train_dataset=[], fisher=fisher, lam=1.0)
    with pytest.raises(InvalidInputError, match="lam"):
        EWCPenalty(make_fisher(model), model, lam=float("inf"))


def test_trainer_resume_refuses_invalid_checkpoint_state(tmp_path):
    from transformers import Trainer, TrainingArguments

    import hf_fisher

    import reference as R

    g = torch.Generator().manual_seed(0)
    samples = []
    for k in range(8):
        ids = torch.randint(3, tm.VOCAB, (1, 3 + k % 4), generator=g)
        samples.append({"input_ids": ids, "labels": ids.clone()})

    def collate(items):
        return R.collate([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])

    def args(**kw):
        return TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=0.0, max_steps=4,
                                 report_to=[], logging_steps=1, use_cpu=True, remove_unused_columns=False,
                                 disable_tqdm=True, seed=0, data_seed=0, **kw)

    Trainer(model=tm.llama(torch.float32), args=args(save_strategy="steps", save_steps=2), train_dataset=samples,
            data_collator=collate, callbacks=[hf_fisher.FisherCallback(reduction="param")]).train()
    state = tmp_path / "run" / "checkpoint-2" / "fisher"
    _corrupt(state / "fisher.safetensors", f"mean.{TARGET}", lambda t: t.view(-1)[:3].fill_(float("nan")))
    trainer = Trainer(model=tm.llama(torch.float32), args=args(save_strategy="no"), train_dataset=samples,
                      data_collator=collate, callbacks=[hf_fisher.FisherCallback(reduction="param")])
    with pytest.raises(ArtifactError) as e:
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _names_tensor_and_count(str(e.value), "nan")


# ---------------------------------------------------------------------------- item 2: merge inputs
def _merge(models, fishers=None, **kw):
    from hf_fisher.consumers.merge.api import merge_with_fisher

    return merge_with_fisher(models, fishers, progress=False, **kw)


def test_fisher_folder_missing_a_listed_tensor(merge_inputs, tmp_path):
    import shutil

    r = merge_inputs
    folder = Path(shutil.copytree(r / "f1", tmp_path / "f1"))
    tensors = load_file(str(folder / "fisher.safetensors"))
    del tensors[f"mean.{TARGET}"]
    save_file(tensors, str(folder / "fisher.safetensors"))
    with pytest.raises(ArtifactError) as e:
        _merge([r / "m0", r / "m1"], [r / "f0", folder], output_dir=tmp_path / "out")
    assert f"'mean.{TARGET}' is missing" in str(e.value) and "incomplete" in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_truncated_model_safetensors(merge_inputs, tmp_path):
    import shutil

    r = merge_inputs
    model = Path(shutil.copytree(r / "m1", tmp_path / "m1"))
    file = model / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(ArtifactError, match="truncated") as e:
        _merge([r / "m0", model], [r / "f0", r / "f1"], output_dir=tmp_path / "out")
    assert str(file) in str(e.value)
    assert not (tmp_path / "out").exists()
    recipe = {"merge_method": "average", "models": [{"model": str(r / "m0")}, {"model": str(model)}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = hf_fisher("merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(method="task_arithmetic", scaling=float("nan")), r"scaling must be a finite number, got nan"),
        (dict(method="task_arithmetic", scaling=float("inf")), r"scaling must be a finite number"),
        (dict(method="ties", density=float("nan")), r"density must be a finite number"),
        (dict(method="average", weights=["a", 1]), r"weights\[0\] must be a finite number, got 'a'"),
        (dict(method="average", weights=[True, 1]), r"weights\[0\] must be a finite number, got True"),
        (dict(method="average", weights="ab"), r"weights must be a list of numbers"),
        (dict(method="fisher", fisher_floor=True), r"fisher_floor must be a finite number, got True"),
        (dict(method="dare", seed=1.5), r"seed must be an integer"),
        (dict(method="average", validation=[[], []]), r"validation\[0\] holds no batch"),
        (dict(method="average", validation=[[{"input_ids": torch.ones(1, 3, dtype=torch.long)}], iter([])]),
         r"validation\[1\] holds no batch"),
        (dict(method="regmean", data=[[], []]), r"data\[0\] holds no batch"),
        (dict(method="regmean", data=[[{"input_ids": torch.ones(1, 3, dtype=torch.long)}], (x for x in [])]),
         r"data\[1\] holds no batch"),
    ],
    ids=["scaling-nan", "scaling-inf", "density-nan", "weights-str", "weights-bool", "weights-string",
         "floor-bool", "seed-float", "validation-empty", "validation-iterator", "regmean-empty", "regmean-generator"],
)
def test_bad_merge_arguments_refused_up_front(merge_inputs, tmp_path, kwargs, pattern):
    r = merge_inputs
    kw = dict(kwargs)
    method = kw.pop("method")
    fishers = [r / "f0", r / "f1"] if method == "fisher" else None
    base = r / "m0" if method in ("task_arithmetic", "ties", "dare") else None
    with pytest.raises(InvalidInputError, match=pattern):
        _merge([r / "m0", r / "m1"], fishers, method=method, base_model=base, output_dir=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_lora_merge_refuses_bad_numbers(tmp_path):
    from hf_fisher.consumers.merge.lora import merge_lora_adapters

    with pytest.raises(InvalidInputError, match="fisher_floor must be a finite number, got True"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "b"], [None, None], fisher_floor=True)
    with pytest.raises(InvalidInputError, match=r"weights\[1\] must be a finite number"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "b"], None, method="average", weights=[1, "x"])
    with pytest.raises(InvalidInputError, match="scaling must be a finite number"):
        merge_lora_adapters([tmp_path / "a", tmp_path / "b"], None, method="task_arithmetic", scaling=float("nan"))


DUPLICATE = """\
merge_method: average
models:
  - model: {m0}
    parameters: {{weight: 0.5}}
  - model: {m1}
    parameters:
      weight: 0.5
      weight: 0.9
"""


def test_duplicate_recipe_key_refused_naming_key_and_lines(merge_inputs, tmp_path):
    from hf_fisher.consumers.merge.api import load_recipe

    r = merge_inputs
    path = tmp_path / "recipe.yaml"
    path.write_text(DUPLICATE.format(m0=r / "m0", m1=r / "m1"))
    with pytest.raises(InvalidInputError, match=r"key 'weight' is given twice in one mapping \(lines 7 and 8\)"):
        load_recipe(path)
    top = "merge_method: average\nmerge_method: fisher\nmodels: []\n"
    (tmp_path / "top.yaml").write_text(top)
    with pytest.raises(InvalidInputError, match=r"'merge_method' is given twice .*lines 1 and 2"):
        load_recipe(tmp_path / "top.yaml")
    proc = hf_fisher("merge", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "'weight' is given twice" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- item 4: minor
def test_samples_zero_with_values_is_refused(tmp_path, llama):
    f = make_fisher(llama, variance=False, samples=0)
    folder = f.save_pretrained(tmp_path / "f")
    with pytest.raises(ArtifactError, match="counts.samples is 0") as e:
        Fisher.from_pretrained(folder)
    assert "non-zero" in str(e.value)
    with pytest.raises(ArtifactError, match="non-zero"):
        FisherReader(folder).get(TARGET)
    zero = Fisher({n: torch.zeros_like(t) for n, t in f.means.items()}, None, reduction="param", groups=None,
                  param_shapes=f.param_shapes, counts=Counts(0, 0), metadata=f.metadata)
    Fisher.from_pretrained(zero.save_pretrained(tmp_path / "zero"))  # all zeros with no sample: consistent


def test_unknown_estimator_is_refused_with_the_known_names(tmp_path, llama):
    from hf_fisher import plugins

    f = make_fisher(llama)
    odd = Fisher(f.means, None, reduction="param", groups=None, param_shapes=f.param_shapes, counts=f.counts,
                 metadata=replace(f.metadata, estimator="my_estimator"))
    folder = odd.save_pretrained(tmp_path / "f")
    for load in (Fisher.from_pretrained, FisherReader):
        with pytest.raises(ArtifactError, match="'my_estimator', which is not registered") as e:
            load(folder)
        assert all(name in str(e.value) for name in ("'empirical'", "'kfac'", "'true'"))
    assert "load_problems" in Fisher.from_pretrained(folder, strict=False).metadata.extra

    class MyPlugin:  # a plugin that registers the estimator: the artifact loads
        @plugins.hookimpl
        def hf_fisher_register_estimators(self, register):
            register("my_estimator", object)

    name = plugins.register(MyPlugin(), "my-plugin")
    try:
        back = Fisher.from_pretrained(folder)
        assert back.metadata.estimator == "my_estimator" and "load_problems" not in back.metadata.extra
    finally:
        plugins.unregister(name)


# ---------------------------------------------------------------------------- item 3: cards
def test_merged_card_reads_as_written(merge_inputs, tmp_path):
    import shutil

    from huggingface_hub import ModelCard
    from markdown_it import MarkdownIt

    r = merge_inputs
    models = [Path(shutil.copytree(r / f"m{i}", tmp_path / f"my_model_{i}")) for i in (0, 1)]
    val = [[tm.padded_batch([4, 3], seed=5)], [tm.padded_batch([4, 3], seed=6)]]
    out = _merge(models, [r / "f0", r / "f1"], output_dir=tmp_path / "out", validation=val,
                 validation_grid={"weight_lean": [0.0, 0.5], "fisher_floor": [1e-6]})
    text = ModelCard.load(out / "README.md").text
    body = text.split("## Recipe")[0]
    # the raw file reads as written: no backslash escapes in names, paths, settings or the paper title
    assert "\\" not in body, [line for line in body.splitlines() if "\\" in line]
    assert f"`{models[0]}`" in body and "`fisher_floor`" in body and "`no_fisher_rule`" in body
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(text)
    assert "<em>Merging Models with Fisher-Weighted Averaging</em>" in html  # the title in italics, not *...*
    assert f"<code>{models[0]}</code>" in html and "<code>fisher_floor</code>" in html
    assert "Matena &amp; Raffel 2022" in html and "&amp;amp;" not in html
    # the recipe: plain YAML, no anchors or aliases, and it loads back to the same recipe
    recipe_text = (out / "mergekit_config.yml").read_text()
    assert "&id" not in recipe_text and "*id" not in recipe_text, recipe_text
    block = text.split("```yaml\n")[1].split("```")[0]
    assert "&id" not in block and "*id" not in block
    recipe = yaml.safe_load(recipe_text)
    assert [e["parameters"]["weight"] for e in recipe["models"]] == recipe["hf_fisher"]["validation"]["chosen"]["weights"]


@pytest.mark.parametrize("state, problem", [
    ({"weight_sum": float("nan"), "weight_sq_sum": 1.0}, "weight_sum"),
    ({"weight_sum": 2.0, "weight_sq_sum": -1.0}, "weight_sq_sum"),
    ({"weight_sum": 2.0, "weight_sq_sum": 5.0}, "weight_sq_sum 5.0 > weight_sum²"),
    ({"weight_sum": 2.0}, "weight_sq_sum null"),
])
def test_ema_resume_state_is_checked(tmp_path, llama, state, problem):
    f = make_fisher(llama)
    ema = Fisher(f.means, f.variances, reduction="param", groups=None, param_shapes=f.param_shapes, counts=f.counts,
                 metadata=replace(f.metadata, ema_decay=0.9, extra={"ema_state": state}))
    folder = ema.save_pretrained(tmp_path / "f")
    with pytest.raises(ArtifactError, match="metadata.extra.ema_state") as e:
        Fisher.from_pretrained(folder)
    assert problem in str(e.value), str(e.value)
    good = replace(ema.metadata, extra={"ema_state": {"weight_sum": 2.0, "weight_sq_sum": 1.5}})
    Fisher.from_pretrained(Fisher(f.means, f.variances, reduction="param", groups=None, param_shapes=f.param_shapes,
                                  counts=f.counts, metadata=good).save_pretrained(tmp_path / "g"))


def test_accumulator_state_values_are_checked():
    from hf_fisher.collection.stats import EMA, Welford

    mean = torch.ones(5, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match=r"'m2' holds 2 negative \(of 5 values\)"):
        Welford.from_state_dict({"count": 3, "mean": mean, "m2": torch.tensor([1.0, -1, -2, 0, 0])})
    with pytest.raises(InvalidInputError, match=r"'mean' holds 1 NaN"):
        Welford.from_state_dict({"count": 3, "mean": torch.tensor([1.0, float("nan"), 0, 0, 0]), "m2": mean})
    with pytest.raises(InvalidInputError, match="weight_sum"):
        EMA.from_state_dict({"count": 3, "decay": 0.9, "weight_sum": float("nan"), "weight_sq_sum": 0.1,
                             "mean": mean, "m2": mean})
    assert Welford.from_state_dict({"count": 3, "mean": mean, "m2": mean}).count == 3


@pytest.mark.slow
def test_show_no_strict_prints_the_problem(merge_inputs, tmp_path):
    proc = hf_fisher("show", str(merge_inputs / "f1-negative"), "--no-strict", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("WARNING: ") and f"'mean.{TARGET}' has 3 negative" in proc.stdout
