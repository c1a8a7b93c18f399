"""The KFAC artifact: Kronecker factors of the Fisher per layer, their algebra, and their I/O.

A :class:`KFACFisher` holds, for every Kronecker-factored layer of a model (``nn.Linear``, HF
``Conv1D`` — GPT-2's fused ``c_attn`` is one such layer —, ``nn.Embedding``), two factors

    F_layer ≈ G ⊗ A        (acting on the layer's weight in its canonical form M, [d_out, d_in]:
                            (G ⊗ A) vec(M) = vec(G M A), vec row-major)

- ``A`` [d_in (+1), d_in (+1)]: the layer inputs' second moment, bias-augmented (ã = [a, 1])
  when the layer has a covered bias; for an embedding, whose inputs are one-hot, A is diagonal
  and stored as its diagonal [num_embeddings] (the token frequencies);
- ``G`` [d_out, d_out]: the second moment of the output gradients, or its diagonal [d_out] when
  the output dimension exceeds the estimator's ``diagonal_g_above`` (an lm_head over a large
  vocabulary: a dense G would be V x V).

Canonical forms (``M`` rows = outputs, columns = inputs): ``nn.Linear`` weight W [out, in]:
M = [W | b]; HF ``Conv1D`` (y = x W + b, W [in, out]): M = [Wᵀ | b]; ``nn.Embedding`` E
[num, dim] (y = onehot(x) E): M = Eᵀ. The normalisation of A and G (which quantity the
product approximates, and how it relates to curvlinops' ``KFACLinearOperator``) is documented
in :mod:`hf_fisher.estimators.kfac`.

A parameter used by several layers (tied embeddings: GPT-2's ``wte`` is also ``lm_head``) gets
the sum of the Kronecker terms of its uses, ``F_θ ≈ Σ_uses G_u ⊗ A_u`` (mapped to the parameter's
layout); cross-use terms are dropped, as KFAC drops cross-layer terms.

Operations:

- :meth:`KFACFisher.matvec` — ``F v`` per parameter;
- :meth:`KFACFisher.eigendecompose` — per-factor eigenpairs ``A = Q_A diag(λ_A) Q_Aᵀ``,
  ``G = Q_G diag(λ_G) Q_Gᵀ`` (cached);
- :meth:`KFACFisher.inverse_vp` — the natural gradient ``(F + λI)⁻¹ g``. ``damping_mode="exact"``
  (default): the exact inverse of ``G ⊗ A + λI`` through the eigenbases,
  ``M ↦ Q_G [(Q_Gᵀ M Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``; ``"factor"``: Martens & Grosse's factor
  damping ``(G + √λ I)⁻¹ M (A + √λ I)⁻¹``. Tied parameters (a sum of Kronecker terms) are solved
  with conjugate gradients on the exact damped operator.
- :meth:`KFACFisher.to_diagonal` — the diagonal ``diag(G ⊗ A)`` as an :class:`hf_fisher.Fisher`
  with reduction "param": weight ``F[o, i] = G_oo A_ii``, bias ``F[o] = G_oo Ã_{-1,-1}`` (the
  augmented corner, which is 1).

On disk an artifact is a folder::

    kfac.safetensors     keys "A.<layer>" and "G.<layer>"
    kfac_config.json     metadata, counts, settings, parameter shapes, the collected parameters
                         no layer covers ("uncovered": name -> why), and per layer its kind,
                         parameters and factor shapes
    README.md            a short card (with the uncovered parameters)

Saving is atomic (:mod:`hf_fisher.artifacts.atomic`); loading never unpickles and checks every config
field, the tensors' dtypes and shapes, and that the factors fit the parameter shapes
(:class:`~hf_fisher.errors.ArtifactError` naming what is wrong).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hf_fisher.artifacts.atomic import recover
from hf_fisher.artifacts.base import ArtifactHubMixin
from hf_fisher.artifacts.cards import md_text
from hf_fisher.artifacts.fisher import Fisher
from hf_fisher.artifacts.format import (
    CARD_NAME,
    CONFIG_NAME,
    KFAC_CONFIG_NAME,
    KFAC_FORMAT_VERSION,
    KFAC_WEIGHTS_NAME,
    REQUIRED,
    S_COUNTS,
    S_METADATA,
    SchemaError,
    artifact_path,
    is_kfac_artifact_file,
    load_file,
    read_json,
    s_bool,
    s_int,
    s_list,
    s_map,
    s_nullable,
    s_obj,
    s_str,
    write_json,
)
from hf_fisher.artifacts.metadata import Counts, FisherMetadata
from hf_fisher.artifacts.values import ValueCheck, check_estimator_name, record_problems
from hf_fisher.errors import ArtifactError, InvalidInputError, ModelMismatchError

__all__ = ["KFAC_CONFIG_NAME", "KFAC_FORMAT_VERSION", "KFAC_WEIGHTS_NAME", "KFACEigen", "KFACFisher", "KFACLayer",
           "is_kfac_artifact_file"]

logger = logging.getLogger(__name__)

KINDS = ("linear", "conv1d", "embedding")
FISHER_TYPES = ("empirical", "mc", "type-2")
KFAC_APPROXES = ("expand", "reduce")
DAMPING_MODES = ("exact", "factor")


@dataclass
class KFACLayer:
    """The factors of one layer (see the module docstring for the canonical form).

    ``kind``: "linear" | "conv1d" | "embedding"; ``weight`` / ``bias``: the parameter names (as in
    ``model.named_parameters()``; ``bias`` None when the bias is absent or not covered);
    ``A``: [d_in + has_bias]² (or the diagonal [d_in] when ``a_diagonal``); ``G``: [d_out]²
    (or the diagonal [d_out] when ``g_diagonal``).
    """

    kind: str
    weight: str
    bias: str | None
    A: torch.Tensor
    G: torch.Tensor
    a_diagonal: bool = False
    g_diagonal: bool = False

    @property
    def d_in(self) -> int:
        return int(self.A.shape[0]) - (1 if self.bias is not None else 0)

    @property
    def d_out(self) -> int:
        return int(self.G.shape[0])

    def weight_shape(self) -> tuple[int, int]:
        """The weight's shape in the model (Linear [out, in]; Conv1D and Embedding [in, out])."""
        return (self.d_out, self.d_in) if self.kind == "linear" else (self.d_in, self.d_out)

    # canonical form M [d_out, d_in (+1)] <-> parameter tensors
    def to_canonical(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        m = w if self.kind == "linear" else w.transpose(0, 1)
        if self.bias is not None:
            m = torch.cat([m, b.reshape(-1, 1)], dim=1)
        return m

    def from_canonical(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = None
        if self.bias is not None:
            m, b = m[:, :-1], m[:, -1]
        w = m if self.kind == "linear" else m.transpose(0, 1)
        return w.contiguous(), b

    def left(self, m: torch.Tensor) -> torch.Tensor:
        """G M."""
        return self.G.to(m.dtype).unsqueeze(1) * m if self.g_diagonal else self.G.to(m.dtype) @ m

    def right(self, m: torch.Tensor) -> torch.Tensor:
        """M A."""
        return m * self.A.to(m.dtype).unsqueeze(0) if self.a_diagonal else m @ self.A.to(m.dtype)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """(G ⊗ A) vec(M) as the matrix G M A."""
        return self.right(self.left(m))

    def diagonal(self) -> torch.Tensor:
        """diag(G ⊗ A) in the canonical form: outer(diag G, diag A)."""
        g = self.G if self.g_diagonal else torch.diagonal(self.G)
        a = self.A if self.a_diagonal else torch.diagonal(self.A)
        return torch.outer(g, a)


@dataclass
class KFACEigen:
    """Eigenpairs of one layer's factors: ``A = Q_A diag(a) Q_Aᵀ`` (Q_A None for a diagonal A,
    the identity) and likewise for G. Eigenvalues are clamped at 0 (the factors are PSD)."""

    a: torch.Tensor
    QA: torch.Tensor | None
    g: torch.Tensor
    QG: torch.Tensor | None

    def solve(self, m: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
        """``(G ⊗ A + λI)⁻¹ vec(M)`` ("exact") or ``(G + √λI)⁻¹ M (A + √λI)⁻¹`` ("factor")."""
        x = m
        if self.QG is not None:
            x = self.QG.transpose(0, 1) @ x
        if self.QA is not None:
            x = x @ self.QA
        if mode == "exact":
            x = x / (torch.outer(self.g, self.a) + damping)
        else:
            r = math.sqrt(damping)
            x = x / torch.outer(self.g + r, self.a + r)
        if self.QG is not None:
            x = self.QG @ x
        if self.QA is not None:
            x = x @ self.QA.transpose(0, 1)
        return x


def _eig(f: torch.Tensor, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if diagonal:
        return f.to(torch.float64).clamp(min=0), None
    w, q = torch.linalg.eigh(f.to(torch.float64))
    return w.clamp(min=0), q


class KFACFisher(ArtifactHubMixin):
    """A Kronecker-factored Fisher (see the module docstring).

    ``KFACFisher(layers, *, param_shapes, counts, metadata, settings)``

    - ``layers``: ``{module name: KFACLayer}``;
    - ``param_shapes``: the shape of every parameter the layers cover (and only those);
    - ``settings``: ``{"fisher_type", "kfac_approx", "mc_samples", "seed", "diagonal_g_above"}``
      (stored in ``kfac_config.json`` and in ``metadata.extra["kfac"]``);
    - ``uncovered``: ``{parameter name: why}`` for the collected parameters no layer covers (a
      norm's weight, a layer whose forward is not its affine map, ...). They have no factors:
      :meth:`to_diagonal`, :meth:`matvec` and :meth:`inverse_vp` leave them out, and the
      artifact says so (``kfac_config.json``, the card, ``repr``).

    The constructor checks that the factors fit the parameter shapes
    (:class:`~hf_fisher.errors.InvalidInputError` naming the layer).
    """

    def __init__(
        self,
        layers: Mapping[str, KFACLayer],
        *,
        param_shapes: Mapping[str, Any],
        counts: Counts,
        metadata: FisherMetadata,
        settings: Mapping[str, Any],
        uncovered: Mapping[str, str] | None = None,
    ) -> None:
        self.layers: dict[str, KFACLayer] = dict(layers)
        self.uncovered: dict[str, str] = dict(uncovered or {})
        self.param_shapes = {k: tuple(int(s) for s in v) for k, v in param_shapes.items()}
        self.counts = counts
        self.metadata = metadata
        self.settings = dict(settings)
        self._eigen: dict[str, KFACEigen] = {}
        self._check()

    # ------------------------------------------------------------------ validation
    def _check(self) -> None:
        used: set[str] = set()
        for name, L in self.layers.items():
            where = f"KFAC layer {name!r}"
            if L.kind not in KINDS:
                raise InvalidInputError(f"{where}: kind must be one of {KINDS}, got {L.kind!r}")
            for t, what, diag in ((L.A, "A", L.a_diagonal), (L.G, "G", L.g_diagonal)):
                if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                    raise InvalidInputError(f"{where}: factor {what} must be a floating-point tensor")
                ok = t.dim() == 1 if diag else (t.dim() == 2 and t.shape[0] == t.shape[1])
                if not ok:
                    form = "1-D (its diagonal)" if diag else "square"
                    raise InvalidInputError(f"{where}: factor {what} must be {form}, got shape {tuple(t.shape)}")
            if L.kind == "embedding" and (not L.a_diagonal or L.bias is not None):
                raise InvalidInputError(f"{where}: an embedding has a diagonal A and no bias")
            if L.a_diagonal and L.kind != "embedding":
                raise InvalidInputError(f"{where}: only an embedding has a diagonal A")
            for pname, shape in ((L.weight, L.weight_shape()), (L.bias, (L.d_out,))):
                if pname is None:
                    continue
                used.add(pname)
                have = self.param_shapes.get(pname)
                if have is None:
                    raise InvalidInputError(f"{where}: parameter {pname!r} is not listed in param_shapes")
                if have != tuple(shape):
                    raise InvalidInputError(
                        f"{where}: its factors (A {tuple(L.A.shape)}, G {tuple(L.G.shape)}) fit a parameter "
                        f"{pname!r} of shape {tuple(shape)}, but param_shapes gives {have}"
                    )
        extra = sorted(set(self.param_shapes) - used)
        if extra:
            raise InvalidInputError(f"param_shapes lists parameters no layer covers: {extra[:5]}")
        both = sorted(set(self.uncovered) & used)
        if both:
            raise InvalidInputError(f"uncovered lists parameters a layer covers: {both[:5]}")
        bad = [n for n, why in self.uncovered.items() if not (isinstance(n, str) and n and isinstance(why, str))]
        if bad:
            raise InvalidInputError(f"uncovered must map parameter names to reasons (strings), got {bad[:3]}")

    # ------------------------------------------------------------------ views
    def names(self) -> list[str]:
        """The covered parameter names, sorted."""
        return sorted(self.param_shapes)

    def layer_names(self) -> list[str]:
        return sorted(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"KFACFisher(task={self.metadata.task!r}, fisher_type={s.get('fisher_type')!r}, "
            f"kfac_approx={s.get('kfac_approx')!r}, layers={len(self)}, samples={self.counts.samples}"
            + (f", uncovered={len(self.uncovered)}" if self.uncovered else "") + ")"
        )

    def _uses(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.layer_names():
            L = self.layers[name]
            for p in (L.weight, L.bias):
                if p is not None:
                    out.setdefault(p, []).append(name)
        return out

    def _components(self) -> list[list[str]]:
        """Layers grouped by shared parameters (a tied weight joins its layers)."""
        parent = {n: n for n in self.layers}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for layers in self._uses().values():
            for other in layers[1:]:
                parent[find(other)] = find(layers[0])
        comps: dict[str, list[str]] = {}
        for n in self.layer_names():
            comps.setdefault(find(n), []).append(n)
        return list(comps.values())

    def blocks(self) -> list[list[str]]:
        """The parameter blocks the Kronecker factors couple, each a sorted list of names: a
        weight with its covered bias, and a tied weight with every layer using it. ``matvec`` and
        ``inverse_vp`` take whole blocks."""
        return [sorted({p for layer in comp for p in (self.layers[layer].weight, self.layers[layer].bias) if p})
                for comp in self._components()]

    def _check_vectors(self, vecs: Mapping[str, torch.Tensor], what: str) -> None:
        unknown = sorted(set(vecs) - set(self.param_shapes))
        if unknown:
            raise InvalidInputError(
                f"{what}: {unknown[:3]} {'is' if len(unknown) == 1 else 'are'} not covered by this KFAC "
                f"(it covers {len(self.param_shapes)} parameters; see .names())"
            )
        for n, v in vecs.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != self.param_shapes[n]:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise InvalidInputError(f"{what}[{n!r}] has shape {got}, the parameter has {self.param_shapes[n]}")
        for comp in self._components():
            params = {p for layer in comp for p in (self.layers[layer].weight, self.layers[layer].bias) if p}
            given = params & set(vecs)
            if given and given != params:
                raise InvalidInputError(
                    f"{what}: layer(s) {comp} need all of {sorted(params)} together, missing "
                    f"{sorted(params - given)} (a weight and its bias, and a tied weight's layers, are one block)"
                )

    # ------------------------------------------------------------------ algebra
    def _apply_layers(self, comp: list[str], vecs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in comp:
            L = self.layers[name]
            w = vecs[L.weight].to(torch.float64)
            b = vecs[L.bias].to(torch.float64) if L.bias is not None else None
            rw, rb = L.from_canonical(L.apply(L.to_canonical(w, b)))
            out[L.weight] = out[L.weight] + rw if L.weight in out else rw
            if L.bias is not None:
                out[L.bias] = out[L.bias] + rb if L.bias in out else rb
        return out

    def matvec(self, vecs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``F v`` for ``{param name: tensor of the parameter's shape}`` (float64 results).

        Every block given must be complete (a weight with its covered bias; a tied weight with
        all of its layers' parameters); blocks not given are left out of the result."""
        self._check_vectors(vecs, "matvec")
        out: dict[str, torch.Tensor] = {}
        for comp in self._components():
            if self.layers[comp[0]].weight in vecs:
                out.update(self._apply_layers(comp, vecs))
        return out

    def eigendecompose(self) -> dict[str, KFACEigen]:
        """Per-layer eigenpairs of A and G (float64, eigenvalues clamped at 0), cached."""
        for name, L in self.layers.items():
            if name not in self._eigen:
                a, QA = _eig(L.A, L.a_diagonal)
                g, QG = _eig(L.G, L.g_diagonal)
                self._eigen[name] = KFACEigen(a, QA, g, QG)
        return self._eigen

    def inverse_vp(
        self, grads: Mapping[str, torch.Tensor], *, damping: float = 1e-3, damping_mode: str = "exact",
        cg_tol: float = 1e-10, cg_max_iter: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The natural gradient ``(F + λI)⁻¹ g`` per block (float64 results; see the module docstring).

        ``damping_mode="exact"``: ``(G ⊗ A + λI)⁻¹`` through the eigenbases (exact);
        ``"factor"``: ``(G + √λI)⁻¹ ⊗ (A + √λI)⁻¹``. Blocks of tied parameters (several
        Kronecker terms) are solved by conjugate gradients on ``Σ_u G_u ⊗ A_u + λI`` to a
        relative residual ``cg_tol`` (``damping_mode`` must then be "exact").
        """
        if damping_mode not in DAMPING_MODES:
            raise InvalidInputError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping <= 0:
            raise InvalidInputError(f"damping must be a positive finite number (λ of (F + λI)⁻¹), got {damping!r}")
        self._check_vectors(grads, "inverse_vp")
        eig = self.eigendecompose()
        out: dict[str, torch.Tensor] = {}
        for comp in self._components():
            if self.layers[comp[0]].weight not in grads:
                continue
            if len(comp) == 1:
                L = self.layers[comp[0]]
                b = grads[L.bias].to(torch.float64) if L.bias is not None else None
                m = L.to_canonical(grads[L.weight].to(torch.float64), b)
                rw, rb = L.from_canonical(eig[comp[0]].solve(m, float(damping), damping_mode))
                out[L.weight] = rw
                if L.bias is not None:
                    out[L.bias] = rb
                continue
            if damping_mode != "exact":
                raise InvalidInputError(
                    f"layers {comp} share a parameter (tied weights): their block is a sum of Kronecker products, "
                    "which has no factor-damped form; use damping_mode='exact'"
                )
            out.update(self._cg(comp, grads, float(damping), cg_tol, cg_max_iter))
        return out

    def _cg(self, comp, grads, damping, tol, max_iter) -> dict[str, torch.Tensor]:
        names = sorted({p for layer in comp for p in (self.layers[layer].weight, self.layers[layer].bias) if p})
        b = {n: grads[n].to(torch.float64) for n in names}

        def op(v):
            r = self._apply_layers(comp, v)
            return {n: r[n] + damping * v[n] for n in names}

        def dot(u, v):
            return sum(float((u[n] * v[n]).sum()) for n in names)

        x = {n: torch.zeros_like(b[n]) for n in names}
        r = {n: b[n].clone() for n in names}
        p = {n: r[n].clone() for n in names}
        rr = dot(r, r)
        bb = math.sqrt(rr)
        limit = max_iter or 10 * sum(b[n].numel() for n in names)
        it = 0
        while math.sqrt(rr) > tol * bb and it < limit:
            q = op(p)
            alpha = rr / dot(p, q)
            for n in names:
                x[n].add_(p[n], alpha=alpha)
                r[n].sub_(q[n], alpha=alpha)
            new = dot(r, r)
            for n in names:
                p[n] = r[n] + (new / rr) * p[n]
            rr = new
            it += 1
        if math.sqrt(rr) > tol * bb:
            logger.warning("inverse_vp: CG on tied layers %s stopped after %d iterations (relative residual %.2e)",
                           comp, it, math.sqrt(rr) / bb)
        return x

    def to_diagonal(self) -> Fisher:
        """The diagonal of the KFAC, ``diag(Σ_u G_u ⊗ A_u)``, as a :class:`hf_fisher.Fisher`
        (reduction "param", no variance, same counts; ``metadata.estimator`` "kfac" and
        ``metadata.extra["kfac"]`` the settings). Weight entries ``G_oo A_ii``; bias entries
        ``G_oo Ã_{-1,-1}`` (the bias-augmented corner, equal to 1).

        Parameters the KFAC does not cover (:attr:`uncovered`) are not in the result (no zeros in
        their place); they are listed in ``metadata.extra["uncovered"]`` and a WARNING names them."""
        if self.uncovered:
            logger.warning(
                "to_diagonal: this KFAC leaves %d parameter(s) uncovered (%s%s); the diagonal Fisher has no entry for them "
                "(listed in metadata.extra['uncovered'])", len(self.uncovered), ", ".join(sorted(self.uncovered)[:3]),
                ", ..." if len(self.uncovered) > 3 else "",
            )
        mean: dict[str, torch.Tensor] = {}
        for name in self.layer_names():
            L = self.layers[name]
            w, b = L.from_canonical(L.diagonal().to(torch.float64))
            mean[L.weight] = mean[L.weight] + w if L.weight in mean else w
            if L.bias is not None:
                mean[L.bias] = mean[L.bias] + b if L.bias in mean else b
        extra = dict(self.metadata.extra)
        extra["kfac"] = dict(self.settings)
        extra["diagonal_of"] = "kfac"
        if self.uncovered:
            extra["uncovered"] = dict(self.uncovered)
        meta = replace(self.metadata, reduction="param", estimator="kfac", extra=extra)
        return Fisher(mean, None, reduction="param", groups=None, param_shapes=self.param_shapes, counts=self.counts, metadata=meta)

    def validate(self, model: Any) -> None:
        """Every covered parameter must exist in ``model`` with its shape (ModelMismatchError)."""
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        bad = [
            f"  - {n}: KFAC expects {s}, the model has {params.get(n, 'no such parameter')}"
            for n, s in sorted(self.param_shapes.items()) if params.get(n) != s
        ]
        if bad:
            raise ModelMismatchError(
                "this KFAC artifact does not match the model:\n" + "\n".join(bad[:5])
                + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
                + "\nUse it with the model it was collected on, or collect a new one."
            )

    # ------------------------------------------------------------------ I/O
    def _config(self) -> dict[str, Any]:
        return {
            "format_version": KFAC_FORMAT_VERSION,
            "library": "hf_fisher",
            "artifact": "kfac",
            "metadata": self.metadata.to_dict(),
            "counts": self.counts.to_dict(),
            "settings": dict(self.settings),
            "param_shapes": {n: list(self.param_shapes[n]) for n in self.names()},
            "uncovered": dict(sorted(self.uncovered.items())),
            "layers": {
                n: {
                    "kind": L.kind, "weight": L.weight, "bias": L.bias,
                    "a_shape": list(L.A.shape), "g_shape": list(L.G.shape),
                    "a_diagonal": L.a_diagonal, "g_diagonal": L.g_diagonal,
                    "dtype": str(L.A.dtype).removeprefix("torch."),
                }
                for n, L in sorted(self.layers.items())
            },
            "tensor_file": KFAC_WEIGHTS_NAME,
        }

    artifact_kind = "KFAC artifact"
    is_own_file = staticmethod(is_kfac_artifact_file)

    def _save_pretrained(self, folder: Path) -> None:
        """``kfac.safetensors``, ``kfac_config.json`` and ``README.md`` into ``folder``
        (:meth:`save_pretrained`, atomic through :class:`~hf_fisher.artifacts.base.ArtifactHubMixin`:
        an existing folder is replaced only when it holds nothing but a previous KFAC artifact)."""
        from safetensors.torch import save_file

        state = {}
        for n, L in sorted(self.layers.items()):
            state[f"A.{n}"] = L.A.detach().to("cpu").contiguous().clone()
            state[f"G.{n}"] = L.G.detach().to("cpu").contiguous().clone()
        meta = {"format": "pt", "artifact": "kfac", "hf_fisher_format_version": str(KFAC_FORMAT_VERSION)}
        save_file(state, str(folder / KFAC_WEIGHTS_NAME), metadata=meta)
        write_json(folder / KFAC_CONFIG_NAME, self._config())
        (folder / CARD_NAME).write_text(self._card(), encoding="utf-8")

    def _commit_message(self) -> str:
        return (
            f"Upload KFAC artifact (task {self.metadata.task!r}, fisher_type {self.settings.get('fisher_type')}, "
            f"{len(self)} layers, {self.counts.samples} samples) with hf_fisher"
        )

    def _card(self) -> str:
        md, s = self.metadata, self.settings
        base = f"base_model: {md.model_name_or_path}\n" if md.model_name_or_path and "\n" not in md.model_name_or_path else ""
        left = ""
        if self.uncovered:
            left = (
                f"\n**Not covered** ({len(self.uncovered)} of the collected parameters have no factors; "
                "`to_diagonal()`, `matvec` and `inverse_vp` leave them out):\n\n| parameter | why |\n|---|---|\n"
                + "\n".join(f"| {md_text(n)} | {md_text(w)} |" for n, w in sorted(self.uncovered.items())) + "\n"
            )
        rows = "\n".join(
            f"| {md_text(n)} | {L.kind} | {tuple(L.A.shape)}{' diag' if L.a_diagonal else ''} | "
            f"{tuple(L.G.shape)}{' diag' if L.g_diagonal else ''} |"
            for n, L in sorted(self.layers.items())
        )
        return (
            "---\nlibrary_name: hf_fisher\ntags:\n- fisher-information\n- kfac\n" + base + "---\n\n"
            f"# KFAC Fisher ({md_text(md.task)})\n\n"
            f"Kronecker-factored Fisher ``F ≈ G ⊗ A`` per layer, collected with hf_fisher {md_text(md.library_version)}: "
            f"fisher_type `{s.get('fisher_type')}`, kfac_approx `{s.get('kfac_approx')}`, normalization "
            f"`{md.normalization}`, {self.counts.samples} samples, {self.counts.tokens} label tokens.\n\n"
            "```python\nfrom hf_fisher import KFACFisher\nkfac = KFACFisher.from_pretrained(path)\n"
            "nat_grad = kfac.inverse_vp(grads, damping=1e-3)\nfisher = kfac.to_diagonal()\n```\n\n"
            "| layer | kind | A | G |\n|---|---|---|---|\n" + rows + "\n" + left
        )

    def _value_check(self, what: str, strict: bool = True) -> ValueCheck:
        check = ValueCheck(what, strict=strict, samples=self.counts.samples)
        for n, L in sorted(self.layers.items()):
            check.add(f"A.{n}", L.A, nonnegative="all" if L.a_diagonal else "diagonal")
            check.add(f"G.{n}", L.G, nonnegative="all" if L.g_diagonal else "diagonal")
        return check

    def _default_what(self) -> str:
        return f"the KFAC Fisher of task {self.metadata.task!r}"

    def check_values(self, what: str | None = None) -> None:
        """:class:`~hf_fisher.errors.ArtifactError` unless every factor is finite with a
        non-negative diagonal (a stored diagonal: all of it), and all zero when
        ``counts.samples`` is 0, naming each bad factor with its counts
        (:class:`hf_fisher.artifacts.values.ValueCheck`). Consumers call it before any work."""
        super().check_values(what)

    @classmethod
    def _from_pretrained(cls, folder: Path, *, device: torch.device | str, strict: bool) -> KFACFisher:
        """The KFAC artifact in ``folder`` (:meth:`from_pretrained`, which takes a folder or a Hub
        reference such as ``"user/repo:kfac"``; safetensors only, no pickle).

        Checks every field of ``kfac_config.json`` (an :class:`~hf_fisher.errors.ArtifactError`
        naming the field), that the tensor file holds exactly the ``A.<layer>`` / ``G.<layer>``
        tensors the config lists with its dtype and shapes, that the factors fit the parameter
        shapes, and that ``metadata.estimator`` is a registered estimator; the mixin then checks
        the values (every factor finite with a non-negative diagonal, all zero when
        ``counts.samples`` is 0). ``strict=False`` loads such an artifact anyway with a WARNING,
        recording the problems in ``metadata.extra["load_problems"]``."""
        root = Path(folder)
        if root.parent.is_dir():
            recover(root, what="KFAC artifact")
        if not root.is_dir():
            raise ArtifactError(f"KFAC artifact folder {root} does not exist; pass the folder KFACFisher.save_pretrained wrote")
        cfg_path = root / KFAC_CONFIG_NAME
        if not cfg_path.is_file():
            hint = " (it holds a diagonal Fisher: use hf_fisher.Fisher.from_pretrained)" if (root / CONFIG_NAME).is_file() else ""
            raise ArtifactError(f"{root} has no {KFAC_CONFIG_NAME}: it is not a KFAC artifact{hint}")
        cfg = read_json(cfg_path, "KFAC config", S_KFAC_CONFIG)
        if cfg["format_version"] > KFAC_FORMAT_VERSION:
            raise ArtifactError(
                f"{cfg_path}: format_version {cfg['format_version']} is newer than this hf_fisher reads "
                f"({KFAC_FORMAT_VERSION}); upgrade hf_fisher"
            )
        file = artifact_path(root, cfg["tensor_file"], "tensor_file")
        if not file.is_file():
            raise ArtifactError(f"KFAC artifact {root} lacks its tensor file {cfg['tensor_file']}; save it again")
        tensors = load_file(file, None, device)
        want = {f"{k}.{n}" for n in cfg["layers"] for k in "AG"}
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        if missing or extra:
            raise ArtifactError(
                f"KFAC artifact {root} is malformed: {cfg['tensor_file']} "
                + (f"lacks {missing[:3]}" if missing else "")
                + (" and " if missing and extra else "")
                + (f"holds unexpected tensors {extra[:3]}" if extra else "")
                + "; save it again"
            )
        layers = {}
        for n, spec in cfg["layers"].items():
            for k in "AG":
                t = tensors[f"{k}.{n}"]
                shape = spec["a_shape" if k == "A" else "g_shape"]
                if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != spec["dtype"]:
                    raise ArtifactError(
                        f"KFAC artifact {root} is malformed: tensor '{k}.{n}' has shape {list(t.shape)} and dtype "
                        f"{str(t.dtype).removeprefix('torch.')}, {KFAC_CONFIG_NAME} says {shape} and {spec['dtype']}"
                    )
            layers[n] = KFACLayer(
                spec["kind"], spec["weight"], spec["bias"], tensors[f"A.{n}"], tensors[f"G.{n}"],
                spec["a_diagonal"], spec["g_diagonal"],
            )
        try:
            out = cls(
                layers, param_shapes=cfg["param_shapes"], counts=Counts.from_dict(cfg["counts"]),
                metadata=FisherMetadata.from_dict(cfg["metadata"]), settings=cfg["settings"],
                uncovered=cfg.get("uncovered") or {},
            )
        except InvalidInputError as e:
            raise ArtifactError(f"KFAC artifact {root} is malformed: {e}") from e
        problem = check_estimator_name(out.metadata.estimator, f"KFAC artifact {root}", strict=strict)
        out.metadata = record_problems(out.metadata, [problem] if problem else [])
        out._root = root
        return out


def _schema():

    def after_layer(v: dict, path: str) -> None:
        for key, diag in (("a_shape", v["a_diagonal"]), ("g_shape", v["g_diagonal"])):
            s = v[key]
            if len(s) != (1 if diag else 2) or (not diag and s[0] != s[1]):
                raise SchemaError(f"{path}.{key}", f"must be {'[n]' if diag else '[n, n]'}, got {s}")
        if v["dtype"] not in ("float16", "bfloat16", "float32", "float64"):
            raise SchemaError(f"{path}.dtype", f"must be a floating-point dtype name, got {v['dtype']!r}")

    layer = s_obj(
        {
            "kind": (s_str(KINDS), REQUIRED),
            "weight": (s_str(nonempty=True), REQUIRED),
            "bias": (s_nullable(s_str(nonempty=True)), REQUIRED),
            "a_shape": (s_list(s_int(1), min_len=1), REQUIRED),
            "g_shape": (s_list(s_int(1), min_len=1), REQUIRED),
            "a_diagonal": (s_bool, REQUIRED),
            "g_diagonal": (s_bool, REQUIRED),
            "dtype": (s_str(), REQUIRED),
        },
        after=after_layer,
    )
    settings = s_obj(
        {
            "fisher_type": (s_str(FISHER_TYPES), REQUIRED),
            "kfac_approx": (s_str(KFAC_APPROXES), REQUIRED),
            "mc_samples": (s_nullable(s_int(1)), REQUIRED),
            "seed": (s_nullable(s_int()), None),
            "diagonal_g_above": (s_nullable(s_int()), None),
        },
        extra=True,
    )
    return s_obj(
        {
            "format_version": (s_int(1), REQUIRED),
            "library": (s_str(("hf_fisher",)), REQUIRED),
            "artifact": (s_str(("kfac",)), REQUIRED),
            "metadata": (S_METADATA, REQUIRED),
            "counts": (S_COUNTS, REQUIRED),
            "settings": (settings, REQUIRED),
            "param_shapes": (s_map(s_list(s_int())), REQUIRED),
            "uncovered": (s_map(s_str()), None),  # absent in artifacts written before it existed
            "layers": (s_map(layer), REQUIRED),
            "tensor_file": (s_str(nonempty=True), REQUIRED),
        },
        extra=True,
    )


S_KFAC_CONFIG = _schema()
_S_CONFIG = S_KFAC_CONFIG  # the old private name
