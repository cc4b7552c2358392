"""The exact operator norm of depthwise convs on small inputs, where the DFT bound is loosest (DESIGN §1e).

:func:`depthwise_exact_small` solves each channel's dense operator (pruned by the DFT bounds of
:func:`invseg.spectral.search_channels_full` when several convs are batched); :func:`use_exact_small` is the gate
the SN layers use to take this path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from invseg.utils import is_int

from .geometry import DepthwiseGeometry
from .reference import conv_apply, conv_spec
from .search import DEFAULT_MEMORY_BUDGET, _search

__all__ = [
    "SMALL_INPUT_POINTS",
    "SMALL_INPUT_WORK",
    "SMALL_INPUT_WORK_PRUNED",
    "SMALL_INPUT_POINTS_PRUNED",
    "EXACT_FIRST_CANDIDATES",
    "EXACT_MAX_SOLVES",
    "use_exact_small",
    "depthwise_exact_small",
]

#: Inputs with at most this many spatial points get the exact norm in the SN layers (:func:`use_exact_small`) ...
SMALL_INPUT_POINTS = 64
#: ... when ``channels · points³`` stays below this, for the exact norm of every channel (``segments=None`` in
#: :func:`depthwise_exact_small`): a batched dense solve per step is not free (measured on CPU: 2,560 16×16 SVDs
#: ~ 30 ms) ...
SMALL_INPUT_WORK = 2**20
#: The pruned search (``segments`` given) takes inputs of at most this many points (7×7: 49×49 Gram matrices; at
#: 8×8 its ``eigvalsh`` of 64×64 matrices cost 4-8x the DFT search of the same layers: one-off timing, 2-core CPU,
#: one thread, MobileNetV2's and ResNet-34-DS's 8×8 groups) ...
SMALL_INPUT_POINTS_PRUNED = 49
#: ... and ``channels · points³`` below this (the work of one batched ``eigvalsh`` of every channel's Gram
#: matrix, which the pruned search avoids: a DFT search plus a few dozen small solves, at most
#: ``EXACT_MAX_SOLVES`` distinct filters in its second round).
SMALL_INPUT_WORK_PRUNED = 2**27

#: Channels per segment whose exact norm the pruned search computes first (by decreasing DFT bound).
EXACT_FIRST_CANDIDATES = 4
#: Most exact solves of the pruned search's second round (distinct filters; see :func:`depthwise_exact_small`).
EXACT_MAX_SOLVES = 256


def use_exact_small(channels: int, input_size: Sequence[int], pruned: bool = False) -> bool:
    """Whether the SN layers take the exact path (:func:`depthwise_exact_small`) for a layer of ``channels``
    channels on inputs of ``input_size``: at most :data:`SMALL_INPUT_POINTS` points and
    ``channels · points³`` at most :data:`SMALL_INPUT_WORK` (every channel's exact norm) or, with
    ``pruned=True`` (the caller passes ``segments`` to :func:`depthwise_exact_small`), at most
    :data:`SMALL_INPUT_POINTS_PRUNED` points and :data:`SMALL_INPUT_WORK_PRUNED`.

    The pruned gate covers MobileNetV2's 7×7 (input 224²) and 4×4 (input 128²) stages at 960 channels and
    ResNet-34-DS's 4×4 stage (512 channels), where the DFT bound is loosest (median overestimation 5.2 % at
    N = 7, 13 % at N = 4 for Gaussian 3×3 filters, ``scripts/bench_spectral.py`` table (c)); its cost per
    network in ``scripts/bench_search.py``.
    """
    n = math.prod(input_size)
    if pruned:
        return n <= SMALL_INPUT_POINTS_PRUNED and channels * n**3 <= SMALL_INPUT_WORK_PRUNED
    return n <= SMALL_INPUT_POINTS and channels * n**3 <= SMALL_INPUT_WORK


_SHIFT_CACHE: dict = {}


def _shift_operators(geom: DepthwiseGeometry, device, dtype) -> torch.Tensor:
    """``S`` of shape ``(Πk, n_out·n_in)``: the single-channel conv operator is ``Σ_t θ[t] S_t`` (cached)."""
    key = (geom.kernel, geom.input_size, geom.stride, geom.padding, geom.dilation, geom.mode, str(device), dtype)
    ops = _SHIFT_CACHE.get(key)
    if ops is None:
        n_in = math.prod(geom.input_size)
        k = math.prod(geom.kernel)
        taps = torch.eye(k, dtype=torch.float64).reshape(k, 1, *geom.kernel)
        spec = conv_spec(taps[:1], geom.input_size, geom.stride, geom.padding, geom.dilation, 1, geom.mode)
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *geom.input_size)
        cols = [conv_apply(eye, taps[t:t + 1], spec).reshape(n_in, -1).t() for t in range(k)]  # (n_out, n_in)
        ops = torch.stack(cols).reshape(k, -1).to(device=device, dtype=dtype)
        if len(_SHIFT_CACHE) >= 256:
            _SHIFT_CACHE.clear()
        _SHIFT_CACHE[key] = ops
    return ops


def _check_segments(segments, channels: int) -> list[int]:
    if segments is None:
        return [channels]
    seg = list(segments)
    if not seg or any(not is_int(s) or s < 1 for s in seg) or sum(seg) != channels:
        raise ValueError(f"segments must be positive ints summing to the {channels} channels of the weight, "
                         f"got {segments!r}")
    return seg


def _channel_norms(theta: torch.Tensor, ops: torch.Tensor, n_in: int) -> torch.Tensor:
    """Exact operator norms of the channels ``theta`` ``(m, K)``: the top eigenvalue of the smaller Gram."""
    mats = (theta @ ops).reshape(theta.shape[0], -1, n_in)  # (m, n_out, n_in)
    gram = mats @ mats.mT if mats.shape[1] <= n_in else mats.mT @ mats
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()


def _top_phase(theta: torch.Tensor, ops: torch.Tensor, n_in: int) -> torch.Tensor:
    """``phase[l, t] = uᵀ S_t v`` for the top singular pair ``(u, v)`` of each channel in ``theta`` ``(L, K)``
    (the top eigenvector of the smaller Gram matrix, the other vector by one product: half an SVD's cost)."""
    k = ops.shape[0]
    mats = (theta @ ops).reshape(theta.shape[0], -1, n_in)  # (L, n_out, n_in)
    left = mats.shape[1] <= n_in
    gram = mats @ mats.mT if left else mats.mT @ mats
    vec = torch.linalg.eigh(gram)[1][:, :, -1]  # (L, n): u (left) or v
    other = (mats.mT if left else mats) @ vec[:, :, None]  # Aᵀu = σ v, or A v = σ u
    norm = torch.linalg.vector_norm(other, dim=1, keepdim=True)
    # a zero operator has no singular direction: any unit vector gives σ = 0 (here the first basis vector)
    e0 = torch.zeros_like(other)
    e0[:, 0] = 1.0
    other = torch.where(norm > 0, other / norm.clamp_min(torch.finfo(other.dtype).tiny), e0)[:, :, 0]
    u, v = (vec, other) if left else (other, vec)
    s_v = ops.reshape(k, -1, n_in) @ v.t()  # (K, n_out, L): S_t v_l
    return torch.einsum("kol,lo->lk", s_v, u)


@torch.no_grad()
def depthwise_exact_small(
    weight: torch.Tensor, geom: DepthwiseGeometry, segments: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact operator norm of a depthwise conv on a small input, where the DFT bound is loose (``N`` close
    to ``k``): per channel a certified upper bound, exact where it matters.

    A depthwise conv's norm is the maximum over its channels of the largest singular value of each channel's
    dense ``n_out × n_in`` operator (the top eigenvalue of its smaller Gram matrix).

    * ``segments=None``: every channel's exact norm (one batched ``eigvalsh``), so any slice of ``values``
      has its exact maximum.
    * ``segments`` given (the channel counts of consecutive independent convs batched in ``weight``, e.g.
      several layers of equal geometry; ``[C]`` for one conv): only each segment's maximum is exact. On CPU
      the search prunes: every channel gets its DFT bound ``u_c`` (:func:`search_channels_full`, an upper
      bound); per segment the :data:`EXACT_FIRST_CANDIDATES` channels of largest ``u_c`` get their exact
      norm, then (one host check) every other channel whose ``u_c`` is not below the best exact norm of its
      segment. Each channel left out is certified below its segment's maximum and keeps ``u_c``. Identical
      filters are solved once. If more than :data:`EXACT_MAX_SOLVES` distinct filters remain candidates
      (near-ties, e.g. filters initialised alike plus noise), only that many of the largest bounds are solved
      and the others keep ``u_c``: the values stay certified upper bounds, but a segment's maximum may then be a
      DFT bound rather than its exact norm (never looser than without this path), and the cost stays bounded.
      On other devices every channel is solved (no host synchronisation). Exact solves and the worst case
      (identical filters) of the networks' groups: ``scripts/bench_search.py``.

    Returns:
        ``(values, channel, phase)``: ``values`` ``(C,)`` are certified upper bounds of every channel's norm,
        **exact for the arg-max channel of each segment** (of the whole weight for ``segments=None``, where
        all are exact; see above for the bounded near-tie case), so ``values[segment].max()`` is that
        segment's exact norm; ``channel`` ``(L,)`` int64,
        the arg-max channel of each of the ``L`` segments (indices into the whole weight; ``(1,)`` for
        ``segments=None``); ``phase`` ``(L, Πk)`` with ``phase[l, t] = uᵀ S_t v`` for the top singular pair
        ``(u, v)`` of that channel — so ``σ = |phase[l] · θ_c|`` is differentiable, equals the exact norm for
        the weights it was computed on, and has the exact gradient ``u vᵀ`` (projected on the taps).

    Raises:
        ValueError: ``segments`` that are not positive ints summing to ``C``.
    """
    seg = _check_segments(segments, geom.channels)
    real = torch.float64 if weight.dtype == torch.float64 else torch.float32
    ops = _shift_operators(geom, weight.device, real)  # (K, n_out·n_in)
    n_in = math.prod(geom.input_size)
    C, L = geom.channels, len(seg)
    device = weight.device
    with torch.autocast(device.type, enabled=False):  # full precision under AMP
        theta = weight.detach().reshape(C, -1).to(real)
        if segments is None or device.type != "cpu" or max(seg) <= EXACT_FIRST_CANDIDATES:
            values = _channel_norms(theta, ops, n_in)
        else:
            values = _pruned_norms(weight, theta, geom, seg, ops, n_in)
        if L == 1:
            channel = values.max(dim=0)[1].reshape(1)
        elif len(set(seg)) == 1:
            channel = values.reshape(L, seg[0]).max(dim=1)[1] + torch.arange(L, device=device) * seg[0]
        else:
            offsets = torch.tensor([sum(seg[:i]) for i in range(L)], device=device)
            channel = torch.stack([part.max(dim=0)[1] for part in values.split(seg)]) + offsets
        phase = _top_phase(theta[channel], ops, n_in)
    return values, channel, phase


def _pruned_norms(weight, theta, geom, seg, ops, n_in) -> torch.Tensor:
    """Per-channel values of :func:`depthwise_exact_small` on CPU: DFT bounds, exact where they could win."""
    L, width = len(seg), max(seg)
    upper = _search(weight, geom, None, DEFAULT_MEMORY_BUDGET, False)[0].to(theta.dtype)  # (C,) upper bounds
    if len(set(seg)) == 1:  # the usual case (equal layers): a view, channel = row · width + column
        padded, offsets = upper.view(L, width), torch.arange(L) * width
    else:  # padded to a common width with -1 (below every bound)
        offsets = torch.tensor([sum(seg[:i]) for i in range(L)])
        col = torch.cat([torch.arange(n) for n in seg])
        padded = upper.new_full((L, width), -1.0)
        padded[torch.repeat_interleave(torch.arange(L), torch.tensor(seg)), col] = upper
    m = min(EXACT_FIRST_CANDIDATES, width)
    top_u, top_i = padded.topk(min(m + 1, width), dim=1)  # (L, m [+ 1]): the (m+1)-th is the first left out
    real = top_u[:, :m] >= 0  # not padding
    first = (top_i[:, :m] + offsets[:, None])[real]
    exact = _channel_norms(theta[first], ops, n_in)
    values = upper.clone()
    values[first] = exact
    best = padded.new_full((L, m), -1.0)
    best[real] = exact
    # a bound within round-off of the best exact norm is not trusted to be below it (the DFT bound is exact for
    # some geometries, e.g. k <= s)
    best = best.amax(dim=1) * (1 - 64 * torch.finfo(values.dtype).eps)
    if top_u.shape[1] > m and bool((top_u[:, m] >= best).any()):  # some channel left out could still win
        left = padded >= best[:, None]
        left.scatter_(1, top_i[:, :m], False)
        rows, cols = torch.nonzero(left, as_tuple=True)
        rest = offsets[rows] + cols
        # the solves allowed: EXACT_MAX_SOLVES, or as many as SMALL_INPUT_WORK of n_in³ solves buys (tiny inputs:
        # 2×2 gives 16,384, i.e. all of them)
        cap = max(EXACT_MAX_SOLVES, SMALL_INPUT_WORK // n_in**3)
        if rest.numel() <= cap:
            values[rest] = _channel_norms(theta[rest], ops, n_in)
            return values
        # many near-ties (e.g. filters initialised alike): identical filters are solved once; beyond that each
        # segment's largest bounds are solved (the cap shared evenly) and the others keep their certified DFT bounds
        unique, inverse = torch.unique(theta[rest], dim=0, return_inverse=True)
        if unique.shape[0] <= cap:
            values[rest] = _channel_norms(unique, ops, n_in)[inverse]
        else:
            share = max(1, cap // L)
            picked = []
            for r in range(L):
                mine = rest[rows == r]
                if mine.numel():
                    picked.append(mine[upper[mine].topk(min(share, mine.numel())).indices])
            picked = torch.cat(picked)
            values[picked] = _channel_norms(theta[picked], ops, n_in)
    return values
