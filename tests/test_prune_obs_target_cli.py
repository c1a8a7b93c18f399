"""``hf-fisher prune --obs-target``: passed through to ``prune(obs_target=)`` (the same pruned
weights as the API, recorded in pruning.json) and refused, exit 2, before any loading when the
score is not kfac."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from hf_fisher.cli import main
from hf_fisher.consumers.prune.core import prune
from hf_fisher.data import load_samples, make_batches

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_obs_target_cli")
    tm.llama(torch.float64, layers=2, seed=4).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, tm.VOCAB, (n,), generator=g).tolist()} for n in (9, 7, 8, 6, 9, 5)]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cli(workspace, out, *extra):
    return main(["prune", "--model", str(workspace / "model"), "--sparsity", "0.5", "--scope", "layer",
                 "--data", str(workspace / "calib.jsonl"), "--batch-size", "3", "--dtype", "float64",
                 "--out", str(out), "--no-progress", *extra])


def test_obs_target_layer_equals_the_api_and_is_recorded(workspace):
    out = workspace / "layer"
    assert _cli(workspace, out, "--obs-target", "layer") == 0
    info = json.loads((out / "pruning.json").read_text())
    assert info["stats"]["obs_target"] == "layer"
    batches = make_batches(None, load_samples(workspace / "calib.jsonl"), batch_size=3, max_length=512,
                           task_type="causal_lm", pad_id=0, vocab_size=tm.VOCAB)
    model = tf.AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float64).eval()
    r = prune(model, None, sparsity=0.5, scope="layer", rescale_batches=batches, calibration_batches=batches,
              progress=False, obs_target="layer")
    saved = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).state_dict()
    for name, value in r.model.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    # the default target gives other weights (the flag reached the pruner)
    default = workspace / "default"
    assert _cli(workspace, default) == 0
    assert json.loads((default / "pruning.json").read_text())["stats"]["obs_target"] == "unpruned"
    other = tf.AutoModelForCausalLM.from_pretrained(default, dtype=torch.float64).state_dict()
    assert any(not torch.equal(other[n], saved[n]) for n in saved)


def test_obs_target_refused_for_another_score_before_loading(tmp_path, capsys):
    tm.llama(torch.float32).config.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)  # loading would fail: the refusal comes first
    (tmp_path / "calib.txt").write_text("the cat\na dog\n", encoding="utf-8")
    rc = main(["prune", "--model", str(tmp_path / "m"), "--sparsity", "0.3", "--scope", "layer", "--score", "flap",
               "--data", str(tmp_path / "calib.txt"), "--obs-target", "layer", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--obs-target is what the KFAC-OBS update reconstructs; it applies to --score kfac only, not --score flap" in err
    assert "obs_target=" not in err
    assert not (tmp_path / "out").exists()
