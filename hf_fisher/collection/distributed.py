"""Exact cross-rank merge of Fisher accumulators over ``torch.distributed`` collectives.

Each rank of a process group (torchrun, ``accelerate launch``, a Trainer under DDP)
accumulates the contributions of its own samples; :func:`merge_accumulators` combines the
ranks' states so that every rank ends with the statistics of the union of all samples.

Welford accumulators (per tensor: count ``n``, mean ``μ``, centred ``M2``) merge with Chan,
Golub & LeVeque's pairwise formula, applied to the ranks in rank order 0, 1, ..., K−1::

    n  = n_a + n_b
    δ  = μ_b − μ_a
    μ  = μ_a + δ · n_b / n
    M2 = M2_a + M2_b + δ² · n_a · n_b / n

which is exactly the state of one accumulator that saw every rank's samples (up to float
rounding: the result does not depend on the rank order beyond it).

EMA accumulators merge with the same formula in *weights*: each sample keeps the weight its
own rank's EMA gave it, ``w_{r,k} = (1 − d) d^(n_r − k)`` (sample ``k`` of ``n_r`` on rank
``r``), and the merged state is the weighted statistics of the union. With ``W`` the weight
sum, ``W2`` the sum of squared weights and ``S = Σ w (x − μ)²``::

    W  = W_a + W_b,   W2 = W2_a + W2_b,   n = n_a + n_b
    δ  = μ_b − μ_a
    μ  = μ_a + δ · W_b / W
    S  = S_a + S_b + δ² · W_a · W_b / W

so the merged mean is ``Σ_r W_r μ_r / Σ_r W_r`` and the variance and effective count follow
from ``S``, ``W`` and ``W2`` as for one EMA (:class:`hf_fisher.collection.stats.EMA`). Under data-parallel
training every rank adds the same number of samples per step, so samples of the same step
weigh the same on every rank: the merge is an EMA over steps.

Mean-only Welford accumulators (``variance=False``) send only ``μ`` (and a compensated one's
low-order part) and fold the ranks with the mean's line of the same merge: the merged mean is
bit for bit the one merged with ``M2``. A mean-only accumulator is a kind of its own in the
signature: ranks that disagree on the setting are refused.

Transport: tensors only (``all_gather`` of int64 counters, float64 EMA weights and the
accumulators' own dtype for ``μ``/``M2``, in buckets of a bounded size), never pickled
objects, so any backend works (gloo on CPU, nccl on CUDA). Every rank receives the same
gathered bytes and runs the same merge in the same order, so every rank holds bit-identical
results. Before any state moves, each rank's *signature* (parameter names, shapes, dtype,
accumulator kind, reduction, task...) is gathered and compared with rank 0's; a mismatch
raises :class:`DistributedMismatchError` on every rank at once (no rank is left waiting in a
collective), naming the first rank and the first entry that differ.

Every rank must call the merge (it is a collective): a rank that never calls it, or fails
before calling it, leaves the others waiting until the process group's timeout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DistributedMismatchError, InvalidInputError
from .stats import EMA, AccumulatorState, Welford

log = logging.getLogger(__name__)

__all__ = [
    "DistributedMismatchError",
    "all_gather_tensor",
    "is_distributed",
    "merge_accumulators",
    "merge_ema_states",
    "merge_welford_states",
    "rank",
    "world_size",
]

#: the largest bucket of μ/M2 values gathered at once, per rank (bytes); the gathered copy is K times it
DEFAULT_BUCKET_BYTES = 64 * 2**20


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed(group=None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one process (in ``group``)."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)


def world_size(group=None) -> int:
    """Processes in ``group`` (1 when ``torch.distributed`` is not initialised)."""
    dist = _dist()
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 when ``torch.distributed`` is not initialised)."""
    dist = _dist()
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group``, in place (on the backend's device and
    back); every rank must call it with the same shape and dtype."""
    dist = _dist()
    device = _comm_device(group)
    t = tensor.detach().to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if t is not tensor:
        tensor.copy_(t)
    return tensor


def rank_seed(seed: int, group=None) -> int:
    """The seed of this rank's random draws: ``seed`` itself in one process and on rank 0, and a
    different stream per other rank, so that the ranks' Monte Carlo draws are independent (the
    same seed on every rank would draw the same numbers for different samples)."""
    r = rank(group)
    if r == 0:
        return int(seed)
    mixer = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, 2**62, (r,), generator=mixer)[-1])


def _comm_device(group=None) -> torch.device:
    """The device the group's backend communicates from: CUDA for nccl, CPU otherwise
    (gloo, mpi, and ``cpu:gloo,cuda:nccl`` style mixed backends)."""
    backend = str(_dist().get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "xccl":  # pragma: no cover - Intel GPUs
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def all_gather_tensor(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order, on the
    device ``tensor`` came from. One ``all_gather`` on the backend's device."""
    dist = _dist()
    k = dist.get_world_size(group)
    device = _comm_device(group)
    t = tensor.detach().to(device).contiguous()
    out = [torch.empty_like(t) for _ in range(k)]
    dist.all_gather(out, t, group=group)
    return [o.to(tensor.device) for o in out]


def _gather_bytes(data: bytes, group=None) -> list[bytes]:
    """Every rank's byte string (ragged lengths: the lengths first, then padded uint8 tensors)."""
    n = torch.tensor([len(data)], dtype=torch.int64)
    lengths = [int(x.item()) for x in all_gather_tensor(n, group)]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = all_gather_tensor(buf, group)
    return [bytes(p[:m].tolist()) for p, m in zip(parts, lengths)]


# ---------------------------------------------------------------------------------- merges
def merge_welford_states(states: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan's pairwise merge of ``(n, μ, M2)`` states, folded left to right::

        n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n

    States with ``n == 0`` are skipped. Returns ``(n, μ, M2)`` (zeros of the first state's
    shape when every ``n`` is 0)."""
    acc = Welford(tuple(states[0][1].shape), dtype=states[0][1].dtype, device=states[0][1].device)
    for n, mean, m2 in states:
        if n:
            acc.update_moments(n, mean, m2)
    return acc.count, acc.mean, acc.m2


def merge_ema_states(
    states: list[tuple[int, float, float, torch.Tensor, torch.Tensor]],
) -> tuple[int, float, float, torch.Tensor, torch.Tensor]:
    """Weighted Chan merge of EMA states ``(n, W, W2, μ, S)``, folded left to right::

        W = W_a + W_b,  W2 = W2_a + W2_b,  n = n_a + n_b,  δ = μ_b − μ_a,
        μ = μ_a + δ W_b / W,  S = S_a + S_b + δ² W_a W_b / W

    (``S = Σ w (x − μ)²``, unnormalised: :class:`~hf_fisher.collection.stats.EMA`'s internal ``m2``).
    Every sample keeps the weight its own EMA gave it. States with ``n == 0`` are skipped."""
    n_t, w_t, w2_t = 0, 0.0, 0.0
    mean = torch.zeros_like(states[0][3])
    s = torch.zeros_like(states[0][4])
    for n, w, w2, mu, s_b in states:
        if n == 0 or w == 0.0:
            continue
        if n_t == 0:
            mean, s = mu.clone(), s_b.clone()
        else:
            total = w_t + w
            delta = mu - mean
            mean = mean + delta * (w / total)
            s = s + s_b + delta.square() * (w_t * w / total)
        n_t, w_t, w2_t = n_t + n, w_t + w, w2_t + w2
    return n_t, w_t, w2_t, mean, s


# ---------------------------------------------------------------------------------- signature
def _signature(accumulators: Mapping[str, Any], counters: Mapping[str, int], context: Mapping[str, Any]) -> dict:
    tensors = []
    for name in sorted(accumulators):
        acc = accumulators[name]
        tensors.append([name, list(acc.shape) if acc.shape is not None else None])
    kinds = sorted({_kind(a) for a in accumulators.values()})
    dtypes = sorted({str(a.dtype) for a in accumulators.values()})
    decays = sorted({float(a.decay) for a in accumulators.values() if isinstance(a, EMA)})
    return {
        "context": {k: context[k] for k in sorted(context)},
        "counters": sorted(counters),
        "accumulator": kinds,
        "dtype": dtypes,
        "ema_decay": decays,
        "tensors": tensors,
    }


def _describe_difference(mine: dict, ref: dict, r: int) -> str:
    """The first entry in which rank ``r``'s signature ``mine`` differs from rank 0's ``ref``."""
    for key in ("context", "counters", "accumulator", "dtype", "ema_decay"):
        if mine[key] != ref[key]:
            if key == "context":
                for k in sorted(set(mine[key]) | set(ref[key])):
                    if mine[key].get(k) != ref[key].get(k):
                        return f"{k} is {mine[key].get(k)!r} on rank {r} but {ref[key].get(k)!r} on rank 0"
            return f"{key} is {mine[key]!r} on rank {r} but {ref[key]!r} on rank 0"
    a, b = dict(mine["tensors"]), dict(ref["tensors"])
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"rank {r} has {name!r}, which rank 0 does not collect"
        if name not in a:
            return f"rank 0 has {name!r}, which rank {r} does not collect"
        if a[name] != b[name]:
            return f"{name!r} has shape {tuple(a[name] or ())} on rank {r} but {tuple(b[name] or ())} on rank 0"
    return "their signatures differ"  # pragma: no cover - json of equal dicts is equal


def _check_signatures(sig: dict, group=None) -> None:
    mine = json.dumps(sig, sort_keys=True).encode()
    every = _gather_bytes(mine, group)
    ref = json.loads(every[0].decode())
    for r, data in enumerate(every):
        if data != every[0]:
            what = _describe_difference(json.loads(data.decode()), ref, r)
            raise DistributedMismatchError(
                f"cannot merge the Fisher accumulators across ranks: {what}. Every rank must collect the same "
                "parameters of the same model with the same settings (reduction, task, accumulation dtype, "
                "ema_decay); build the model and the collector identically on every rank, or pass "
                "distributed=False to keep each rank's Fisher separate"
            )
    if any(s is None for _, s in sig["tensors"]):
        raise InvalidInputError("cannot merge accumulators created without a shape and never updated; give them a shape")


# ---------------------------------------------------------------------------------- merge
def merge_accumulators(
    accumulators: Mapping[str, Welford | EMA],
    counters: Mapping[str, int] | None = None,
    *,
    context: Mapping[str, Any] | None = None,
    group=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> tuple[dict[str, Welford | EMA], dict[str, int]]:
    """Merge every rank's ``accumulators`` (name -> Welford or EMA) and integer ``counters``
    (e.g. samples, tokens, batches: summed) exactly; a collective that every rank of ``group``
    must call with the same names, shapes and ``context`` (JSON-able settings that must agree,
    e.g. reduction and task).

    Welford: Chan's pairwise formula, ranks folded in order 0..K−1 (see the module docstring);
    EMA: the weighted form (each sample keeps its own rank's EMA weight). Returns new
    accumulators on each input's device and dtype (the inputs are not modified) and the summed
    counters; every rank gets bit-identical results. Raises :class:`DistributedMismatchError`
    on every rank when the ranks' signatures differ.

    Memory: the μ/M2 values travel in buckets of at most ``bucket_bytes`` per rank (a tensor
    larger than that travels alone), so the gathered copy is at most K buckets at a time.
    """
    counters = dict(counters or {})
    names = sorted(accumulators)
    _check_signatures(_signature(accumulators, counters, dict(context or {})), group)
    if not names and not counters:
        return {}, {}
    k = world_size(group)
    # integer counts: per accumulator n, then the counters (sorted by name)
    ints = torch.tensor([accumulators[n].count for n in names] + [int(counters[c]) for c in sorted(counters)], dtype=torch.int64)
    all_ints = all_gather_tensor(ints, group)
    merged_counters = {c: int(sum(int(t[len(names) + i]) for t in all_ints)) for i, c in enumerate(sorted(counters))}
    emas = [n for n in names if isinstance(accumulators[n], EMA)]
    weights = None
    if emas:
        states = [accumulators[n].state() for n in emas]
        w = torch.tensor([[s.weight_sum, s.weight_sq_sum] for s in states], dtype=torch.float64)
        weights = all_gather_tensor(w, group)

    index = {n: i for i, n in enumerate(names)}
    ema_index = {n: j for j, n in enumerate(emas)}
    out: dict[str, Welford | EMA] = {}
    for bucket in _buckets(accumulators, names, bucket_bytes):
        dtype = accumulators[bucket[0]].dtype
        flat = torch.cat([t.reshape(-1).to(dtype) for n in bucket for t in _state(accumulators[n])])
        gathered = all_gather_tensor(flat, group)
        offset = 0
        for name in bucket:
            acc = accumulators[name]
            numel = int(torch.Size(acc.shape).numel())
            width = _width(acc)
            pieces = [tuple(g[offset + j * numel: offset + (j + 1) * numel].view(acc.shape) for j in range(width)) for g in gathered]
            if not _keeps_m2(acc):  # a mean-only Welford: (μ, lo) or (μ,) travelled; M2 slot None
                pieces = [(p[0], None, *p[1:]) for p in pieces]
            offset += width * numel
            counts = [int(t[index[name]]) for t in all_ints]
            device = acc.device
            if isinstance(acc, EMA):
                j = ema_index[name]
                n, w, w2, mean, s = merge_ema_states(
                    [(counts[r], float(weights[r][j, 0]), float(weights[r][j, 1]), pieces[r][0], pieces[r][1]) for r in range(k)]
                )
                out[name] = EMA.from_state(AccumulatorState(n, mean, s, acc.decay, w, w2), dtype=acc.dtype, device=device)
            elif _compensated(acc) or not _keeps_m2(acc):  # ranks folded in order (with their low-order parts)
                merged = Welford(acc.shape, dtype=acc.dtype, device=device, compensated=acc.compensated, variance=acc.has_variance)
                for r in range(k):
                    if counts[r]:
                        merged.update_moments(counts[r], pieces[r][0], pieces[r][1], mean_lo=pieces[r][2] if acc.compensated else None)
                out[name] = merged
            else:
                n, mean, m2 = merge_welford_states([(counts[r], pieces[r][0], pieces[r][1]) for r in range(k)])
                out[name] = Welford.from_state(AccumulatorState(n, mean, m2), dtype=acc.dtype, device=device)
    return out, merged_counters


def _compensated(acc) -> bool:
    return isinstance(acc, Welford) and acc.compensated


def _keeps_m2(acc) -> bool:
    """False for a mean-only Welford (``variance=False``), which has no M2 to send."""
    return not isinstance(acc, Welford) or acc.has_variance


def _kind(acc) -> str:
    """The accumulator's kind in the ranks' signature (a mean-only Welford is one of its own)."""
    return type(acc).__name__ + ("" if _keeps_m2(acc) else " without variance")


def _width(acc) -> int:
    """How many state tensors of the accumulator's shape travel: μ, M2 (kept), lo (compensated)."""
    return 1 + _keeps_m2(acc) + _compensated(acc)


def _state(acc) -> tuple[torch.Tensor, ...]:
    """(μ, M2) of a Welford, (μ, S) of an EMA: the raw state tensors (zeros before any sample);
    a compensated Welford adds its mean's low-order part (μ = hi + lo), so that a float32 merge
    across ranks keeps the precision each rank accumulated. A mean-only Welford has no M2: (μ[, lo])."""
    state = acc.state()
    if state.mean is None:
        z = torch.zeros(acc.shape, dtype=acc.dtype, device=acc.device)
        return (z,) * _width(acc)
    out = [state.mean]
    if _keeps_m2(acc):
        out.append(state.m2)
    if _compensated(acc):
        out.append(state.mean_lo if state.mean_lo is not None else torch.zeros_like(state.mean))
    return tuple(out)


def _buckets(accumulators, names: list[str], limit: int) -> list[list[str]]:
    """Consecutive names (sorted) of one dtype and device, at most ``limit`` bytes of μ+M2 each."""
    out: list[list[str]] = []
    size = 0
    key = None
    for name in names:
        acc = accumulators[name]
        nbytes = _width(acc) * int(torch.Size(acc.shape).numel()) * acc.dtype.itemsize
        k = (acc.dtype, acc.device)
        if not out or k != key or size + nbytes > limit:
            out.append([])
            size = 0
            key = k
        out[-1].append(name)
        size += nbytes
    return [b for b in out if b]
