"""``hf-fisher merge``: merge models as a recipe YAML describes.

The method names come from the merge-method registry (built-ins and plugins, ``hf-fisher plugins``);
the recipe's method is checked by :func:`hf_fisher.consumers.merge.api.load_recipe` /
``recipe_to_kwargs`` before torch is imported.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hf_fisher.cli.common import looks_local
from hf_fisher.errors import InvalidInputError

MERGE_DESCRIPTION = """\
Merge models as a recipe describes. mergekit recipes run unchanged:

    merge_method: ties              # linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
                                    # breadcrumbs_ties, della, della_linear, slerp, nuslerp, passthrough,
                                    # model_stock (plugin), and fisher, fisher_task_vector, kfac, average, dare
                                    # (all: hf-fisher plugins)
    base_model: path/to/base        # the task-vector methods' base (listed among models too, as mergekit allows)
    models:
      - model: path/or/hub-id
        parameters:
          weight: [1.0, 0.5]        # a gradient over the layers, or {filter: self_attn, value: ...} lists
          density: 0.5
      - model: other/model
        parameters: {weight: 0.5, density: 0.3, fisher: path/to/fisher}   # fisher: for the Fisher methods
    parameters: {normalize: true, int8_mask: true, lambda: 1.0}
    dtype: bfloat16                 # output dtype (out_dtype wins); arithmetic is float32 or float64
    tokenizer_source: base          # base or one of the models

Instead of models:, mergekit's slices: take layer ranges of several models (frankenmerges with
passthrough; any method over the same number of models per slice; num_hidden_layers of the output
is the sum of the slice lengths):

    slices:
      - sources: [{model: a, layer_range: [0, 16]}]
      - sources: [{model: b, layer_range: [8, 24]}]
    merge_method: passthrough

Numbers follow mergekit 0.1.5 (convention: mergekit, the default; convention: hf_fisher for the
earlier TIES/DARE arithmetic). Arithmetic is float32 (float64 for float64 inputs) rounded once to
the output dtype; mergekit computes in a 16-bit recipe dtype, which is logged as a difference.
Not carried out, refused naming the key: modules, tokenizer, chat_template, tokenizer_source: union,
slices[i].residual_weight. Every input, Fisher and the output folder are checked before any tensor
is merged. Relative paths are read relative to the recipe's folder. The merge writes its recipe as
mergekit_config.yml (the scale as lambda, slices as slices:), which mergekit and hf-fisher both rerun.
"""
MERGE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hf-fisher merge`` to the subcommands ``sub``."""
    p = sub.add_parser("merge", help="merge models (Fisher, TIES, DARE, task arithmetic, ...) from a recipe YAML",
                       description=MERGE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=None,
                   help="merge recipe YAML (mergekit_config.yml, the one a merge writes, reproduces it; mergekit recipes run unchanged)")
    p.add_argument("--config", default=None, metavar="RECIPE", help="the recipe YAML (instead of the positional argument)")
    p.add_argument("--out", required=True, help="folder to write the merged model to (new, empty, or a previous merge output)")
    p.add_argument("--dtype", choices=MERGE_DTYPES, default=None, help="dtype of the merged weights (default: the recipe's, else the inputs')")
    p.add_argument("--max-shard-size", default=None, help="largest weight shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="merge even when the inputs' tokenizer vocabularies differ")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the merged folder to this Hub repo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if (args.recipe is None) == (args.config is None):
        raise InvalidInputError("give the recipe YAML once: as the argument (hf-fisher merge recipe.yml) or as --config")
    recipe_path = Path(args.recipe if args.recipe is not None else args.config)
    # Cheap checks first: the recipe file and its keys, the output folder -- before torch is imported.
    if not recipe_path.is_file():
        raise InvalidInputError(f"recipe {str(recipe_path)!r} does not exist (or is not a file); pass a merge recipe YAML")
    if args.dtype is not None and args.dtype not in MERGE_DTYPES:  # pragma: no cover - argparse choices
        raise InvalidInputError(f"--dtype must be one of {MERGE_DTYPES}")
    from hf_fisher.consumers.merge.api import _check_output, _input_paths, load_recipe, recipe_to_kwargs

    recipe = load_recipe(recipe_path)
    kwargs = recipe_to_kwargs(recipe, relative_to=recipe_path.parent)
    refs = [*kwargs["models"], kwargs.get("base_model"), *(kwargs.get("fishers") or [])]
    for ref in [r for x in refs for r in (x.input_refs() if hasattr(x, "input_refs") else [x])]:
        if ref is not None and not os.path.exists(ref) and looks_local(ref):
            raise InvalidInputError(f"recipe {recipe_path}: {ref!r} does not exist (a local path, not a Hub id)")
    out = Path(os.path.abspath(args.out))
    if args.push_to_hub:
        from hf_fisher.artifacts.hub import check_push_ready

        check_push_ready(args.push_to_hub, flag="--push-to-hub")
    _check_output(out, _input_paths(kwargs["models"], kwargs.get("base_model"), kwargs.get("fishers")), flag="--out")
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    if args.max_shard_size is not None:
        kwargs["max_shard_size"] = args.max_shard_size
    if args.allow_tokenizer_mismatch:
        kwargs["allow_tokenizer_mismatch"] = True
    from hf_fisher.consumers.merge.api import merge_with_fisher

    path = merge_with_fisher(output_dir=out, progress=not args.no_progress,
                             push_to_hub=args.push_to_hub, **kwargs)
    print(f"Merged {len(kwargs['models'])} models ({kwargs['method']}) into {path}")
    return 0


# --------------------------------------------------------------------------- parser
