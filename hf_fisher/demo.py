"""End-to-end demo, offline, in seconds on a laptop CPU: ``python -m hf_fisher.demo``.

1. builds a tiny LLaMA from a config (2 layers, 4 query heads sharing 2 kv-heads, vocab 128);
2. trains it for 150 small steps on a *copy* task: ``<s> x1..x8 | x1..x8``, loss on the copy
   only, so the model must learn attention heads that look back 9 positions;
3. collects the empirical Fisher of the copy task with ``reduction="group"``;
4. prints the most important heads and MLP channels and the per-layer totals (the same tables
   as ``hf-fisher show``) and saves the artifact (default ``demo_output/fisher-copy``).

It also saves the trained model with a word-level tokenizer and the data as text next to the
artifact, so the command line can be tried on them (the demo prints the command).
Everything is seeded: two runs print the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["add_arguments", "run", "main", "DemoResult", "word_tokenizer", "copy_batch", "tiny_llama"]

logger = logging.getLogger("hf_fisher.demo")

VOCAB = 128
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
SEP_ID = 4  # "|"
FIRST_CONTENT_ID = 5  # "w5" ... "w127"
SPAN = 8  # tokens to copy


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
    with torch.no_grad():
        out = model(**batch)
        pred = out.logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        keep = target != -100
        acc = (pred[keep] == target[keep]).float().mean().item()
    return out.loss.item(), acc


def train(model, *, steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3) -> tuple[float, float, float]:
    """AdamW on fresh copy batches; returns (loss before, loss after, copy accuracy after)."""
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


def run(args: argparse.Namespace) -> DemoResult:
    """Run the demo with the options of :func:`add_arguments`; prints its report."""
    import hf_fisher
    from hf_fisher.cli import format_report

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
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
    print(f"Collecting the empirical Fisher of the copy task over {n} sequences ...")
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

    out.parent.mkdir(parents=True, exist_ok=True)
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

    model_dir = out.parent / "tiny-llama-copy"
    data_file = out.parent / "copy.txt"
    model.save_pretrained(model_dir)
    tokenizer = word_tokenizer(demo_words())
    tokenizer.save_pretrained(model_dir)
    words = demo_words()
    lines = []
    for b in batches:
        for row in b["input_ids"].tolist():
            lines.append(" ".join(words[i - len(SPECIAL_TOKENS)] for i in row[1:]))
    data_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - start
    print()
    print(f"Also saved the trained model + tokenizer to {model_dir}/ and the data to {data_file}; try")
    print(f"  hf-fisher collect --model {model_dir} --data {data_file} --task copy --out {out.parent / 'fisher-cli'} --overwrite")
    print(f"  hf-fisher show {out.parent / 'fisher-cli'}")
    print(f"Done in {seconds:.1f} s.")
    return DemoResult(out=out, initial_loss=initial, final_loss=final, copy_accuracy=acc, seconds=seconds, fisher=fisher)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output/fisher-copy", help="artifact folder (default demo_output/fisher-copy)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--samples", type=int, default=64, help="sequences for the Fisher (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=8, help="rows in the heads / channels tables")
    parser.add_argument("--card-lines", type=int, default=12, help="lines of the model card to print")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_fisher.demo [options]`` is ``hf-fisher demo [options]``."""
    import sys

    from hf_fisher.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
