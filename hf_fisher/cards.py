"""Model cards (README.md) for Fisher artifacts, rendered from the Jinja templates in model_cards/.

The card's YAML header carries the Hub metadata (``library_name: hf_fisher``, ``tags`` and, when
the source model is a Hub id, ``base_model``); the body explains the quantity (``F = mean_i C_i``,
``C_i = g_i ⊙ g_i``), the normalisation and reduction used, the counts, the metadata and a
per-layer summary (layer, total Fisher, share of the total, largest group).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_fisher.errors import ArtifactError, HfFisherError

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard, ModelCardData

    from hf_fisher.fisher import Fisher

__all__ = ["load_template", "card_data", "render_card", "looks_like_hub_id", "layer_rows"]

FISHER_TEMPLATE = "fisher_card.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


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
    fallback = Path(__file__).resolve().parent.parent / "model_cards" / name
    if fallback.is_file():
        return fallback.read_text(encoding="utf-8")
    raise ArtifactError(
        f"card template {name!r} not found in hf_fisher.model_cards nor in {fallback.parent}; "
        "the installation is incomplete — reinstall hf-fisher"
    )


def looks_like_hub_id(value: str | None) -> bool:
    """``"name"`` or ``"owner/name"`` made of letters, digits, ``.``, ``_``, ``-`` (not a local path)."""
    if not value or ".." in value or "--" in value:
        return False
    return bool(_HUB_ID.match(value)) and not value.endswith((".", "-"))


def card_data(fisher: "Fisher") -> "ModelCardData":
    """Hub metadata: ``library_name="hf_fisher"``, tags, and ``base_model`` for Hub ids.

    A local path is not a valid ``base_model`` on the Hub, so it is left out (it stays in the
    card's metadata table).
    """
    from huggingface_hub import ModelCardData

    md = fisher.metadata
    tags = ["fisher-information", "hf-fisher", str(md.estimator), str(fisher.reduction)]
    base = md.model_name_or_path if looks_like_hub_id(md.model_name_or_path) else None
    return ModelCardData(library_name="hf_fisher", tags=tags, base_model=base)


def _fmt(x: float) -> str:
    return f"{x:.4e}"


def _md(text: Any) -> str:
    """Make a value safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def layer_rows(fisher: "Fisher") -> list[dict[str, str]]:
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
                "top": _md(f"{top[1]} = {_fmt(top[0])}") if top else "",
            }
        )
    return rows


def render_card(fisher: "Fisher", *, template: str | None = None) -> "ModelCard":
    """The artifact's :class:`huggingface_hub.ModelCard` (``template``: Jinja text to override the default)."""
    from huggingface_hub import ModelCard

    md = fisher.metadata
    meta = md.to_dict()
    extra = meta.pop("extra", {}) or {}
    rows = [(k, _md(v)) for k, v in meta.items() if v is not None]
    rows += [(f"extra.{k}", _md(v)) for k, v in sorted(extra.items())]
    names = fisher.names()
    return ModelCard.from_template(
        card_data(fisher),
        template_str=template if template is not None else load_template(),
        task=md.task,
        model_name=md.model_name_or_path,
        library_version=md.library_version,
        estimator=md.estimator,
        reduction=fisher.reduction,
        normalization=md.normalization,
        ema_decay=md.ema_decay,
        has_variance=fisher.has_variance,
        counts=fisher.counts,
        metadata_rows=rows,
        layer_rows=layer_rows(fisher),
        total=_fmt(fisher.total()),
        num_params=len(names),
        num_values=sum(fisher[n].numel() for n in names),
        example_name=names[0] if names else "<param name>",
    )
