"""Accuracy and cost of the depthwise spectral bound (the paper's Figure-2 protocol, DESIGN §1a/§1b/§1e).

**Accuracy** (:func:`bound_accuracy`). For each input size ``N`` and stride, ``n`` Gaussian ``k × k``
single-channel filters (seeded) are drawn; for each the relative overestimation ``bound / exact - 1`` of

* ``"paper"`` — the paper's bound: one grid ``M = N + 2p``, and for strides ``||P K|| <= ||K||``
  (:func:`invseg.spectral.depthwise_bound_dense` with ``paper_grid=True``), and
* ``"invseg"`` — :func:`invseg.spectral.depthwise_bound`: the minimum over grids, and for strides the
  exact aliasing formula,

is summarised by its median and inter-quartile range. The exact norm is

* ``"dense"`` for ``N <= dense_max``: the dense operator in float64 and the largest eigenvalue of its
  (smaller) Gram matrix — the same number as the dense SVD of :func:`invseg.spectral.exact_conv_norm`,
  batched over filters;
* ``"lanczos"`` beyond: a converged, explicitly restarted Lanczos iteration with full
  reorthogonalisation on ``AᵀA`` (float64). The plain power method is not used there: the top of the
  spectrum of a zero-padded conv is clustered (gaps ``~ 1/N²``), and a 20 000-iteration power method at
  ``N = 128`` is still ~5e-5 below the truth — the size of the effect being measured. The value returned
  is ``||A x||`` for the final unit Ritz vector ``x``, hence never above the truth: the overestimation
  reported is, if anything, too large. Checked against the dense SVD at ``N = 48, 64``: relative error
  below 1e-7.

**Cost** (:func:`bound_cost`). Time (median of several runs) of one bound evaluation as a layer does it
(search without grad + differentiable σ + backward), and the peak transient memory of one evaluation,
for invseg's chunked bound and for the straightforward full-FFT-with-autograd baseline (the paper's
single grid). Memory is measured in a fresh process: on CUDA ``max_memory_allocated`` minus the memory
allocated before; on CPU the peak resident memory (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus ``VmRSS`` before, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors return to the OS (DESIGN §4).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from invseg.analysis.memory import measure_call
from invseg.spectral import (
    conv_apply,
    conv_spec,
    depthwise_bound,
    depthwise_bound_dense,
    depthwise_geometry,
    depthwise_search_channels,
    exact_conv_norm,
    lanczos_conv_norms,
)

__all__ = [
    "BOUNDS",
    "gaussian_filters",
    "dense_norms",
    "reference_norms",
    "ExactNorm",
    "depthwise_exact_norm",
    "per_filter_bounds",
    "AccuracyRecord",
    "bound_accuracy",
    "CostRecord",
    "bound_cost",
    "measure_peak_bytes",
]

#: Bounds compared by :func:`bound_accuracy`.
BOUNDS = ("paper", "invseg")


def gaussian_filters(n: int, kernel: int = 3, spatial_dims: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` i.i.d. standard Gaussian single-channel filters, shape ``(n, 1, *(kernel,)*d)``, float64."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1) + (kernel,) * spatial_dims, generator=gen, dtype=torch.float64)


def _operator(filters: torch.Tensor, input_size: int, stride: int, padding: int | None):
    """The per-filter operators ``x -> conv(x, θ_c)`` of a depthwise conv, as ``(C, L) -> (C, L_out)``."""
    c = filters.shape[0]
    spec = conv_spec(filters, input_size, stride, padding, 1, c)
    shape = (1, c, *spec.input_size)
    return spec, shape


@torch.no_grad()
def dense_norms(
    filters: torch.Tensor, input_size: int, stride: int = 1, padding: int | None = None, chunk: int = 16
) -> torch.Tensor:
    """Exact operator norm of each single-channel filter's conv (dense operator, float64).

    Builds each ``(L_out × L_in)`` operator by applying the conv to the identity basis and takes the largest
    eigenvalue of the smaller Gram matrix (``AAᵀ`` or ``AᵀA``): the square of the largest singular value.

    Returns:
        ``(C,)`` float64 tensor.
    """
    w = filters.detach().to(torch.float64).cpu()
    out = []
    for c0 in range(0, w.shape[0], chunk):
        wc = w[c0:c0 + chunk]
        spec, shape = _operator(wc, input_size, stride, padding)
        n_in = math.prod(spec.input_size)
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *spec.input_size)
        cols = conv_apply(eye.expand(n_in, wc.shape[0], *spec.input_size), wc, spec)  # (n_in, C, *N_out)
        a_t = cols.reshape(n_in, wc.shape[0], -1).permute(1, 0, 2)  # (C, n_in, n_out) = Aᵀ per filter
        gram = a_t.transpose(1, 2) @ a_t if a_t.shape[2] <= a_t.shape[1] else a_t @ a_t.transpose(1, 2)
        out.append(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt())
    return torch.cat(out)


def reference_norms(
    filters: torch.Tensor, input_size: int, stride: int = 1, padding: int | None = None, dense_max: int = 32
) -> tuple[torch.Tensor, str, float]:
    """Exact norms: dense for ``input_size <= dense_max``, converged Lanczos beyond.

    Returns:
        ``(sigma (C,), method ("dense" | "lanczos"), last relative change (0 for dense))``.
    """
    if input_size <= dense_max:
        return dense_norms(filters, input_size, stride, padding), "dense", 0.0
    sigma, change = lanczos_conv_norms(filters, input_size, stride, padding)
    return sigma, "lanczos", change


@dataclass
class ExactNorm:
    """The operator norm of a depthwise conv and how it was obtained.

    Attributes:
        value: the norm (``||A y||`` for a unit Ritz vector ``y``, a lower bound of the truth, when
            ``method == "lanczos"``).
        method: ``"dense"`` (SVD of the dense single-channel operator, exact to rounding) or
            ``"lanczos"`` (:func:`invseg.spectral.lanczos_conv_norms`).
        channels_checked: channels whose exact norm was computed (the rest were ruled out by their bound).
        residual: largest last relative change of the Lanczos Ritz values (0 for "dense"): a convergence
            indicator.
    """

    value: float
    method: str
    channels_checked: int
    residual: float = 0.0


@torch.no_grad()
def depthwise_exact_norm(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dense_limit: int = 1024,
    tol: float = 1e-10,
    max_restarts: int = 30,
) -> ExactNorm:
    """Operator norm of ``F.conv{d}d(x, weight, stride=stride, padding=padding, groups=C)`` on inputs of
    spatial size ``input_size`` -- the reference the bounds are compared against, at any size.

    A depthwise conv is block-diagonal over channels, so its norm is the **maximum over channels** of the
    single-channel norms (DESIGN §4). The dense operator is far too large at 112² (12 544 columns per
    channel, 96 channels), so:

    1. invseg's per-channel upper bounds ``b_c`` (:func:`invseg.spectral.depthwise_search_channels`, float64)
       order the channels, largest first;
    2. channels are evaluated in that order and the search stops at the first channel with
       ``b_c <= best`` (the best single-channel norm so far): no remaining channel can exceed it. Because
       the bound is tight, one to a few channels are evaluated per layer;
    3. a single channel's norm is exact by the SVD of its dense operator
       (:func:`invseg.spectral.exact_conv_norm`) when ``prod(input_size) <= dense_limit`` (default 1024,
       i.e. up to 32²), else by the restarted Lanczos iteration of :func:`invseg.spectral.lanczos_conv_norms`
       (float64, full re-orthogonalization) until its Ritz value changes by at most ``tol`` (relative) or
       after ``max_restarts`` restarts. It reports ``||A y||`` for the final unit Ritz vector ``y``: a lower
       bound of the channel's norm, so overestimations computed against it are never understated.

    Args:
        weight: ``(C, 1, *k)`` depthwise filters.
        input_size: spatial input size (int or per axis).
        stride, padding: as for the conv (padding default ``(k - 1) // 2``).
        dense_limit: largest ``prod(input_size)`` evaluated densely (default 1024).
        tol: Lanczos relative-change tolerance (default 1e-10).
        max_restarts: Lanczos restart cap (default 30).

    Returns:
        :class:`ExactNorm`.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    geom = depthwise_geometry(w, input_size, stride, padding)
    bounds, _ = depthwise_search_channels(w, geom)  # (C,) per-channel upper bounds
    order = torch.argsort(bounds, descending=True).tolist()
    n_in = math.prod(geom.input_size)
    method = "dense" if n_in <= dense_limit else "lanczos"
    best, checked, worst_change = 0.0, 0, 0.0
    for c in order:
        if float(bounds[c]) <= best:
            break
        wc = w[c:c + 1]
        if method == "dense":
            value = exact_conv_norm(wc, geom.input_size, geom.stride, geom.padding)
        else:
            sigma, change = lanczos_conv_norms(wc, geom.input_size, geom.stride, geom.padding, tol=tol,
                                               max_restarts=max_restarts, seed=c)
            value = float(sigma[0])
            worst_change = max(worst_change, change)
        best = max(best, value)
        checked += 1
    return ExactNorm(best, method, checked, worst_change)

@torch.no_grad()
def per_filter_bounds(
    filters: torch.Tensor, input_size: int, stride: int = 1, padding: int | None = None
) -> dict[str, torch.Tensor]:
    """Per-filter values of each bound in :data:`BOUNDS` (``(C,)`` float64 tensors)."""
    out: dict[str, list[float]] = {name: [] for name in BOUNDS}
    for c in range(filters.shape[0]):
        f = filters[c:c + 1]
        out["paper"].append(float(depthwise_bound_dense(f, input_size, stride, padding, paper_grid=True)))
        out["invseg"].append(float(depthwise_bound(f, input_size, stride, padding)))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@dataclass
class AccuracyRecord:
    """Relative overestimation ``bound / exact - 1`` of each bound for one ``(N, stride)``.

    Attributes:
        input_size: N. stride: s. kernel: k. filters: number of Gaussian filters.
        reference: ``"dense"`` or ``"lanczos"``; reference_change: last relative change of the Lanczos
            Ritz values (0 for dense).
        median, q25, q75: per bound name, the median and quartiles of the overestimation (fractions).
        min_ratio: per bound name, the smallest ``bound / exact`` (must be >= 1 for a valid bound).
    """

    input_size: int
    stride: int
    kernel: int
    filters: int
    reference: str
    reference_change: float
    median: dict[str, float]
    q25: dict[str, float]
    q75: dict[str, float]
    min_ratio: dict[str, float]


def bound_accuracy(
    input_sizes: Sequence[int],
    strides: Sequence[int] = (1, 2),
    filters_for: Callable[[int], int] | int = 100,
    kernel: int = 3,
    dense_max: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[AccuracyRecord]:
    """The Figure-2 protocol: overestimation of each bound on Gaussian filters, per ``(N, stride)``.

    Args:
        input_sizes: the N values (square 2D inputs).
        strides: strides to evaluate (default 1 and 2).
        filters_for: number of filters, or a function of N giving it (fewer at large N).
        kernel: filter size (default 3, padding ``(k-1)//2``).
        dense_max: largest N with the dense exact reference; Lanczos beyond.
        seed: the filters for N use ``seed + N``.
        progress: optional callable receiving one line per finished ``(N, stride)``.
    """
    records = []
    for n in input_sizes:
        count = filters_for(n) if callable(filters_for) else int(filters_for)
        filters = gaussian_filters(count, kernel, 2, seed + n)
        for s in strides:
            exact, method, change = reference_norms(filters, n, s, None, dense_max)
            bounds = per_filter_bounds(filters, n, s)
            med, q25, q75, mins = {}, {}, {}, {}
            for name, b in bounds.items():
                over = b / exact - 1
                qs = torch.quantile(over, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
                q25[name], med[name], q75[name] = (float(v) for v in qs)
                mins[name] = float((b / exact).min())
            rec = AccuracyRecord(n, s, kernel, count, method, change, med, q25, q75, mins)
            records.append(rec)
            if progress is not None:
                progress(f"N={n} s={s} ({count} filters, {method}): "
                         + ", ".join(f"{k} {100 * v:.3f}%" for k, v in med.items()))
    return records


# --- cost -----------------------------------------------------------------------------------------


def _evaluate(weight: torch.Tensor, input_size: int, implementation: str) -> None:
    """One bound evaluation as a layer does it: value + backward."""
    weight.grad = None
    if implementation == "chunked":
        sigma = depthwise_bound(weight, input_size)
    elif implementation == "dense":
        sigma = depthwise_bound_dense(weight, input_size, paper_grid=True)
    else:
        raise ValueError(f"implementation must be 'chunked' or 'dense', got {implementation!r}")
    sigma.backward()


def _make_weight(channels: int, spatial_dims: int, kernel: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((channels, 1) + (kernel,) * spatial_dims, generator=gen)
    return w.to(device).requires_grad_(True)


def _bound_call(channels: int, spatial_dims: int, input_size: int, implementation: str, device: str,
                kernel: int) -> Callable[[], None]:
    """The measured call of :func:`measure_peak_bytes` (built inside the measuring process)."""
    w = _make_weight(channels, spatial_dims, kernel, device)
    return lambda: _evaluate(w, input_size, implementation)


def measure_peak_bytes(
    channels: int, spatial_dims: int, input_size: int, implementation: str, device: str = "cpu", kernel: int = 3
) -> int:
    """Peak transient memory (bytes) of one bound evaluation, measured in a fresh process
    (:func:`invseg.analysis.memory.measure_call`: after one warm-up evaluation, above the memory in use).

    Raises:
        invseg.analysis.memory.WorkerError: if the measuring process fails (its stderr is included).
    """
    kwargs = dict(channels=channels, spatial_dims=spatial_dims, input_size=input_size,
                  implementation=implementation, device=device, kernel=kernel)
    return measure_call("invseg.analysis.bound_accuracy:_bound_call", kwargs, device)


@dataclass
class CostRecord:
    """Cost of one bound evaluation (search + differentiable σ + backward) for one layer shape.

    Attributes:
        spatial_dims, channels, input_size, kernel: the depthwise layer.
        device: ``"cpu"`` or ``"cuda"``.
        chunked_time_s: median time of invseg's chunked bound (:func:`invseg.spectral.depthwise_bound`).
        chunked_peak_bytes: its peak transient memory.
        dense_time_s, dense_peak_bytes: the same for the full-FFT autograd baseline (paper grid), or
            None when skipped.
        fft_bytes: size of one complex64 spectrum ``C·(N+2p)^d`` (what autograd would keep per grid).
    """

    spatial_dims: int
    channels: int
    input_size: int
    kernel: int
    device: str
    chunked_time_s: float
    chunked_peak_bytes: int
    dense_time_s: float | None
    dense_peak_bytes: int | None
    fft_bytes: int


def _median_time(w: torch.Tensor, input_size: int, implementation: str, repeats: int) -> float:
    _evaluate(w, input_size, implementation)  # warm-up
    times = []
    for _ in range(repeats):
        if w.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _evaluate(w, input_size, implementation)
        if w.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bound_cost(
    shapes: Sequence[tuple[int, int, int]],
    device: str = "cpu",
    repeats: int = 3,
    dense: bool = True,
    kernel: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[CostRecord]:
    """Time and peak memory of one bound evaluation for each ``(spatial_dims, channels, input_size)``.

    Args:
        shapes: layer shapes (float32 weights, kernel ``k``, padding ``(k-1)//2``).
        device: ``"cpu"`` or ``"cuda"``.
        repeats: timed runs per implementation (the median is reported).
        dense: also measure the full-FFT autograd baseline.
        kernel: filter size.
        progress: optional callable receiving one line per shape.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    out = []
    for d, c, n in shapes:
        w = _make_weight(c, d, kernel, device)
        t_chunk = _median_time(w, n, "chunked", repeats)
        m_chunk = measure_peak_bytes(c, d, n, "chunked", device, kernel)
        t_dense = m_dense = None
        if dense:
            t_dense = _median_time(w, n, "dense", max(1, repeats // 2))
            m_dense = measure_peak_bytes(c, d, n, "dense", device, kernel)
        fft_bytes = c * (n + 2 * ((kernel - 1) // 2)) ** d * 8
        out.append(CostRecord(d, c, n, kernel, device, t_chunk, m_chunk, t_dense, m_dense, fft_bytes))
        if progress is not None:
            progress(f"{d}D C={c} N={n}: chunked {t_chunk:.3f}s")
    return out




