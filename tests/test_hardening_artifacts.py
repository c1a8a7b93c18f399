"""Issue 21, artifacts: invalid values in a Fisher / KFAC artifact, the merge inputs, the cards.

Every reader refuses a Fisher that is not finite and non-negative (naming the tensor and the
count) before any work or write; ``strict=False`` reads it with a WARNING and records it.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_fisher.errors import ArtifactError, InvalidInputError
from hf_fisher.fisher import Counts, Fisher, FisherMetadata, FisherReader

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
    with caplog.at_level(logging.WARNING, logger="hf_fisher.fisher"):
        f = Fisher.from_pretrained(folder, strict=False)
    assert any(r.levelno == logging.WARNING and TARGET in r.getMessage() for r in caplog.records)
    problems = f.metadata.extra["load_problems"]
    assert len(problems) == 1 and f"'mean.{TARGET}' has 3 NaN" in problems[0]
    assert torch.isnan(f[TARGET]).sum() == 3  # the values as stored
    with pytest.raises(ArtifactError, match="3 NaN"):  # consumers still refuse it
        f.check_values()
    reader = FisherReader(folder, strict=False)
    with caplog.at_level(logging.WARNING, logger="hf_fisher.fisher"):
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

    from hf_fisher.kfac import KFAC_WEIGHTS_NAME, KFACFisher

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
        from hf_fisher.consumers.merge_kfac import load_kfac
        load_kfac(loose)


def test_kfac_negative_off_diagonal_is_fine(tmp_path, kfac_folder):
    import shutil

    from hf_fisher.kfac import KFAC_WEIGHTS_NAME, KFACFisher

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
    from hf_fisher.consumers.merging import merge_with_fisher

    r = merge_inputs
    for fishers in ([r / "f0", r / f"f1-{bad}"], [r / "f0", Fisher.from_pretrained(r / f"f1-{bad}", strict=False)]):
        with pytest.raises(ArtifactError) as e:
            merge_with_fisher([r / "m0", r / "m1"], fishers, output_dir=tmp_path / "out", progress=False)
        _names_tensor_and_count(str(e.value), bad)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["nan", "negative"])
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


def test_show_refuses_nan(merge_inputs, tmp_path):
    proc = hf_fisher("show", str(merge_inputs / "f1-nan"), cwd=tmp_path)
    assert proc.returncode == 2 and "nan" not in proc.stdout.lower(), proc.stdout
    _names_tensor_and_count(proc.stderr, "nan")


def test_lora_merge_refuses_invalid_fisher(tmp_path):
    import copy

    import peft

    from hf_fisher.consumers.merge_lora import merge_lora_adapters
    from hf_fisher.consumers.merging import merge_with_fisher

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
    import hf_fisher
    from transformers import Trainer, TrainingArguments

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
