"""End-to-end demo, offline, in seconds on a laptop CPU: ``python -m hf_fisher.demo``.

1. builds a tiny LLaMA from a config (2 layers, 4 query heads sharing 2 kv-heads, vocab 128);
2. trains it for 150 small steps on a *copy* task: ``<s> x1..x8 | x1..x8``, loss on the copy
   only, so the model must learn attention heads that look back 9 positions;
3. collects the empirical Fisher of the copy task with ``reduction="group"``;
4. prints the most important heads and MLP channels and the per-layer totals (the same tables
   as ``hf-fisher show``) and saves the artifact.

Everything it writes goes inside ``--out`` (default ``demo_output``)::

    fisher-copy/        the Fisher artifact
    tiny-llama-copy/    the trained model with a word-level tokenizer
    copy.txt            the data as text, one sequence per line

so the command line can be tried on them (the demo prints the command, whose output
``fisher-cli/`` also goes inside ``--out``). ``--out`` may be new, or hold what an earlier demo
run wrote (it is replaced); anything else in it makes the demo refuse before training. The
arguments are checked before anything is trained. Everything is seeded: two runs print the same
numbers.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hf_fisher.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["add_arguments", "run", "main", "DemoResult", "word_tokenizer", "copy_batch", "tiny_llama"]

logger = logging.getLogger("hf_fisher.demo")

VOCAB = 128
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
SEP_ID = 4  # "|"
FIRST_CONTENT_ID = 5  # "w5" ... "w127"
SPAN = 8  # tokens to copy

# what the demo writes inside --out (and the folder of the command it suggests)
ARTIFACT_DIR = "fisher-copy"
MODEL_DIR = "tiny-llama-copy"
DATA_FILE = "copy.txt"
CLI_ARTIFACT_DIR = "fisher-cli"
DEMO_ENTRIES = (ARTIFACT_DIR, MODEL_DIR, DATA_FILE, CLI_ARTIFACT_DIR)
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
    """The demo's vocabulary after the special tokens: ``|`` (id 4) and ``w5`` ... ``w127``."""
    return ["|"] + [f"w{i}" for i in range(FIRST_CONTENT_ID, VOCAB)]


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


def copy_batch(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` sequences ``<s> x1..x8 | x1..x8`` with labels on the copied half only (-100 elsewhere)."""
    import torch

    x = torch.randint(FIRST_CONTENT_ID, VOCAB, (n, SPAN), generator=generator)
    bos = torch.full((n, 1), 1, dtype=torch.long)
    sep = torch.full((n, 1), SEP_ID, dtype=torch.long)
    ids = torch.cat([bos, x, sep, x], dim=1)
    labels = ids.clone()
    labels[:, : SPAN + 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@dataclass
class DemoResult:
    out: Path
    initial_loss: float
    final_loss: float
    copy_accuracy: float
    seconds: float
    fisher: object


def _copy_metrics(model, batch) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        out = model(**batch)
        pred = out.logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        keep = target != -100
        acc = (pred[keep] == target[keep]).float().mean().item()
    return out.loss.item(), acc


def train(model, *, steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3) -> tuple[float, float, float]:
    """AdamW on fresh copy batches; returns (loss before, loss after, copy accuracy after)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    held_out = copy_batch(128, torch.Generator().manual_seed(seed + 1))
    model.eval()
    initial, _ = _copy_metrics(model, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    for step in range(steps):
        loss = model(**copy_batch(batch_size, g)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 25 == 0:
            logger.info("train step %d/%d: loss %.3f", step + 1, steps, loss.item())
    opt.zero_grad(set_to_none=True)
    model.eval()
    final, acc = _copy_metrics(model, held_out)
    return initial, final, acc


def _is_model_file(name: str) -> bool:
    return name.endswith(MODEL_FILE_SUFFIXES)


def check_arguments(args: argparse.Namespace) -> Path:
    """Check the demo's options and its output folder before any work; return ``--out``.

    Raises :class:`~hf_fisher.errors.InvalidInputError` for an out-of-range number and
    :class:`~hf_fisher.errors.ArtifactError` (from :func:`hf_fisher.cli.check_output_folder`) for
    an output folder holding anything but an earlier demo's files, or one that cannot be written.
    """
    from hf_fisher.cli import check_output_folder
    from hf_fisher.fisher import is_artifact_file

    for flag, low in (("steps", 0), ("samples", 1), ("top", 0), ("card_lines", 0), ("seed", 0)):
        value = getattr(args, flag)
        if value < low:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= {low} (got {value})")
    if args.seed >= 2**63:
        raise InvalidInputError(f"--seed must be < 2**63 (got {args.seed})")
    from hf_fisher.errors import ArtifactError

    try:
        out = check_output_folder(
            args.out, allowed=lambda name: name in DEMO_ENTRIES, what="demo output", overwrite=True, flag="--out"
        )
    except ArtifactError as e:
        if (Path(args.out) / "fisher_config.json").is_file():  # --out names an artifact (the old usage)
            raise ArtifactError(f"{e} (--out is the folder the demo writes everything into; its artifact goes "
                                f"to {Path(args.out) / ARTIFACT_DIR})") from None
        raise
    check_output_folder(out / ARTIFACT_DIR, allowed=is_artifact_file, what="Fisher artifact", overwrite=True, flag="--out")
    check_output_folder(out / MODEL_DIR, allowed=_is_model_file, what="model folder", overwrite=True, flag="--out")
    check_output_folder(out / CLI_ARTIFACT_DIR, allowed=is_artifact_file, what="Fisher artifact", overwrite=True, flag="--out")
    if (out / DATA_FILE).is_dir():
        raise InvalidInputError(f"--out {out}: {DATA_FILE} is a folder; the demo writes its data to a file of that name")
    return out


def run(args: argparse.Namespace) -> DemoResult:
    """Run the demo with the options of :func:`add_arguments`; prints its report.

    Everything is written inside ``args.out`` (see the module docstring), which is checked,
    with the other options, before the model is built.
    """
    root = check_arguments(args)

    import torch

    import hf_fisher
    from hf_fisher.atomic import atomic_folder
    from hf_fisher.cli import format_report

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = root / ARTIFACT_DIR
    model = tiny_llama(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Tiny LLaMA: {n_params:,} parameters, 2 layers, 4 heads / 2 kv-heads, vocab {VOCAB}")
    print(f"Training {args.steps} steps on the copy task  <s> x1..x{SPAN} | x1..x{SPAN}  ...")
    initial, final, acc = train(model, steps=args.steps, seed=args.seed)
    print(f"  copy loss {initial:.3f} -> {final:.3f}, copy accuracy {100 * acc:.1f}% (held-out)")

    g = torch.Generator().manual_seed(args.seed + 2)
    sizes = [16] * (args.samples // 16) + ([args.samples % 16] if args.samples % 16 else [])
    batches = [copy_batch(size, g) for size in sizes]
    n = sum(len(b["input_ids"]) for b in batches)
    print(f"Collecting the empirical Fisher of the copy task over {n} sequences (loss on the copied half only) ...")
    fisher = hf_fisher.collect(
        model,
        batches,
        reduction="group",
        task="copy",
        progress=False,
        model_name_or_path="hf_fisher demo: tiny LLaMA trained to copy",
        data_description=f"{n} synthetic copy sequences <s> x1..x{SPAN} | x1..x{SPAN} (loss on the copy)",
    )
    print()
    print(format_report(fisher, top=args.top, source=str(out)))
    print()

    fisher.save_pretrained(out)
    print(f"Saved the Fisher artifact to {out}/")
    card = out / "README.md"
    if card.is_file():
        lines = card.read_text(encoding="utf-8").splitlines()
        if lines and lines[0] == "---" and "---" in lines[1:]:  # skip the Hub metadata block
            lines = lines[lines.index("---", 1) + 1 :]
        while lines and not lines[0].strip():
            lines = lines[1:]
        print(f"First lines of its model card, {card}:")
        for line in lines[: args.card_lines]:
            print(f"  | {line}")

    model_dir = root / MODEL_DIR
    data_file = root / DATA_FILE
    tokenizer = word_tokenizer(demo_words())
    with atomic_folder(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    words = demo_words()
    lines = []
    for b in batches:
        for row in b["input_ids"].tolist():
            lines.append(" ".join(words[i - len(SPECIAL_TOKENS)] for i in row[1:]))
    tmp_data = data_file.with_name(f".{DATA_FILE}.tmp")
    tmp_data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp_data.replace(data_file)
    seconds = time.perf_counter() - start
    cli_out = root / CLI_ARTIFACT_DIR
    print()
    print(f"Also saved the trained model + tokenizer to {model_dir}/ and the data to {data_file}; try")
    print(f"  hf-fisher collect --model {model_dir} --data {data_file} --task copy --out {cli_out} --overwrite")
    print(f"  hf-fisher show {cli_out}")
    print("(hf-fisher collect scores every token of each line, the causal-LM labels being the input ids,")
    print(" while the demo above scored only the copied half, so the two Fishers differ.)")
    print(f"Done in {seconds:.1f} s.")
    return DemoResult(out=out, initial_loss=initial, final_loss=final, copy_accuracy=acc, seconds=seconds, fisher=fisher)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``hf-fisher demo`` / ``python -m hf_fisher.demo``); imports nothing heavy."""
    parser.add_argument(
        "--out", default="demo_output",
        help=f"folder the demo writes everything into: {ARTIFACT_DIR}/ (the artifact), {MODEL_DIR}/ "
             f"(model + tokenizer), {DATA_FILE} (the data); an earlier demo's output is replaced "
             f"(default demo_output)",
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--samples", type=int, default=64, help="sequences for the Fisher (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the model, training and data (default 0)")
    parser.add_argument("--top", type=int, default=8, help="rows in the heads / channels tables (default 8)")
    parser.add_argument("--card-lines", type=int, default=12, help="lines of the model card to print (default 12)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_fisher.demo [options]`` is ``hf-fisher demo [options]``."""
    import sys

    from hf_fisher.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
