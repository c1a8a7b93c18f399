"""Module inputs at the real token positions: the forward-only machinery RegMean's Grams and the
pruning criteria's activation statistics share.

:func:`linear_weights` finds the plain ``nn.Linear`` / HF ``Conv1D`` weights of a model (whose
output is ``x W^T`` / ``x W``), :func:`select_weights` narrows them by name, and
:func:`token_inputs` runs a model over batches (``torch.no_grad``, eval mode; train/eval flags and
random streams restored) handing every call's input rows at the non-padding positions
(``attention_mask == 1``; every position without a mask) to a callback, in float64. A callback
may raise :class:`StopForward` to end a batch's forward early (the layers above are not needed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hf_fisher.errors import EmptyDataError, InvalidInputError, regex_argument

__all__ = [
    "ForwardSummary",
    "StopForward",
    "linear_weights",
    "model_inputs",
    "select_weights",
    "token_inputs",
]

log = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class StopForward(Exception):
    """Raised by a :func:`token_inputs` callback: the rest of this batch's forward is not needed."""


@dataclass
class ForwardSummary:
    """What :func:`token_inputs` saw: sequences, batches, and the modules whose inputs could not
    be aligned with the token positions (name -> reason)."""

    samples: int = 0
    batches: int = 0
    unaligned: dict[str, str] = field(default_factory=dict)


def conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def linear_weights(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, str]], dict[str, str]]:
    """``{weight name: (module, kind)}`` of the plain Linear / Conv1D weights, and
    ``{weight name: reason}`` of those that cannot get an exact Gram."""
    conv1d = conv1d_type()
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    found: dict[str, tuple[nn.Module, str]] = {}
    skipped: dict[str, str] = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind, base = "linear", nn.Linear
        elif conv1d is not None and isinstance(m, conv1d):
            kind, base = "conv1d", conv1d
        else:
            continue
        w = m._parameters.get("weight")
        if not isinstance(w, torch.Tensor):
            continue
        name = f"{mname}.weight" if mname else "weight"
        others = [n for n in owners.get(id(w), []) if n != name]
        if others:
            skipped[name] = (
                f"tied to {', '.join(others)}: the weight is also used outside this {type(m).__name__}, so its "
                "input Gram does not describe every use of it"
            )
        elif type(m).forward is not base.forward:
            skipped[name] = f"{type(m).__name__} overrides the forward of {base.__name__}; its output is not x W^T"
        else:
            found[name] = (m, kind)
    return found, skipped


def select_weights(found: dict, skipped: dict, names: str | Iterable[str] | None) -> tuple[dict, dict]:
    if names is None:
        return found, skipped
    every = {**found, **skipped}
    if isinstance(names, str):
        pattern = regex_argument("names", names)
        keep = {n for n in every if pattern.search(n)}
        if not keep:
            raise InvalidInputError(
                f"names={names!r} matches no nn.Linear / Conv1D weight of the model (e.g. {next(iter(every), 'none')!r})"
            )
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in every]
        if missing:
            raise InvalidInputError(
                f"names: {', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} not the weight of an "
                f"nn.Linear / Conv1D of the model (e.g. {next(iter(every), 'none')!r}); only those have token inputs of this kind"
            )
        keep = set(wanted)
    return {n: v for n, v in found.items() if n in keep}, {n: r for n, r in skipped.items() if n in keep}


def accepted_kwargs(model: nn.Module) -> set[str] | None:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def position_convention(model: nn.Module) -> int | None:
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return m.padding_idx
    return None


def model_inputs(model: nn.Module, batch: Mapping[str, Any], index: int, device, accepted, convention) -> dict[str, Any]:
    """The model inputs of one batch (checked), on ``device``, with ``position_ids`` where the
    model's default would number a left-padded sample's tokens differently than alone."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise InvalidInputError(f"batch {index} must be a mapping with 'input_ids' (got {type(batch).__name__})")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InvalidInputError(f"batch {index}: input_ids must be an integer tensor [batch, seq_len]")
    if ids.numel() == 0:
        raise InvalidInputError(f"batch {index} is empty")
    B, T = ids.shape
    out: dict[str, Any] = {}
    for key in INPUT_KEYS:
        v = batch.get(key)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, T):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InvalidInputError(f"batch {index}: {key} has shape {shape} but input_ids has shape {(B, T)}; they must match")
        if accepted is None or key in accepted:
            out[key] = v.to(device)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
        raise InvalidInputError(
            f"batch {index}: a token id is outside the model's vocabulary [0, {vocab}); check the tokenizer matches the model"
        )
    mask = out.get("attention_mask")
    if mask is not None and "position_ids" not in out and (accepted is None or "position_ids" in accepted):
        m = mask.long()
        if convention is None:
            own = torch.arange(T, device=m.device).expand(B, T)
            wanted = (m.cumsum(-1) - 1).clamp(min=0)
        else:
            nonpad = out["input_ids"].ne(convention).long()
            own = nonpad.cumsum(-1) * nonpad + convention
            wanted = m.cumsum(-1) * m + convention
        real = m.bool()
        if not torch.equal(own[real], wanted[real]):
            out["position_ids"] = wanted
    if accepted is None or "use_cache" in accepted:
        out["use_cache"] = False
    return out


def truncate(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    B = batch["input_ids"].shape[0]
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v) for k, v in batch.items()}




def token_inputs(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    modules: Mapping[str, nn.Module],
    on_rows: Callable[[str, torch.Tensor], None],
    *,
    max_samples: int | None = None,
    progress: bool = True,
    desc: str = "module inputs",
    device: str | torch.device | None = None,
) -> ForwardSummary:
    """Run ``model`` over ``batches`` and call ``on_rows(name, X)`` for every call of every
    ``modules[name]``, with ``X`` ``[N, in]`` float64: the call's input rows at the non-padding
    token positions (on ``device``, default the input's). Inputs not laid out as ``[B, T, in]``
    or ``[B*T, in]`` while the batch has padding are listed in ``.unaligned`` (never passed on).
    ``max_samples`` stops after that many sequences. :class:`StopForward` raised by ``on_rows``
    ends the current batch's forward. Raises :class:`EmptyDataError` when no batch was given.
    """
    from tqdm.auto import tqdm

    from hf_fisher.collection.collector import preserved_rng

    try:
        model_device = next(model.parameters()).device
    except StopIteration:
        model_device = torch.device("cpu")
    accepted = accepted_kwargs(model)
    convention = position_convention(model)
    summary = ForwardSummary()
    state: dict[str, Any] = {}

    def make_hook(name: str):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, torch.Tensor):
                summary.unaligned[name] = f"its input is a {type(x).__name__}, not a tensor"
                return None
            B, T, mask = state["B"], state["T"], state["mask"]
            feats = x.shape[-1]
            if mask is None:
                xs = x.reshape(-1, feats)
            elif tuple(x.shape[:-1]) == (B, T):
                xs = x[mask]
            elif x.dim() == 2 and x.shape[0] == B * T:
                xs = x[mask.reshape(-1)]
            else:
                summary.unaligned[name] = (
                    f"its input has shape {tuple(x.shape)}, not [batch={B}, seq={T}, in] (e.g. routed expert tokens), "
                    "so padding positions cannot be excluded"
                )
                return None
            on_rows(name, xs.detach().to(device=device or xs.device, dtype=torch.float64))
            return None

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    bar = tqdm(total=max_samples, desc=desc, unit="sample", disable=not progress)
    try:
        model.eval()
        with preserved_rng(model), torch.no_grad():
            for index, batch in enumerate(batches):
                if max_samples is not None and summary.samples >= max_samples:
                    break
                if max_samples is not None and isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
                    if batch["input_ids"].dim() == 2 and batch["input_ids"].shape[0] > max_samples - summary.samples:
                        batch = truncate(batch, max_samples - summary.samples)
                inputs = model_inputs(model, batch, index, model_device, accepted, convention)
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                state.update(B=ids.shape[0], T=ids.shape[1], mask=None if mask is None else mask.bool())
                with contextlib.suppress(StopForward):
                    model(**inputs)
                summary.samples += int(ids.shape[0])
                summary.batches += 1
                bar.update(int(ids.shape[0]))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
    if summary.batches == 0:
        raise EmptyDataError(f"no batches: {desc} needs at least one batch of the model's inputs")
    return summary
