"""End-to-end demo, offline, in well under a minute on a laptop CPU: ``python -m hf_fisher.demo``.

Each stage uses the public API on what the stage before it produced:

1. builds a tiny LLaMA from a config (2 layers, 4 query heads sharing 2 kv-heads, vocab 128) and
   trains a shared *base* briefly on two generated tasks over the same word vocabulary:
   *copy* ``<s> x1..x8 | x1..x8`` and *reverse* ``<s> x1..x8 ~ x8..x1`` (loss on the answer
   only, so the model needs attention heads that look back);
2. fine-tunes one model per task from that base with a ``transformers.Trainer`` and a
   :class:`hf_fisher.FisherCallback` in ``"training"`` mode: each task's Fisher (``reduction="group"``)
   comes free from the Trainer's own backward passes and is saved to ``<task>/fisher``;
3. prints each task's most important heads (and channels, per-layer totals: the tables of
   ``hf-fisher show``);
4. prunes the copy model with :func:`hf_fisher.prune` (30% of the heads / channels of every
   layer, structured OBS under KFAC with a rescale on calibration batches, physically removed) and
   prints its copy loss before and after (the fine-tuned copy model is saturated — its Fisher
   vanishes — so ``prune`` warns and adds FLAP's bias compensation to its default);
5. merges the two task models with :func:`hf_fisher.merge_with_fisher`, by Fisher merging and by
   plain averaging, and prints a score table: each task's held-out loss for the copy model, the
   reverse model, the average merge and the Fisher merge;
6. writes a report of the two Fishers with :func:`hf_fisher.write_report` (CSV, summary, plots).

Everything it writes goes inside ``--out`` (default ``demo_output``)::

    base/                   the shared base model + word-level tokenizer
    copy/model/             the copy model (fine-tuned with the Trainer)
    copy/fisher/            its Fisher artifact, saved by FisherCallback (with a model card)
    reverse/model/, reverse/fisher/     the same for the reverse task
    pruned-copy/            the copy model with 30% of its heads / channels removed (pruning.json)
    merged-fisher/          the Fisher merge (mergekit_config.yml, model card README.md)
    merged-average/         the plain average (mergekit_config.yml, README.md)
    report/                 report.csv, summary.txt and the plots (PNG)
    copy.txt, reverse.txt   the held-out data as text, one sequence per line

and prints that index at the end, with a command line to try on them (its output ``fisher-cli/``
also goes inside ``--out``). ``--out`` may be new, or hold what an earlier demo run wrote (it is
replaced, the folders of the earlier demo version, ``fisher-copy/`` and ``tiny-llama-copy/``,
included); anything else in it makes the demo refuse before training. The arguments are checked
before anything is trained. Everything is seeded: two runs print the same numbers. Unless
``OMP_NUM_THREADS`` is set, the demo computes on one thread (the fastest for a model this small,
and immune to a busy machine's contention).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hf_fisher.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TASKS", "DemoResult", "add_arguments", "copy_batch", "main", "run", "task_batch", "tiny_llama", "word_tokenizer",
]

logger = logging.getLogger(__name__)

VOCAB = 128
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
SEP_ID = 4  # "|": the copy task's separator
REVERSE_SEP_ID = 5  # "~": the reverse task's separator
FIRST_CONTENT_ID = 6  # "w6" ... "w127"
SPAN = 8  # tokens to copy / reverse
TASKS = ("copy", "reverse")
SEPARATORS = {"copy": SEP_ID, "reverse": REVERSE_SEP_ID}
PRUNE_SPARSITY = 0.3
BATCH_SIZE = 32

# what the demo writes inside --out (and the folder of the command it suggests)
BASE_DIR = "base"
TASK_MODEL_SUBDIR = "model"  # <task>/model
TASK_FISHER_SUBDIR = "fisher"  # <task>/fisher: FisherCallback's output_subdir in the Trainer's output_dir <task>/
PRUNED_DIR = "pruned-copy"
MERGED_FISHER_DIR = "merged-fisher"
MERGED_AVERAGE_DIR = "merged-average"
REPORT_DIR = "report"
DATA_FILE = "copy.txt"
DATA_FILES = {task: f"{task}.txt" for task in TASKS}
CLI_ARTIFACT_DIR = "fisher-cli"
LEGACY_ENTRIES = ("fisher-copy", "tiny-llama-copy")  # what the demo wrote before it had two tasks
DEMO_ENTRIES = (
    BASE_DIR, *TASKS, PRUNED_DIR, MERGED_FISHER_DIR, MERGED_AVERAGE_DIR, REPORT_DIR, *DATA_FILES.values(),
    CLI_ARTIFACT_DIR, *LEGACY_ENTRIES,
)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


def word_tokenizer(words: Sequence[str]):
    """A whitespace word-level fast tokenizer, built offline.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``words`` in order from 4. Every
    encoded text starts with ``<s>``. Returns a :class:`transformers.PreTrainedTokenizerFast`
    that ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def demo_words() -> list[str]:
    """The demo's vocabulary after the special tokens: ``|`` (id 4), ``~`` (id 5), ``w6`` ... ``w127``."""
    return ["|", "~"] + [f"w{i}" for i in range(FIRST_CONTENT_ID, VOCAB)]


def tiny_llama(seed: int = 0):
    """A randomly initialised LLaMA: hidden 64, 2 layers, 4 heads, 2 kv-heads (GQA), vocab 128."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(cfg)


def task_batch(task: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` sequences of ``task``: copy ``<s> x1..x8 | x1..x8`` or reverse ``<s> x1..x8 ~ x8..x1``,
    labels on the answer half only (-100 elsewhere)."""
    import torch

    if task not in SEPARATORS:
        raise InvalidInputError(f"unknown demo task {task!r}; choose one of {list(TASKS)}")
    x = torch.randint(FIRST_CONTENT_ID, VOCAB, (n, SPAN), generator=generator)
    answer = x if task == "copy" else x.flip(1)
    bos = torch.full((n, 1), 1, dtype=torch.long)
    sep = torch.full((n, 1), SEPARATORS[task], dtype=torch.long)
    ids = torch.cat([bos, x, sep, answer], dim=1)
    labels = ids.clone()
    labels[:, : SPAN + 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def copy_batch(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` sequences ``<s> x1..x8 | x1..x8`` with labels on the copied half only (-100 elsewhere)."""
    return task_batch("copy", n, generator)


def _split(batch: dict, size: int) -> list[dict]:
    n = len(batch["input_ids"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


@dataclass
class DemoResult:
    out: Path
    seconds: float
    fishers: dict = field(default_factory=dict)  # task -> Fisher (FisherCallback's)
    scores: dict = field(default_factory=dict)  # row name -> {task: held-out loss}
    accuracy: dict = field(default_factory=dict)  # row name -> {task: held-out answer accuracy}
    prune_stats: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # what -> path

    @property
    def fisher(self):  # the copy task's, as before the demo had two tasks
        return self.fishers.get("copy")


def _metrics(model, batches: Sequence[dict]) -> tuple[float, float]:
    """Token-weighted answer loss and accuracy of ``model`` on ``batches``."""
    import torch

    loss_sum, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits, target = out.logits[:, :-1], batch["labels"][:, 1:]
            keep = target != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            correct += (logits[keep].argmax(-1) == target[keep]).sum().item()
            count += int(keep.sum())
    model.train(was_training)
    return loss_sum / count, correct / count


def train_base(model, *, steps: int, seed: int, batch_size: int = BATCH_SIZE, lr: float = 6e-3) -> None:
    """AdamW on fresh batches, half copy, half reverse."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    for step in range(steps):
        parts = [task_batch(t, batch_size // 2, g) for t in TASKS]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 25 == 0:
            logger.info("base step %d/%d: loss %.3f", step + 1, steps, loss.item())
    opt.zero_grad(set_to_none=True)
    model.eval()


def finetune(model, task: str, *, steps: int, seed: int, output_dir: Path, lr: float = 5e-3):
    """Fine-tune ``model`` on ``task`` with a ``transformers.Trainer`` and a training-mode
    :class:`hf_fisher.FisherCallback`; returns the callback (its Fisher is in ``output_dir/fisher``)."""
    import torch
    import transformers as tf

    import hf_fisher

    g = torch.Generator().manual_seed(seed)
    data = task_batch(task, max(steps, 1) * BATCH_SIZE, g)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]
    callback = hf_fisher.FisherCallback(mode="training", reduction="group", task=task, output_subdir=TASK_FISHER_SUBDIR,
                                        log_summary=False)
    args = tf.TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=BATCH_SIZE, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), weight_decay=0.0, max_grad_norm=1.0,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=dataset, data_collator=tf.default_data_collator,
                         callbacks=[callback])
    trainer.remove_callback(tf.trainer_callback.PrinterCallback)  # its end-of-training dict on stdout
    trainer.train()
    model.eval()
    return callback


def _is_model_file(name: str) -> bool:
    return name.endswith(MODEL_FILE_SUFFIXES)


def _check_folders(out: Path) -> None:
    """Each of the demo's folders inside ``out`` holds only what the demo writes there."""
    from hf_fisher.artifacts.atomic import check_target, check_writable
    from hf_fisher.artifacts.fisher import is_artifact_file
    from hf_fisher.consumers.merge.api import is_merge_output_file
    from hf_fisher.consumers.prune.core import PRUNE_FILES
    from hf_fisher.consumers.report import _is_report_file

    def check(path: Path, allowed, what: str) -> None:
        check_writable(check_target(path, allowed=allowed, what=what, overwrite=True, flag="--out"), what=what, flag="--out")

    check(out / BASE_DIR, _is_model_file, "model folder")
    for task in TASKS:
        check(out / task, lambda n: n in (TASK_MODEL_SUBDIR, TASK_FISHER_SUBDIR), f"demo {task} folder")
        check(out / task / TASK_MODEL_SUBDIR, _is_model_file, "model folder")
        check(out / task / TASK_FISHER_SUBDIR, is_artifact_file, "Fisher artifact")
    check(out / PRUNED_DIR, lambda n: _is_model_file(n) or n in PRUNE_FILES, "pruned model")
    for name in (MERGED_FISHER_DIR, MERGED_AVERAGE_DIR):
        check(out / name, is_merge_output_file, "merged model")
    check(out / REPORT_DIR, _is_report_file, "report")
    check(out / CLI_ARTIFACT_DIR, is_artifact_file, "Fisher artifact")
    check(out / "fisher-copy", is_artifact_file, "Fisher artifact")  # an earlier demo version's output
    check(out / "tiny-llama-copy", _is_model_file, "model folder")
    for name in DATA_FILES.values():
        if (out / name).is_dir():
            raise InvalidInputError(f"--out {out}: {name} is a folder; the demo writes its data to a file of that name")


def check_arguments(args: argparse.Namespace) -> Path:
    """Check the demo's options and its output folder before any work; return ``--out``.

    Raises :class:`~hf_fisher.errors.InvalidInputError` for an out-of-range number and
    :class:`~hf_fisher.errors.ArtifactError` (from :func:`hf_fisher.artifacts.atomic.check_target` /
    :func:`~hf_fisher.artifacts.atomic.check_writable`) for an output folder holding anything but an earlier
    demo's files, or one that cannot be written.
    """
    from hf_fisher.artifacts.atomic import check_target, check_writable

    for flag, low in (("steps", 0), ("task_steps", 1), ("samples", 1), ("top", 0), ("card_lines", 0), ("seed", 0)):
        value = getattr(args, flag)
        if value < low:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= {low} (got {value})")
    if args.seed >= 2**63 - 16:
        raise InvalidInputError(f"--seed must be < 2**63 - 16 (got {args.seed})")
    from hf_fisher.errors import ArtifactError

    try:
        out = check_target(args.out, allowed=lambda name: name in DEMO_ENTRIES, what="demo output", overwrite=True,
                           flag="--out")
        check_writable(out, what="demo output", flag="--out")
    except ArtifactError as e:
        if (Path(args.out) / "fisher_config.json").is_file():  # --out names an artifact (the old usage)
            raise ArtifactError(f"{e} (--out is the folder the demo writes everything into; its artifacts go "
                                f"to {Path(args.out) / 'copy' / TASK_FISHER_SUBDIR} and beside it)") from None
        raise
    _check_folders(out)
    return out


def _save_model(model, tokenizer, folder: Path) -> None:
    from hf_fisher.artifacts.atomic import atomic_folder

    with atomic_folder(folder, what="model folder") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _data_lines(batches: Sequence[dict]) -> str:
    words = demo_words()
    lines = [" ".join(words[i - len(SPECIAL_TOKENS)] for i in row[1:]) for b in batches for row in b["input_ids"].tolist()]
    return "\n".join(lines) + "\n"


def _print_card(card: Path, n_lines: int) -> None:
    if not card.is_file() or n_lines <= 0:
        return
    lines = card.read_text(encoding="utf-8").splitlines()
    if lines and lines[0] == "---" and "---" in lines[1:]:  # skip the Hub metadata block
        lines = lines[lines.index("---", 1) + 1 :]
    while lines and not lines[0].strip():
        lines = lines[1:]
    print(f"First lines of its model card, {card}:")
    for line in lines[:n_lines]:
        print(f"  | {line}")


def _head_line(fisher, top: int) -> str:
    heads = fisher.head_importance()
    total = sum(heads.values()) or 1.0
    best = sorted(heads.items(), key=lambda kv: -kv[1])[: max(top, 0)]
    return ", ".join(f"L{layer}.H{head} {100 * v / total:.0f}%" for (layer, head), v in best)


def run(args: argparse.Namespace) -> DemoResult:
    """Run the demo with the options of :func:`add_arguments`; prints its report.

    Everything is written inside ``args.out`` (see the module docstring), which is checked,
    with the other options, before the model is built.
    """
    root = check_arguments(args)

    import torch
    import transformers as tf

    threads, verbosity = torch.get_num_threads(), tf.logging.get_verbosity()
    bars = tf.utils.logging.is_progress_bar_enabled()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    tf.logging.set_verbosity_error()  # the Trainer's and the loaders' set-up chatter
    tf.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    try:
        return _run(args, root)
    finally:
        torch.set_num_threads(threads)
        tf.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()


def _run(args: argparse.Namespace, root: Path) -> DemoResult:
    import torch
    import transformers as tf

    import hf_fisher
    from hf_fisher.tables import format_report

    start = time.perf_counter()
    for name in LEGACY_ENTRIES:  # an earlier demo version's output (checked above): replaced by the new layout
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    tokenizer = word_tokenizer(demo_words())
    result = DemoResult(out=root, seconds=0.0)
    held_out = {t: _split(task_batch(t, args.samples, torch.Generator().manual_seed(args.seed + 1 + i)), 16)
                for i, t in enumerate(TASKS)}
    calibration = _split(task_batch("copy", 64, torch.Generator().manual_seed(args.seed + 3)), 16)

    # 1. the shared base
    torch.manual_seed(args.seed)
    model = tiny_llama(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Tiny LLaMA: {n_params:,} parameters, 2 layers, 4 heads / 2 kv-heads, vocab {VOCAB}")
    print(f"Tasks: copy  <s> x1..x{SPAN} | x1..x{SPAN}   and   reverse  <s> x1..x{SPAN} ~ x{SPAN}..x1  (loss on the answer)")
    before = {t: _metrics(model, held_out[t]) for t in TASKS}
    print(f"[1/6] Training the shared base {args.steps} steps on both tasks ...")
    train_base(model, steps=args.steps, seed=args.seed)
    after = {t: _metrics(model, held_out[t]) for t in TASKS}
    for t in TASKS:
        print(f"  {t} loss {before[t][0]:.3f} -> {after[t][0]:.3f}, {t} accuracy {100 * after[t][1]:.1f}% (held-out)")
    _save_model(model, tokenizer, root / BASE_DIR)
    result.scores["base"] = {t: after[t][0] for t in TASKS}
    result.accuracy["base"] = {t: after[t][1] for t in TASKS}

    # 2. one model per task, fine-tuned with the Trainer; FisherCallback collects each task's Fisher
    models = {}
    for i, task in enumerate(TASKS):
        print(f"[2/6] Fine-tuning a {task} model from the base: transformers.Trainer, {args.task_steps} steps, "
              f"with hf_fisher.FisherCallback(mode='training') ...")
        task_model = tf.LlamaForCausalLM.from_pretrained(root / BASE_DIR)
        task_dir = root / task
        if task_dir.is_dir():  # an earlier run's (checked): the Trainer and the callback write afresh
            shutil.rmtree(task_dir)
        callback = finetune(task_model, task, steps=args.task_steps, seed=args.seed + 10 + i, output_dir=task_dir)
        fisher = callback.fisher()
        fisher.metadata.model_name_or_path = f"hf_fisher demo: tiny LLaMA fine-tuned on {task} (Trainer)"
        fisher.metadata.data_description = (f"{fisher.counts.samples} synthetic {task} sequences seen in fine-tuning "
                                            f"(loss on the answer half)")
        fisher.save_pretrained(task_dir / TASK_FISHER_SUBDIR)  # again, with the data description in its card
        _save_model(task_model, tokenizer, task_dir / TASK_MODEL_SUBDIR)
        loss, acc = _metrics(task_model, held_out[task])
        print(f"  {task} loss {result.scores['base'][task]:.3f} -> {loss:.3f}, {task} accuracy {100 * acc:.1f}% "
              f"(held-out); Fisher over {fisher.counts.samples} training sequences in {task_dir / TASK_FISHER_SUBDIR}/")
        models[task] = task_model
        result.fishers[task] = fisher

    # 3. the most important heads of each task
    print()
    print("[3/6] Most important heads and channels of each task (Fisher mass; hf-fisher show prints the same):")
    for task in TASKS:
        print()
        print(format_report(result.fishers[task], top=args.top, source=str(root / task / TASK_FISHER_SUBDIR)))
    print()
    for task in TASKS:
        print(f"  top heads of {task:<8}: {_head_line(result.fishers[task], min(args.top, 4))}")
    print()
    _print_card(root / "copy" / TASK_FISHER_SUBDIR / "README.md", args.card_lines)

    # 4. prune the copy model
    print()
    print(f"[4/6] Pruning {int(100 * PRUNE_SPARSITY)}% of the copy model's heads / channels in every layer "
          f"(hf_fisher.prune, score 'kfac', rescaled on {sum(len(b['input_ids']) for b in calibration)} calibration sequences) ...")
    work = tf.LlamaForCausalLM.from_pretrained(root / "copy" / TASK_MODEL_SUBDIR).eval()
    pruned = hf_fisher.prune(work, sparsity=PRUNE_SPARSITY, scope="layer", rescale_batches=calibration, physical=True,
                             seed=args.seed, progress=False)
    small = pruned.model.eval()
    n_small = sum(p.numel() for p in small.parameters())
    loss_before, acc_before = _metrics(models["copy"], held_out["copy"])
    loss_after, acc_after = _metrics(small, held_out["copy"])
    pruned.save_pretrained(root / PRUNED_DIR, overwrite=True)  # with the tokenizer of the copy model's folder
    result.prune_stats = {"params_before": n_params, "params_after": n_small, "loss_before": loss_before,
                          "loss_after": loss_after, "accuracy_before": acc_before, "accuracy_after": acc_after,
                          "removed_units": len(pruned.removed), "score": pruned.stats.get("score"),
                          "compensated": pruned.stats.get("compensated"), "warnings": pruned.stats.get("warnings", [])}
    if pruned.stats.get("compensated"):
        print("  the copy model is saturated (it predicts its answers with probability ~1, so its Fisher vanishes): "
              "hf_fisher.prune warned and added FLAP's bias compensation to the default (pruning.json, 'warnings')")
    print(f"  removed {len(pruned.removed)} heads / channels: {n_params:,} -> {n_small:,} parameters; "
          f"copy loss {loss_before:.3f} -> {loss_after:.3f}, copy accuracy {100 * acc_before:.1f}% -> {100 * acc_after:.1f}%")

    # 5. merge the task models: Fisher merging vs plain averaging
    print()
    print("[5/6] Merging the copy and reverse models (hf_fisher.merge_with_fisher) by Fisher merging and by plain averaging ...")
    folders = [str(root / t / TASK_MODEL_SUBDIR) for t in TASKS]
    merged = {}
    for method, name in (("average", MERGED_AVERAGE_DIR), ("fisher", MERGED_FISHER_DIR)):
        kwargs = {"fishers": [str(root / t / TASK_FISHER_SUBDIR) for t in TASKS]} if method == "fisher" else {}
        path = hf_fisher.merge_with_fisher(folders, method=method, output_dir=root / name, progress=False, **kwargs)
        merged[method] = tf.LlamaForCausalLM.from_pretrained(path).eval()
    rows = [("copy model", models["copy"]), ("reverse model", models["reverse"]),
            ("average merge", merged["average"]), ("Fisher merge", merged["fisher"])]
    print()
    print("Held-out loss per task (lower is better; accuracy in brackets)")
    header = f"  {'model':<15} " + " ".join(f"{t + ' loss':>20}" for t in TASKS) + f" {'mean':>8}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for label, m in rows:
        cells = {t: _metrics(m, held_out[t]) for t in TASKS}
        result.scores[label] = {t: cells[t][0] for t in TASKS}
        result.accuracy[label] = {t: cells[t][1] for t in TASKS}
        mean = sum(c[0] for c in cells.values()) / len(cells)
        print(f"  {label:<15} " + " ".join(f"{c[0]:>11.3f} ({100 * c[1]:5.1f}%)" for c in cells.values()) + f" {mean:>8.3f}")
    print()
    mass = ", ".join(f"{t} {result.fishers[t].total():.4g}" for t in TASKS)
    print(f"  Total Fisher mass: {mass}. The Fisher merge weighs each parameter by its task's Fisher,")
    print("  so a task the model already solves (small gradients, small empirical Fisher) gives way to the other.")
    print()

    # 6. the report of the two Fishers
    print("[6/6] Writing the report of the two Fishers (hf_fisher.write_report) ...")
    report = hf_fisher.write_report([result.fishers[t] for t in TASKS], root / REPORT_DIR, names=list(TASKS), overwrite=True)
    for note in report.notes:
        print(f"  note: {note}")

    for task in TASKS:
        _write_text(root / DATA_FILES[task], _data_lines(held_out[task]))
    result.seconds = time.perf_counter() - start
    cli_out = root / CLI_ARTIFACT_DIR
    plots = [f for f in report.files if f.endswith(".png")]
    index = [
        (f"{BASE_DIR}/", "the shared base model + tokenizer (trained on both tasks)"),
        *[(f"{t}/{TASK_MODEL_SUBDIR}/", f"the {t} model (Trainer fine-tune of the base)") for t in TASKS],
        *[(f"{t}/{TASK_FISHER_SUBDIR}/", f"the {t} Fisher artifact from FisherCallback, with its model card README.md")
          for t in TASKS],
        (f"{PRUNED_DIR}/", f"the copy model, {int(100 * PRUNE_SPARSITY)}% of its heads / channels removed (pruning.json)"),
        (f"{MERGED_FISHER_DIR}/", "the Fisher merge (mergekit_config.yml, model card README.md)"),
        (f"{MERGED_AVERAGE_DIR}/", "the plain average (mergekit_config.yml, model card README.md)"),
        (f"{REPORT_DIR}/", ", ".join(f for f in report.files if not f.endswith(".png"))
                           + (f" and {len(plots)} plots" if plots else "")),
        (", ".join(DATA_FILES.values()), f"the held-out sequences ({args.samples} per task), one a line"),
    ]
    print()
    print(f"Everything is in {root}/:")
    width = max(len(k) for k, _ in index)
    for key, what in index:
        print(f"  {key:<{width}}  {what}")
    result.files = {k: root / k.split(",")[0].rstrip("/") for k, _ in index}
    model_dir, data_file = root / "copy" / TASK_MODEL_SUBDIR, root / DATA_FILES["copy"]
    print()
    print("Try the command line on them:")
    print(f"  hf-fisher collect --model {model_dir} --data {data_file} --task copy --out {cli_out} --overwrite")
    print(f"  hf-fisher show {cli_out}")
    print("(hf-fisher collect scores every token of each line, the causal-LM labels being the input ids,")
    print(" while the demo scored only the answer half, so the two Fishers differ.)")
    print(f"Done in {result.seconds:.1f} s.")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``hf-fisher demo`` / ``python -m hf_fisher.demo``); imports nothing heavy."""
    parser.add_argument(
        "--out", default="demo_output",
        help="folder the demo writes everything into (the base and task models, their Fisher artifacts, the pruned "
             "and merged models, the report, the data); an earlier demo's output is replaced (default demo_output)",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps of the shared base on both tasks (default 300)")
    parser.add_argument("--task-steps", type=int, default=200,
                        help="Trainer fine-tuning steps of each task model, with FisherCallback (default 200)")
    parser.add_argument("--samples", type=int, default=64, help="held-out sequences per task for the scores (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the model, training and data (default 0)")
    parser.add_argument("--top", type=int, default=8, help="rows in the heads / channels tables (default 8)")
    parser.add_argument("--card-lines", type=int, default=12, help="lines of the model card to print (default 12)")
