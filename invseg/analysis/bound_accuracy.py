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

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from invseg.spectral import conv_adjoint, conv_apply, conv_spec, depthwise_bound, depthwise_bound_dense

__all__ = [
    "BOUNDS",
    "gaussian_filters",
    "dense_norms",
    "lanczos_norms",
    "reference_norms",
    "per_filter_bounds",
    "AccuracyRecord",
    "bound_accuracy",
    "CostRecord",
    "bound_cost",
    "measure_peak_bytes",
    "format_accuracy_table",
    "format_cost_table",
    "plot_bound_accuracy",
    "write_json",
]

#: Bounds compared by :func:`bound_accuracy`.
BOUNDS = ("paper", "invseg")

_MALLOC_MMAP_THRESHOLD = "65536"


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


@torch.no_grad()
def lanczos_norms(
    filters: torch.Tensor,
    input_size: int,
    stride: int = 1,
    padding: int | None = None,
    steps: int = 48,
    tol: float = 1e-9,
    max_restarts: int = 30,
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Operator norm of each filter's conv by restarted Lanczos on ``AᵀA`` (float64, all filters at once).

    Each restart runs ``steps`` Lanczos steps with full (twice-applied) reorthogonalisation from the
    previous Ritz vector; it stops when every filter's top Ritz value changed by at most ``tol``
    (relative) or after ``max_restarts``.

    Returns:
        ``(sigma, last_change)``: ``sigma = ||A x||`` for the final unit Ritz vectors (``(C,)``, a lower
        bound of the truth) and the last relative change of the Ritz values (a convergence indicator).
    """
    w = filters.detach().to(torch.float64)
    c = w.shape[0]
    spec, shape = _operator(w, input_size, stride, padding)
    length = math.prod(spec.input_size)
    steps = max(2, min(steps, length))

    def gram(v: torch.Tensor) -> torch.Tensor:  # (C, L) -> (C, L): AᵀA per filter
        return conv_adjoint(conv_apply(v.reshape(shape), w, spec), w, spec).reshape(c, length)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((c, length), generator=gen, dtype=torch.float64).to(w.device)
    prev = torch.zeros(c, dtype=torch.float64, device=w.device)
    change = float("inf")
    for _ in range(max_restarts):
        basis = torch.zeros((steps, c, length), dtype=torch.float64, device=w.device)
        tri = torch.zeros((c, steps, steps), dtype=torch.float64, device=w.device)
        q = x / x.norm(dim=1, keepdim=True)
        for j in range(steps):
            basis[j] = q
            z = gram(q)
            tri[:, j, j] = (q * z).sum(1)
            for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
                h = torch.einsum("mcl,cl->mc", basis[: j + 1], z)
                z = z - torch.einsum("mc,mcl->cl", h, basis[: j + 1])
            if j + 1 < steps:
                b = z.norm(dim=1)
                tri[:, j, j + 1] = b
                tri[:, j + 1, j] = b
                q = z / b.clamp_min(1e-300)[:, None]
        evals, evecs = torch.linalg.eigh(tri)
        x = torch.einsum("cm,mcl->cl", evecs[:, :, -1], basis)
        theta = evals[:, -1]
        change = float(((theta - prev).abs() / theta.clamp_min(1e-300)).max())
        prev = theta
        if change <= tol:
            break
    x = x / x.norm(dim=1, keepdim=True)
    sigma = conv_apply(x.reshape(shape), w, spec).reshape(c, -1).norm(dim=1)
    return sigma.cpu(), change


def reference_norms(
    filters: torch.Tensor, input_size: int, stride: int = 1, padding: int | None = None, dense_max: int = 32
) -> tuple[torch.Tensor, str, float]:
    """Exact norms: dense for ``input_size <= dense_max``, converged Lanczos beyond.

    Returns:
        ``(sigma (C,), method ("dense" | "lanczos"), last relative change (0 for dense))``.
    """
    if input_size <= dense_max:
        return dense_norms(filters, input_size, stride, padding), "dense", 0.0
    sigma, change = lanczos_norms(filters, input_size, stride, padding)
    return sigma, "lanczos", change


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


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _peak_worker(argv: Sequence[str]) -> None:
    """Entry point of the measuring process: prints ``{"peak_bytes": ...}`` as JSON."""
    cfg = json.loads(argv[0])
    w = _make_weight(cfg["channels"], cfg["spatial_dims"], cfg["kernel"], cfg["device"])
    _evaluate(w, cfg["input_size"], cfg["implementation"])  # warm-up (workspaces, grad buffer)
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _evaluate(w, cfg["input_size"], cfg["implementation"])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        w.grad = None
        base = _read_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
            fh.write("5")
        _evaluate(w, cfg["input_size"], cfg["implementation"])
        peak = (_read_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_bytes": int(peak)}))


def measure_peak_bytes(
    channels: int, spatial_dims: int, input_size: int, implementation: str, device: str = "cpu", kernel: int = 3
) -> int:
    """Peak transient memory (bytes) of one bound evaluation, measured in a fresh process.

    Raises:
        RuntimeError: if the measuring process fails (its stderr is included).
    """
    cfg = dict(channels=channels, spatial_dims=spatial_dims, input_size=input_size,
               implementation=implementation, device=device, kernel=kernel)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=_MALLOC_MMAP_THRESHOLD)
    code = "import sys; from invseg.analysis.bound_accuracy import _peak_worker; _peak_worker(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory worker failed for {cfg}:\n{proc.stderr[-4000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


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


# --- reporting ------------------------------------------------------------------------------------


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_accuracy_table(records: Sequence[AccuracyRecord]) -> str:
    """Plain-text table: per (N, stride), median [IQR] overestimation (%) of each bound."""
    head = f"{'N':>4} {'s':>2} {'filters':>7} {'exact by':>8} " + " ".join(
        f"{name + ' median [q25, q75] %':>34}" for name in BOUNDS) + f" {'min bound/exact':>16}"
    lines = [head, "-" * len(head)]
    for r in records:
        cells = " ".join(
            f"{100 * r.median[b]:>10.3f} [{100 * r.q25[b]:>9.3f}, {100 * r.q75[b]:>9.3f}]" for b in BOUNDS)
        lines.append(f"{r.input_size:>4} {r.stride:>2} {r.filters:>7} {r.reference:>8} {cells} "
                     f"{min(r.min_ratio.values()):>16.9f}")
    return "\n".join(lines)


def format_cost_table(records: Sequence[CostRecord]) -> str:
    """Plain-text table of the time and peak memory of one bound evaluation."""
    head = (f"{'dims':>4} {'C':>4} {'N':>4} {'dev':>4} {'chunked s':>10} {'chunked MiB':>11} "
            f"{'dense s':>9} {'dense MiB':>10} {'one FFT MiB':>11}")
    lines = [head, "-" * len(head)]
    for r in records:
        dt = "-" if r.dense_time_s is None else f"{r.dense_time_s:.3f}"
        lines.append(f"{r.spatial_dims:>4} {r.channels:>4} {r.input_size:>4} {r.device:>4} "
                     f"{r.chunked_time_s:>10.3f} {_mib(r.chunked_peak_bytes):>11} {dt:>9} "
                     f"{_mib(r.dense_peak_bytes):>10} {_mib(r.fft_bytes):>11}")
    return "\n".join(lines)


def plot_bound_accuracy(records: Sequence[AccuracyRecord], path: str | Path) -> Path:
    """Median (line) and IQR (band) of the overestimation vs N, one panel per stride; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    strides = sorted({r.stride for r in records})
    fig, axes = plt.subplots(1, len(strides), figsize=(5 * len(strides), 4), squeeze=False)
    for ax, s in zip(axes[0], strides):
        rs = sorted((r for r in records if r.stride == s), key=lambda r: r.input_size)
        ns = [r.input_size for r in rs]
        for name in BOUNDS:
            med = [max(100 * r.median[name], 1e-6) for r in rs]
            lo = [max(100 * r.q25[name], 1e-6) for r in rs]
            hi = [max(100 * r.q75[name], 1e-6) for r in rs]
            label = {"paper": "paper (grid N+2p" + (", ||PK||<=||K||)" if s > 1 else ")"),
                     "invseg": "invseg (min over grids" + (", aliasing)" if s > 1 else ")")}[name]
            ax.plot(ns, med, marker="o", label=label)
            ax.fill_between(ns, lo, hi, alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input size N")
        ax.set_ylabel("relative overestimation (%)")
        ax.set_title(f"Gaussian 3x3 filters, stride {s}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: str | Path, accuracy: Sequence[AccuracyRecord], cost: Sequence[CostRecord],
               meta: dict) -> Path:
    """Write both result lists and ``meta`` (machine, protocol) as JSON."""
    path = Path(path)
    payload = {"meta": meta, "accuracy": [asdict(r) for r in accuracy], "cost": [asdict(r) for r in cost]}
    path.write_text(json.dumps(payload, indent=2))
    return path
