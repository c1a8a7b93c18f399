"""The Fisher artifact: construction checks, save/load round trips, sharding, atomic writes,
model validation, and the README model card."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from hf_fisher import plugins
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.errors import ArtifactError, InvalidInputError, ModelMismatchError
from hf_fisher.layout import ParamGroups

import tiny_models as tm


def make_fisher(model, *, reduction="param", dtype=torch.float64, variance=True, seed=0, task="math", name="org/tiny-llama"):
    """A Fisher with random positive values for every parameter of ``model`` (and its real layout)."""
    layout = plugins.model_layout(model)
    g = torch.Generator().manual_seed(seed)
    mean, var = {}, {}
    for n, p in model.named_parameters():
        shape = (layout.groups[n].num_groups,) if reduction == "group" else tuple(p.shape)
        mean[n] = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
        var[n] = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    meta = FisherMetadata(
        task=task, estimator="empirical", reduction=reduction, normalization="mean",
        model_name_or_path=name, revision="abc123", model_type=model.config.model_type,
        mode="eval", accumulation_dtype=torch.float64, storage_dtype=dtype,
        data_description="64 toy sequences", extra={"seed": seed},
    )
    return Fisher(
        mean, var if variance else None, reduction=reduction, groups=dict(layout.groups),
        param_shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
        counts=Counts(samples=64, tokens=1000, skipped=3, nonfinite=1), metadata=meta, layout=layout,
    )


@pytest.fixture(scope="module")
def llama():
    return tm.llama()


def assert_same(a: Fisher, b: Fisher):
    assert a.names() == b.names() and a.reduction == b.reduction
    for n in a.names():
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    assert set(a.variances) == set(b.variances)
    for n, v in a.variances.items():
        assert torch.equal(v, b.variances[n]), n
    assert a.counts == b.counts
    assert a.metadata == b.metadata
    assert a.param_shapes == b.param_shapes
    assert {k: g.to_dict() for k, g in a.groups.items()} == {k: g.to_dict() for k, g in b.groups.items()}
    assert (a.layout is None) == (b.layout is None)
    if a.layout is not None:
        assert a.layout.to_dict() == b.layout.to_dict()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".tmp-hf-fisher-", ".old-hf-fisher-"))]


# ---------------------------------------------------------------------------- object
def test_getitem_shapes_and_mapping(llama):
    f = make_fisher(llama)
    params = dict(llama.named_parameters())
    assert f.names() == sorted(params) and len(f) == len(params)
    for n in f.names():
        assert f[n].shape == params[n].shape and n in f
    assert "nope" not in f
    with pytest.raises(KeyError, match="nope"):
        f["nope"]
    fg = make_fisher(llama, reduction="group")
    assert fg["model.layers.0.self_attn.q_proj.weight"].shape == (4,)
    assert fg["model.layers.0.self_attn.k_proj.weight"].shape == (2,)
    assert fg["model.layers.1.mlp.down_proj.weight"].shape == (40,)
    assert fg.group_names("model.layers.0.self_attn.k_proj.weight") == ["kv_head_0", "kv_head_1"]
    assert fg.variances["lm_head.weight"].shape == (61,)


def test_constructor_validates_names_and_shapes(llama):
    f = make_fisher(llama)
    name = "model.layers.0.self_attn.q_proj.weight"
    common = dict(reduction="param", groups=f.groups, param_shapes=f.param_shapes, counts=f.counts, metadata=f.metadata)
    bad = dict(f.means)
    bad[name] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="q_proj"):
        Fisher(bad, None, **common)
    var = dict(f.variances)
    del var[name]
    with pytest.raises(InvalidInputError, match="q_proj"):
        Fisher(f.means, var, **common)
    var = dict(f.variances)
    var[name] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="variance for"):
        Fisher(f.means, var, **common)
    fg = make_fisher(llama, reduction="group")
    bad = dict(fg.means)
    bad[name] = torch.zeros(5, dtype=torch.float64)  # 4 heads
    with pytest.raises(InvalidInputError, match="length 4"):
        Fisher(bad, None, reduction="group", groups=fg.groups, param_shapes=fg.param_shapes, counts=fg.counts, metadata=fg.metadata)
    groups = dict(fg.groups)
    groups[name] = ParamGroups.single(0, 31)  # does not cover 32 rows
    with pytest.raises(InvalidInputError, match="partition"):
        Fisher(fg.means, None, reduction="group", groups=groups, param_shapes=fg.param_shapes, counts=fg.counts, metadata=fg.metadata)
    with pytest.raises(InvalidInputError, match="metadata.reduction"):
        Fisher(f.means, None, **{**common, "reduction": "group"})


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("reduction", ["param", "group"])
def test_save_load_round_trip(tmp_path, llama, reduction):
    f = make_fisher(llama, reduction=reduction)
    out = f.save_pretrained(tmp_path / "fisher-math")
    assert sorted(os.listdir(out)) == ["README.md", "fisher.safetensors", "fisher_config.json"]
    g = Fisher.from_pretrained(out)
    assert_same(f, g)
    assert g.metadata.extra == {"seed": 0} and g.metadata.storage_dtype == "float64"
    with safe_open(str(out / "fisher.safetensors"), framework="pt") as h:
        meta = h.metadata()
        keys = set(h.keys())
    assert meta["format"] == "pt" and meta["task"] == "math"
    assert keys == {f"mean.{n}" for n in f.names()} | {f"variance.{n}" for n in f.names()}
    cfg = json.loads((out / "fisher_config.json").read_text())
    assert cfg["counts"] == {"samples": 64, "tokens": 1000, "skipped": 3, "nonfinite": 1}
    assert cfg["tensor_files"] == ["fisher.safetensors"] and cfg["index_file"] is None
    assert loaded_without_pickle(out)


def loaded_without_pickle(path) -> bool:
    import pickle

    real = pickle.load, pickle.loads, torch.load

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    pickle.load = pickle.loads = torch.load = boom
    try:
        Fisher.from_pretrained(path)
    finally:
        pickle.load, pickle.loads, torch.load = real
    return True


def test_round_trip_without_variance_and_without_layout(tmp_path, llama):
    f = make_fisher(llama, variance=False)
    f = Fisher(f.means, None, reduction="param", groups=None, param_shapes=f.param_shapes, counts=f.counts, metadata=f.metadata)
    g = Fisher.from_pretrained(f.save_pretrained(tmp_path / "x"))
    assert_same(f, g)
    assert g.variances == {} and g.layout is None and not g.has_variance


def test_sharded_save_and_lazy_reader(tmp_path, llama):
    f = make_fisher(llama)
    out = f.save_pretrained(tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(os.listdir(out))
    shards = [x for x in files if x.startswith("fisher-") and x.endswith(".safetensors")]
    assert len(shards) >= 3 and "fisher.safetensors" not in files
    index = json.loads((out / "fisher.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert len(index["weight_map"]) == 2 * len(f)
    expected_bytes = sum(t.numel() * t.element_size() for t in list(f.means.values()) + list(f.variances.values()))
    assert index["metadata"]["total_size"] == expected_bytes
    assert_same(f, Fisher.from_pretrained(out))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(Fisher.open_tensor(out, name), f[name])
    assert torch.equal(Fisher.open_tensor(out, name, kind="variance"), f.variances[name])
    with pytest.raises(KeyError):
        Fisher.open_tensor(out, "not.a.param")


def test_float16_storage_is_preserved(tmp_path, llama):
    f = make_fisher(llama, dtype=torch.float16, reduction="group")
    g = Fisher.from_pretrained(f.save_pretrained(tmp_path / "half"))
    for n in f.names():
        assert g[n].dtype == torch.float16 and torch.equal(g[n], f[n])
    assert g.metadata.storage_dtype == "float16"


# ---------------------------------------------------------------------------- atomicity
def test_interrupted_save_leaves_nothing(tmp_path, llama, monkeypatch):
    import hf_fisher.artifacts.cards

    def broken(*a, **k):
        raise RuntimeError("disk full while rendering the card")

    monkeypatch.setattr(hf_fisher.artifacts.cards, "render_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_fisher(llama).save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


def test_interrupted_overwrite_keeps_previous_artifact(tmp_path, llama, monkeypatch):
    import safetensors.torch

    old = make_fisher(llama, seed=1)
    target = old.save_pretrained(tmp_path / "art")
    before = sorted(os.listdir(target))
    real_save = safetensors.torch.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError("interrupted mid-write")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="interrupted"):
        make_fisher(llama, seed=2).save_pretrained(target, max_shard_size=20_000)
    assert sorted(os.listdir(target)) == before
    assert_same(old, Fisher.from_pretrained(target))
    assert leftovers(tmp_path) == []


def test_failed_swap_restores_previous_artifact(tmp_path, llama, monkeypatch):
    old = make_fisher(llama, seed=1)
    target = old.save_pretrained(tmp_path / "art")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-hf-fisher-"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        make_fisher(llama, seed=2).save_pretrained(target)
    monkeypatch.setattr(os, "rename", real_rename)
    assert_same(old, Fisher.from_pretrained(target))
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_artifact(tmp_path, llama):
    target = make_fisher(llama, seed=1).save_pretrained(tmp_path / "art", max_shard_size=20_000)
    new = make_fisher(llama, seed=2)
    new.save_pretrained(target)  # unsharded now: old shards must not survive
    assert sorted(os.listdir(target)) == ["README.md", "fisher.safetensors", "fisher_config.json"]
    assert_same(new, Fisher.from_pretrained(target))
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_foreign_folder(tmp_path, llama):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        make_fisher(llama).save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- broken artifacts
def test_missing_or_broken_files_raise_artifact_error(tmp_path, llama):
    with pytest.raises(ArtifactError, match="does not exist"):
        Fisher.from_pretrained(tmp_path / "nowhere")
    f = make_fisher(llama)
    a = f.save_pretrained(tmp_path / "a")
    (a / "fisher_config.json").unlink()
    with pytest.raises(ArtifactError, match="fisher_config.json"):
        Fisher.from_pretrained(a)

    b = f.save_pretrained(tmp_path / "b", max_shard_size=20_000)
    shard = sorted(p for p in os.listdir(b) if p.startswith("fisher-"))[1]
    (b / shard).unlink()
    with pytest.raises(ArtifactError, match=shard):
        Fisher.from_pretrained(b)

    c = f.save_pretrained(tmp_path / "c")
    data = (c / "fisher.safetensors").read_bytes()
    (c / "fisher.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="fisher.safetensors"):
        Fisher.from_pretrained(c)


# ---------------------------------------------------------------------------- model checks
def test_model_validation(tmp_path, llama):
    out = make_fisher(llama).save_pretrained(tmp_path / "f")
    Fisher.from_pretrained(out, model=tm.llama(seed=3))  # same architecture, other weights: fine
    with pytest.raises(ModelMismatchError) as e:
        Fisher.from_pretrained(out, model=tm.llama(vocab=67))
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and "(61, 32)" in msg and "(67, 32)" in msg
    with pytest.raises(ModelMismatchError, match="not a parameter of the model") as e:
        Fisher.from_pretrained(out, model=tm.gpt2())
    assert "and " in str(e.value) and "more" in str(e.value)  # long lists are truncated
    with pytest.raises(ModelMismatchError, match=r"(?s)9 of its 21 .*model\.layers\.1\.input_layernorm\.weight: in the Fisher with shape \(32,\)"):
        make_fisher(llama).validate(tm.llama(layers=1))


# ---------------------------------------------------------------------------- model card
def test_model_card(tmp_path, llama):
    f = make_fisher(llama, reduction="group")
    out = f.save_pretrained(tmp_path / "card")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "hf_fisher"
    assert card.data.tags == ["fisher-information", "hf-fisher", "empirical", "group"]
    assert card.data.base_model == "org/tiny-llama"
    text = card.text
    per_layer = f.per_layer()
    total = sum(per_layer.values())
    for layer, label in [(0, "| 0 |"), (1, "| 1 |"), (None, "| other (not in a layer) |")]:
        row = next(line for line in text.splitlines() if line.startswith(label))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(per_layer[layer], rel=1e-3)
        assert float(cells[2]) == pytest.approx(100 * per_layer[layer] / total, abs=0.01)
    assert "Fisher.from_pretrained" in text and "| 64 | 1000 | 3 | 1 |" in text
    # a local path is not a Hub id: no base_model
    f2 = make_fisher(llama, name="/tmp/checkpoints/run-1")
    card2 = ModelCard.load(f2.save_pretrained(tmp_path / "card2") / "README.md")
    assert card2.data.base_model is None and "/tmp/checkpoints/run-1" in card2.text


# ---------------------------------------------------------------------------- card: base_model
def card_of(fisher, folder):
    return ModelCard.load(fisher.save_pretrained(folder) / "README.md")


def test_base_model_only_for_hub_ids(tmp_path, llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "run-1").mkdir(parents=True)
    (tmp_path / "localmodel").mkdir()
    cases = {
        "org/tiny-llama": "org/tiny-llama",  # not a local path, a valid repo id
        "gpt2": "gpt2",
        "checkpoints/run-1": None,  # looks like owner/name, but is an existing relative folder
        "localmodel": None,  # existing relative folder
        str(tmp_path / "localmodel"): None,  # absolute path
        "./nowhere": None,  # a path, not a repo id
        "a/b/c": None,
        "org/model..x": None,  # validate_repo_id refuses '..'
        "hf_fisher demo: tiny LLaMA": None,
    }
    for i, (name, expected) in enumerate(cases.items()):
        f = make_fisher(llama, name=name)
        card = card_of(f, tmp_path / f"out{i}")
        assert card.data.base_model == expected, name
    # a model transformers resolved from the Hub (it records the commit hash) is a Hub id even if a
    # folder of the same name happens to exist here now; without the hash the folder wins
    f = make_fisher(llama, name="checkpoints/run-1")
    hub = Fisher(f.means, None, reduction="param", groups=f.groups, param_shapes=f.param_shapes, counts=f.counts,
                 metadata=replace(f.metadata, revision="0123456789abcdef0123456789abcdef01234567"))
    assert card_of(hub, tmp_path / "hub").data.base_model == "checkpoints/run-1"


# ---------------------------------------------------------------------------- card: escaping
class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.stack.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        for tag in set(self.stack):
            self.text.setdefault(tag, []).append(data)
        if (self.stack and self.stack[-1] in ("td", "th")) or ("td" in self.stack or "th" in self.stack):
            self.rows[-1][-1] += data


def render_html(markdown: str) -> _Html:
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(markdown)
    parser = _Html()
    parser.feed(html)
    return parser


NASTY = (
    "x</details>\n# pwned | `tick` *b* _i_ [l](http://e.com) ![img](http://e.com/i.png) <img src=x onerror=alert(1)>"
    "\n---\nbase_model: evil/model\n$x$ ~~s~~ \\ www.evil.com &amp; a@b.c\r\tend"
)


def shown(text: str) -> str:
    """How a value must read in the rendered card: the same text, line breaks shown as \\n etc."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def test_card_renders_task_and_names_inertly(tmp_path, llama):
    f = make_fisher(llama, task=NASTY, name="org/<script>alert(1)</script>")
    odd = "model.layers.0.x|y</td><b>z"  # a parameter name in the per-layer table
    mean = dict(f.means)
    mean[odd] = torch.full((3,), 1e6, dtype=torch.float64)
    f = Fisher(mean, None, reduction="param", groups=None, param_shapes={**f.param_shapes, odd: (3,)},
               counts=f.counts, metadata=replace(f.metadata, estimator="emp*irical", extra={"k|ey": "v<i>al"}))
    card = card_of(f, tmp_path / "card")
    # YAML header: values quoted by CardData, nothing injected
    assert card.data.hf_fisher["task"] == NASTY
    assert card.data.base_model is None and card.data.library_name == "hf_fisher"
    assert card.data.tags == ["fisher-information", "hf-fisher", "emp*irical", "param"]
    assert set(card.data.to_dict()) == {"library_name", "tags", "hf_fisher"}  # no injected base_model
    # Markdown body: the values render as text; no HTML, heading, link, image or code from them
    page = render_html(card.text)
    assert page.tags.count("h1") == 1
    assert set(page.tags) <= {"h1", "h2", "p", "strong", "em", "code", "ul", "li", "table", "thead", "tbody", "tr",
                              "th", "td", "pre"}, set(page.tags)
    heading = "".join(page.text["h1"])
    assert heading == f'Fisher information for task "{shown(NASTY)}" of "org/<script>alert(1)</script>"', heading
    assert not any("pwned" in t for t in page.text.get("h2", []))
    assert all("tick" not in t for t in page.text.get("code", [])) and "em" in page.tags  # em: the template's *i*
    assert not any(t.strip() == "b" for t in page.text.get("em", []))
    rows = {r[0]: r for r in page.rows}
    assert rows["task"] == ["task", shown(NASTY)]
    assert rows["estimator"] == ["estimator", "emp*irical"]
    assert rows["extra.k|ey"] == ["extra.k|ey", "v<i>al"]
    assert rows["0"][3] == f"{odd} = 3.0000e+06", rows["0"]
    assert all(len(r) in (2, 4) for r in page.rows), page.rows  # no cell split by a '|'
    assert "pwned" in card.text and "&lt;/details&gt;" in card.text  # escaped, not stripped


# ---------------------------------------------------------------------------- permissions, fsync
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value):
        os.umask(value)

    yield set_umask
    os.umask(old)


def modes(folder: Path) -> tuple[int, set[int]]:
    return folder.stat().st_mode & 0o7777, {p.stat().st_mode & 0o7777 for p in folder.iterdir()}


@pytest.mark.parametrize("mask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_new_artifacts_get_the_umask_permissions(tmp_path, llama, umask, mask, folder_mode, file_mode):
    umask(mask)
    out = make_fisher(llama).save_pretrained(tmp_path / "new", max_shard_size=20_000)
    assert modes(out) == (folder_mode, {file_mode})
    assert len(os.listdir(out)) > 4  # shards, index, config, card: every file checked


def test_overwrite_keeps_the_folder_mode(tmp_path, llama, umask):
    umask(0o022)
    out = make_fisher(llama, seed=1).save_pretrained(tmp_path / "art")
    out.chmod(0o750)
    make_fisher(llama, seed=2).save_pretrained(out)
    assert modes(out) == (0o750, {0o644})
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o711)
    make_fisher(llama).save_pretrained(empty)
    assert modes(empty) == (0o711, {0o644})


@pytest.mark.parametrize("existing", [False, True])
def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, llama, monkeypatch, existing):
    target = tmp_path / "art"
    if existing:
        make_fisher(llama, seed=1).save_pretrained(target)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_rename(src, dst)

    def replace_(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace_)
    make_fisher(llama, seed=2).save_pretrained(target, max_shard_size=20_000)
    final = [i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f"-> {target}")
             and Path(what.split(" -> ")[0]).name.startswith(".tmp-hf-fisher-art-")]
    assert len(final) == 1, events
    tmp = events[final[0]][1].split(" -> ")[0]
    before = {what for kind, what in events[: final[0]] if kind == "fsync"}
    for name in os.listdir(target):
        assert f"{tmp}/{name}" in before, f"{name} not fsynced before the rename"
    assert tmp in before  # the folder itself
    assert ("fsync", str(tmp_path)) in events[final[0] + 1:]  # the parent, after the rename
    if existing:
        aside = [what for kind, what in events[: final[0]] if kind == "rename" and what.startswith(f"{target} -> ")]
        assert len(aside) == 1 and Path(aside[0].split(" -> ")[1]).name.startswith(".old-hf-fisher-art-")
