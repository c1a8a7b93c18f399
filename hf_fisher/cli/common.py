"""What the ``hf-fisher`` commands share: the exit codes, the common options (model and data,
device and dtype), the checks made before any work (``--out`` folders and their disk space,
``--device``, ``--estimator``, ``--model``, ``--data`` and its samples against the model's config),
loading the config, model, tokenizer and batches, and turning errors into exit codes.

Every error hf_fisher raises on purpose (:class:`hf_fisher.errors.HfFisherError`), an ``OSError``
(a folder that cannot be written, a full disk...), and a model or tokenizer that cannot be loaded,
ends the command with a one-line message on stderr and exit code 2 (no traceback).

Imports nothing heavy (no torch) at import time: the functions that need torch or transformers
import them when they run.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_fisher.errors import ArtifactError, HfFisherError, InvalidInputError

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a Unix tool killed by a closed pipe returns
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")
STORAGE_DTYPES = ("float64", "float32", "float16")


# ---- output folders


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output_folder(
    path: str | os.PathLike,
    *,
    allowed: Callable[[str], bool],
    what: str,
    overwrite: bool,
    needed_bytes: int | None = None,
    needed_detail: str = "",
    flag: str = "--out",
) -> Path:
    """Check, before any work, that ``path`` can receive a ``what``; return it as an absolute path.

    - the rules of :func:`hf_fisher.artifacts.atomic.check_target` (new, empty, or holding only ``allowed``
      files, replaced only with ``overwrite``; the nearest existing folder above it writable);
    - with ``needed_bytes``, that folder's disk has at least that much free space.

    Raises :class:`~hf_fisher.errors.ArtifactError` (an ``OSError``) naming the problem. Writes
    nothing that stays.
    """
    from hf_fisher.artifacts.atomic import check_target, check_writable

    target = check_target(path, allowed=allowed, what=what, overwrite=overwrite, flag=flag)
    base = check_writable(target, what=what, flag=flag)
    if needed_bytes is not None:
        try:
            free = shutil.disk_usage(base).free
        except OSError:
            free = None
        if free is not None and free < needed_bytes:
            raise ArtifactError(
                f"not enough disk space for the {what} in {target}: it needs about {_human(needed_bytes)}"
                f"{f' ({needed_detail})' if needed_detail else ''} but only {_human(free)} are free there; "
                f"free some space or choose another {flag}"
            )
    return target


def safetensors_shapes(model_dir: Path) -> list[tuple[int, ...]] | None:
    """Tensor shapes from the headers of the ``*.safetensors`` files of a model folder (the
    data is not read), or None when there are none or a header cannot be read."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return None
    shapes: list[tuple[int, ...]] = []
    try:
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= 100 * 2**20:
                    return None
                header = json.loads(fh.read(n))
            shapes.extend(tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return shapes


def estimate_artifact_bytes(shapes: Sequence[Sequence[int]], *, reduction: str, element_size: int,
                            variance: bool = True) -> int:
    """About how many bytes a Fisher artifact of parameters of ``shapes`` takes on disk.

    ``param``: every element, twice (mean and variance; once with ``variance=False``) at
    ``element_size`` bytes; ``group``: at most one value per row of the longest axis of each
    tensor (heads, channels, vocabulary rows), as many times -- small. Plus 1 MiB for the config
    and the model card.
    """
    if reduction == "param":
        values = sum(math.prod(s) for s in shapes)
    else:
        values = sum(max(s) if len(s) else 1 for s in shapes)
    return int(values) * element_size * (2 if variance else 1) + 2**20


_ELEMENT_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def disk_need(shapes: Sequence[Sequence[int]], args: argparse.Namespace) -> tuple[int, str]:
    dtype = args.storage_dtype or "float64"
    variance = not getattr(args, "no_variance", False)
    need = estimate_artifact_bytes(shapes, reduction=args.reduction, element_size=_ELEMENT_SIZE[dtype], variance=variance)
    if args.reduction == "param":
        n = sum(math.prod(s) for s in shapes)
        what = "x 2 for mean and variance" if variance else "for the mean (--no-variance)"
        detail = f"{n:,} parameters x {_ELEMENT_SIZE[dtype]} bytes ({dtype}) {what}"
    else:
        detail = f"group reduction, {dtype}"
    return need, detail


def meta_shapes(config: Any, task_type: str) -> list[tuple[int, ...]] | None:
    """Parameter shapes of the model ``config`` describes, built on the meta device (no memory,
    no weights read); None when that fails."""
    try:
        import torch
        import transformers

        cls = (transformers.AutoModelForSequenceClassification if task_type == "sequence_classification"
               else transformers.AutoModelForSeq2SeqLM if task_type == "seq2seq" else transformers.AutoModelForCausalLM)
        with torch.device("meta"):
            model = cls.from_config(config)
        return [tuple(p.shape) for p in model.parameters()]
    except Exception as e:  # an estimate only: never a reason to fail
        logger.debug("could not estimate the model's size from its config: %s", e)
        return None


# ---- devices, models, data


def check_device(device: str):
    """Parse ``--device`` and check that it exists here; returns the ``torch.device``."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise InvalidInputError("--device meta holds no data; use cpu or a GPU")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)"
            )
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InvalidInputError(f"--device {device}: no {dev.type} device is available here; use --device cpu")
    return dev


def check_estimator(name: str) -> None:
    from hf_fisher import plugins

    names = plugins.estimators()
    if name not in names:
        raise InvalidInputError(
            f"--estimator {name!r} is not registered; available: {', '.join(sorted(names)) or 'none'} "
            f"(see `hf-fisher plugins`)"
        )


def position_limit(model: Any, config: Any) -> int | None:
    """Longest sequence the model can place (config ``max_position_embeddings`` / ``n_positions``;
    RoBERTa-style models, numbering positions from ``padding_idx + 1``: minus ``padding_idx + 1``)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return max(limit - (m.padding_idx + 1), 1)
    return limit


def check_token_ids(samples: Sequence[Any], vocab_size: Any) -> None:
    """Ready ``input_ids`` against the config's vocabulary, before the weights are loaded."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        return
    for i, sample in enumerate(samples):
        if sample.input_ids is not None and max(sample.input_ids) >= vocab_size:
            raise InvalidInputError(
                f"{sample.where or f'sample {i}'}: token id {max(sample.input_ids)} but the model's vocabulary "
                f"has {vocab_size} entries (config.vocab_size); were these ids made by this model's tokenizer?"
            )


def looks_local(name: str) -> bool:
    """Whether ``--model`` can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


SCORING = {
    "causal_lm": "every token of each line scored, causal-LM labels = the input ids",
    "sequence_classification": "each sample scored on its 'label'",
    "seq2seq": "each (source, target) pair scored on the target's tokens, the decoder's cross-entropy",
}


def check_model_and_data_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cheap checks shared by ``collect`` and ``compare-estimators`` (nothing heavy loaded):
    ``--data`` (.txt / .jsonl, exists), ``--batch-size`` / ``--max-length`` / ``--max-samples``
    (>= 1), ``--encoding``, ``--model`` (a folder with a config.json, or a Hub id)."""
    data_path = Path(args.data)
    if data_path.suffix.lower() not in (".txt", ".jsonl", ".tsv"):
        raise InvalidInputError(f"--data {str(data_path)!r}: expected a .txt or .jsonl file (or a .tsv of source<TAB>target pairs for an encoder-decoder)")
    if not data_path.is_file():
        raise InvalidInputError(f"--data {str(data_path)!r} does not exist (or is not a file)")
    for flag in ("batch_size", "max_length", "max_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise InvalidInputError(f"--encoding {args.encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return data_path, check_model_arg(args)


def check_model_arg(args: argparse.Namespace) -> Path:
    """``--model``: a folder with a config.json, or a Hub id."""
    model_path = Path(args.model)
    if not model_path.exists() and looks_local(args.model):
        raise InvalidInputError(f"--model {args.model!r} does not exist; pass the folder of a saved transformers model")
    if model_path.exists():
        if not model_path.is_dir():
            raise InvalidInputError(f"--model {str(model_path)!r} is a file; pass the folder of a saved transformers model")
        if not (model_path / "config.json").is_file():
            raise InvalidInputError(f"--model {str(model_path)!r} has no config.json: is it a saved transformers model?")
    return model_path


def read_samples(args: argparse.Namespace, data_path: Path) -> list:
    """The samples of ``--data`` (the first ``--max-samples`` of them)."""
    from hf_fisher.data import load_samples

    samples = load_samples(data_path, encoding=args.encoding)
    if args.max_samples is not None:  # the first N samples of the file
        samples = samples[: args.max_samples]
    return samples


def check_samples_against_config(args: argparse.Namespace, samples: Sequence[Any]) -> tuple[Any, str]:
    """The model's config and task type, with the samples' labels and token ids checked against
    it (before the weights are loaded)."""
    from hf_fisher.data import check_labels

    config, task_type = load_config(args.model)
    check_labels(samples, task_type, getattr(config, "num_labels", None))
    check_token_ids(samples, getattr(config, "vocab_size", None))
    return config, task_type


def load_model_and_batches(args: argparse.Namespace, config: Any, task_type: str, samples: Sequence[Any]):
    """Tokenizer (when a sample needs one), model (``--dtype``, ``--device``) and the batches
    (``--batch-size``; ``--max-length`` capped to the model's positions) on ``--device``."""
    from hf_fisher.data import make_batches, pad_token_id

    tokenizer = load_tokenizer(args.model) if any(s.input_ids is None for s in samples) else None
    model = load_model(args.model, config, args.dtype, args.device)
    max_length = args.max_length
    limit = position_limit(model, config)
    if limit is not None and max_length > limit:
        logger.info("--max-length %d is more than the model's %d positions: samples are truncated to %d tokens",
                    max_length, limit, limit)
        max_length = limit
    batches = make_batches(
        tokenizer,
        samples,
        batch_size=args.batch_size,
        max_length=max_length,
        task_type=task_type,
        pad_id=pad_token_id(tokenizer, model.config),
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    if args.device != "cpu":
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    return model, batches


def batches_for(args: argparse.Namespace, model: Any, config: Any, task_type: str, samples: Sequence[Any]):
    from hf_fisher.data import make_batches, pad_token_id

    tokenizer = load_tokenizer(args.model) if any(s.input_ids is None for s in samples) else None
    limit = position_limit(model, config)
    batches = make_batches(tokenizer, samples, batch_size=args.batch_size,
                           max_length=min(args.max_length, limit) if limit else args.max_length, task_type=task_type,
                           pad_id=pad_token_id(tokenizer, model.config), vocab_size=model.get_input_embeddings().num_embeddings)
    if args.device != "cpu":
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    return batches


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_config(name_or_path: str):
    """The model's config and task type: causal LM by default, sequence classification when
    ``config.architectures`` says so."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # whatever fails while reading a config, the model cannot be used
        logger.debug("loading the config failed", exc_info=True)
        if not os.path.exists(name_or_path) and not looks_local(name_or_path):
            offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
            why = "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set" if offline else "the Hub could not be reached"
            raise InvalidInputError(
                f"--model {name_or_path!r} is not a local folder, and it is not in the Hugging Face cache ({why}). "
                "Pass the folder of a saved model (model.save_pretrained(DIR)), or download it first where the Hub is "
                f"reachable: hf download {name_or_path}"
            ) from None
        raise InvalidInputError(f"could not load the config of model {name_or_path!r}: {e}") from None
    archs = getattr(config, "architectures", None) or []
    task_type = "sequence_classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"
    if getattr(config, "is_encoder_decoder", False):  # T5, BART, Marian, ...: (source, target) pairs
        task_type = "seq2seq"
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as TEXT_TO_TEXT

        if config.model_type not in TEXT_TO_TEXT:
            raise InvalidInputError(
                f"--model {name_or_path!r} is a {config.model_type} encoder-decoder that does not take text (not an "
                "AutoModelForSeq2SeqLM, e.g. speech: Whisper): the command line reads text pairs; collect its Fisher "
                "with the Python API (hf_fisher.collect with batches of 'input_features' and 'labels')"
            )
    return config, task_type


def load_model(name_or_path: str, config: Any, dtype: str, device: str):
    import torch
    import transformers
    from packaging.version import Version

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        cls = transformers.AutoModelForSequenceClassification
    elif getattr(config, "is_encoder_decoder", False):
        cls = transformers.AutoModelForSeq2SeqLM
    else:
        cls = transformers.AutoModelForCausalLM
    # transformers >= 4.56 names the argument ``dtype`` (``torch_dtype`` before).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model = cls.from_pretrained(name_or_path, config=config, **{key: getattr(torch, dtype)})
        return model.to(device)
    except Exception as e:  # corrupt weights (SafetensorError), shape mismatches, missing files...
        logger.debug("loading the model failed", exc_info=True)
        raise InvalidInputError(f"could not load model {name_or_path!r}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(name_or_path: str):
    import transformers

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise InvalidInputError(
            f"the data has text, but {name_or_path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save "
            "the tokenizer next to the model (tokenizer.save_pretrained(DIR)), or give a .jsonl data file with "
            "ready 'input_ids'"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        logger.debug("loading the tokenizer failed", exc_info=True)
        raise InvalidInputError(
            f"could not load a tokenizer from {name_or_path!r} ({e}); save one next to the model, "
            f"or use a .jsonl data file with 'input_ids'"
        ) from None


def add_task_data_options(p: argparse.ArgumentParser) -> None:
    """The data and model-loading options of the commands that read one file per task."""
    p.add_argument("--encoding", default="utf-8", help="text encoding of the data files (default utf-8)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens (default 512)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples of each task")
    add_device_options(p)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where and in which dtype the model is loaded."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model is loaded in (default float32)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (works under capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool) -> None:
    """The ``hf_fisher`` loggers to stderr (``LEVEL name: message``), INFO, DEBUG with ``-v``."""
    lib = logging.getLogger("hf_fisher")
    lib.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in lib.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again (the recipe of
    the Python docs for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run_command(args: argparse.Namespace) -> int:
    """Run the handler of a parsed command line (``args.func``); an error hf_fisher raises on
    purpose or an ``OSError`` becomes a one-line message on stderr and :data:`EXIT_ERROR`,
    Ctrl-C exit code 130. A ``BrokenPipeError`` goes to the caller (:func:`hf_fisher.cli.main`)."""
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        raise
    except HfFisherError as e:
        print(f"hf-fisher {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a folder that cannot be written, a full disk, an unreadable file...
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        print(f"hf-fisher {args.command}: error: {e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hf-fisher: interrupted", file=sys.stderr)
        return 130
