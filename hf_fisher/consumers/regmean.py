"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer ``y = x W^T`` (nn.Linear, ``W`` ``[out, in]``) or ``y = x W`` (HF Conv1D,
``W`` ``[in, out]``), model i's inputs ``X_i`` (one row per non-padding token) define the Gram
``G_i = X_i^T X_i`` ``[in, in]``. The merged weight minimises ``Σ_i ||X_i W' − X_i W_i'||²``
(``W' = W^T`` for Linear, ``W`` for Conv1D), whose normal equations give

    W'* = (Σ_i G_i)^{-1} Σ_i G_i W_i'.

RegMean regularises the Grams by shrinking their off-diagonal entries:
``G̃_i = α G_i + (1 − α) diag(G_i)`` (``α = 1``: plain RegMean; ``α = 0``: each input feature
j's row of ``W'`` is the average of the models' rows weighted by ``G_i[j, j]``).

Two pieces live here:

- :func:`collect_input_grams` runs a model over batches (no backward, ``torch.no_grad``, eval
  mode, random streams and train/eval flags restored) and accumulates, for every nn.Linear /
  Conv1D weight, the Gram of its inputs over the non-padding token positions, summed over every
  call of the module (a module called twice per forward contributes both calls).
- :func:`regmean_tensor` is the per-tensor formula the merger (:mod:`hf_fisher.consumers.merging`)
  applies to one weight of every model.

Normalisation (``normalize=``): ``"mean"`` (default) divides each Gram by the number of token
rows that entered it, ``G_i = X_i^T X_i / N_i``, so every model counts equally whatever the size
of its data; ``"sum"`` keeps ``X_i^T X_i`` (the paper's form: a model seen on more tokens weighs
more).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from hf_fisher.errors import EmptyDataError, InvalidInputError

__all__ = ["NORMALIZE", "InputGrams", "collect_input_grams", "regmean_tensor"]

log = logging.getLogger("hf_fisher")

NORMALIZE = ("mean", "sum")
KINDS = ("linear", "conv1d")
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class InputGrams:
    """Input Grams of one model's Linear / Conv1D weights (see the module docstring).

    - ``grams``: weight parameter name -> ``G`` ``[in, in]`` float64 (on the CPU), normalised as
      ``normalize`` says;
    - ``kinds``: name -> ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (weight ``[in, out]``);
    - ``num_tokens``: name -> number of input rows (token positions × calls) in its Gram;
    - ``num_samples``: sequences seen;
    - ``skipped``: name -> why the weight has no Gram (tied to another module, a subclass with its
      own forward, never called, inputs not laid out per token); the merger uses its fallback
      rule for these.
    """

    grams: dict[str, torch.Tensor]
    kinds: dict[str, str]
    num_tokens: dict[str, int]
    num_samples: int
    normalize: str = "mean"
    skipped: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.grams


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def _candidates(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, str]], dict[str, str]]:
    """``{weight name: (module, kind)}`` of the plain Linear / Conv1D weights, and
    ``{weight name: reason}`` of those that cannot get an exact Gram."""
    conv1d = _conv1d_type()
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


def _select(found: dict, skipped: dict, names: "str | Iterable[str] | None") -> tuple[dict, dict]:
    if names is None:
        return found, skipped
    every = {**found, **skipped}
    if isinstance(names, str):
        try:
            pattern = re.compile(names)
        except re.error as e:
            raise InvalidInputError(f"names={names!r} is not a valid regular expression: {e}") from None
        keep = {n for n in every if pattern.search(n)}
        if not keep:
            raise InvalidInputError(
                f"names={names!r} matches no Linear/Conv1D weight of the model (e.g. {next(iter(every), 'none')!r})"
            )
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in every]
        if missing:
            raise InvalidInputError(
                f"names: {', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} not the weight of an "
                f"nn.Linear / Conv1D of the model (e.g. {next(iter(every), 'none')!r}); RegMean applies to those only"
            )
        keep = set(wanted)
    return {n: v for n, v in found.items() if n in keep}, {n: r for n, r in skipped.items() if n in keep}


def _accepted(model: nn.Module) -> set[str] | None:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _position_convention(model: nn.Module) -> int | None:
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return m.padding_idx
    return None


def _inputs(model: nn.Module, batch: Mapping[str, Any], index: int, device, accepted, convention) -> dict[str, Any]:
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
    for key in _INPUT_KEYS:
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


def _truncate(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    B = batch["input_ids"].shape[0]
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v) for k, v in batch.items()}


def collect_input_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    names: "str | Iterable[str] | None" = None,
    max_samples: int | None = None,
    progress: bool = True,
    normalize: str = "mean",
    device: "str | torch.device | None" = None,
) -> InputGrams:
    """Input Grams of ``model``'s nn.Linear / Conv1D weights over ``batches``.

    For weight W of a module receiving inputs ``x_t`` (last dimension ``in``) at the token
    positions t with ``attention_mask == 1`` (every position without a mask), summed over all
    calls of the module::

        G = Σ_t x_t x_t^T / N        (normalize="mean", N = number of rows summed)
        G = Σ_t x_t x_t^T            (normalize="sum")

    accumulated in float64. Batches are dicts with ``input_ids`` ``[B, T]`` and optionally
    ``attention_mask`` (1 = token, 0 = padding), ``token_type_ids``, ``position_ids`` (``labels``
    are ignored: no loss is computed). ``names`` selects weights (a regular expression searched in
    the parameter name, or a list of names); ``max_samples`` stops after that many sequences;
    ``device`` is where the Grams are accumulated (default: the weight's device; pass ``"cpu"``
    for large models on a small GPU). The model runs under ``torch.no_grad`` in eval mode; its
    train/eval flags and the random streams are restored.

    Weights tied to another parameter name (an lm_head sharing the input embedding), weights of
    Linear subclasses with their own forward, modules never called and modules whose inputs are
    not laid out per token while the batch has padding are listed in ``.skipped`` with the reason.
    """
    if normalize not in NORMALIZE:
        raise InvalidInputError(f"unknown normalize {normalize!r}; choose 'mean' or 'sum'")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise InvalidInputError(f"max_samples must be a positive integer, got {max_samples!r}")
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found, skipped = _select(*_candidates(model), names)
    if not found:
        raise InvalidInputError(
            "the model has no nn.Linear / Conv1D weight RegMean can use"
            + (f" (skipped: {dict(list(skipped.items())[:3])})" if skipped else "")
        )
    from tqdm.auto import tqdm

    from hf_fisher.collector import _preserved_rng

    try:
        model_device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover - found is non-empty
        model_device = torch.device("cpu")
    accepted = _accepted(model)
    convention = _position_convention(model)
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in found}
    unaligned: dict[str, str] = {}
    state: dict[str, Any] = {}

    def make_hook(name: str, module: nn.Module, kind: str):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs.get("input" if kind == "linear" else "x")
            if not isinstance(x, torch.Tensor):
                unaligned[name] = f"its input is a {type(x).__name__}, not a tensor"
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
                unaligned[name] = (
                    f"its input has shape {tuple(x.shape)}, not [batch={B}, seq={T}, in] (e.g. routed expert tokens), "
                    "so padding positions cannot be excluded"
                )
                return None
            xs = xs.detach().to(device=device or xs.device, dtype=torch.float64)
            g = grams.get(name)
            if g is None:
                g = grams[name] = torch.zeros((feats, feats), dtype=torch.float64, device=xs.device)
            g.addmm_(xs.T, xs)
            rows[name] += int(xs.shape[0])
            return None

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(make_hook(n, m, k), with_kwargs=True) for n, (m, k) in found.items()]
    samples = 0
    n_batches = 0
    bar = tqdm(total=max_samples, desc="RegMean Grams", unit="sample", disable=not progress)
    try:
        model.eval()
        with _preserved_rng(model), torch.no_grad():
            for index, batch in enumerate(batches):
                if max_samples is not None and samples >= max_samples:
                    break
                if max_samples is not None and isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
                    if batch["input_ids"].dim() == 2 and batch["input_ids"].shape[0] > max_samples - samples:
                        batch = _truncate(batch, max_samples - samples)
                inputs = _inputs(model, batch, index, model_device, accepted, convention)
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                state.update(B=ids.shape[0], T=ids.shape[1], mask=None if mask is None else mask.bool())
                model(**inputs)
                samples += int(ids.shape[0])
                n_batches += 1
                bar.update(int(ids.shape[0]))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
    if n_batches == 0:
        raise EmptyDataError("no batches: RegMean needs at least one batch of the model's inputs to form Grams")
    out, kinds, tokens = {}, {}, {}
    for name, (_, kind) in found.items():
        if name in unaligned:
            skipped[name] = unaligned[name]
            continue
        if rows[name] == 0:
            skipped[name] = "the module was never called on a non-padding token during the forward passes"
            continue
        g = grams[name]
        if normalize == "mean":
            g = g / rows[name]
        out[name] = g.cpu()
        kinds[name] = kind
        tokens[name] = rows[name]
    for name, reason in skipped.items():
        log.info("RegMean: no Gram for %s: %s", name, reason)
    log.info("RegMean: Grams of %d weights from %d samples (%d skipped)", len(out), samples, len(skipped))
    return InputGrams(grams=out, kinds=kinds, num_tokens=tokens, num_samples=samples, normalize=normalize, skipped=skipped)


def _regularised(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``G̃ = α G + (1 − α) diag(G)`` (off-diagonal entries scaled by α)."""
    d = torch.diagonal(g)
    return (g * alpha).diagonal_scatter(d.clone())


def regmean_tensor(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float,
    kind: str,
    name: str | None = None,
) -> torch.Tensor:
    """The RegMean merge of one weight::

        G̃_i = α G_i + (1 − α) diag(G_i)
        kind="linear" (W [out, in]):  W* = ((Σ_i G̃_i)^{-1} Σ_i G̃_i W_i^T)^T
        kind="conv1d" (W [in, out]):  W* = (Σ_i G̃_i)^{-1} Σ_i G̃_i W_i

    computed in float64 with :func:`torch.linalg.solve`; the result has ``weights[0]``'s dtype.
    When ``Σ_i G̃_i`` is singular (a Cholesky pivot at or below ``in · eps`` of its largest
    diagonal entry: an input feature no model ever used, fewer tokens than features with α = 1),
    a ridge ``λ I`` is added to every ``G̃_i`` — the smallest ``λ = 10^k · 1e-10 · mean diag``
    that makes the sum definite — so directions no input reaches get the plain average of the
    models' weights; the ridge is logged as a warning (``name`` identifies the tensor there).
    """
    if kind not in KINDS:
        raise InvalidInputError(f"unknown kind {kind!r}; choose 'linear' (weight [out, in]) or 'conv1d' (weight [in, out])")
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InvalidInputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if len(weights) == 0:
        raise InvalidInputError("nothing to merge: no weights")
    if len(grams) != len(weights):
        raise InvalidInputError(f"{len(grams)} Grams for {len(weights)} weights; give one Gram per model")
    what = f" of {name}" if name else ""
    shape = tuple(weights[0].shape)
    if len(shape) != 2:
        raise InvalidInputError(f"RegMean merges 2-D weights; weight 0{what} has shape {shape}")
    n_in = shape[1] if kind == "linear" else shape[0]
    for i, (w, g) in enumerate(zip(weights, grams)):
        if tuple(w.shape) != shape:
            raise InvalidInputError(f"weight {i}{what} has shape {tuple(w.shape)}, weight 0 has {shape}")
        if tuple(g.shape) != (n_in, n_in):
            raise InvalidInputError(
                f"Gram {i}{what} has shape {tuple(g.shape)}; a {kind} weight of shape {shape} needs [{n_in}, {n_in}] "
                f"(the input dimension is the weight's {'second' if kind == 'linear' else 'first'} axis)"
            )
        if not bool(torch.isfinite(g).all()):
            raise InvalidInputError(f"Gram {i}{what} has NaN or Inf entries")
    dt = torch.float64
    a = float(alpha)
    A = torch.zeros((n_in, n_in), dtype=dt)
    R = torch.zeros((n_in, shape[0] if kind == "linear" else shape[1]), dtype=dt)
    S = torch.zeros_like(R)  # Σ_i W_i', for the ridge
    for w, g in zip(weights, grams):
        gt = _regularised(g.detach().to("cpu", dt), a)
        wt = w.detach().to("cpu", dt)
        wt = wt.T if kind == "linear" else wt
        A.add_(gt)
        R.addmm_(gt, wt)
        S.add_(wt)
    tol = max(n_in, 1) * torch.finfo(dt).eps

    def definite(M: torch.Tensor) -> bool:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            return False
        piv = torch.diagonal(L) ** 2
        return bool(piv.min() > tol * torch.diagonal(M).max())

    if definite(A):
        X = torch.linalg.solve(A, R)
    else:
        scale = float(torch.diagonal(A).mean()) / len(weights)
        scale = scale if scale > 0 else 1.0
        lam = 1e-10 * scale
        eye = torch.eye(n_in, dtype=dt)
        while not definite(A + len(weights) * lam * eye):
            lam *= 10.0
        log.warning(
            "RegMean%s: the summed Gram (alpha=%g) is singular; adding a ridge %.3g·I to every model's Gram "
            "(%.1e of its mean diagonal): input directions no model's data reaches get the average weight",
            what, a, lam, lam / scale,
        )
        X = torch.linalg.solve(A + len(weights) * lam * eye, R + lam * S)
    out = X.T if kind == "linear" else X
    return out.contiguous().to(weights[0].dtype)
