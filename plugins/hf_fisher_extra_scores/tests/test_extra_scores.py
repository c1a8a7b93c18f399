"""The hf-fisher-extra-scores plugin as a third party ships it: a real distribution (its
``*.dist-info`` with the ``hf_fisher`` entry point; the installed one when scripts/setup.sh
installed it, else one made here in a temporary folder), on a tiny real LLaMA built from a config.

Self-contained (nothing from the repository's tests/ folder). The reference for ``activation_rms``
runs the model one sample at a time on its real tokens only (no padding), records the inputs of
every ``o_proj`` / ``down_proj`` with forward pre-hooks and computes
``sqrt(Σ_t Σ_{j∈J_u} x_{t,j}² / n)`` from the head / channel column ranges of the config.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hf_fisher import plugins
from hf_fisher.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[1]  # plugins/hf_fisher_extra_scores
REPO = ROOT.parents[1]
DIST = "hf-fisher-extra-scores"
ENTRY = "extra_scores = hf_fisher_extra_scores.scores"
H, HD, FF, LAYERS, VOCAB = 4, 4, 12, 2, 64


def _installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> list[str]:
    """Folders to put on sys.path / PYTHONPATH so that the distribution is installed: none when
    it is; else a ``hf_fisher_extra_scores-0.1.0.dist-info`` made here plus the plugin's source."""
    if _installed():
        return []
    where = tmp_path_factory.mktemp("site")
    info = where / "hf_fisher_extra_scores-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[hf_fisher]\n{ENTRY}\n")
    return [str(where), str(ROOT)]


@pytest.fixture
def installed(site, monkeypatch):
    for p in reversed(site):
        monkeypatch.syspath_prepend(p)
    monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
    importlib.invalidate_caches()
    plugins.reset()
    yield
    plugins.reset()


def tiny_llama(seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=H * HD, intermediate_size=FF, num_hidden_layers=LAYERS,
                         num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).to(torch.float64).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((7, 5, 3), (6, 6, 2)):
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def reference(model, data) -> dict[tuple[str, int, int], float]:
    """``(kind, layer, index) -> sqrt(Σ_t Σ_{j∈J_u} x_{t,j}² / n)``, one unpadded sample at a time."""
    sumsq: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for kind, mod in (("head", layer.self_attn.o_proj), ("channel", layer.mlp.down_proj)):
            def pre(m, args, key=(kind, li)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sumsq[key] = sumsq.get(key, 0) + (x * x).sum(0)
            hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for b in data:
                for row, m in zip(b["input_ids"], b["attention_mask"]):
                    real = row[m.bool()]
                    model(input_ids=real[None])
                    count += int(real.numel())
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for li in range(LAYERS):
        for h in range(H):
            out[("head", li, h)] = float(sumsq[("head", li)][h * HD:(h + 1) * HD].sum() / count) ** 0.5
        for c in range(FF):
            out[("channel", li, c)] = float(sumsq[("channel", li)][c] / count) ** 0.5
    return out


def test_the_distribution_registers_the_score_and_plugins_list_it(installed):
    from hf_fisher_extra_scores.scores import ActivationRMSScore

    assert plugins.prune_scores()["activation_rms"] is ActivationRMSScore
    (row,) = [d for d in plugins.describe() if d["kind"] == "prune_score" and d["name"] == "activation_rms"]
    assert row["plugin"] == "extra_scores" and row["distribution"] == DIST
    assert {"fisher", "kfac", "flap"} <= set(plugins.prune_scores())  # the built-ins stay


def test_score_equals_the_brute_force_reference(installed):
    from hf_fisher.consumers.prune.statistics import score_units
    from hf_fisher.consumers.prune.units import structured_units

    model, data = tiny_llama(), batches()
    units = structured_units(model, plugins.model_layout(model), ["heads", "channels"])
    scores, _ = score_units(model, units, "activation_rms", batches=data, progress=False)
    ref = reference(model, data)
    assert len(units) == len(ref)
    got = {(u.kind, u.layer, u.index): float(s) for u, s in zip(units, scores)}
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-10), key


def test_prune_api_removes_the_lowest_scores_per_layer(installed):
    import hf_fisher

    model, data = tiny_llama(), batches()
    ref = reference(model, data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = hf_fisher.prune(model, sparsity=0.3, score="activation_rms", scope="layer", calibration_batches=data,
                             progress=False)
    assert result.stats["score"] == "activation_rms" and result.stats["removed_units"] > 0
    removed = {(u["kind"], u["layer"], u["index"]) for u in result.removed}
    for kind, count in (("head", H), ("channel", FF)):
        for li in range(LAYERS):
            gone = [ref[(kind, li, i)] for i in range(count) if (kind, li, i) in removed]
            kept = [ref[(kind, li, i)] for i in range(count) if (kind, li, i) not in removed]
            assert gone and kept and max(gone) <= min(kept), (kind, li)
    # a removed head's O columns are zero, the rest of o_proj unchanged
    (kind, li, h) = next(k for k in sorted(removed) if k[0] == "head")
    w = model.model.layers[li].self_attn.o_proj.weight
    assert bool((w[:, h * HD:(h + 1) * HD] == 0).all())
    result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_prune_api_refuses_what_the_score_cannot_do(installed):
    import hf_fisher

    model = tiny_llama()
    with pytest.raises(InvalidInputError, match="calibration data"):
        hf_fisher.prune(model, sparsity=0.3, score="activation_rms", progress=False)
    with pytest.raises(InvalidInputError, match="output projections"):
        hf_fisher.prune(model, sparsity=0.3, score="activation_rms", structured="vocab", calibration_batches=batches(),
                        progress=False)
    with pytest.raises(InvalidInputError, match="structured units only"):
        hf_fisher.prune(model, sparsity=0.3, score="activation_rms", structured=None, calibration_batches=batches(),
                        progress=False)


def _cli(*args: str, site: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("hf-fisher")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *site, os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("HF_FISHER_PLUGINS", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hf_fisher_plugins_lists_the_score(site, tmp_path):
    proc = _cli("plugins", site=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "activation_rms" in ln)
    assert "prune_score" in line and "extra_scores" in line and DIST in line


def test_cli_prune_with_the_plugin_score(site, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    data = batches()
    rows = [{"input_ids": row[m.bool()].tolist()} for b in data for row, m in zip(b["input_ids"], b["attention_mask"])]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("prune", "--model", str(tmp_path / "model"), "--sparsity", "0.3", "--score", "activation_rms",
                "--scope", "layer", "--data", str(tmp_path / "calib.jsonl"), "--no-rescale", "--dtype", "float64",
                "--out", str(tmp_path / "out"), "--no-progress", site=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert info["stats"]["score"] == "activation_rms"
    ref = reference(model, [{"input_ids": torch.tensor([r["input_ids"]]),
                             "attention_mask": torch.ones(1, len(r["input_ids"]), dtype=torch.long)} for r in rows])
    removed = {(u["kind"], u["layer"], u["index"]) for u in info["removed"]}
    for li in range(LAYERS):
        gone = [ref[("channel", li, c)] for c in range(FF) if ("channel", li, c) in removed]
        kept = [ref[("channel", li, c)] for c in range(FF) if ("channel", li, c) not in removed]
        assert gone and max(gone) <= min(kept)
