"""The model card of a merged model (:func:`merged_card`), from its recipe and the method's class in
the merge registry (formula, paper, whether it is a Fisher merge)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hf_fisher.artifacts.cards import hub_base_model, load_template, md_code, md_text, value_md

__all__ = ["MERGED_TEMPLATE", "merged_card"]

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

MERGED_TEMPLATE = "merged_card.md"

_MERGE_FORMULAS = {
    "fisher": "Fisher-weighted averaging, per element: `θ* = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i` with `F̃_i = max(F_i, floor)`.",
    "fisher_task_vector": "Fisher-weighted task vectors: `θ* = θ_base + Σ_i λ_i F̃_i τ_i / Σ_i λ_i F̃_i`, `τ_i = θ_i − θ_base`.",
    "average": "Weighted average: `θ* = Σ_i λ_i θ_i / Σ_i λ_i`.",
    "task_arithmetic": "Task arithmetic: `θ* = θ_base + s Σ_i λ_i τ_i`, `τ_i = θ_i − θ_base`.",
    "ties": "TIES: trim each `λ_i τ_i` to its largest magnitudes (density), elect each entry's sign, average the agreeing entries, `θ* = θ_base + s · mean`.",
    "dare": "DARE: drop each task-vector entry with probability `p`, rescale the rest by `1/(1 − p)`, then task arithmetic or TIES.",
    "regmean": "RegMean: `W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i` per linear layer (λ_i the model weights) (input Gram matrices, off-diagonal scaled by `α`); other tensors averaged.",
    "fisher_regmean": "RegMean for every linear weight, Fisher-weighted averaging for the other tensors.",
    "kfac": "KFAC Fisher merging, per block: `Σ_i λ_i (F_i + δI) vec(M* − M_i) = 0` with `F_i ≈ G_i ⊗ A_i` (Kronecker-factored Fishers).",
}


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def merged_card(recipe: dict, *, sources=None, fishers=None, base=None, template: str | None = None,
                library_name: str = "transformers") -> ModelCard:
    """The :class:`huggingface_hub.ModelCard` of a merged model, from its recipe.

    Metadata (compatible with mergekit's cards): ``base_model`` lists the inputs that are Hub ids
    (:func:`hub_base_model`; local folders are listed in the body instead), ``base_model_relation:
    merge``, ``tags`` ``merge``, ``hf-fisher`` and the method, ``library_name: transformers``
    (``peft`` for a merged adapter).
    The body names the method with its formula and paper, the inputs with their weights and
    Fisher artifacts, the validation choice, and the recipe.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from hf_fisher import plugins
    from hf_fisher.consumers.merge.recipe import yaml_text

    method = str(recipe.get("merge_method"))
    cls = plugins.merge_methods().get(method)
    entries = recipe.get("models") or []
    refs = [str(e.get("model")) for e in entries]
    base_ref = recipe.get("base_model")
    hub_ids = []
    for i, ref in enumerate(refs + ([str(base_ref)] if base_ref else [])):
        src = None
        if sources is not None and i < len(sources):
            src = sources[i]
        elif base is not None and i == len(refs):
            src = base
        hub = getattr(src, "hub_id", None) or hub_base_model(ref)
        if hub and hub not in hub_ids:
            hub_ids.append(hub)
    local = [r for r in refs + ([str(base_ref)] if base_ref else []) if r not in hub_ids and r.split(":")[0] not in hub_ids]
    tags = ["merge", "hf-fisher", method.replace("_", "-")]
    if cls is not None and cls.fishers is not None:
        tags.append("fisher-merging")
    data = ModelCardData(library_name=library_name, base_model=hub_ids or None, base_model_relation="merge", tags=tags)
    # Values read as they are written: names, paths and settings in code spans (md_code), prose
    # the library wrote itself as plain Markdown; only free text goes through md_text.
    rows = []
    for i, e in enumerate(entries):
        p = e.get("parameters") or {}
        rows.append({"index": i, "model": md_code(e.get("model"), in_table=True),
                     "weight": value_md(p.get("weight", "")),
                     "fisher": md_code(p.get("fisher"), in_table=True) if p.get("fisher") else "-"})
    section = recipe.get("hf_fisher") or {}
    no_fisher = (section.get("no_fisher") or {})
    nf = no_fisher.get("tensors") or []
    no_fisher_md = None
    if nf:
        shown = ", ".join(md_code(t) for t in nf[:10]) + (f" and {len(nf) - 10} more" if len(nf) > 10 else "")
        no_fisher_md = (f"{len(nf)} tensor(s), merged by rule {md_code(no_fisher.get('rule'))} "
                        f"({md_text(no_fisher.get('text'))}): {shown}")
    val = section.get("validation")
    validation_md = None
    if val:
        chosen = val.get("chosen") or {}
        parts = [md_code(f"{k} = {v}") for k, v in chosen.items()]
        validation_md = f"Picked on a grid of {md_text(val.get('points'))} points by the {md_text(val.get('criterion'))}: " + "; ".join(parts)
    recipe_yaml = yaml_text(recipe)
    fence = _fence(recipe_yaml)
    params = recipe.get("parameters") or {}
    return ModelCard.from_template(
        data,
        template_str=template if template is not None else load_template(MERGED_TEMPLATE),
        title_md=md_text(f"Merged model ({method})"),
        num_models=len(entries),
        version_md=md_text(section.get("version", "")),
        method_md=md_text(method),
        formula_md=_MERGE_FORMULAS.get(method) or (md_code(cls.formula) if cls is not None and cls.formula else md_text(method)),
        paper_md=(cls.paper if cls is not None else "") or "-",  # the method's own Markdown (titles in italics)
        parameter_rows=[(md_code(k, in_table=True), value_md(v)) for k, v in params.items()] + (
            [(md_code("dtype"), md_code(recipe["dtype"], in_table=True))] if recipe.get("dtype") else []),
        input_rows=rows,
        base_md=md_code(base_ref) if base_ref else None,
        local_md=", ".join(md_code(r) for r in local) if local else None,
        no_fisher_md=no_fisher_md,
        validation_md=validation_md,
        recipe_yaml=recipe_yaml,
        fence=fence,
    )
