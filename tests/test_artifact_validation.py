"""Artifacts validate what they claim: the architecture they were computed for, every field of
fisher_config.json (an ArtifactError naming the field, never a KeyError/TypeError/...), file names
that stay inside the artifact folder, and stored tensors that match the config."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from test_fisher_artifact import assert_same, make_fisher

from hf_fisher.artifacts.fisher import Fisher, FisherReader
from hf_fisher.errors import ArtifactError, ModelMismatchError

import tiny_models as tm

CONFIG = "fisher_config.json"
Q = "model.layers.0.self_attn.q_proj.weight"


def llama_heads(heads: int, kv_heads: int, layers: int = 2):
    """A tiny LLaMA like tm.llama() (hidden 32) with another head count."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.LlamaForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="module")
def llama():
    return tm.llama()


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("reduction", ["param", "group"])
def test_same_shapes_other_head_count_is_a_mismatch(tmp_path, llama, reduction):
    other = llama_heads(8, 4)  # head_dim 4 instead of 8: every parameter has the same shape
    assert shapes(other) == shapes(llama)
    out = make_fisher(llama, reduction=reduction).save_pretrained(tmp_path / "f")
    Fisher.from_pretrained(out, model=tm.llama(seed=5))  # same architecture, other weights: fine
    with pytest.raises(ModelMismatchError) as e:
        Fisher.from_pretrained(out, model=other)
    msg = str(e.value)
    assert "layout.attention[*].num_heads (layers 0, 1): the artifact has 4, the model has 8" in msg, msg
    assert "layout.attention[*].num_kv_heads (layers 0, 1): the artifact has 2, the model has 4" in msg, msg
    assert "layout.attention[*].head_dim (layers 0, 1): the artifact has 8, the model has 4" in msg, msg
    assert "collect a new Fisher for this model" in msg
    assert "parameters differ" not in msg  # names and shapes alone would have passed
    if reduction == "group":
        k = "model.layers.0.self_attn.k_proj.weight"
        assert f'groups["{k}"]: the artifact sums 2 group(s) (kv_head_0, kv_head_1 along axes (0,)), the model\'s layout has 4' in msg, msg


def test_more_layers_is_a_mismatch(tmp_path, llama):
    out = make_fisher(llama).save_pretrained(tmp_path / "f")
    deeper = tm.llama(layers=3)
    assert set(shapes(llama).items()) < set(shapes(deeper).items())  # every Fisher parameter fits
    with pytest.raises(ModelMismatchError) as e:
        Fisher.from_pretrained(out, model=deeper)
    msg = str(e.value)
    assert "layout.num_layers: the artifact has 2, the model has 3" in msg, msg
    assert "layout.attention (layer 2): the model has one, the artifact none" in msg, msg
    assert "parameters differ" not in msg


def test_other_model_type_with_same_shapes_is_a_mismatch(tmp_path, llama):
    mistral = tm.mistral()
    assert shapes(mistral) == shapes(llama)
    f = make_fisher(llama)
    with pytest.raises(ModelMismatchError, match=r"metadata\.model_type: the artifact has 'llama', the model has 'mistral'"):
        f.validate(mistral)
    # without a stored layout the model type is still compared
    bare = Fisher(f.means, None, reduction="param", groups=None, param_shapes=f.param_shapes, counts=f.counts,
                  metadata=f.metadata)
    out = bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelMismatchError, match="model_type"):
        Fisher.from_pretrained(out, model=mistral)
    Fisher.from_pretrained(out, model=tm.llama(seed=4))


def test_architecture_and_shape_problems_are_reported_together(llama):
    f = make_fisher(llama)
    with pytest.raises(ModelMismatchError) as e:
        f.validate(llama_heads(4, 4))  # MHA: k/v projections are twice as large
    msg = str(e.value)
    assert "layout.attention[*].num_kv_heads (layers 0, 1): the artifact has 2, the model has 4" in msg
    assert "4 of its 21 parameters differ" in msg  # k_proj and v_proj of 2 layers
    assert "model.layers.0.self_attn.k_proj.weight: Fisher expects shape (16, 32), the model has (32, 32)" in msg


# ---------------------------------------------------------------------------- config fields
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A sharded group artifact with layout and variances; the config is mutated per case."""
    src = tmp_path_factory.mktemp("art") / "fisher"
    make_fisher(tm.llama(), reduction="group").save_pretrained(src, max_shard_size=4_000)
    return src


@pytest.fixture
def art(artifact, tmp_path):
    dst = tmp_path / "fisher"
    shutil.copytree(artifact, dst)
    return dst


def read_cfg(path: Path) -> dict:
    return json.loads((path / CONFIG).read_text())


MAP_PATHS = {"param_shapes", "groups", "layout.groups", "layout.param_layers", "metadata.extra"}
FREE_PATHS = ("metadata.extra",)  # anything goes below these
OPTIONAL = {
    "metadata.model_name_or_path", "metadata.revision", "metadata.model_type", "metadata.accumulation_dtype",
    "metadata.storage_dtype", "metadata.data_description", "metadata.ema_decay", "metadata.extra", "layout.experts",
}
OPTIONAL_LEAVES = {"first", "offset", "extra_axes", "router", "router_axis", "top_k"}
NULLABLE = {
    "groups", "layout", "index_file", "layout.model_type", "metadata.model_name_or_path", "metadata.revision",
    "metadata.model_type", "metadata.accumulation_dtype", "metadata.storage_dtype", "metadata.data_description",
    "metadata.ema_decay", "metadata.extra",
}


def key_path(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def fields_of(cfg, path="", in_map=False):
    """(path, container, key, is_map_entry) for every field of the config, depth first."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            p = key_path(path, k)
            if p.startswith(FREE_PATHS) and p not in FREE_PATHS:
                continue
            yield p, cfg, k, in_map
            yield from fields_of(v, p, p in MAP_PATHS)
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            p = f"{path}[{i}]"
            yield p, cfg, i, False
            yield from fields_of(v, p)


def wrong_type(v):
    """A JSON value of a type the field never accepts."""
    if isinstance(v, (dict, list)):
        return "oops"
    if isinstance(v, bool):
        return "yes"
    if isinstance(v, (int, float)):
        return "7"
    if isinstance(v, str):
        return 12345
    return ["oops"]  # null: every nullable field takes a scalar or an object, not a list


_TOKEN = re.compile(r'\.?([A-Za-z_]\w*)|\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]')


def locate(cfg, path: str):
    """(container, key) of the field named by a JSON path such as ``groups["x"].runs[0].count``."""
    keys = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        assert m, path[pos:]
        keys.append(m.group(1) if m.group(1) else int(m.group(2)) if m.group(2) else json.loads(f'"{m.group(3)}"'))
        pos = m.end()
    node = cfg
    for k in keys[:-1]:
        node = node[k]
    return node, keys[-1]


def set_field(cfg, path: str, value) -> None:
    node, key = locate(cfg, path)
    node[key] = value


def del_field(cfg, path: str) -> None:
    node, key = locate(cfg, path)
    del node[key]


def write_cfg(path: Path, cfg) -> None:
    (path / CONFIG).write_text(json.dumps(cfg))


def expect_field_error(path: Path, field: str, load=Fisher.from_pretrained):
    with pytest.raises(ArtifactError) as e:
        load(path)
    assert type(e.value) is ArtifactError
    assert f"'{field}'" in str(e.value), f"{field} not named in: {e.value}"
    return str(e.value)


def test_every_field_with_a_wrong_type_is_named(art):
    cfg = read_cfg(art)
    text = json.dumps(cfg)  # json.loads(text): a fast deep copy
    cases = list(fields_of(cfg))
    assert len(cases) > 300  # the walk reaches the layout's heads, slices and groups
    for path, container, key, _ in cases:
        bad = json.loads(text)
        set_field(bad, path, wrong_type(container[key]))
        write_cfg(art, bad)
        expect_field_error(art, path)
    write_cfg(art, cfg)
    Fisher.from_pretrained(art)


def test_every_required_field_missing_or_null_is_named(art):
    cfg = read_cfg(art)
    text = json.dumps(cfg)
    original = Fisher.from_pretrained(art)
    checked = 0
    for path, container, key, in_map in list(fields_of(cfg)):
        if in_map or isinstance(container, list):
            continue  # map entries and list items are not fields
        optional = path in OPTIONAL or key in OPTIONAL_LEAVES
        for mutation in ("missing", "null"):
            bad = json.loads(text)
            if mutation == "missing":
                del_field(bad, path)
            else:
                set_field(bad, path, None)
            write_cfg(art, bad)
            ok = optional if mutation == "missing" else (path in NULLABLE or key in {"router", "top_k", "channel_axis"})
            if ok:
                loaded = Fisher.from_pretrained(art)  # optional / nullable: still loads, same numbers
                for n in original.names():
                    assert torch.equal(loaded[n], original[n])
            else:
                msg = expect_field_error(art, path)
                assert ("is missing" if mutation == "missing" else "got null") in msg, msg
                checked += 1
    assert checked > 200


@pytest.mark.parametrize(
    "field,value,problem",
    [
        ("counts.samples", -1, ">= 0, got -1"),
        ("counts.tokens", 1.5, "got the number 1.5"),
        ("counts.skipped", True, "got the boolean true"),
        ("counts.nonfinite", "1", "got the string '1'"),
        ("format_version", -2, ">= 0"),
        ("reduction", "layer", "must be one of ['param', 'group']"),
        ("metadata.reduction", "param", "must equal reduction ('group')"),
        ("metadata.mode", "training", "must be one of ['eval', 'train']"),
        ("metadata.ema_decay", "0.9", "finite number"),
        ("layout.attention[0].num_heads", 0, ">= 1, got 0"),
        ("layout.attention[0].num_kv_heads", 3, "must divide num_heads (4)"),
        ("layout.attention[1].heads[0].q[0].stop", -8, ">= 0"),
        ("layout.num_layers", None, "got null"),
        ("tensor_files", [], "at least 1"),
        ("index_file", "", "non-empty"),
        (f'param_shapes["{Q}"][0]', -32, ">= 0"),
        (f'groups["{Q}"].runs[0].count', "4", "integer"),
        (f'groups["{Q}"].extra_axes', [0], "must not repeat an axis"),
    ],
)
def test_bad_values_are_named(art, field, value, problem):
    cfg = read_cfg(art)
    set_field(cfg, field, value)
    write_cfg(art, cfg)
    msg = expect_field_error(art, field)
    assert problem in msg, msg
    expect_field_error(art, field, load=lambda p: Fisher.open_tensor(p, Q))
    expect_field_error(art, field, load=FisherReader)


def test_groups_that_do_not_fit_or_cover_the_parameters(art):
    cfg = read_cfg(art)
    bad = copy.deepcopy(cfg)
    bad["groups"][Q]["runs"][0]["size"] = 7  # 4 x 7 != 32 rows
    write_cfg(art, bad)
    assert "does not fit the parameter's shape (32, 32)" in expect_field_error(art, f'groups["{Q}"]')
    bad = copy.deepcopy(cfg)
    del bad["groups"][Q]  # a group Fisher needs the groups of every parameter
    write_cfg(art, bad)
    expect_field_error(art, f'groups["{Q}"]')
    bad = copy.deepcopy(cfg)
    bad["groups"]["not.a.param"] = bad["groups"][Q]
    write_cfg(art, bad)
    assert "not a parameter listed in param_shapes" in expect_field_error(art, 'groups["not.a.param"]')


@pytest.mark.parametrize("field", ["counts", "param_shapes", "task", "num_layers", "num_heads", "tensor_files"])
def test_garbage_json_names_the_field(art, field):
    cfg = read_cfg(art)
    for _, container, key, _ in fields_of(cfg):
        if key == field:
            container[key] = "__GARBAGE__"
            break
    text = json.dumps(cfg, indent=2).replace('"__GARBAGE__"', "{oops: ]")
    (art / CONFIG).write_text(text)
    with pytest.raises(ArtifactError) as e:
        Fisher.from_pretrained(art)
    assert "not valid JSON" in str(e.value) and f"in field '{field}'" in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"fisher"', "\x00\xff"])
def test_garbage_config_files(art, text):
    (art / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=CONFIG):
        Fisher.from_pretrained(art)


def test_shard_index_fields(art):
    index_path = art / "fisher.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = f"mean.{Q}"
    for value, problem in [("nope.safetensors", "not in tensor_files"), ("../x.safetensors", "'..'"),
                           ("/etc/passwd", "absolute path"), (3, "must be a string")]:
        bad = copy.deepcopy(index)
        bad["weight_map"][key] = value
        index_path.write_text(json.dumps(bad))
        with pytest.raises(ArtifactError) as e:
            Fisher.from_pretrained(art)
        assert f'weight_map["{key}"]' in str(e.value) and problem in str(e.value), str(e.value)
    bad = copy.deepcopy(index)
    bad["weight_map"]["junk.x"] = bad["weight_map"].pop(key)
    index_path.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r'weight_map\["junk.x"\]'):
        Fisher.open_tensor(art, Q)
    index_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="index.json is not valid JSON"):
        Fisher.from_pretrained(art)
    del index["weight_map"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="'weight_map' is missing"):
        FisherReader(art)


# ---------------------------------------------------------------------------- files stay inside
@pytest.fixture
def plain(tmp_path, llama):
    return make_fisher(llama).save_pretrained(tmp_path / "plain")


@pytest.mark.parametrize(
    "name,problem",
    [("../outside.safetensors", "'..'"), ("sub/../../outside.safetensors", "'..'"),
     ("/tmp/outside.safetensors", "absolute path"), ("C:\\outside.safetensors", "absolute path"),
     ("..\\outside.safetensors", "'..'")],
)
def test_tensor_files_outside_the_folder_are_rejected(plain, name, problem):
    shutil.copy(plain / "fisher.safetensors", plain.parent / "outside.safetensors")
    cfg = read_cfg(plain)
    cfg["tensor_files"] = [name]
    write_cfg(plain, cfg)
    for load in (Fisher.from_pretrained, lambda p: Fisher.open_tensor(p, Q), FisherReader):
        msg = expect_field_error(plain, "tensor_files[0]", load=load)
        assert problem in msg, msg


def test_symlinks_pointing_outside_are_rejected(plain, llama):
    f = Fisher.from_pretrained(plain)
    outside = plain.parent / "elsewhere.safetensors"
    (plain / "fisher.safetensors").rename(outside)
    (plain / "fisher.safetensors").symlink_to(outside)
    msg = expect_field_error(plain, "tensor_files[0]")
    assert "resolves outside the artifact folder" in msg
    with pytest.raises(ArtifactError, match="resolves outside"):
        Fisher.open_tensor(plain, Q)
    # a link that stays inside the folder is fine
    (plain / "fisher.safetensors").unlink()
    outside.rename(plain / "data.bin")
    (plain / "fisher.safetensors").symlink_to("data.bin")
    assert_same(f, Fisher.from_pretrained(plain))
    # so is a config that is a link outside the folder: rejected too
    (plain / CONFIG).rename(plain.parent / "cfg.json")
    (plain / CONFIG).symlink_to(plain.parent / "cfg.json")
    expect_field_error(plain, CONFIG)


def test_hub_cache_snapshot_links_are_accepted(plain):
    """huggingface_hub's cache stores snapshot files as links into the repo's blobs/ folder."""
    f = Fisher.from_pretrained(plain)
    repo = plain.parent / "hub" / "models--org--fisher-math"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(plain))):
        shutil.copy(plain / name, repo / "blobs" / f"blob{i}")
        (snap / name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert_same(f, Fisher.from_pretrained(snap))
    # but not a link from a snapshot to anywhere else
    (snap / "fisher.safetensors").unlink()
    (snap / "fisher.safetensors").symlink_to(plain / "fisher.safetensors")
    expect_field_error(snap, "tensor_files[0]")


# ---------------------------------------------------------------------------- stored tensors
def test_stored_tensors_must_match_the_config(plain):
    path = plain / "fisher.safetensors"
    good = load_file(str(path))
    for key, tensor, problem in [
        (f"mean.{Q}", torch.zeros(31, 32, dtype=torch.float64), "has shape (31, 32), but fisher_config.json gives it (32, 32)"),
        (f"variance.{Q}", torch.zeros(32, 32, dtype=torch.int64), "dtype torch.int64"),
        ("mean.not.a.param", torch.zeros(1, dtype=torch.float64), "unexpected tensor 'mean.not.a.param'"),
        ("junk", torch.zeros(1, dtype=torch.float64), "unexpected tensor 'junk'"),
    ]:
        save_file({**good, key: tensor}, str(path))
        with pytest.raises(ArtifactError) as e:
            Fisher.from_pretrained(plain)
        assert problem in str(e.value), str(e.value)
        if key.endswith(Q):
            kind = key.partition(".")[0]
            with pytest.raises(ArtifactError, match=problem.split(",")[0].replace("(", r"\(").replace(")", r"\)")):
                Fisher.open_tensor(plain, Q, kind=kind)
    save_file({k: v for k, v in good.items() if not k.startswith("variance.")}, str(path))
    with pytest.raises(ArtifactError, match=r"has_variance: true"):
        Fisher.from_pretrained(plain)
    cfg = read_cfg(plain)
    cfg["has_variance"] = False
    write_cfg(plain, cfg)
    assert not Fisher.from_pretrained(plain).has_variance
    save_file(good, str(path))
    with pytest.raises(ArtifactError, match="'has_variance' is false"):
        Fisher.from_pretrained(plain)


def test_newer_format_asks_for_an_upgrade(plain):
    cfg = read_cfg(plain)
    cfg["format_version"] = 99
    cfg["counts"] = "from the future"  # the version is judged first
    write_cfg(plain, cfg)
    with pytest.raises(ArtifactError, match="format 99, newer than this hf_fisher supports"):
        Fisher.from_pretrained(plain)


def test_unknown_metadata_keys_are_kept(plain):
    cfg = read_cfg(plain)
    cfg["metadata"]["new_in_v2"] = {"x": 1}
    cfg["something_new"] = [1]
    write_cfg(plain, cfg)
    f = Fisher.from_pretrained(plain)
    assert f.metadata.extra["new_in_v2"] == {"x": 1} and f.metadata.extra["seed"] == 0
