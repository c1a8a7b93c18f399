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

__all__ = ["card_data", "hub_base_model", "layer_rows", "load_template", "looks_like_hub_id", "md_code", "md_text", "render_card", "summary_section", "value_md"]

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


def value_md(value: Any) -> str:
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


_value_md = value_md  # the name before the merged card moved out


def __getattr__(name: str):
    """``merged_card`` moved to :mod:`hf_fisher.consumers.merge.card` (this alias goes in the next release)."""
    if name in ("merged_card", "MERGED_TEMPLATE"):
        import warnings

        warnings.warn(f"hf_fisher.artifacts.cards.{name} moved to hf_fisher.consumers.merge.card", DeprecationWarning,
                      stacklevel=2)
        from hf_fisher.consumers.merge import card

        return getattr(card, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
