"""Careless input to the ``hf-fisher`` command line: every mistake is found before the work and
ends with a one-line message, exit code 2, no traceback, and nothing written.

The output-folder and data cases run the real ``hf-fisher`` entry point in a subprocess with a
model folder whose loading would fail differently (a config.json that is not JSON, or weights
that are not safetensors): had the check come after loading, the error would be about the model.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hf_fisher import cli
from hf_fisher.cli import main
from hf_fisher.demo import word_tokenizer

import tiny_models as tm

REPO = Path(__file__).resolve().parents[1]
LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(
    [str(REPO), os.environ.get("PYTHONPATH", "")]))


def entry_point() -> list[str]:
    """The installed ``hf-fisher`` script next to this Python, else ``python -m hf_fisher.cli``."""
    script = Path(sys.executable).with_name("hf-fisher")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]


def hf_fisher(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_point(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120, **kw)


class Result:
    """Exit code and output of one CLI run, from a subprocess or from ``main()`` in-process."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


def run_cli(args: list[str], *, cwd: Path, capsys=None) -> Result:
    """With ``capsys``: ``hf_fisher.cli.main(args)`` in this process (fast; an unexpected exception
    fails the test); without: the real ``hf-fisher`` entry point in a subprocess."""
    if capsys is None:
        proc = hf_fisher(*args, cwd=cwd)
        return Result(list(args), proc.returncode, proc.stdout, proc.stderr)
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return Result(list(args), code, captured.out, captured.err)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders): to show nothing was written."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def assert_clean_error(proc: subprocess.CompletedProcess | Result, pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
    # the message is the last line, one line long
    command = next(a for a in proc.args if a in ("collect", "show", "plugins", "demo"))
    assert proc.stderr.strip().splitlines()[-1].startswith(f"hf-fisher {command}: error: "), proc.stderr


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-bad")
    model = tm.llama(torch.float32)
    model.save_pretrained(root / "llama")
    word_tokenizer(sorted({w for line in LINES for w in line.split()})).save_pretrained(root / "llama")
    (root / "lines.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")

    # loading this model fails (config.json is not JSON): any check that passes it ran before loading
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{this is not json", encoding="utf-8")

    # a valid classifier config (num_labels 3) whose weights are not a safetensors file
    clf = root / "broken-weights-classifier"
    config = tf.BertConfig(vocab_size=tm.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=40, num_labels=3, architectures=["BertForSequenceClassification"])
    config.save_pretrained(clf)
    (clf / "model.safetensors").write_bytes(b"\x00" * 64)
    return root


def collect_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(model), "--data", str(data), "--task", "toy", "--out", str(out),
            "--no-progress", *extra]


# --------------------------------------------------------------------------- the output folder, before the model


def _huge_model(folder: Path) -> None:
    """A model folder whose weights header declares 10^13 parameters (and whose config is broken)."""
    folder.mkdir()
    (folder / "config.json").write_text("{this is not json", encoding="utf-8")
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**7, 10**6], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


def _unwritable_parent(tmp: Path) -> Path | None:
    """An --out whose nearest existing ancestor cannot be written to, or None on this machine."""
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return ro / "new" / "out"
    ro.chmod(0o755)  # root writes anyway: try a read-only system folder
    for d in (Path("/sys"), Path("/proc/sys")):
        if d.is_dir() and not (d / "hf-fisher-test").exists():
            try:
                probe = d / ".hf-fisher-probe-test"
                probe.touch()
                probe.unlink()
            except OSError:
                return d / "hf-fisher-test"
    return None


# (case, through a real subprocess?) -- a few through the entry point, the rest in-process (fast)
OUT_CASES = [("foreign-files", True), ("foreign-files-overwrite", False), ("artifact-no-overwrite", False),
             ("is-a-file", False), ("under-a-file", False), ("not-writable", True), ("no-disk-space", True)]


@pytest.mark.parametrize("case, real", OUT_CASES, ids=[c for c, _ in OUT_CASES])
@pytest.mark.slow
def test_output_folder_checked_before_the_model(ws, tmp_path, capsys, case, real):
    model = ws / "broken-config"
    out = tmp_path / "out"
    extra: list[str] = []
    if case.startswith("foreign-files"):
        out.mkdir()
        (out / "notes.txt").write_text("precious", encoding="utf-8")
        pattern = r"refusing to overwrite .*out.*notes\.txt"
        if case.endswith("overwrite"):
            extra = ["--overwrite"]
    elif case == "artifact-no-overwrite":
        out.mkdir()
        (out / "fisher_config.json").write_text("{}", encoding="utf-8")
        pattern = r"already holds a Fisher artifact.*--overwrite"
    elif case == "is-a-file":
        out.write_text("x", encoding="utf-8")
        pattern = r"a file with that name exists"
    elif case == "under-a-file":
        (tmp_path / "file").write_text("x", encoding="utf-8")
        out = tmp_path / "file" / "sub" / "out"
        pattern = r"file.* is a file, not a folder"
    elif case == "not-writable":
        found = _unwritable_parent(tmp_path)
        if found is None:
            pytest.skip("no unwritable folder on this machine")
        out = found
        pattern = r"is not writable"
    else:
        model = tmp_path / "huge"
        _huge_model(model)
        extra = ["--reduction", "param"]
        pattern = (r"not enough disk space for the Fisher artifact .* needs about .*TiB "
                   r"\(10,000,000,000,000 parameters x 8 bytes \(float64\) x 2 for mean and variance\)")
    before = tree(tmp_path)
    proc = run_cli(collect_args(model, ws / "lines.txt", out, *extra), cwd=tmp_path, capsys=None if real else capsys)
    assert_clean_error(proc, pattern)
    assert "config" not in proc.stderr.splitlines()[-1]  # never reached the model
    if case == "not-writable" and out.is_relative_to(tmp_path):
        (tmp_path / "read-only").chmod(0o755)
    assert tree(tmp_path) == before


def test_disk_space_estimate_follows_the_reduction(ws, tmp_path, monkeypatch, capsys):
    """param: parameters x bytes x 2; group: small. With free space between the two, group runs."""
    shapes = cli._safetensors_shapes(ws / "llama")
    n = sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(ws / "llama").parameters())
    assert sum(torch.Size(s).numel() for s in shapes) == n
    param = cli.estimate_artifact_bytes(shapes, reduction="param", element_size=8)
    group = cli.estimate_artifact_bytes(shapes, reduction="group", element_size=8)
    assert param == n * 8 * 2 + 2**20 and group < param
    assert cli.estimate_artifact_bytes(shapes, reduction="param", element_size=4) < param

    free = (group + param) // 2
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free * 2, free * 2 - free, free))
    out = tmp_path / "out"
    assert main(collect_args(ws / "llama", ws / "lines.txt", out, "--reduction", "param")) == 2
    assert f"{n:,} parameters x 8 bytes (float64) x 2" in capsys.readouterr().err
    assert not out.exists()
    # float16 storage needs a quarter: it fits
    assert cli.estimate_artifact_bytes(shapes, reduction="param", element_size=2) < free
    assert main(collect_args(ws / "llama", ws / "lines.txt", out, "--reduction", "param", "--storage-dtype", "float16")) == 0
    assert main(collect_args(ws / "llama", ws / "lines.txt", tmp_path / "group")) == 0


# --------------------------------------------------------------------------- arguments, device, estimator


@pytest.mark.parametrize(
    "extra, pattern, real",
    [
        (["--device", "gpu"], r"--device 'gpu' is not a device torch knows; use cpu, cuda", True),
        (["--device", "cuda:7"], r"--device cuda:7: (no CUDA device is available|there are only)", False),
        (["--device", "meta"], r"--device meta holds no data", False),
        (["--estimator", "empirial"], r"--estimator 'empirial' is not registered; available: .*empirical", False),
        (["--encoding", "utf9"], r"--encoding 'utf9' is not an encoding", True),
        (["--batch-size", "0"], r"--batch-size must be >= 1", True),
        (["--max-length", "-3"], r"--max-length must be >= 1", False),
        (["--task", " "], r"--task must not be empty", False),
    ],
    ids=["device", "cuda", "meta", "estimator", "encoding", "batch-size", "max-length", "task"],
)
def test_bad_arguments_before_the_model(ws, tmp_path, capsys, extra, pattern, real):
    args = collect_args(ws / "broken-config", ws / "lines.txt", tmp_path / "out")
    if "--task" in extra:
        args[args.index("--task") + 1] = extra[1]
        extra = []
    proc = run_cli([*args, *extra], cwd=tmp_path, capsys=None if real else capsys)
    assert_clean_error(proc, pattern)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder(ws, tmp_path):
    proc = hf_fisher(*collect_args(tmp_path / "no-such-model", ws / "lines.txt", tmp_path / "out"), cwd=tmp_path)
    assert_clean_error(proc, r"--model '.*no-such-model' does not exist")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- data


def test_data_not_utf8_names_file_line_and_encoding(ws, tmp_path):
    data = tmp_path / "latin.txt"
    data.write_bytes("the cat\nthe caf\u00e9 sat\n".encode("latin-1"))
    before = tree(tmp_path)
    proc = hf_fisher(*collect_args(ws / "broken-config", data, tmp_path / "out"), cwd=tmp_path)
    assert_clean_error(proc, r"latin\.txt, line 2: not valid utf-8 .*re-save the file as UTF-8 .*--encoding cp1252")
    assert tree(tmp_path) == before


def test_encoding_option_reads_the_file(ws, tmp_path, capsys):
    data = tmp_path / "latin.txt"
    data.write_bytes("the cat\nthe caf\u00e9 sat\n".encode("latin-1"))
    assert main(collect_args(ws / "llama", data, tmp_path / "out", "--encoding", "latin-1")) == 0
    assert "samples 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines, pattern, real",
    [
        ([{"text": "a", "label": 0}, {"text": "b", "label": 3}], r"labels\.jsonl, line 2: label 3 is outside \[0, 3\)", True),
        ([{"text": "a", "label": 1}, {"text": "b", "label": -1}], r"labels\.jsonl, line 2: label -1 is outside", False),
        ([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}], r"labels\.jsonl, line 2: 'label' must be an integer", False),
        ([{"text": "a", "label": 1}, {"text": "b"}], r"labels\.jsonl, line 2: no 'label'", False),
    ],
    ids=["too-large", "negative", "not-integer", "missing"],
)
@pytest.mark.slow
def test_classifier_labels_checked_before_the_weights(ws, tmp_path, capsys, lines, pattern, real):
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(o) + "\n" for o in lines), encoding="utf-8")
    before = tree(tmp_path)
    proc = run_cli(collect_args(ws / "broken-weights-classifier", data, tmp_path / "out"), cwd=tmp_path,
                   capsys=None if real else capsys)
    assert_clean_error(proc, pattern)
    assert tree(tmp_path) == before


def test_corrupt_weights_are_a_clean_message(ws, tmp_path):
    """What the label tests would have met had the labels been checked after loading."""
    data = tmp_path / "labels.jsonl"
    data.write_text('{"text": "a", "label": 1}\n', encoding="utf-8")
    assert main(collect_args(ws / "broken-weights-classifier", data, tmp_path / "out")) == 2


def test_ready_token_ids_checked_before_the_weights(ws, tmp_path, capsys):
    data = tmp_path / "ids.jsonl"
    data.write_text('{"input_ids": [1, 2, 3], "label": 0}\n{"input_ids": [1, 999], "label": 1}\n', encoding="utf-8")
    assert main(collect_args(ws / "broken-weights-classifier", data, tmp_path / "out")) == 2
    assert re.search(r"ids\.jsonl, line 2: token id 999 .* 61 entries", capsys.readouterr().err)


def test_utf8_bom_is_not_part_of_the_first_line(tmp_path):
    from hf_fisher.data import Sample, load_samples

    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert load_samples(f) == [Sample(text="a"), Sample(text="b")]
    assert load_samples(f)[1].where == "bom.jsonl, line 2"


# --------------------------------------------------------------------------- lengths


def _save_gpt2(folder: Path, n_positions: int) -> None:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=tm.VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(folder)


def test_max_length_capped_to_the_position_limit(tmp_path, capsys):
    import hf_fisher
    from hf_fisher import Fisher
    from hf_fisher.errors import InvalidInputError

    _save_gpt2(tmp_path / "gpt2", n_positions=8)
    data = tmp_path / "long.jsonl"
    data.write_text('{"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}\n{"input_ids": [5, 6, 7]}\n', encoding="utf-8")
    # the library refuses sequences longer than the position table ...
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    ids = torch.arange(5, 17).unsqueeze(0)
    with pytest.raises(InvalidInputError, match="longer than the model's 8 positions"):
        hf_fisher.collect(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], progress=False)
    # ... the command line truncates to it, saying so
    out = tmp_path / "out"
    assert main(collect_args(tmp_path / "gpt2", data, out, "--max-length", "100")) == 0
    captured = capsys.readouterr()
    assert "--max-length 100 is more than the model's 8 positions: samples are truncated to 8 tokens" in captured.err
    assert "every token of each line scored, causal-LM labels = the input ids" in captured.out
    assert Fisher.from_pretrained(out).counts.tokens == 7 + 2


def test_roberta_style_position_limit(tmp_path, capsys):
    """RoBERTa numbers positions from padding_idx + 1: 12 positions, pad 1 -> 10 tokens."""
    from hf_fisher import Fisher

    torch.manual_seed(0)
    cfg = tf.RobertaConfig(vocab_size=tm.VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=20, max_position_embeddings=12, pad_token_id=1, num_labels=2)
    model = tf.RobertaForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "roberta")
    assert cli._position_limit(model, model.config) == 10
    data = tmp_path / "clf.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(3, 17)), "label": 1}) + "\n"
                    + json.dumps({"input_ids": [3, 4, 5], "label": 0}) + "\n", encoding="utf-8")
    assert main(collect_args(tmp_path / "roberta", data, tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert "model's 10 positions" in captured.err and "each sample scored on its 'label'" in captured.out
    assert Fisher.from_pretrained(tmp_path / "out").counts.samples == 2


# --------------------------------------------------------------------------- OS errors, pipes


def test_oserror_while_saving_is_a_clean_message(ws, tmp_path, monkeypatch, capsys):
    from hf_fisher.artifacts.fisher import Fisher

    def full_disk(self, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Fisher, "save_pretrained", full_disk)
    assert main(collect_args(ws / "llama", ws / "lines.txt", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "hf-fisher collect: error: [Errno 28] No space left on device" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["plugins", "--help"])
def test_closed_pipe_exits_quietly(tmp_path, command):
    # the reader is gone before the first write: a BrokenPipeError every time
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([*entry_point(), command], cwd=tmp_path, env=ENV, stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.stderr == "", proc.stderr
    # argparse swallows the error of its own help output; a command's output ends with 128 + SIGPIPE
    assert proc.returncode == (0 if command == "--help" else cli.EXIT_BROKEN_PIPE)
    if command == "--help":  # and the everyday case (cheap with --help; `plugins | head -1` is the same)
        shell = subprocess.run(f"{' '.join(entry_point())} --help | head -1; echo \"rc=${{PIPESTATUS[0]}}\"",
                               shell=True, executable="/bin/bash", cwd=tmp_path, env=ENV, capture_output=True,
                               text=True, timeout=120)
        assert shell.stdout.splitlines()[0].startswith("usage: hf-fisher")
        assert shell.stdout.splitlines()[1] in ("rc=0", f"rc={cli.EXIT_BROKEN_PIPE}")
        assert shell.stderr == ""


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--samples", "0"], r"--samples must be >= 1"),
        (["--steps", "-1"], r"--steps must be >= 0"),
        (["--top", "-2"], r"--top must be >= 0"),
        (["--card-lines", "-1"], r"--card-lines must be >= 0"),
        (["--seed", "-1"], r"--seed must be >= 0"),
    ],
)
def test_demo_checks_numbers_before_training(tmp_path, capsys, extra, pattern):
    assert main(["demo", "--out", str(tmp_path / "demo"), *extra]) == 2
    captured = capsys.readouterr()
    assert re.search(pattern, captured.err) and "Training" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_foreign_output_folder_before_training(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious", encoding="utf-8")
    before = tree(tmp_path)
    proc = hf_fisher("demo", "--out", str(out), cwd=tmp_path)
    assert_clean_error(proc, r"refusing to overwrite .*mine.*thesis\.tex")
    assert "Training" not in proc.stdout
    assert tree(tmp_path) == before
    # a foreign file inside one of the demo's own folders is refused too
    (out / "thesis.tex").unlink()
    (out / "tiny-llama-copy").mkdir()
    (out / "tiny-llama-copy" / "notes.md").write_text("mine", encoding="utf-8")
    assert main(["demo", "--out", str(out)]) == 2


# --------------------------------------------------------------------------- show wording


def _report(model, tmp_path: Path, name: str) -> str:
    import hf_fisher

    fisher = hf_fisher.collect(model, [tm.padded_batch([5, 3], seed=1)], progress=False)
    fisher.save_pretrained(tmp_path / name)
    return cli.format_report(hf_fisher.Fisher.from_pretrained(tmp_path / name), top=2)


def _titles(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("Top ")]


def test_show_wording_follows_the_architecture(tmp_path):
    gpt2 = _titles(_report(tm.gpt2(torch.float32), tmp_path, "gpt2"))
    assert gpt2 == ["Top 2 of 8 attention heads (Q + K + V + O; Q, K, V fused in c_attn)",
                    "Top 2 of 256 MLP channels (c_fc column and bias + c_proj row)"]
    gqa = _titles(_report(tm.llama(torch.float32, kv_heads=2), tmp_path, "gqa"))
    assert gqa == ["Top 2 of 8 attention heads (Q + O + its share of the kv-head's K, V)",
                   "Top 2 of 80 MLP channels (gate/up row + down column)"]
    mha = _titles(_report(tm.llama(torch.float32, kv_heads=4), tmp_path, "mha"))
    assert mha[0] == "Top 2 of 8 attention heads (Q + K + V + O)" and "kv-head" not in mha[0]


# --------------------------------------------------------------------------- help


def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "import hf_fisher.cli as c\n"
            "c.build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            "    assert c.main(['--help']) == 0 and c.main(['collect', '--help']) == 0 and c.main(['demo', '--help']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert 'every token of each line' in buf.getvalue()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import hf_fisher  # every public name is still there, lazily

    for name in hf_fisher.__all__:
        assert getattr(hf_fisher, name) is not None


def _parsers(parser: argparse.ArgumentParser, path: str = "hf-fisher"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help():
    parsers = list(_parsers(cli.build_parser()))
    assert {p for p, _ in parsers} == {"hf-fisher", "hf-fisher collect", "hf-fisher show", "hf-fisher plugins", "hf-fisher demo", "hf-fisher merge", "hf-fisher compare-estimators", "hf-fisher prune", "hf-fisher report", "hf-fisher qkov", "hf-fisher conflicts", "hf-fisher analyze"}
    for path, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert action.help, path
                for choice in action._choices_actions:
                    assert choice.help and choice.help.strip(), f"{path} {choice.dest}"
                continue
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                f"{path} {action.option_strings or action.dest}: no help"


# ----------------------------------------------------------------------------- newcomer mistakes
def test_hub_id_while_offline_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "d.txt").write_text("a line\n")
    rc = main(["collect", "--model", "someone/some-model", "--data", str(tmp_path / "d.txt"), "--task", "t",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a local folder" in err and "HF_HUB_OFFLINE" in err and "hf download someone/some-model" in err
    assert not (tmp_path / "out").exists()


def test_model_folder_without_tokenizer_and_text_data(tmp_path, capsys):
    tm.llama(torch.float32).save_pretrained(tmp_path / "m")
    (tmp_path / "d.txt").write_text("a line\n\nanother line\n")
    rc = main(["collect", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"), "--task", "t",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no tokenizer" in err and "tokenizer.save_pretrained" in err and "input_ids" in err
    assert not (tmp_path / "out").exists()
