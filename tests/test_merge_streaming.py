"""The streaming merge: sharded inputs and outputs with an index, loading the result with
transformers, the output dtype, tied weights, and the peak memory of a merge of ~200 MB of inputs
(measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.consumers.merge.api import merge_with_fisher
from hf_fisher.consumers.merge.io import (
    FolderSource,
    ModelSource,
    ShardedWriter,
    TensorInfo,
    parse_size,
)

import tiny_models as tm

pytestmark = pytest.mark.usefixtures("one_thread")


def _fisher(model, seed):
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.01 for n, p in model.named_parameters()}
    return Fisher(mean, None, reduction="param", groups=None, param_shapes={n: t.shape for n, t in mean.items()},
                  counts=Counts(2, 2), metadata=FisherMetadata(model_type=model.config.model_type))


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_sharded_inputs_and_outputs_load_with_transformers(tmp_path):
    import transformers

    a, b = tm.llama(seed=1), tm.llama(seed=2)
    a.save_pretrained(tmp_path / "a", max_shard_size="20KB")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    fa, fb = _fisher(a, 3), _fisher(b, 4)
    out = merge_with_fisher([tmp_path / "a", tmp_path / "b"], [fa, fb], output_dir=tmp_path / "out",
                            max_shard_size="30KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    got = _all_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for f in shards:  # no shard above the limit unless one tensor alone is larger
        size = sum(t.numel() * t.element_size() for t in load_file(str(out / f)).values())
        assert size <= 30_000 or len(load_file(str(out / f))) == 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    sa, sb = a.state_dict(), b.state_dict()
    for n, p in loaded.state_dict().items():
        x, y = fa[n].clamp_min(1e-6), fb[n].clamp_min(1e-6)
        assert torch.allclose(p, (x * sa[n] + y * sb[n]) / (x + y), atol=1e-12, rtol=0), n
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


def test_output_dtype_and_tied_weights(tmp_path):
    import transformers

    a, b = tm.gpt2(seed=1), tm.gpt2(seed=2)  # GPT-2: lm_head tied to wte
    a.save_pretrained(tmp_path / "a")
    src_folder, src_model = FolderSource(tmp_path / "a"), ModelSource(b)
    assert src_folder.names() and set(src_folder.names()) == set(src_model.names())
    assert "lm_head.weight" not in src_model.names()
    out = merge_with_fisher([tmp_path / "a", b], method="average", dtype="bfloat16", output_dir=tmp_path / "o",
                            progress=False)
    got = _all_tensors(out)
    assert {t.dtype for t in got.values() if t.is_floating_point()} == {torch.bfloat16}
    ref = (a.state_dict()["transformer.wte.weight"] + b.state_dict()["transformer.wte.weight"]) / 2
    assert torch.equal(got["transformer.wte.weight"], ref.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_writer_refuses_unplanned_tensors(tmp_path):
    plan = [TensorInfo("x", (2, 2), torch.float32), TensorInfo("y", (3,), torch.float32)]
    w = ShardedWriter(tmp_path, plan, 16)
    w.write("x", torch.ones(2, 2))
    with pytest.raises(Exception, match="expected tensor 'y'"):
        w.write("z", torch.ones(3))
    with pytest.raises(Exception, match="incomplete"):
        w.close()
    w.abort()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, safetensors, yaml, jinja2, huggingface_hub, tqdm
    from transformers.models.llama import configuration_llama
    from hf_fisher.consumers.merge import api as merging, io as merge_io, math as merge_math
    import hf_fisher.artifacts.fisher, hf_fisher.artifacts.cards, hf_fisher.artifacts.atomic

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    root = sys.argv[1]
    merging.merge_with_fisher([root + "/small_a", root + "/small_b"], [root + "/small_fa", root + "/small_fb"],
                              output_dir=root + "/warm", progress=False)  # warm-up: lazy imports, allocator
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS")
        how = "clear_refs"
    except OSError:
        base = status("VmHWM")
        how = "hwm"
    merging.merge_with_fisher([root + "/a", root + "/b"], [root + "/fa", root + "/fb"], output_dir=root + "/out",
                              progress=False)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "how": how}))
    """
)


def _synthetic(folder: Path, n: int, rows: int, cols: int, seed: int, fisher: Path) -> int:
    """A 'model' folder of n float32 [rows, cols] tensors (+ a llama config) and a Fisher artifact."""
    folder.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cols,
           "num_hidden_layers": n, "num_attention_heads": 8, "vocab_size": rows}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    tensors = {f"w.{i}": torch.randn(rows, cols, generator=g) for i in range(n)}
    half = n // 2  # two input shards with an index
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    mean = {k: torch.rand(rows, cols, generator=g) for k in tensors}
    Fisher(mean, None, reduction="param", groups=None, param_shapes=dict.fromkeys(tensors, (rows, cols)),
           counts=Counts(1, 1), metadata=FisherMetadata(model_type="llama", storage_dtype="float32")).save_pretrained(fisher)
    return sum(t.numel() * 4 for t in tensors.values())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.slow
def test_streaming_peak_memory_is_bounded(tmp_path):
    rows, cols, n = 1024, 1024, 12  # 4 MiB tensors, 48 MiB per model, 48 MiB per Fisher
    total = 0
    for tag, seed in (("a", 1), ("b", 2)):
        total += _synthetic(tmp_path / tag, n, rows, cols, seed, tmp_path / f"f{tag}") * 2  # model + Fisher
        _synthetic(tmp_path / f"small_{tag}", 2, 8, 8, seed, tmp_path / f"small_f{tag}")
    largest = rows * cols * 4
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=False,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["base"]
    print(f"inputs {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak growth {growth / 2**20:.1f} MiB ({result['how']})")
    assert total > 180 * 2**20
    # 2 models + 2 Fishers + numerator, denominator, one weighted Fisher, one read buffer: 8 tensors;
    # plus a constant for the allocator and the mapped pages, which moves in steps of 16 MiB between
    # runs of the same code (32 / 48 MiB alone, 51.6 once in the parallel suite on a loaded machine)
    assert growth < 8 * largest + 24 * 2**20, growth / 2**20
    assert growth < 0.3 * total
    merged = _all_tensors(tmp_path / "out")
    assert len(merged) == n and merged["w.0"].dtype == torch.float32
