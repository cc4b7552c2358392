"""Operator-norm bound of a full (dense-channel) convolution by the multi-channel DFT.

For a conv with ``Cout × Cin`` filters, zero padding ``p`` and stride ``s`` on inputs of size ``N``,
embedding into any grid ``M >= N + p`` with ``s | M`` (as for the depthwise bound, DESIGN §1a/§1b) makes it
rows of a circulant multi-channel conv, whose strided norm is exactly
``max_ω ||B_ω||₂ / s^{d/2}`` with ``B_ω`` the ``Cout × Cin·s^d`` matrix of the filters' DFT values at the
``s^d`` aliases of ``ω`` (Sedghi et al. 2019 for unit stride; the fold as in §1b). Meant for layers with
few channels such as a network's stem: the search keeps the smaller Gram matrix of ``B_ω`` (side
``n = min(Cout, Cin·s^d)``) on half the frequencies, ``n²·ΠM / (2 s^d)`` complex values.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence

import torch

from invseg.utils import check_int, int_tuple

__all__ = ["full_conv_grids", "full_conv_search", "full_conv_sigma_at", "full_conv_bound", "full_conv_projection",
           "full_conv_sigma_from_projection"]


def full_conv_grids(
    input_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    grids: int | None = None,
) -> list[tuple[int, ...]]:
    """Candidate grids ``M`` of the full-conv bound: per axis the first ``grids`` multiples of ``s`` that are
    ``>= max(N + p, k)``, all combinations over axes. Every such grid gives a valid upper bound.

    ``grids=None``: 2 per axis for inputs of at most ``64^2`` points, else 1 (more grids gain < 0.02 % there:
    measured median overestimation for 16×3×3×3 filters at N = 32 is 0.21 % with one grid, 0.20 % with two;
    at N = 8 3.6 % vs 2.0 %).
    """
    if grids is None:
        grids = 2 if math.prod(input_size) <= 64**2 else 1
    check_int(grids, "grids")
    per_axis = []
    for n, k, s, p in zip(input_size, kernel, stride, padding):
        first = -(-max(n + p, k) // s) * s
        per_axis.append([first + i * s for i in range(grids)])
    return list(itertools.product(*per_axis))


#: Batches of at most ``2 ×`` this many frequencies are solved whole (no pruning); it also caps the first
#: exact batch of the pruned search.
PRUNE_CANDIDATES = 64
#: Frequencies solved first at the last level of the pruned search (usually all that is needed).
_FIRST_CANDIDATES = 16
#: Relative round-off allowance of the pruning's upper bounds (float32 Gram iterations): a frequency is
#: dropped only when its bound is below the best exact eigenvalue found by more than this.
_PRUNE_MARGIN = 1e-4


_LOCAL = threading.local()


#: Largest buffer (bytes) :func:`_workspace` keeps between calls; larger temporaries are allocated each time.
_WORKSPACE_MAX_BYTES = 16 * 2**20


def _workspace(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor | None:
    """A per-thread buffer reused across calls for the search's two frequency-sized temporaries (None above
    ``_WORKSPACE_MAX_BYTES``): fresh multi-MB allocations page-fault on every call (one-off timing, 2-core CPU,
    one thread: the stem search at 128² in 2.3 ms instead of 4.5 ms)."""
    if math.prod(shape) * torch.empty((), dtype=dtype).element_size() > _WORKSPACE_MAX_BYTES:
        return None
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    key = (tag, dtype, str(device))
    buf = cache.get(key)
    n = math.prod(shape)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _exact_top(gram: torch.Tensor, idx: torch.Tensor, best, best_i):
    """Exact top eigenvalues of ``gram[idx]``; returns the updated ``(best value, best frequency)``."""
    lam = torch.linalg.eigvalsh(gram[idx])[:, -1]
    val, j = lam.max(dim=0)
    if best is None or bool(val > best):
        return val, idx[j]
    return best, best_i


def _largest_eigenvalue(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_ω λ_max(G_ω)`` and its arg-max over a batch of Hermitian PSD matrices ``(Ω, n, n)``, exactly.

    On CUDA one batched ``eigvalsh`` (no host synchronisation). On CPU, where a batched ``eigvalsh`` of
    thousands of small matrices dominates the update, a pruned search gives the same exact answer: the
    Gram iteration ``u_ω^{(l)} = ||G_ω^{2^l}||_F^{2^{-l}} >= λ_max(G_ω)`` is tightened level by level
    (``l = 1, 2, 3``; each power normalised by its Frobenius norm, whose logarithm is kept) only on the
    frequencies not yet certified below the best exact eigenvalue found so far (``eigvalsh`` of a few
    leaders per level). At the last level ``eigvalsh`` runs on the highest bounds, then on every survivor
    they do not certify. A flat spectrum (nothing can be dropped) ends in one batched ``eigvalsh`` of the
    survivors: the answer of the unpruned search. ``G`` should be scaled to ``λ_max <= ~1e4`` (float32:
    ``G²`` is formed before the first normalisation).
    """
    omega = gram.shape[0]
    if gram.device.type == "cuda" or omega <= 2 * PRUNE_CANDIDATES:
        return torch.linalg.eigvalsh(gram)[:, -1].max(dim=0)
    idx = torch.arange(omega, device=gram.device)
    best = best_i = None
    log_scale = torch.zeros(omega, dtype=gram.real.dtype, device=gram.device)  # Σ_l 2^-l log f_l so far
    tiny = torch.finfo(log_scale.dtype).tiny
    g = gram
    for level in range(1, 4):
        # G^(2^level) / Π f^(...): the normalised power (the first one, over every frequency, in a reused buffer)
        out = _workspace("square", g.shape, g.dtype, g.device) if level == 1 else None
        g = torch.matmul(g, g, out=out) if out is not None else g @ g
        fro = torch.linalg.vector_norm(torch.view_as_real(g), dim=(1, 2, 3)).clamp_min(tiny)
        log_scale = log_scale + fro.log() * 0.5**level
        upper = log_scale.exp()  # ||G^(2^level)||_F^(2^-level) >= λ_max(G)
        if level < 3:  # a few exact leaders raise the bar, then drop what is certified below it
            top = upper.topk(min(4, upper.shape[0])).indices
            best, best_i = _exact_top(gram, idx[top], best, best_i)
            keep = torch.nonzero(upper * (1 + _PRUNE_MARGIN) >= best).reshape(-1)
            if keep.shape[0] < upper.shape[0] // 2:  # a copy of the survivors pays when it halves the work
                idx, g, fro, log_scale = idx[keep], g.index_select(0, keep), fro[keep], log_scale[keep]
            # normalised (no overflow, no underflow of the top direction at the next level)
            torch.view_as_real(g).mul_(fro.reciprocal()[:, None, None, None])
            continue
        n_cand = min(_FIRST_CANDIDATES, PRUNE_CANDIDATES, upper.shape[0])
        top = upper.topk(n_cand).indices
        best, best_i = _exact_top(gram, idx[top], best, best_i)
        if n_cand == upper.shape[0]:
            return best, best_i
        rest = torch.ones_like(upper, dtype=torch.bool)
        rest[top] = False
        left = torch.nonzero(rest & (upper * (1 + _PRUNE_MARGIN) >= best)).reshape(-1)
        if left.numel():  # not certified: solve every survivor
            best, best_i = _exact_top(gram, idx[left], best, best_i)
    return best, best_i


_GRAM_CACHE: dict = {}


def _cache_put(key, value):
    if len(_GRAM_CACHE) >= 256:
        _GRAM_CACHE.clear()
    _GRAM_CACHE[key] = value
    return value


def _lag_factor(kernel: int, stride: int, right: bool, device, cdtype):
    """One axis' lags ``Δ = t - u`` and the factor mapping tap pairs ``(t, u)`` to the lag matrices ``Z_Δ`` (see
    :func:`_folded_grams`): ``(k², nΔ·s²)`` with ``[t - u = Δ] e^{2πi (q t - r u)/s}`` over ``(Δ, q, r)`` (right
    side), or ``(k², nΔ)`` with ``s [t - u = Δ]`` for the lags that are multiples of ``s`` (left side; the others
    vanish under ``Σ_q``), cached."""
    key = ("lag", kernel, stride, right, str(device), cdtype)
    hit = _GRAM_CACHE.get(key)
    if hit is not None:
        return hit
    lag = [x for x in range(-(kernel - 1), kernel) if right or x % stride == 0]
    t = torch.arange(kernel)
    on = (t[:, None, None] - t[None, :, None] == torch.tensor(lag)[None, None, :]).to(torch.float64)  # (t, u, Δ)
    if right:
        q = torch.arange(stride, dtype=torch.float64)
        ang = 2 * math.pi * (q[None, None, :, None] * t[:, None, None, None]
                             - q[None, None, None, :] * t[None, :, None, None]) / stride  # (t, u, q, r)
        e = torch.view_as_real(torch.polar(torch.ones_like(ang), ang))
        e = torch.view_as_complex(torch.where(e.abs() < 1e-12, 0.0, e))  # exact zeros (see _phase_table)
        f = on[:, :, :, None, None] * e[:, :, None]  # (t, u, Δ, q, r)
    else:
        f = on.to(torch.complex128) * stride
    return _cache_put(key, (lag, f.reshape(kernel * kernel, -1).to(device=device, dtype=cdtype)))


def _phase_table(grid: int, stride: int, lags: Sequence[int], sign: float, half: bool, device, cdtype):
    """``e^{sign·2πi ω Δ / M}`` for the ``M/s`` frequencies ``ω`` (half of them + 1 when ``half``), ``(F, nΔ)``."""
    key = ("phase", grid, stride, tuple(lags), sign, half, str(device), cdtype)
    hit = _GRAM_CACHE.get(key)
    if hit is not None:
        return hit
    nf = (grid // stride) // 2 + 1 if half else grid // stride
    om = torch.arange(nf)
    frac = torch.remainder(om[:, None] * torch.tensor(lags)[None, :], grid).to(torch.float64) / grid  # exact
    ang = sign * 2 * math.pi * frac
    e = torch.view_as_real(torch.polar(torch.ones_like(ang), ang))
    # exact zeros where cos or sin vanish (sin π = 1.2e-16 otherwise): those specks turn into subnormal floats
    # in the Gram iteration's powers, which run ~2x slower on x86 (one-off timing: 1.0 vs 0.5 ms per squaring)
    e = torch.view_as_complex(torch.where(e.abs() < 1e-12, 0.0, e))
    return _cache_put(key, e.to(device=device, dtype=cdtype))


def _folded_grams(w: torch.Tensor, grid: Sequence[int], stride: Sequence[int], cdtype: torch.dtype,
                  half: bool = False, workspace: bool = False) -> torch.Tensor:
    """The smaller Gram matrix of ``B_ω`` (``BᴴB``, ``Cin·s^d`` square, or ``BBᴴ``, ``Cout`` square) at all ``ω``
    (row-major over the ``M/s`` grid; ``half``: only ``ω_last <= (M/s)/2``, the other half is conjugate).

    Computed Gram-first, never forming ``B``, as a trigonometric polynomial in the lags ``Δ = t - u`` of the taps:
    ``BᴴB(ω) = Σ_Δ e^{2πi⟨ω, Δ⟩/M} Z_Δ`` with ``Z_Δ[(i,q),(j,r)] = Σ_{t-u=Δ} H[i,t; j,u] e^{2πi(q t - r u)/s}``, and
    the tiny real ``H = Σ_o W[o,i,t] W[o,j,u]`` (``BBᴴ`` likewise, with ``Σ_q`` leaving the lags that are multiples
    of ``s``). The lag matrices ``Z`` do not depend on the grid; the sum over lags runs one axis at a time (a
    small matrix product per axis). Measured on the 2-core CPU (``scripts/bench_search.py``) for MobileNetV2's
    stem at 128² (32×3×3×3, stride 2): see the search table there.
    """
    d = w.dim() - 2
    cout, cin = int(w.shape[0]), int(w.shape[1])
    kernel, stride = tuple(int(k) for k in w.shape[2:]), tuple(stride)
    fold = math.prod(stride)
    right = cin * fold <= cout
    n = cin * fold if right else cout
    factors = [_lag_factor(k, s, right, w.device, cdtype) for k, s in zip(kernel, stride)]
    lags = [f[0] for f in factors]
    n_lags = [len(x) for x in lags]
    flat = w.reshape(cout, cin, -1)
    if right:  # H[i, j, t, u] = Σ_o W[o,i,t] W[o,j,u]
        h = torch.einsum("oit,oju->ijtu", flat, flat)
    else:  # H[o, p, t, u] = Σ_i W[o,i,t] W[p,i,u]
        h = torch.einsum("oit,piu->optu", flat, flat)
    c = h.shape[0]
    # (c, c, t_0..t_{d-1}, u_0..u_{d-1}) -> (c, c, t_0, u_0, t_1, u_1, ...); then per axis, last first, the pair
    # (t_a, u_a) becomes that axis' (Δ_a[, q_a, r_a]), moved in front of the remaining taps
    z = h.reshape(c, c, *kernel, *kernel).permute(0, 1, *[x for a in range(d) for x in (2 + a, 2 + d + a)])
    z = z.to(cdtype)
    for a in reversed(range(d)):
        z = (z.reshape(*z.shape[:-2], -1) @ factors[a][1]).movedim(-1, 2)
    # z: (c, c, R_0, .., R_{d-1}) with R_a = (Δ_a, q_a, r_a) (right) or Δ_a (left)
    if right:  # -> (Δ.., i, q.., j, r..)
        z = z.reshape(cin, cin, *[x for a in range(d) for x in (n_lags[a], stride[a], stride[a])])
        z = z.permute(*[2 + 3 * a for a in range(d)], 0, *[3 + 3 * a for a in range(d)], 1,
                      *[4 + 3 * a for a in range(d)])
    else:  # -> (Δ.., o, p)
        z = z.permute(*range(2, 2 + d), 0, 1)
    t = z.reshape(*n_lags, n * n)
    sign = 1.0 if right else -1.0
    for a in reversed(range(d)):  # contract the lags of axis a with its phases: (.., nΔ_a, rest) -> (.., F_a, rest)
        phase = _phase_table(grid[a], stride[a], lags[a], sign, half and a == d - 1, w.device, cdtype)
        t = t.reshape(math.prod(n_lags[:a]), n_lags[a], -1)
        out = None
        if workspace and a == 0:  # the (Ω, n, n) result in a reused buffer (``workspace``: the caller's temporary)
            out = _workspace("gram", (1, phase.shape[0], t.shape[2]), cdtype, w.device)
        t = torch.matmul(phase, t, out=out) if out is not None else torch.matmul(phase, t)
    return t.reshape(-1, n, n)


def _real_complex(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    return (torch.float64, torch.complex128) if dtype == torch.float64 else (torch.float32, torch.complex64)


def _check_geometry(weight, input_size, stride, padding):
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (Cout, Cin, *kernel) with 1, 2 or 3 spatial dims, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    d = weight.dim() - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = int_tuple(input_size, d, "input_size", minimum=1)
    s = int_tuple(stride, d, "stride", minimum=1)
    p = tuple((k - 1) // 2 for k in kernel) if padding is None else int_tuple(padding, d, "padding", minimum=0)
    for a in range(d):
        if p[a] > kernel[a] - 1:
            raise ValueError(f"padding must be <= kernel - 1 = {kernel[a] - 1} on axis {a}, got {p}")
        if n[a] + 2 * p[a] < kernel[a]:
            raise ValueError(f"input_size {n} is smaller than the kernel {kernel} with padding {p} (empty output)")
    return d, kernel, n, s, p


@torch.no_grad()
def full_conv_search(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    grids: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bound of ``||x ↦ F.conv{d}d(x, weight, stride=stride, padding=padding)||₂`` (zero padding,
    no groups) on inputs of spatial size ``input_size``, searched without autograd.

    For each candidate grid ``M`` (:func:`full_conv_grids`), the filters' DFT on ``M`` is folded into the
    ``Cout × Cin·s^d`` matrices ``B_ω`` (``ω`` on the ``M/s`` grid) and the bound on that grid is
    ``max_ω ||B_ω||₂ / s^{d/2}`` (exact for the circulant conv); the minimum over the grids is returned.

    Memory: ``n²·ΠM / (2 s^d)`` complex entries transient, ``n = min(Cout, Cin·s^d)`` (meant for stems
    and other convs with few channels; a depthwise conv should use
    :func:`invseg.spectral.depthwise_bound`); up to 16 MiB of it is kept between calls for reuse.

    Returns:
        ``(value, state)``: the bound (0-dim, no grad) and the int64 state ``[M_1..M_d, ω_1..ω_d]`` from which
        :func:`full_conv_sigma_at` recomputes the same value differentiably.
    """
    d, kernel, n, s, p = _check_geometry(weight, input_size, stride, padding)
    real, cplx = _real_complex(weight.dtype)
    w = weight.detach().to(real)
    # scaled to unit Frobenius norm: λ_max(G) <= Πs·Πk for the pruned search's powers (undone below)
    scale = torch.linalg.vector_norm(w).clamp_min(torch.finfo(real).tiny)
    w = w / scale
    fold = math.prod(s)
    device = w.device
    best_val = torch.tensor(float("inf"), dtype=real, device=device)
    best_state = torch.zeros(2 * d, dtype=torch.int64, device=device)
    for grid in full_conv_grids(n, kernel, s, p, grids):
        with torch.autocast(device.type, enabled=False):  # full precision under AMP
            # (Ω, n, n): the smaller Gram matrix of every B_ω on half the grid (B_{-ω} is the conjugate of B_ω)
            gram = _folded_grams(w, grid, s, cplx, half=True, workspace=True)
            val, idx = _largest_eigenvalue(gram)  # max_ω ||B_ω||², exact, and its frequency
        val = (val.clamp_min(0) / fold).sqrt() * scale
        omegas = []
        rem = idx
        for a in reversed(range(d)):
            nf = grid[a] // s[a] if a < d - 1 else (grid[a] // s[a]) // 2 + 1
            omegas.append(torch.remainder(rem, nf))
            rem = torch.div(rem, nf, rounding_mode="floor")
        state = torch.cat([torch.tensor(grid, device=device), torch.stack(omegas[::-1])])
        better = val < best_val
        best_val = torch.where(better, val, best_val)
        best_state = torch.where(better, state, best_state)
    return best_val, best_state


def _alias_phases(state: torch.Tensor, axis: int, stride: int, kernel: int, cdtype: torch.dtype) -> torch.Tensor:
    """``e[q, t] = exp(-2πi (ω + q M/s) t / M)`` on one axis for ``state = [M_1..M_d, ω_1..ω_d]``: ``(s, k)``."""
    d = state.shape[0] // 2
    m_a, om_a = state[axis], state[d + axis]
    j = om_a + torch.arange(stride, device=state.device) * torch.div(m_a, stride, rounding_mode="floor")
    taps = torch.arange(kernel, device=state.device)
    phase = torch.remainder(j[:, None] * taps[None, :], m_a).to(torch.float64)  # exact integer phases
    ang = phase * (-2.0 * math.pi) / m_a.to(torch.float64)
    return torch.polar(torch.ones_like(ang), ang).to(cdtype)


def full_conv_sigma_at(weight: torch.Tensor, state: torch.Tensor, stride: int | Sequence[int] = 1) -> torch.Tensor:
    """Differentiable ``||B_ω||₂ / s^{d/2}`` at a remembered ``state = [M_1..M_d, ω_1..ω_d]``.

    ``B_ω`` is built from ``Cout·Cin·s^d`` DFT values computed directly from the filters (``O(Cout·Cin·k^d·s^d)``
    work and memory, no host synchronisation); its value equals the search's maximum for the weights the
    state was found on.
    """
    d = weight.dim() - 2
    s = int_tuple(stride, d, "stride", minimum=1)
    real, cplx = _real_complex(weight.dtype)
    cout = int(weight.shape[0])
    with torch.autocast(weight.device.type, enabled=False):
        t = weight.to(real).to(cplx)  # (Cout, Cin, *k)
        for a in range(d):
            e = _alias_phases(state, a, s[a], int(weight.shape[2 + a]), cplx)  # (s_a, k_a)
            t = torch.tensordot(t, e, dims=([2], [1]))  # contracts the next kernel axis, appends s_a
        b = t.reshape(cout, -1)  # (Cout, Cin·s^d)
        return torch.linalg.matrix_norm(b, ord=2) / math.sqrt(math.prod(s))


@torch.no_grad()
def full_conv_projection(weight: torch.Tensor, state: torch.Tensor, stride: int | Sequence[int] = 1) -> torch.Tensor:
    """The real ``(Cin·Πk, 2)`` matrix ``P`` with ``||W P||_F = ||B_ω v||₂`` at a remembered state.

    ``v`` is the top right singular vector of ``B_ω`` (the folded DFT matrix at ``state``, see
    :func:`full_conv_sigma_at`) for the current weights, and ``P = [Re c, Im c]`` with
    ``c[i, t] = Σ_q v[i, q] E[q, t]`` (``E`` the alias phases). So :func:`full_conv_sigma_from_projection`
    gives the same value as :func:`full_conv_sigma_at` for these weights and, by the envelope theorem, the
    same gradient (a simple top singular value) — with one multiply, one sum and one norm in forward
    instead of a complex DFT and an SVD. Computed once per update, no grad.
    """
    d = weight.dim() - 2
    s = int_tuple(stride, d, "stride", minimum=1)
    real, cplx = _real_complex(weight.dtype)
    cout, cin = int(weight.shape[0]), int(weight.shape[1])
    e = None
    for a in range(d):
        ea = _alias_phases(state, a, s[a], int(weight.shape[2 + a]), cplx)  # (s_a, k_a)
        e = ea if e is None else torch.kron(e, ea)  # (Πs, Πk), row-major over the axes
    w = weight.detach().to(real).reshape(cout, cin, -1).to(cplx)
    b = (w @ e.T).reshape(cout, -1)  # (Cout, Cin·Πs): B_ω
    # v: the top eigenvector of the smaller Gram matrix (a quarter of an SVD's time for the 32 × 12 stem)
    if b.shape[1] <= cout:
        v = torch.linalg.eigh(b.mH @ b)[1][:, -1]
    else:
        u = torch.linalg.eigh(b @ b.mH)[1][:, -1]
        v = b.mH @ u
        norm = torch.linalg.vector_norm(v)
        # B = 0 has no singular direction: any unit vector gives σ = 0
        e0 = torch.zeros_like(v)
        e0[0] = 1.0
        v = torch.where(norm > 0, v / norm.clamp_min(torch.finfo(norm.dtype).tiny), e0)
    c = v.reshape(cin, -1) @ e  # (Cin, Πk)
    return torch.stack([c.real, c.imag], dim=-1).reshape(-1, 2)


def full_conv_sigma_from_projection(weight: torch.Tensor, projection: torch.Tensor,
                                    stride: int | Sequence[int] = 1) -> torch.Tensor:
    """Differentiable ``||W P||_F / s^{d/2}`` with ``P`` from :func:`full_conv_projection` (elementwise
    products and a sum, so autocast keeps it in the weight's precision)."""
    s = int_tuple(stride, weight.dim() - 2, "stride", minimum=1)
    y = (weight.reshape(weight.shape[0], -1, 1) * projection.to(weight.dtype)).sum(dim=1)  # (Cout, 2)
    sigma = torch.linalg.vector_norm(y)
    fold = math.prod(s)
    return sigma if fold == 1 else sigma * (1.0 / math.sqrt(fold))


def full_conv_bound(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    grids: int | None = None,
) -> torch.Tensor:
    """Upper bound of the operator norm of a full conv (see :func:`full_conv_search`), differentiable
    w.r.t. ``weight``."""
    _, state = full_conv_search(weight, input_size, stride, padding, grids)
    return full_conv_sigma_at(weight, state, stride)
