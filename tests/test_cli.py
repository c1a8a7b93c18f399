"""The ``hf-fisher`` command line, end to end on a tiny LLaMA saved to disk with an offline tokenizer.

Numbers are checked against an independent reference: a one-sample-at-a-time autograd loop over
the same tokenized lines (mean cross-entropy per sample, gradient squared, averaged).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hf_fisher.cli import main
from hf_fisher.demo import word_tokenizer

import tiny_models as tm

REPO = Path(__file__).resolve().parents[1]

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang",
    "cats and dogs play in the park on sunday",
    "a mat",
    "the sun is up and the bird is on the mat",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tm.llama(torch.float32)
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    words = sorted({w for line in LINES for w in line.split()})
    tokenizer = word_tokenizer(words)
    assert len(tokenizer) <= tm.VOCAB
    tokenizer.save_pretrained(model_dir)
    (root / "lines.txt").write_text("\n".join(LINES) + "\n\n", encoding="utf-8")
    jsonl = [{"text": LINES[0]}, {"input_ids": [1, 40, 41, 42, 43, 60]}, {"text": LINES[2]}, {"text": LINES[3]}]
    (root / "mixed.jsonl").write_text("".join(json.dumps(o) + "\n" for o in jsonl), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model(workspace):
    return tf.AutoModelForCausalLM.from_pretrained(workspace / "tiny-llama").eval()


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return tf.AutoTokenizer.from_pretrained(workspace / "tiny-llama")


def collect_args(ws: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(ws / "tiny-llama"), "--data", str(ws / data), "--task", "toy",
            "--out", str(out), "--batch-size", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def group_artifact(workspace):
    out = workspace / "fisher-group"
    assert main(collect_args(workspace, "lines.txt", out)) == 0
    return out


@pytest.fixture(scope="module")
def param_artifact(workspace):
    """Collected by a real ``python -m hf_fisher.cli`` process, uninstalled (PYTHONPATH = repo)."""
    out = workspace / "fisher-param"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_fisher.cli", *collect_args(workspace, "lines.txt", out, "--reduction", "param")],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}" in proc.stdout
    return out


def reference_fisher(model, id_lists) -> dict[str, torch.Tensor]:
    """mean_i (d l_i / d theta)^2, l_i = mean cross-entropy of sample i, one sample at a time."""
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for ids in id_lists:
        x = torch.tensor([ids])
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.double() ** 2
    model.zero_grad(set_to_none=True)
    return {n: t / len(id_lists) for n, t in total.items()}


def assert_matches_reference(fisher, ref):
    assert sorted(fisher.names()) == sorted(ref)
    for name, expected in ref.items():
        got = fisher[name].double()
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-7 * float(expected.abs().max()), msg=name)


def artifact_files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def test_collect_txt_group(group_artifact, model):
    from hf_fisher import Fisher

    assert {"fisher.safetensors", "fisher_config.json", "README.md"} <= artifact_files(group_artifact)
    fisher = Fisher.from_pretrained(group_artifact, model=model)
    assert fisher.reduction == "group"
    assert fisher.counts.samples == len(LINES)
    # each line is <s> + its words; a causal LM predicts every token after the first
    assert fisher.counts.tokens == sum(len(line.split()) for line in LINES)
    assert fisher.metadata.task == "toy"
    assert fisher.metadata.data_description == f"lines.txt: {len(LINES)} samples"
    assert fisher.metadata.model_name_or_path.endswith("tiny-llama")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert fisher[q].shape == (len(fisher.group_names(q)),)


def test_subprocess_param_run_matches_one_sample_loop(param_artifact, group_artifact, model, tokenizer):
    from hf_fisher import Fisher

    ids = [tokenizer(line)["input_ids"] for line in LINES]
    assert ids[2][0] == 1 and len(ids[2]) == 1 + 3  # <s> the bird sang
    fisher = Fisher.from_pretrained(param_artifact, model=model)
    assert fisher.reduction == "param"
    assert_matches_reference(fisher, reference_fisher(model, ids))
    # the group artifact (another process, another reduction) holds the same mass per tensor
    group = Fisher.from_pretrained(group_artifact, model=model)
    for name in fisher.names():
        torch.testing.assert_close(group[name].double().sum(), fisher[name].double().sum(), rtol=1e-5, atol=0.0)


def test_collect_jsonl_with_ids_and_max_samples(workspace, model, tokenizer):
    from hf_fisher import Fisher

    out = workspace / "fisher-jsonl"
    assert main(collect_args(workspace, "mixed.jsonl", out, "--reduction", "param", "--max-samples", "3",
                             "--normalization", "mean", "--batch-size", "2", "--storage-dtype", "float32")) == 0
    fisher = Fisher.from_pretrained(out, model=model)
    assert fisher.counts.samples == 3
    assert fisher.metadata.storage_dtype == "float32"
    assert {fisher[n].dtype for n in fisher.names()} == {torch.float32}
    assert fisher.metadata.data_description == "mixed.jsonl: 3 samples"
    ids = [tokenizer(LINES[0])["input_ids"], [1, 40, 41, 42, 43, 60], tokenizer(LINES[2])["input_ids"]]
    assert_matches_reference(fisher, reference_fisher(model, ids))


def table(text: str, title_start: str) -> list[list[str]]:
    """Rows of the table whose title starts with ``title_start`` (cells split on whitespace)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    assert set(lines[start + 2].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def head_totals(fisher) -> dict[tuple[int, int], float]:
    """Independent head totals from a param-reduction artifact: F summed over the head's Q rows
    and O columns, plus its share (H_kv / H) of its kv-head's K and V rows."""
    out = {}
    for att in fisher.layout.attention:
        for h in att.heads:
            def mass(slices):
                return sum(float(fisher[s.param][s.index()].double().sum()) for s in slices)

            out[(h.layer, h.head)] = mass(h.q + h.o) + mass(h.k + h.v) * att.num_kv_heads / att.num_heads
    return out


def test_show_tables(param_artifact, capsys):
    from hf_fisher import Fisher

    assert main(["show", str(param_artifact), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "task: toy" in text and "reduction: param" in text and f"samples: {len(LINES)}" in text
    heads = table(text, "Top 3 of 8 attention heads")
    assert len(heads) == 3
    expected = head_totals(Fisher.from_pretrained(param_artifact))
    ranked = sorted(expected.items(), key=lambda kv: -kv[1])
    for row, ((layer, head), value) in zip(heads, ranked):
        assert (int(row[1]), int(row[2])) == (layer, head)
        assert float(row[3]) == pytest.approx(value, rel=1e-3)
    assert float(heads[0][4].rstrip("%")) == pytest.approx(100 * ranked[0][1] / sum(expected.values()), abs=0.06)
    assert len(table(text, "Top 3 of 80 MLP channels")) == 3
    layers = table(text, "Per-layer totals")
    assert [r[0] for r in layers] == ["0", "1", "-"]
    assert sum(float(r[2].rstrip("%")) for r in layers) == pytest.approx(100.0, abs=0.2)

    assert main(["show", str(param_artifact), "--top", "100"]) == 0
    text = capsys.readouterr().out
    assert len(table(text, "Top 8 of 8 attention heads")) == 8


def test_show_group_artifact_agrees_with_param_artifact(group_artifact, param_artifact, capsys):
    assert main(["show", str(group_artifact), "--top", "8"]) == 0
    group_rows = table(capsys.readouterr().out, "Top 8 of 8 attention heads")
    assert main(["show", str(param_artifact), "--top", "8"]) == 0
    param_rows = table(capsys.readouterr().out, "Top 8 of 8 attention heads")
    assert [r[1:3] for r in group_rows] == [r[1:3] for r in param_rows]
    for g, p in zip(group_rows, param_rows):
        assert float(g[3]) == pytest.approx(float(p[3]), rel=1e-3)


def test_plugins_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    rows = table(capsys.readouterr().out, "Registered plugins")
    assert ["estimator", "empirical"] in [r[:2] for r in rows]
    adapters = [r for r in rows if r[0] == "adapter"]
    assert any("llama" in r[1] for r in adapters)
    assert adapters[-1][1].endswith("generic")  # the generic adapter is asked last


@pytest.mark.parametrize(
    "data, content, message",
    [
        ("missing.txt", None, "missing.txt.*does not exist"),
        ("data.csv", "a,b\n", r"\.txt or \.jsonl"),
        ("bad.jsonl", '{"text": "the cat"}\n{"text": \n', r"bad\.jsonl, line 2: malformed JSON"),
        ("empty.txt", "\n\n", "no sample"),
    ],
)
def test_bad_data_exits_2_and_writes_nothing(workspace, tmp_path, capsys, data, content, message):
    if content is not None:
        (tmp_path / data).write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    args = collect_args(workspace, data, out)
    args[args.index("--data") + 1] = str(tmp_path / data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


def test_refuses_non_empty_out_and_bad_model(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    assert main(collect_args(workspace, "lines.txt", out)) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "keep.txt" in err
    assert artifact_files(out) == {"keep.txt"}
    assert main(collect_args(workspace, "lines.txt", out, "--overwrite")) == 2  # never replaces foreign files
    assert "keep.txt" in capsys.readouterr().err
    assert artifact_files(out) == {"keep.txt"}

    args = collect_args(workspace, "lines.txt", tmp_path / "out2")
    args[args.index("--model") + 1] = str(tmp_path)  # a folder without config.json
    assert main(args) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()

    assert main(["show", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err

    if not torch.cuda.is_available():
        assert main(collect_args(workspace, "lines.txt", tmp_path / "out3", "--device", "cuda")) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "out3").exists()


def test_overwrite_replaces_a_previous_artifact(workspace, tmp_path, capsys):
    from hf_fisher import Fisher

    out = tmp_path / "fisher"
    assert main(collect_args(workspace, "lines.txt", out, "--max-samples", "2")) == 0
    assert main(collect_args(workspace, "lines.txt", out, "--max-samples", "3")) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert Fisher.from_pretrained(out).counts.samples == 2
    assert main(collect_args(workspace, "lines.txt", out, "--max-samples", "3", "--overwrite")) == 0
    assert Fisher.from_pretrained(out).counts.samples == 3


DEMO_TOP = ["base", "copy", "copy.txt", "merged-average", "merged-fisher", "pruned-copy", "report", "reverse", "reverse.txt"]


@pytest.mark.slow
def test_demo_trains_collects_and_saves(tmp_path, capsys):
    """Every stage of the demo on small options: base, Trainer + FisherCallback per task, heads,
    pruning, Fisher vs average merging with the score table, report; all inside --out."""
    import json

    from hf_fisher import Fisher

    root = tmp_path / "demo"
    small = ["--steps", "150", "--task-steps", "20", "--samples", "24", "--card-lines", "3"]
    assert main(["demo", "--out", str(root), *small]) == 0
    text = capsys.readouterr().out
    # 1. the base learned the copy task (the easy one) on the mixed batches
    before, after, acc = map(float, re.search(r"copy loss ([\d.]+) -> ([\d.]+), copy accuracy ([\d.]+)%", text).groups())
    assert after < 0.25 * before and acc > 90.0
    assert (root / "base" / "config.json").is_file() and (root / "base" / "tokenizer.json").is_file()
    # 2. one Trainer fine-tune per task; FisherCallback's artifact in <task>/fisher
    for task in ("copy", "reverse"):
        assert re.search(rf"Fine-tuning a {task} model from the base: transformers.Trainer, 20 steps", text)
        fisher = Fisher.from_pretrained(root / task / "fisher")
        assert fisher.metadata.task == task and fisher.reduction == "group" and fisher.metadata.mode == "train"
        assert fisher.counts.samples == 20 * 32 and fisher.counts.tokens == 20 * 32 * 8  # loss on the answer only
        assert (root / task / "fisher" / "README.md").is_file()
        assert (root / task / "model" / "model.safetensors").is_file()
        assert sorted(p.name for p in (root / task).iterdir()) == ["fisher", "model"]
    # 3. the most important heads of each task
    assert len(table(text, "Top 8 of 8 attention heads")) == 8
    assert re.search(r"top heads of copy +: L\d\.H\d \d+%", text) and re.search(r"top heads of reverse +: L\d\.H\d", text)
    # 4. pruning: a smaller model, its loss before / after
    m = re.search(r"([\d,]+) -> ([\d,]+) parameters; copy loss ([\d.]+) -> ([\d.]+)", text)
    n_before, n_after = (int(x.replace(",", "")) for x in m.groups()[:2])
    assert n_after < 0.9 * n_before
    pruning = json.loads((root / "pruned-copy" / "pruning.json").read_text())
    assert pruning["stats"]["score"] == "kfac" and pruning["removed"]
    assert (root / "pruned-copy" / "model.safetensors").is_file()
    # 5. the merges and the score table: four rows, each with both tasks' losses
    for name in ("merged-average", "merged-fisher"):
        assert (root / name / "mergekit_config.yml").is_file() and (root / name / "README.md").is_file()
    rows = table(text, "Held-out loss per task")
    labels = [" ".join(r[:2]) for r in rows]
    assert labels == ["copy model", "reverse model", "average merge", "Fisher merge"]
    for line in text.split("Held-out loss per task")[1].splitlines()[3:7]:
        assert len(re.findall(r"\d+\.\d{3}", line)) == 3  # copy loss, reverse loss, mean
    # 6. the report
    report = sorted(p.name for p in (root / "report").iterdir())
    assert "report.csv" in report and "summary.txt" in report and any(n.endswith(".png") for n in report)
    assert "Everything is in" in text and "merged-fisher/" in text.split("Everything is in")[1]

    # everything is written inside --out, nothing beside it
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert sorted(p.name for p in root.iterdir()) == DEMO_TOP

    # the command the demo suggests works on what it saved
    model_dir, data = root / "copy" / "model", root / "copy.txt"
    assert len(data.read_text().splitlines()) == 24
    assert f"--model {model_dir} --data {data}" in text
    assert main(["collect", "--model", str(model_dir), "--data", str(data), "--task", "copy",
                 "--out", str(root / "fisher-cli"), "--no-progress"]) == 0
    cli_text = capsys.readouterr()
    assert "every token of each line scored" in cli_text.out
    assert "--max-length 512 is more than the model's 64 positions" in cli_text.err
    assert Fisher.from_pretrained(root / "fisher-cli").counts.samples == 24
    assert Fisher.from_pretrained(root / "fisher-cli").counts.tokens == 24 * (2 * 8 + 1)  # every token after <s>

    # a second run replaces the demo's own output (including the folder of its suggested command)
    # and the layout of the demo's earlier version (fisher-copy/, tiny-llama-copy/)
    (root / "fisher-copy").mkdir()
    Fisher.from_pretrained(root / "fisher-cli").save_pretrained(root / "fisher-copy")
    (root / "tiny-llama-copy").mkdir()
    (root / "tiny-llama-copy" / "config.json").write_text("{}")
    assert main(["demo", "--out", str(root), "--samples", "16", "--steps", "5", "--task-steps", "2"]) == 0
    assert Fisher.from_pretrained(root / "copy" / "fisher").counts.samples == 2 * 32
    assert len((root / "reverse.txt").read_text().splitlines()) == 16
    assert sorted(p.name for p in root.iterdir()) == sorted([*DEMO_TOP, "fisher-cli"])
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
