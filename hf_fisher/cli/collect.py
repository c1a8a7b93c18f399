"""``hf-fisher collect``: a Fisher artifact of a saved model on a data file."""

from __future__ import annotations

import argparse
import logging

from hf_fisher.cli.common import (
    SCORING,
    STORAGE_DTYPES,
    add_device_options,
    check_device,
    check_estimator,
    check_model_and_data_args,
    check_output_folder,
    check_samples_against_config,
    disk_need,
    load_model_and_batches,
    meta_shapes,
    read_samples,
    safetensors_shapes,
    torch_dtype,
)
from hf_fisher.errors import InvalidInputError

logger = logging.getLogger(__name__)


COLLECT_DESCRIPTION = """\
Collect the Fisher information of a saved model on a data file and save it as an artifact folder.

What is scored: for a causal LM every token of each line counts (the labels are the input ids,
padding ignored; the model predicts each token from the ones before it), unlike the demo, which
scores only the copied half of its sequences. A classifier (config architectures
...ForSequenceClassification) is scored on each sample's integer 'label' (.jsonl).
An encoder-decoder (config is_encoder_decoder: T5, BART, Marian, ...) is scored on each
(source, target) pair: the decoder's cross-entropy over the target's tokens (.tsv with two
tab-separated columns, or .jsonl with 'source' and 'target').

Everything is checked before the model's weights are loaded: arguments, --device, --estimator,
--out (new or empty, or a previous artifact with --overwrite; writable; enough free disk space),
the data file (encoding, JSON, labels). --max-length is capped to the model's position limit.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher collect`` to the subcommands ``sub``."""
    p = sub.add_parser("collect", help="collect a Fisher artifact of a model on a data file",
                       description=COLLECT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder of a saved transformers model (with its tokenizer)")
    p.add_argument("--data", required=True, help=".txt (one sample per line) or .jsonl ('text' or 'input_ids', optional 'label'); "
                   "encoder-decoder models: .tsv (source<TAB>target) or .jsonl ('source', 'target')")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8; e.g. latin-1, cp1252, utf-16)")
    p.add_argument("--task", required=True, help="name of the task the data stands for (recorded in the artifact)")
    p.add_argument("--out", required=True, help="folder to write the artifact to (new or empty; checked before the work)")
    p.add_argument("--overwrite", action="store_true", help="replace a Fisher artifact already in --out (never other files)")
    p.add_argument("--reduction", choices=("group", "param"), default="group", help="group: per head/channel/row (default); param: parameter-shaped")
    p.add_argument("--normalization", choices=("mean", "sum", "token"), default="mean", help="per-sample loss normalisation (default mean)")
    p.add_argument("--estimator", default="empirical", help="estimator plugin (default empirical; see `hf-fisher plugins`)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward/backward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens (default 512; capped to the model's positions)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N samples")
    add_device_options(p)
    p.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None, help="dtype of the saved tensors (default: the accumulation dtype, float64)")
    p.add_argument("--no-atomic-batches", action="store_true",
                   help="merge each parameter's batch moments into the accumulators as soon as the backward has produced "
                        "them (atomic_batches=False): a lower peak (no staged copy of the model's moments per batch); "
                        "a batch that fails ends the run either way")
    p.add_argument("--no-variance", action="store_true",
                   help="keep the mean only (variance=False): accumulators of 8 bytes per value instead of 12 (float32) "
                        "or 16 (float64), the same Fisher, and an artifact without variances (intervals from them refuse it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def check_streaming_estimator(name: str, option: str = "atomic_batches", flag: str = "--no-atomic-batches") -> None:
    """``flag`` (``--no-atomic-batches``, ``--no-variance``) only for an estimator that takes
    ``option`` (the diagonal ones, which accumulate per-sample moments)."""
    from hf_fisher import plugins

    if option not in getattr(plugins.estimators()[name], "own_options", ()):
        takers = sorted(n for n, c in plugins.estimators().items() if option in getattr(c, "own_options", ()))
        raise InvalidInputError(
            f"{flag} applies to the estimators that accumulate per-sample moments ({', '.join(takers)}), "
            f"not to --estimator {name}; drop {flag}"
        )


def run(args: argparse.Namespace) -> int:
    # Cheap checks first: nothing heavy is loaded when an argument is wrong.
    data_path, model_path = check_model_and_data_args(args)
    if not args.task.strip():
        raise InvalidInputError("--task must not be empty: it names what the data stands for (e.g. --task math)")

    # The output folder, before the model is touched: overwrite rule, writable, disk space.
    from hf_fisher.artifacts.fisher import is_artifact_file

    shapes = safetensors_shapes(model_path)
    need, detail = disk_need(shapes, args) if shapes else (None, "")
    out = check_output_folder(args.out, allowed=is_artifact_file, what="Fisher artifact",
                              overwrite=args.overwrite, needed_bytes=need, needed_detail=detail)
    check_device(args.device)

    samples = read_samples(args, data_path)
    check_estimator(args.estimator)  # loads the plugins
    if args.no_atomic_batches:
        check_streaming_estimator(args.estimator)
    if args.no_variance:
        check_streaming_estimator(args.estimator, "variance", "--no-variance")
    config, task_type = check_samples_against_config(args, samples)
    if need is None:  # no safetensors headers to read: estimate from the config, still before the weights
        shapes = meta_shapes(config, task_type)
        if shapes:
            need, detail = disk_need(shapes, args)
            check_output_folder(out, allowed=is_artifact_file, what="Fisher artifact",
                                overwrite=args.overwrite, needed_bytes=need, needed_detail=detail)
    model, batches = load_model_and_batches(args, config, task_type, samples)

    import hf_fisher

    logger.info("collecting %s Fisher (task %r) over %d samples in %d batches; %s", args.estimator, args.task,
                len(samples), len(batches), SCORING[task_type])
    fisher = hf_fisher.collect(
        model,
        batches,
        estimator=args.estimator,
        task=args.task,
        reduction=args.reduction,
        normalization=args.normalization,
        progress=not args.no_progress,
        storage_dtype=torch_dtype(args.storage_dtype) if args.storage_dtype else None,
        model_name_or_path=str(args.model),
        data_description=f"{data_path.name}: {len(samples)} samples",
        **({"atomic_batches": False} if args.no_atomic_batches else {}),
        **({"variance": False} if args.no_variance else {}),
    )
    fisher.save_pretrained(out)
    c = fisher.counts
    extra = fisher.metadata.extra
    path = extra.get("per_sample_path", "batched")
    if path == "loop":
        path = f"per-sample loop: {extra.get('loop_reason', '')}"
    elif extra.get("vjp_params"):
        path = f"batched, {len(extra['vjp_params'])} parameter(s) through the batched vjp"
    print(f"Saved {args.reduction} Fisher of {len(fisher)} tensors to {out} "
          f"(samples {c.samples}, tokens {c.tokens}, skipped {c.skipped}; {SCORING[task_type]}; {path})")
    return 0
