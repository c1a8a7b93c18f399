"""Model cards (README.md) for Fisher artifacts, rendered from the Jinja templates in model_cards/.

The card's YAML header carries the Hub metadata (``library_name: hf_fisher``, ``tags``, an
``hf_fisher`` mapping with the task, estimator, reduction and normalisation, and, when the source
model is a Hub id, ``base_model``); the body explains the quantity (``F = mean_i C_i``,
``C_i = g_i ⊙ g_i``), the normalisation and reduction used, the counts, the metadata, a
per-layer summary (layer, total Fisher, share of the total, largest group) and, when the layout
describes attention heads, a "Summary" section (:func:`summary_section`: curvature scale, top
heads, critical / compressible counts with their thresholds).

Rules:

- ``base_model`` is set only for a real Hub id (:func:`hub_base_model`): never for a local folder.
- Every value that comes from the user or the model (task, model name, metadata, parameter and
  group names) is *escaped*, not stripped, where it enters Markdown (:func:`md_text`): it renders
  as the same readable text and can never close an HTML block, start a heading, a table cell, a
  link or an image. In the YAML header, values are written by huggingface_hub's ``CardData``
  (``yaml.dump``), which quotes them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher.artifacts.hub import looks_like_hub_id
from hf_fisher.errors import ArtifactError, HfFisherError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard, ModelCardData

    from hf_fisher.artifacts.fisher import Fisher

__all__ = ["card_data", "hub_base_model", "layer_rows", "load_template", "looks_like_hub_id", "md_code", "md_text", "merged_card", "render_card", "summary_section"]

logger = logging.getLogger(__name__)

FISHER_TEMPLATE = "fisher_card.md"
_COMMIT_HASH_LEN = 40


def load_template(name: str = FISHER_TEMPLATE) -> str:
    """Text of a card template: from the installed data package ``hf_fisher.model_cards``, else from
    the repository's top-level ``model_cards/`` folder (source checkout on PYTHONPATH)."""
    try:
        from importlib.resources import files

        resource = files("hf_fisher.model_cards") / name
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    fallback = Path(__file__).resolve().parents[2] / "model_cards" / name
    if fallback.is_file():
        return fallback.read_text(encoding="utf-8")
    raise ArtifactError(
        f"card template {name!r} not found in hf_fisher.model_cards nor in {fallback.parent}; "
        "the installation is incomplete — reinstall hf-fisher"
    )


def _is_commit_hash(revision: Any) -> bool:
    return isinstance(revision, str) and len(revision) == _COMMIT_HASH_LEN and all(c in "0123456789abcdef" for c in revision)


def hub_base_model(name_or_path: str | None, revision: str | None = None) -> str | None:
    """The ``base_model`` of a card: ``name_or_path`` when it names a model on the Hub, else None.

    A real Hub id is a valid repo id (:func:`looks_like_hub_id`) that is either recorded with a
    Hub commit hash as ``revision`` (transformers records ``_commit_hash`` only for models it
    resolved from the Hub or its cache) or is not an existing local path (relative to the current
    folder, or absolute; ``~`` expanded). A local folder never becomes ``base_model``.
    """
    if not looks_like_hub_id(name_or_path):
        return None
    assert isinstance(name_or_path, str)
    if _is_commit_hash(revision):
        return name_or_path
    if os.path.lexists(name_or_path) or os.path.lexists(os.path.expanduser(name_or_path)):
        return None
    return name_or_path


def card_data(fisher: Fisher) -> ModelCardData:
    """Hub metadata: ``library_name="hf_fisher"``, tags, ``hf_fisher`` (task, estimator, reduction,
    normalization) and ``base_model`` for Hub ids (:func:`hub_base_model`).

    A local path is not a valid ``base_model`` on the Hub, so it is left out (it stays in the
    card's metadata table).
    """
    from huggingface_hub import ModelCardData

    md = fisher.metadata
    tags = ["fisher-information", "hf-fisher", str(md.estimator), str(fisher.reduction)]
    base = hub_base_model(md.model_name_or_path, md.revision)
    info = {"task": str(md.task), "estimator": str(md.estimator), "reduction": str(fisher.reduction),
            "normalization": str(md.normalization)}
    return ModelCardData(library_name="hf_fisher", tags=tags, base_model=base, hf_fisher=info)


_MD_ESCAPED = set("\\`*_[]|~#$!:@")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def md_text(value: Any) -> str:
    """``str(value)`` escaped for inline Markdown (a heading, a paragraph, a table cell).

    Escaped, not removed, so the text renders as written: ``& < >`` become HTML entities (no raw
    HTML such as ``</details>``), Markdown punctuation ``\\ ` * _ [ ] | ~ # $ ! : @`` (and the dot of
    ``www.``) gets a backslash (no emphasis, code, links or autolinks, images, table cells, math),
    and line breaks and other control
    characters are shown as ``\\n``, ``\\r``, ``\\t``, ``\\xNN`` / ``\\uNNNN`` on one line (no new
    block can start).
    """
    out = []
    text = str(value)
    for i, ch in enumerate(text):
        if ch == "." and text[max(0, i - 3):i].lower() == "www":  # no GFM www. autolink
            out.append("\\.")
        elif ch in _MD_ENTITIES:
            out.append(_MD_ENTITIES[ch])
        elif ch in _MD_ESCAPED:
            out.append("\\" + ch)
        elif ch in _CONTROL_NAMES:
            out.append("\\" + _CONTROL_NAMES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\x85\u2028\u2029":
            code = ord(ch)
            out.append("\\\\" + (f"x{code:02x}" if code < 0x100 else f"u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def _shown_controls(text: str) -> str:
    """Line breaks and other control characters as visible escapes (``\\n``, ``\\xNN``...)."""
    out = []
    for ch in text:
        if ch in _CONTROL_NAMES:
            out.append(_CONTROL_NAMES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\x85\u2028\u2029":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def md_code(value: Any, *, in_table: bool = False) -> str:
    """``str(value)`` as an inline code span: shown verbatim, so a path or a parameter name reads
    as written (``m_0``, not ``m\\_0``) in the raw file and on the page, while nothing in it is
    interpreted (no HTML, emphasis, link or heading can start inside a code span). The fence is
    longer than any backtick run in the text; line breaks and control characters are shown as
    ``\\n``, ``\\xNN`` (one line); ``in_table``: ``|`` is written ``\\|`` (a GFM table cell, which
    renders it as ``|``)."""
    text = _shown_controls(str(value))
    if not text:
        return ""
    if in_table:
        text = text.replace("|", "\\|")
    import re

    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _value_md(value: Any) -> str:
    """A setting in a table cell: a number as it is, anything else as a code span."""
    import numbers

    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    return md_code(value, in_table=True) or "-"


def _fmt(x: float) -> str:
    return f"{x:.4e}"


def layer_rows(fisher: Fisher) -> list[dict[str, str]]:
    """Rows of the per-layer table: layer, total, share (%) and the layer's largest group.

    The largest group comes from the group view when a partition is known, else the largest
    parameter (by total) is named.
    """
    from hf_fisher import analysis

    try:
        grouped = analysis.group_view(fisher)
    except HfFisherError:
        grouped = None
    totals = analysis.per_layer(fisher)
    grand = sum(totals.values())
    best: dict[int | None, tuple[float, str]] = {}
    for name in fisher.names():
        layer = analysis.layer_index(fisher, name)
        if grouped is not None:
            vals = grouped[name].double()
            if vals.numel() == 0:
                continue
            g = int(vals.argmax())
            value, label = float(vals[g]), f"{name} [{grouped.groups[name].names[g]}]"
        else:
            value, label = float(fisher[name].double().sum()), name
        if layer not in best or value > best[layer][0]:
            best[layer] = (value, label)
    rows = []
    for layer, total in totals.items():
        share = 100.0 * total / grand if grand > 0 else 0.0
        top = best.get(layer)
        rows.append(
            {
                "layer": "other (not in a layer)" if layer is None else str(layer),
                "total": _fmt(total),
                "share": f"{share:.2f}",
                "top": md_text(f"{top[1]} = {_fmt(top[0])}") if top else "",
            }
        )
    return rows


def render_card(fisher: Fisher, *, template: str | None = None) -> ModelCard:
    """The artifact's :class:`huggingface_hub.ModelCard` (``template``: Jinja text to override the default).

    Template variables ending in ``_md`` and the row lists are escaped Markdown (:func:`md_text`);
    ``reduction``/``normalization`` are the raw values for comparisons only; ``example_name`` is a
    Python string literal for the fenced code block.
    """
    from huggingface_hub import ModelCard

    md = fisher.metadata
    meta = md.to_dict()
    extra = meta.pop("extra", {}) or {}
    rows = [(md_text(k), md_text(v)) for k, v in meta.items() if v is not None]
    rows += [(md_text(f"extra.{k}"), md_text(v)) for k, v in sorted(extra.items(), key=lambda kv: str(kv[0]))]
    names = fisher.names()
    return ModelCard.from_template(
        card_data(fisher),
        template_str=template if template is not None else load_template(),
        task_md=md_text(md.task),
        model_name_md=md_text(md.model_name_or_path) if md.model_name_or_path else None,
        library_version_md=md_text(md.library_version),
        estimator_md=md_text(md.estimator),
        reduction=fisher.reduction,
        normalization=md.normalization,
        normalization_md=md_text(md.normalization),
        ema_decay=md.ema_decay,
        has_variance=fisher.has_variance,
        counts=fisher.counts,
        metadata_rows=rows,
        layer_rows=layer_rows(fisher),
        total=_fmt(fisher.total()),
        num_params=len(names),
        num_values=sum(fisher[n].numel() for n in names),
        example_name=json.dumps(names[0] if names else "<param name>", ensure_ascii=True),
        summary_md=summary_section(fisher),
    )


def summary_section(fisher: Fisher) -> str | None:
    """Markdown of the card's "Summary" section (:func:`hf_fisher.analysis.summary.summary_markdown`),
    or None when the Fisher has no layout with attention heads or the summary cannot be computed
    for it (logged; the card is written without the section)."""
    layout = fisher.layout
    if layout is None or not layout.attention:
        return None
    from hf_fisher.analysis.summary import summary_markdown

    try:
        return summary_markdown(fisher)
    except HfFisherError as e:
        logger.info("model card: no Summary section (%s)", e)
        return None


# ---------------------------------------------------------------------------- merged models
MERGED_TEMPLATE = "merged_card.md"

_MERGE_FORMULAS = {
    "fisher": "Fisher-weighted averaging, per element: `θ* = Σ_i λ_i F̃_i θ_i / Σ_i λ_i F̃_i` with `F̃_i = max(F_i, floor)`.",
    "fisher_task_vector": "Fisher-weighted task vectors: `θ* = θ_base + Σ_i λ_i F̃_i τ_i / Σ_i λ_i F̃_i`, `τ_i = θ_i − θ_base`.",
    "average": "Weighted average: `θ* = Σ_i λ_i θ_i / Σ_i λ_i`.",
    "task_arithmetic": "Task arithmetic: `θ* = θ_base + s Σ_i λ_i τ_i`, `τ_i = θ_i − θ_base`.",
    "ties": "TIES: trim each `λ_i τ_i` to its largest magnitudes (density), elect each entry's sign, average the agreeing entries, `θ* = θ_base + s · mean`.",
    "dare": "DARE: drop each task-vector entry with probability `p`, rescale the rest by `1/(1 − p)`, then task arithmetic or TIES.",
    "regmean": "RegMean: `W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i` per linear layer (input Gram matrices, off-diagonal scaled by `α`); other tensors averaged.",
    "fisher_regmean": "RegMean for every linear weight, Fisher-weighted averaging for the other tensors.",
    "kfac": "KFAC Fisher merging, per block: `Σ_i λ_i (F_i + δI) vec(M* − M_i) = 0` with `F_i ≈ G_i ⊗ A_i` (Kronecker-factored Fishers).",
}


def _fence(text: str) -> str:
    longest = max((len(m) for m in __import__("re").findall(r"`+", text)), default=0)
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

    from hf_fisher.consumers.merge.api import PAPERS, yaml_text

    method = str(recipe.get("merge_method"))
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
    if method in ("fisher", "fisher_task_vector", "fisher_regmean"):
        tags.append("fisher-merging")
    data = ModelCardData(library_name=library_name, base_model=hub_ids or None, base_model_relation="merge", tags=tags)
    # Values read as they are written: names, paths and settings in code spans (md_code), prose
    # the library wrote itself as plain Markdown; only free text goes through md_text.
    rows = []
    for i, e in enumerate(entries):
        p = e.get("parameters") or {}
        rows.append({"index": i, "model": md_code(e.get("model"), in_table=True),
                     "weight": _value_md(p.get("weight", "")),
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
        formula_md=_MERGE_FORMULAS.get(method, md_text(method)),
        paper_md=PAPERS.get(method) or "-",  # the library's own Markdown (titles in italics)
        parameter_rows=[(md_code(k, in_table=True), _value_md(v)) for k, v in params.items()] + (
            [(md_code("dtype"), md_code(recipe["dtype"], in_table=True))] if recipe.get("dtype") else []),
        input_rows=rows,
        base_md=md_code(base_ref) if base_ref else None,
        local_md=", ".join(md_code(r) for r in local) if local else None,
        no_fisher_md=no_fisher_md,
        validation_md=validation_md,
        recipe_yaml=recipe_yaml,
        fence=fence,
    )
