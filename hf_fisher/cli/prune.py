"""``hf-fisher prune``: prune a model by its Fisher information or a baseline score, save the result.

The score names come from the prune-score registry (built-ins and plugins, ``hf-fisher plugins``);
an unknown ``--score`` is refused by :func:`hf_fisher.consumers.prune.core.check_options` before the
model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_fisher.cli.common import (
    add_device_options,
    batches_for,
    check_device,
    check_model_and_data_args,
    check_model_arg,
    check_samples_against_config,
    load_config,
    load_model,
    load_model_and_batches,
    read_samples,
)
from hf_fisher.errors import InvalidInputError

PRUNE_DESCRIPTION = """\
Prune a model by its Fisher information (or a baseline criterion) and save the result:

    hf-fisher prune --model M --sparsity 0.3 --structured heads,channels \\
        --scope layer --data calib.txt --physical --out M-pruned
    hf-fisher prune --model M --fisher fisher-lm --sparsity 0.3 --out M-masked

With --data and --scope layer the default criterion is "kfac": layer by layer, units are removed
greedily by the least loss increase under the KFAC quadratic (Fisher of the layer output x
Gram of its input) with the kept units' scales re-optimised, and half of that update
(--obs-update 0.5: scales 1 + 0.5 (s - 1)) folded into the weights (--obs-update 1: all of it).
Without data, "fisher": a head's score is the Fisher of its Q rows and O columns (no share of
the K/V it shares under GQA; in multi-head attention a head takes its K/V rows along), a
channel's that of its gate/up rows and down column. --physical removes the units (a smaller model
from_pretrained loads); otherwise the weights are zeroed. --out gets the tokenizer files of
--model and pruning.json: what was removed, and the warnings (a sparsity the floors cannot reach;
a saturated model, whose Fisher vanishes: then the default adds FLAP's bias compensation).
With --validation FILE (held-out text) and no --score, each of kfac, mask_fisher, flap and
wanda_sp (each with and without FLAP's bias compensation) prunes the model and the lowest validation loss wins;
the choice and every candidate's loss are printed and saved in pruning.json. --validation holdout
makes the same choice on the last quarter of the --data batches (at least 4), held out, the
candidates pruning with the rest (text the model was trained on leans to the criteria that
reconstruct it: held-out text it was not trained on is the better judge).
The flag combinations are checked before the model is loaded.
"""


def _parse_structured(text: str):
    if text.strip().lower() in ("none", "unstructured", ""):
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("heads", "kv_heads", "channels", "vocab")]
    if bad:
        raise InvalidInputError(f"--structured {text!r}: unknown unit {bad[0]!r}; use a comma list of heads, kv_heads, channels, vocab (or none)")
    return kinds


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher prune`` to the subcommands ``sub``."""
    p = sub.add_parser("prune", help="prune heads / kv-heads / channels / vocabulary rows (or weights) by Fisher or a baseline score",
                       description=PRUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder of a saved transformers model")
    p.add_argument("--fisher", default=None, help="Fisher artifact folder of the model (needed by --score fisher / obd)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of the candidate parameters to remove, in [0, 1)")
    p.add_argument("--structured", default="heads,channels", help="comma list of heads, kv_heads, channels, vocab; or none (unstructured)")
    p.add_argument("--score", default=None, metavar="SCORE",
                   help="criterion: a registered prune score, e.g. fisher, kfac, obd, magnitude, wanda_sp, flap (all of them: "
                        "`hf-fisher plugins`; default with --data and --scope layer: chosen on held-out --data batches, "
                        "kfac with fewer than 4 batches; else fisher)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="one global budget, or the same budget in every layer (default global)")
    p.add_argument("--min-per-layer", type=int, default=1, help="units of each kind kept in every layer (default 1)")
    p.add_argument("--confidence", type=float, default=None, help="remove only units whose upper confidence bound is below every kept unit (e.g. 0.95)")
    p.add_argument("--physical", action="store_true", help="remove the units and save a smaller model (LLaMA family; needs --scope layer)")
    p.add_argument("--data", default=None, help="calibration data (.txt / .jsonl): the least-squares rescale and the data-driven scores")
    p.add_argument("--no-rescale", action="store_true", help="no least-squares rescale even with --data")
    p.add_argument("--validation", default=None, metavar="FILE|holdout",
                   help="held-out data (.txt / .jsonl, not the --data text): the criterion left unset (kfac, "
                        "mask_fisher, flap or wanda_sp, each with FLAP's bias compensation on or off) is chosen by its loss; the "
                        "choice is printed and saved in pruning.json (needs --data). 'holdout': chosen on the last "
                        "quarter of the --data batches instead")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch of --data (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate calibration samples to this many tokens (default 512)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most the first N calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of --score random (default 0)")
    p.add_argument("--obs-update", type=float, default=None, metavar="GAMMA",
                   help="score kfac: the fraction of its OBS update folded into the kept units, in [0, 1] "
                        "(default 0.5; 1: the full update, 0: selection only)")
    p.add_argument("--obs-target", choices=("unpruned", "layer"), default=None,
                   help="score kfac: what its OBS update rebuilds: 'unpruned' (default) the unpruned model's layer "
                        "outputs, 'layer' each layer's own output on the inputs of the model pruned so far")
    p.add_argument("--out", required=True, help="folder to write the pruned model to (new, empty, or a previous output with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (never other files)")
    add_device_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # Cheap checks first: flags, the model and Fisher folders, the data file, the output folder.
    if not 0.0 <= args.sparsity < 1.0:
        raise InvalidInputError(f"--sparsity must be in [0, 1) (a fraction of the candidate parameters), got {args.sparsity}")
    structured = _parse_structured(args.structured)
    if args.min_per_layer < 0:
        raise InvalidInputError(f"--min-per-layer must be >= 0 (got {args.min_per_layer})")
    if args.confidence is not None and not 0.0 < args.confidence < 1.0:
        raise InvalidInputError(f"--confidence must be in (0, 1), e.g. 0.95 (got {args.confidence})")
    if args.data is not None:
        data_path, _ = check_model_and_data_args(args)
    else:
        data_path = None
        check_model_arg(args)
    if args.validation is not None:
        vpath = Path(args.validation)
        if data_path is None:
            raise InvalidInputError("--validation chooses among criteria computed on calibration data: pass --data FILE too")
        if args.validation != "holdout" and (vpath.suffix.lower() not in (".txt", ".jsonl") or not vpath.is_file()):
            raise InvalidInputError(f"--validation {args.validation!r}: expected an existing .txt or .jsonl file, or 'holdout'")
        if args.score is not None:
            raise InvalidInputError("--validation chooses the criterion: drop --score (or drop --validation)")
    if args.fisher is not None and not Path(args.fisher).is_dir():
        raise InvalidInputError(f"--fisher {args.fisher!r} is not a folder; pass a Fisher artifact folder (hf-fisher collect --out)")
    from hf_fisher.artifacts.atomic import check_target
    from hf_fisher.consumers.merge.io import TOKENIZER_FILES, is_model_output_file
    from hf_fisher.consumers.prune.core import CLI_TERMS, PRUNE_FILES, check_options, prune

    check_target(args.out, allowed=lambda n: is_model_output_file(n) or n in PRUNE_FILES, what="pruned model",
                 overwrite=args.overwrite, flag="--out", inputs=[("--model", args.model), ("--fisher", args.fisher)])
    # The flag combinations, on the model's config and the Fisher artifact, before the model is loaded.
    if args.physical and structured and "vocab" in structured and Path(args.model).is_dir() and any(
            (Path(args.model) / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidInputError(
            "--structured vocab with --physical renumbers the token ids, and the tokenizer in --model cannot be "
            "renumbered with them (the output would have none that fits): prune the vocabulary without --physical "
            "(rows zeroed, ids and tokenizer unchanged), or use hf_fisher.prune(..., physical=True, tokenizer=False) "
            "and map ids through its vocab_map.json"
        )
    config, _ = load_config(args.model)
    fisher = None
    if args.fisher is not None:
        from hf_fisher.artifacts.fisher import Fisher

        fisher = Fisher.from_pretrained(args.fisher)
    has_data = data_path is not None
    check_options(sparsity=args.sparsity, structured=structured, score=args.score, scope=args.scope,
                  min_per_layer=args.min_per_layer, confidence=args.confidence, physical=args.physical,
                  has_data=has_data, has_rescale_data=has_data and not args.no_rescale, fisher=fisher,
                  rescale=False if args.no_rescale or not has_data else None, config=config,
                  obs_update=args.obs_update, obs_target=args.obs_target, terms=CLI_TERMS)
    check_device(args.device)
    batches = validation = None
    if data_path is not None:
        samples = read_samples(args, data_path)
        config, task_type = check_samples_against_config(args, samples)
        held_out = None
        if args.validation == "holdout":
            validation = "holdout"
        elif args.validation is not None:
            held_out = read_samples(args, Path(args.validation))
            check_samples_against_config(args, held_out)
        model, batches = load_model_and_batches(args, config, task_type, samples)
        if held_out is not None:
            validation = batches_for(args, model, config, task_type, held_out)
    else:
        model = load_model(args.model, config, args.dtype, args.device)
    result = prune(
        model, fisher, sparsity=args.sparsity, structured=structured, score=args.score, scope=args.scope,
        min_per_layer=args.min_per_layer, confidence=args.confidence, physical=args.physical,
        rescale_batches=None if args.no_rescale else batches, calibration_batches=batches,
        rescale=False if args.no_rescale or batches is None else None, seed=args.seed, progress=not args.no_progress,
        validation=validation, obs_update=args.obs_update, obs_target=args.obs_target,
    )
    result.save_pretrained(args.out, overwrite=args.overwrite)
    st = result.stats
    print(f"Removed {st.get('removed_units', len(result.masks))} units ({100 * st['achieved_sparsity']:.1f}% of "
          f"{st['candidate_params']:,} candidate parameters; score {st['score']}, scope {st['scope']})")
    if "validation" in st:
        chosen = st["validation"]["chosen"]
        by = "Validation" if st["validation"]["source"] == "validation=" else \
            f"On {st['validation']['batches']} held-out --data batch(es), --validation holdout"
        print(by + " chose score " + chosen["score"] + (" with" if chosen["rescale"] else " without") + " rescale,"
              + (" with" if chosen["compensate"] else " without")
              + f" bias compensation (validation loss {chosen['validation_loss']:.6g}); candidates: "
              + ", ".join(f"{c['score']}{'+rescale' if c['rescale'] else ''}{'+compensate' if c['compensate'] else ''} "
                          f"{c['validation_loss']:.6g}" for c in st["validation"]["candidates"]))
    print(f"Saved the {'smaller' if args.physical else 'masked'} model to {args.out}")
    return 0
