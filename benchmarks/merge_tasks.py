"""Pairs of tasks for the merge benchmarks, made offline from real text found on this machine.

    python benchmarks/merge_tasks.py                         # build (or load) the llama-gqa pair, print its losses
    python benchmarks/merge_tasks.py --pairs all             # every pair of PAIRS
    python benchmarks/merge_tasks.py --pairs gpt2 --quick    # a small, quickly trained version (smoke runs)
    python benchmarks/merge_tasks.py --rebuild               # build again even if the cache holds it

The pairs (:data:`PAIRS`; each a shared base model and two task models fine-tuned from it, one
per domain), of different shapes and on different text:

- ``llama-gqa`` (the original pair, cache version v1): LLaMA with 4 query heads over 2 kv-heads,
  ``python`` vs ``prose``;
- ``llama-mha``: LLaMA with 4 query heads and 4 kv-heads, ``man`` vs ``pkgdocs``;
- ``gpt2``: GPT-2 (fused ``c_attn`` Conv1D, tied embeddings, learned positions), ``c`` vs ``changelog``.

The domains of real text, all read from the machine itself (nothing is downloaded):

- ``python``: Python source of the interpreter's standard library (``*.py`` under the stdlib
  folder, site-packages excluded);
- ``prose``: English licence and copyright prose (``/usr/share/common-licenses/*`` and
  ``/usr/share/doc/*/copyright``);
- ``man``: English manual pages in roff (``/usr/share/man/man[1-8]/*.gz``);
- ``pkgdocs``: the package descriptions of the running interpreter's site-packages
  (``*.dist-info/METADATA``, Markdown / reStructuredText);
- ``c``: C headers (``/usr/include/**/*.h``);
- ``changelog``: Debian package changelogs (``/usr/share/doc/*/changelog*.gz``).

The new domains read at most :data:`MAX_BYTES` of text per split (files in sorted order), far
more than the sequences kept.

Each domain's files are split by a hash of their path into train / validation / test (80 / 10 /
10, so the splits hold disjoint files); paragraphs (blank-line separated) are de-duplicated over
the whole domain and a paragraph already met in an earlier split is dropped from the later
ones (licence texts repeat across packages: without this the test set would hold training text).
The text is byte-level tokenised: ids 0..255 are the UTF-8 bytes, 256 is BOS (every sequence is
BOS + 127 bytes; no padding is needed).

Per pair, one shared tiny base model (hidden 128, 3 layers, 4 heads, vocabulary 260; for
``llama-gqa`` 2 kv-heads, intermediate 384, untied, 657k parameters) is pre-trained briefly on a
50/50 mix of both train splits, then each task model is fine-tuned from it on its own domain.
The build checks that each task model is clearly better (by ``MIN_GAP`` nats per token on the
validation split) on its own domain than the other task model (a warning only with ``--quick``),
and prints the loss table (test split). Seeds are fixed.

Everything is cached in ``benchmarks/.cache/merge_tasks-<version>/`` (``llama-gqa``) or
``merge_tasks-<pair>-<version>[-quick]/`` (git-ignored): ``base/`` and one folder per domain
(``save_pretrained`` folders, safetensors), ``data.pt`` (the token splits) and ``meta.json``
(configuration, losses, build time). About 10 MB each.

Other scripts use :func:`load_task_pair` (``pair=`` one of :data:`PAIRS`).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(REPO))

VERSION = "v1"
CACHE = Path(__file__).resolve().parent / ".cache" / f"merge_tasks-{VERSION}"
DOMAINS = ("python", "prose")
SEQ_LEN = 128
BOS = 256
VOCAB = 260  # 256 bytes, BOS, two unused ids, one spare (a multiple of 4)
MODEL = dict(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=384)
# per domain: sequences kept per split (train is also what the base and the Fisher see)
CAPS = {"train": 6000, "validation": 256, "test": 512}
PRETRAIN = dict(steps=300, batch=32, lr=3e-3, warmup=50, seed=0)
FINETUNE = dict(steps=200, batch=32, lr=1e-3, warmup=20, seed=1)
MIN_GAP = 0.1  # nats / token: how much better each task model must be on its own domain
EVAL_BATCH = 64
# --quick: a small, quickly trained version of a pair (smoke runs; its own cache folder)
QUICK = dict(caps={"train": 1200, "validation": 64, "test": 128}, pretrain_steps=60, finetune_steps=40)


@dataclass(frozen=True)
class PairSpec:
    """One task pair: its two domains, the architecture (``"llama"`` or ``"gpt2"``) and its size."""

    name: str
    domains: tuple[str, str]
    arch: str
    model: dict = field(default_factory=dict)
    version: str = "v1"

    def cache(self, quick: bool = False) -> Path:
        name = f"merge_tasks-{self.version}" if self.name == "llama-gqa" else f"merge_tasks-{self.name}-{self.version}"
        return CACHE.parent / (name + ("-quick" if quick else ""))


PAIRS = {
    "llama-gqa": PairSpec("llama-gqa", DOMAINS, "llama", MODEL),
    "llama-mha": PairSpec("llama-mha", ("man", "pkgdocs"), "llama",
                          dict(hidden=128, layers=3, heads=4, kv_heads=4, intermediate=384)),
    "gpt2": PairSpec("gpt2", ("c", "changelog"), "gpt2", dict(hidden=128, layers=3, heads=4, intermediate=512)),
}


# ----------------------------------------------------------------------------------- the text
def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append((rel, p))
    return out


def _prose_files() -> list[tuple[str, Path]]:
    out, seen = [], set()
    for f in sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright")):
        real = Path(f).resolve()
        if not real.is_file() or real in seen:
            continue
        seen.add(real)
        out.append((f, real))
    return out


def _glob_files(*patterns: str) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for pattern in patterns:
        for f in sorted(glob.glob(pattern, recursive=True)):
            real = Path(f).resolve()
            if not real.is_file() or real in seen:
                continue
            seen.add(real)
            out.append((f, real))
    return out


def _pkgdoc_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["purelib"]).resolve()
    return [(p.relative_to(root).as_posix(), p) for p in sorted(root.glob("*.dist-info/METADATA"))]


#: domain -> its files (relative name, path)
DOMAIN_FILES = {
    "python": _stdlib_files,
    "prose": _prose_files,
    "man": lambda: _glob_files("/usr/share/man/man[1-8]/*.gz"),
    "pkgdocs": _pkgdoc_files,
    "c": lambda: _glob_files("/usr/include/**/*.h"),
    "changelog": lambda: _glob_files("/usr/share/doc/*/changelog*.gz"),
}
#: the most text read per split of a domain (None: every file; the original domains read all)
MAX_BYTES = {"python": None, "prose": None, "man": 8_000_000, "pkgdocs": None, "c": 8_000_000, "changelog": 8_000_000}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def _split_of(rel: str) -> str:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "little") % 100
    return "train" if h < 80 else "validation" if h < 90 else "test"


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if len(p.strip()) >= 20]


def domain_splits(domain: str) -> dict[str, list[str]]:
    """The de-duplicated paragraphs of each split of ``domain`` (train, validation, test)."""
    files = DOMAIN_FILES[domain]()
    budget = MAX_BYTES.get(domain)
    by_split: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for rel, path in files:
        by_split[_split_of(rel)].append(path)
    seen: set[bytes] = set()
    out: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):  # a paragraph met earlier is dropped later
        paras = []
        read = 0
        for path in by_split[split]:
            if budget is not None and read >= budget:
                break
            try:
                text = _read_text(path)
            except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                continue
            read += len(text)
            for p in _paragraphs(text):
                key = hashlib.sha1(re.sub(r"\s+", " ", p).strip().encode()).digest()
                if key in seen:
                    continue
                seen.add(key)
                paras.append(p)
        out[split] = paras
    return out


def encode(paragraphs: list[str], cap: int, seed: int) -> torch.Tensor:
    """Shuffle the paragraphs (seeded), join them with blank lines, cut the UTF-8 bytes into
    windows of ``SEQ_LEN - 1`` and prefix each with BOS; keep at most ``cap`` windows."""
    order = list(paragraphs)
    random.Random(seed).shuffle(order)
    data = "\n\n".join(order).encode("utf-8")
    w = SEQ_LEN - 1
    n = min(cap, len(data) // w)
    body = torch.frombuffer(bytearray(data[: n * w]), dtype=torch.uint8).to(torch.int16).view(n, w)
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.int16), body], dim=1)


# ---------------------------------------------------------------------------------- the models
def model_config(spec: PairSpec | None = None):
    """The config of a pair's models (default: ``llama-gqa``)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    spec = spec or PAIRS["llama-gqa"]
    m = spec.model
    if spec.arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=m["hidden"], n_layer=m["layers"], n_head=m["heads"],
            n_inner=m["intermediate"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS,
            eos_token_id=BOS, architectures=["GPT2LMHeadModel"],
        )
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=None,
    )


def _model_class(spec: PairSpec):
    import transformers

    return transformers.GPT2LMHeadModel if spec.arch == "gpt2" else transformers.LlamaForCausalLM


def as_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = ids.long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def batches(ids: torch.Tensor, batch_size: int, max_samples: int | None = None) -> list[dict]:
    """Consecutive batches of ``ids`` (first ``max_samples`` rows), labels = inputs."""
    if max_samples is not None:
        ids = ids[:max_samples]
    return [as_batch(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Mean token loss (nats) of ``model`` over ``ids`` (every sequence has the same length, so
    the mean of the batch means weighted by rows is the token mean)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(ids), batch_size):
        b = as_batch(ids[i : i + batch_size])
        total += float(model(**b).loss) * len(b["input_ids"])
        n += len(b["input_ids"])
    model.train(was_training)
    return total / n


def _train(model, sample, steps: int, lr: float, warmup: int, seed: int, log: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(**as_batch(sample(gen))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  {log} step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()


def _sampler(*tensors: torch.Tensor, batch: int):
    """Uniform rows; with several tensors, an equal share of each batch from each."""
    share = batch // len(tensors)

    def sample(gen):
        parts = [t[torch.randint(len(t), (share,), generator=gen)] for t in tensors]
        return torch.cat(parts)

    return sample


# ------------------------------------------------------------------------------ the task pair
@dataclass
class TaskPair:
    root: Path
    data: dict[str, dict[str, torch.Tensor]]  # domain -> split -> int16 [N, SEQ_LEN]
    meta: dict
    spec: PairSpec = field(default_factory=lambda: PAIRS["llama-gqa"])

    @property
    def domains(self) -> tuple[str, str]:
        return self.spec.domains

    def path(self, which: str) -> Path:
        """``"base"`` or a domain name -> its ``save_pretrained`` folder."""
        return self.root / which

    def load(self, which: str, dtype: torch.dtype = torch.float32):
        import transformers

        transformers.utils.logging.disable_progress_bar()

        return _model_class(self.spec).from_pretrained(self.path(which), dtype=dtype).eval()

    def batches(self, domain: str, split: str, batch_size: int = 32, max_samples: int | None = None) -> list[dict]:
        return batches(self.data[domain][split], batch_size, max_samples)

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        """Mean token loss on each domain's ``split``."""
        return {d: eval_loss(model, self.data[d][split]) for d in self.domains}


def build(root: Path = CACHE, threads: int | None = None, pair: str = "llama-gqa", quick: bool = False) -> TaskPair:
    spec = PAIRS[pair]
    cls = _model_class(spec)
    caps = QUICK["caps"] if quick else CAPS
    pretrain = {**PRETRAIN, **({"steps": QUICK["pretrain_steps"]} if quick else {})}
    finetune = {**FINETUNE, **({"steps": QUICK["finetune_steps"]} if quick else {})}
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[str, torch.Tensor]] = {}
    sources = {}
    for k, d in enumerate(spec.domains):
        paras = domain_splits(d)
        data[d] = {s: encode(p, caps[s], seed=100 + 10 * k + i) for i, (s, p) in enumerate(paras.items())}
        sources[d] = {s: {"paragraphs": len(p), "bytes": sum(len(x.encode()) for x in p)} for s, p in paras.items()}
        print(f"{d}: " + ", ".join(f"{s} {len(t)} sequences (of {sources[d][s]['bytes'] / 1e6:.1f} MB)" for s, t in data[d].items()))
    torch.save(data, root / "data.pt")

    torch.manual_seed(pretrain["seed"])
    base = cls(model_config(spec)).eval()
    n_params = sum(p.numel() for p in base.parameters())
    print(f"{pair} base ({spec.arch}): {n_params:,} parameters; pre-training {pretrain['steps']} steps on the mix")
    _train(base, _sampler(*(data[d]["train"] for d in spec.domains), batch=pretrain["batch"]), pretrain["steps"],
           pretrain["lr"], pretrain["warmup"], pretrain["seed"], "base")
    base.save_pretrained(root / "base")
    for k, d in enumerate(spec.domains):
        model = cls.from_pretrained(root / "base", dtype=torch.float32)
        print(f"fine-tuning the {d} model: {finetune['steps']} steps")
        _train(model, _sampler(data[d]["train"], batch=finetune["batch"]), finetune["steps"], finetune["lr"],
               finetune["warmup"], finetune["seed"] + k, d)
        model.save_pretrained(root / d)

    tp = TaskPair(root, data, {}, spec)
    losses = {}
    for which in ("base",) + spec.domains:
        m = tp.load(which)
        losses[which] = {split: tp.evaluate(m, split) for split in ("validation", "test")}
    for d in spec.domains:
        other = next(o for o in spec.domains if o != d)
        gap = losses[other]["validation"][d] - losses[d]["validation"][d]
        if gap < MIN_GAP:
            msg = f"the {d} model is only {gap:.3f} nats/token better than the {other} model on {d}"
            if not quick:
                raise RuntimeError(msg)
            warnings.warn(msg + " (quick build)", stacklevel=1)
    meta = {
        "version": spec.version, "pair": pair, "quick": quick, "arch": spec.arch, "domains": list(spec.domains),
        "seq_len": SEQ_LEN, "vocab": VOCAB, "model": spec.model, "parameters": n_params, "caps": caps,
        "pretrain": pretrain, "finetune": finetune, "sources": sources, "losses": losses,
        "build_seconds": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    tp.meta = meta
    return tp


def load_task_pair(root: Path | None = None, rebuild: bool = False, threads: int | None = None,
                   pair: str = "llama-gqa", quick: bool = False) -> TaskPair:
    """The cached task pair ``pair`` (one of :data:`PAIRS`), built first when missing (or when
    ``rebuild``); ``quick``: its small version (own cache folder)."""
    spec = PAIRS[pair]
    root = Path(root) if root is not None else spec.cache(quick)
    ready = (root / "meta.json").is_file() and all((root / w / "config.json").is_file() for w in ("base",) + spec.domains)
    if rebuild or not ready:
        return build(root, threads, pair, quick)
    data = torch.load(root / "data.pt")
    return TaskPair(root, data, json.loads((root / "meta.json").read_text()), spec)


def loss_table(meta: dict, split: str = "test") -> str:
    domains = tuple(meta.get("domains") or DOMAINS)
    lines = [f"| model ({split} loss, nats/token) | " + " | ".join(domains) + " | mean |", "| --- |" + " --- |" * (len(domains) + 1)]
    for which in ("base",) + domains:
        row = meta["losses"][which][split]
        vals = [row[d] for d in domains]
        lines.append(f"| {which} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {sum(vals) / len(vals):.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["llama-gqa"], help=f"pairs to build: {list(PAIRS)} or 'all'")
    ap.add_argument("--quick", action="store_true", help="the small, quickly trained versions (smoke runs)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in parse_pairs(args.pairs):
        pair = load_task_pair(rebuild=args.rebuild, threads=args.threads, pair=name, quick=args.quick)
        print(f"\n{name}: task pair in {pair.root} (built in {pair.meta['build_seconds']} s, {pair.meta['threads']} threads)\n")
        print(loss_table(pair.meta, "validation"))
        print()
        print(loss_table(pair.meta, "test"))


def parse_pairs(names) -> list[str]:
    """``--pairs`` values: names of :data:`PAIRS` or ``all``."""
    out = list(PAIRS) if "all" in names else list(names)
    unknown = [n for n in out if n not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pair(s) {unknown}; choose from {list(PAIRS)} or 'all'")
    return out


if __name__ == "__main__":
    main()
