"""Measured memory sweeps: the common runner, and invseg's SN state vs the naive method (issue 7).

Each sweep is a grid of training steps measured one by one in fresh processes with
:func:`invseg.analysis.measure_step` (peak RSS of the step on CPU, CUDA peak counters on GPU; DESIGN §4).
This module holds the cases, records, runner and files shared by both sweeps, and the SN comparison; the
IUNet-vs-depth sweep (``scripts/bench_memory.py``) is :mod:`invseg.experiments.memory_depth`.

* **SN comparison** (:class:`MemoryCompareConfig`, ``scripts/memory_compare.py``): a 3D IUNet and a plain
  3D DS-conv stack (:class:`invseg.nets.ds_stack.DSStack`) with SN method ``"fft"`` (invseg), ``"naive"``
  (warm-start full-operator power method) and ``"none"``, over batch sizes and volume sizes.

Every measured step is the training loop's step including the once-per-step spectral update
(``post_step`` = :func:`invseg.analysis.memory.update_and_record_state`, which calls
:func:`invseg.layers.update_spectral_state`). That hook also writes, once, the persistent SN state of the
measured model after its first step (:func:`invseg.analysis.memory.spectral_state_summary`, which uses the
library's accounting :func:`invseg.spectral.state_bytes`) to the file named by the environment variable
:data:`invseg.analysis.memory.STATE_FILE_ENV`; the state is therefore measured on
the very model whose step is measured, at the measured size (the naive buffers are allocated lazily at the
first forward).

What the numbers mean (see :class:`MemoryRecord`): ``peak_bytes`` is the step's peak *above* the memory
held right before the step, so it excludes what persists between steps - parameters, optimizer state,
and the SN state. The cost of an SN method is therefore ``state_bytes + peak_bytes`` (reported as
``state_plus_peak_bytes``): persistent state plus the step's transient peak. On CUDA,
``run_peak_bytes = baseline - startup + peak`` is additionally the whole training peak (model, optimizer,
input, state, activations); on CPU that difference also holds lazily loaded library memory (oneDNN,
thread pools: 20-200 MB that vary from process to process) and is only reported in the JSON.

Known effect of the batched update: :func:`invseg.layers.update_spectral_state` runs one chunked spectrum
search over all equal-geometry depthwise layers at once (channels concatenated) after
``optimizer.step()``; its transient grows with the number of layers up to the chunk budget
(``invseg.spectral.depthwise.DEFAULT_MEMORY_BUDGET``, 64 MiB). On small inputs it can be the step's peak
(and make the "fft" peak grow with depth where "none" stays flat); it drops out of the peak once the
step's activations exceed it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from invseg.analysis.memory import STATE_FILE_ENV, StepSpec, WorkerError, format_bytes, measure_step
from invseg.utils import check_ints

__all__ = [
    "MeasureConfig",
    "IUNetArch",
    "DSStackArch",
    "MemoryCompareConfig",
    "MemoryCase",
    "MemoryRecord",
    "sn_compare_cases",
    "measure_case",
    "run_cases",
    "sn_summary",
    "format_sn_table",
    "format_sn_summary",
    "plot_sn_memory",
    "machine_info",
    "write_results",
    "SweepRun",
    "run_sweep",
]


_IUNET_FACTORY = "invseg.nets:create_model"
_DS_STACK_FACTORY = "invseg.nets.ds_stack:DSStack"
_POST_STEP = "invseg.analysis.memory:update_and_record_state"

SN_NETWORKS = ("iunet", "ds_stack")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass
class MeasureConfig:
    """How each training step is measured (:class:`invseg.analysis.StepSpec` fields and the runner)."""

    device: Literal["cpu", "cuda"] = "cpu"  # cpu: peak RSS of the step in a fresh process; cuda: CUDA peak
    threads: int | None = 1  # torch threads per CPU worker (1 is fastest on a shared CPU); unused on cuda
    steps: int = 1  # measured steps after the warm-up (peak = max, time = median)
    warmup: int = 1  # warm-up steps (the first allocates gradients, optimizer state and SN state)
    optimizer: Literal["sgd", "adam"] = "sgd"  # optimizer of the step
    lr: float = 1e-3  # learning rate (the weights change, so the SN update does real work)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision of forward + loss
    timeout: float = 900.0  # seconds per measured point before the worker is killed
    on_error: Literal["skip", "raise"] = "skip"  # skip: a failed point (OOM, timeout) is reported, not fatal
    jobs: int = 1  # workers measured concurrently (memory is per process; times get noisier when > 1)


@dataclass
class IUNetArch:
    """The 3D IUNet of both sweeps (``invseg.nets.IUNet`` arguments)."""

    channels: list[int] = field(default_factory=lambda: [8, 32])  # channels per level (3D: x4 per level)
    num_blocks: int = 2  # blocks per level and path (SN comparison only; the depth sweep sets its own)
    coupling: Literal["additive", "affine"] = "additive"  # coupling type
    K: float = 0.9  # Lipschitz bound of each sub-network
    scaling: Literal["hard", "soft"] = "hard"  # Lipschitz scaling
    memory_efficient: bool = True  # recompute activations by inversion (SN comparison only)


@dataclass
class DSStackArch:
    """The plain 3D DS-conv stack (``invseg.nets.ds_stack.DSStack`` arguments)."""

    channels: int = 32  # width of the DS convs
    depth: int = 8  # number of SN DS convs
    K: float = 1.0  # Lipschitz bound of each DS conv


@dataclass
class MemoryCompareConfig:
    """SN state and step memory: invseg ("fft") vs the naive power method vs none (issue 7)."""

    models: list[Literal["iunet", "ds_stack"]] = field(default_factory=lambda: ["iunet", "ds_stack"])  # networks
    methods: list[Literal["fft", "naive", "torch", "none"]] = field(
        default_factory=lambda: ["fft", "naive", "none"]
    )  # spectral normalization methods
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2])  # volumes per step
    sizes: list[int] = field(default_factory=lambda: [16, 32])  # cubic volume edges (CPU)
    cuda_sizes: list[int] | None = field(default_factory=lambda: [32, 64, 96, 128])  # edges on cuda (None: sizes)
    in_channels: int = 1  # input channels
    out_channels: int = 2  # classes (cross-entropy on random labels)
    iunet: IUNetArch = field(default_factory=IUNetArch)  # the IUNet
    ds_stack: DSStackArch = field(default_factory=DSStackArch)  # the DS-conv stack
    measure: MeasureConfig = field(default_factory=MeasureConfig)  # measurement settings
    out_dir: str = "outputs/memory_compare"  # results.json, config.yaml, memory_vs_size.png

    def effective_sizes(self) -> list[int]:
        """``cuda_sizes`` on CUDA when set, else ``sizes``."""
        return _effective_sizes(self.measure.device, self.sizes, self.cuda_sizes)


def _effective_sizes(device: str, sizes: Sequence[int], cuda_sizes: Sequence[int] | None) -> list[int]:
    return list(cuda_sizes) if device == "cuda" and cuda_sizes is not None else list(sizes)


def _check_positive_list(name: str, values: Sequence[int]) -> None:
    check_ints(values, name)


def _check_measure(m: MeasureConfig) -> None:
    if m.threads is not None and m.threads < 1:
        raise ValueError(f"measure.threads must be None or >= 1, got {m.threads}")
    if m.jobs < 1:
        raise ValueError(f"measure.jobs must be >= 1, got {m.jobs}")
    if not m.timeout > 0:
        raise ValueError(f"measure.timeout must be > 0 seconds, got {m.timeout}")


def _check_sizes(sizes: Sequence[int], multiple: int) -> None:
    _check_positive_list("sizes", sizes)
    bad = [s for s in sizes if s % multiple]
    if bad:
        raise ValueError(f"every size must be a multiple of {multiple} (2**(levels - 1) of the networks), got {bad}")


# --------------------------------------------------------------------------------------------
# Depth rules
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# SN state accounting inside the worker
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Cases and records
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryCase:
    """One point of a sweep: labels for the tables and the :class:`StepSpec` to measure.

    Attributes:
        network: ``"iunet"``, ``"iunet_plain"``, ``"monai_unet"`` or ``"ds_stack"``.
        sn_method: SN method of the network (``"-"`` for MONAI's UNet).
        batch: batch size.
        size: cubic volume edge (the input is ``(batch, in_channels, size, size, size)``).
        depth: invertible blocks in total (depth sweep), DS convs (``ds_stack``), or ``None``.
        blocks: IUNet blocks per level, MONAI ``[num_res_units]``, or ``None``.
        spec: the step to measure.
    """

    network: str
    sn_method: str
    batch: int
    size: int
    depth: int | None
    blocks: list[int] | None
    spec: StepSpec


@dataclass
class MemoryRecord:
    """Measurement of one :class:`MemoryCase` (``error`` set and numbers ``None`` if the worker failed).

    Attributes:
        network, sn_method, batch, size, depth, blocks: from the case.
        peak_bytes: measured peak of the step above the memory held right before it
            (:attr:`invseg.analysis.StepMeasurement.peak_bytes`); excludes the SN state.
        state_bytes: persistent SN state of the measured model after its first step
            (:func:`invseg.analysis.memory.spectral_state_summary`).
        state_plus_peak_bytes: ``state_bytes + peak_bytes``: what the method costs beyond the
            model, optimizer and input.
        run_peak_bytes: ``baseline - startup + peak``: the training peak above the empty process
            (exact on CUDA; on CPU it also counts lazily loaded library memory).
        step_time_s: median step time, the SN update included.
        saved_tensor_bytes, param_bytes: from the measurement.
        num_state_tensors, num_sn_layers: from the state record.
        device, device_name, threads, torch_version: where it ran.
        error: the worker's error message (first line and tail), or ``None``.
    """

    network: str
    sn_method: str
    batch: int
    size: int
    depth: int | None
    blocks: list[int] | None
    peak_bytes: int | None = None
    state_bytes: int | None = None
    state_plus_peak_bytes: int | None = None
    run_peak_bytes: int | None = None
    step_time_s: float | None = None
    saved_tensor_bytes: int | None = None
    param_bytes: int | None = None
    num_state_tensors: int | None = None
    num_sn_layers: int | None = None
    device: str = ""
    device_name: str = ""
    threads: int = 0
    torch_version: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the point was measured."""
        return self.error is None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def _spec(cfg_measure: MeasureConfig, factory: str, kwargs: dict, shape: tuple, post_step: str | None) -> StepSpec:
    return StepSpec(
        factory, kwargs, input_shape=shape, target="segmentation", device=cfg_measure.device,
        precision=cfg_measure.precision, optimizer=cfg_measure.optimizer, lr=cfg_measure.lr,
        steps=cfg_measure.steps, warmup=cfg_measure.warmup,
        threads=cfg_measure.threads if cfg_measure.device == "cpu" else None, post_step=post_step,
    )


def _iunet_levels(channels: Sequence[int]) -> int:
    from invseg.nets import iunet_channel_plan

    _check_positive_list("channels", channels)
    iunet_channel_plan(3, list(channels))  # ValueError naming the rule
    return len(channels)



def sn_compare_cases(cfg: MemoryCompareConfig) -> list[MemoryCase]:
    """The grid of :class:`MemoryCompareConfig`: models x batch sizes x sizes x methods.

    Raises:
        ValueError: on an empty/invalid list or a size the IUNet cannot take.
    """
    _check_measure(cfg.measure)
    if not cfg.models or any(m not in SN_NETWORKS for m in cfg.models):
        raise ValueError(f"models must be a non-empty list from {SN_NETWORKS}, got {cfg.models!r}")
    if not cfg.methods:
        raise ValueError("methods must be a non-empty list")
    _check_positive_list("batch_sizes", cfg.batch_sizes)
    levels = _iunet_levels(cfg.iunet.channels) if "iunet" in cfg.models else 1
    sizes = cfg.effective_sizes()
    _check_sizes(sizes, 2 ** (levels - 1))
    cases = []
    for model in cfg.models:
        for batch in cfg.batch_sizes:
            for size in sizes:
                shape = (batch, cfg.in_channels, size, size, size)
                for method in cfg.methods:
                    if model == "iunet":
                        a = cfg.iunet
                        kwargs = dict(name="iunet", spatial_dims=3, in_channels=cfg.in_channels,
                                      out_channels=cfg.out_channels, channels=list(a.channels),
                                      num_blocks=a.num_blocks, coupling=a.coupling, K=a.K, scaling=a.scaling,
                                      sn_method=method, memory_efficient=a.memory_efficient)
                        spec = _spec(cfg.measure, _IUNET_FACTORY, kwargs, shape, _POST_STEP)
                        depth, blocks = None, [a.num_blocks] * len(a.channels)
                    else:
                        a = cfg.ds_stack
                        kwargs = dict(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                      channels=a.channels, depth=a.depth, K=a.K, sn_method=method)
                        spec = _spec(cfg.measure, _DS_STACK_FACTORY, kwargs, shape, _POST_STEP)
                        depth, blocks = a.depth, None
                    cases.append(MemoryCase(model, method, batch, size, depth, blocks, spec))
    return cases


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure_case(case: MemoryCase, *, timeout: float = 900.0, on_error: str = "skip") -> MemoryRecord:
    """Measure one case in a fresh process (:func:`invseg.analysis.measure_step`) with its SN state.

    Args:
        case: the point to measure.
        timeout: seconds before the worker is killed. Default 900.
        on_error: ``"skip"`` (default) returns a record with ``error`` set when the worker fails (out of
            memory, timeout); ``"raise"`` re-raises the :class:`invseg.analysis.WorkerError`.

    Raises:
        ValueError: ``on_error`` not ``"skip"``/``"raise"``.
        RuntimeError: the worker ran ``update_and_record_state`` but wrote no state record.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    labels = dict(network=case.network, sn_method=case.sn_method, batch=case.batch, size=case.size,
                  depth=case.depth, blocks=case.blocks)
    with tempfile.TemporaryDirectory(prefix="invseg_state_") as tmp:
        state_path = Path(tmp) / "state.json"
        try:
            m = measure_step(case.spec, timeout=timeout, env={STATE_FILE_ENV: str(state_path)})
        except WorkerError as err:
            if on_error == "raise":
                raise
            text = str(err).strip().splitlines()
            short = text[0] + (f" ... {text[-1]}" if len(text) > 1 else "")
            return MemoryRecord(**labels, error=short)
        if state_path.is_file():
            state = json.loads(state_path.read_text())
        elif case.spec.post_step is None:  # MONAI's UNet: no SN
            state = {"state_bytes": 0, "num_state_tensors": 0, "num_sn_layers": 0}
        else:
            raise RuntimeError(f"the worker for {case.spec.factory} wrote no SN state record to {state_path}")
    return MemoryRecord(
        **labels,
        peak_bytes=m.peak_bytes,
        state_bytes=state["state_bytes"],
        state_plus_peak_bytes=state["state_bytes"] + m.peak_bytes,
        run_peak_bytes=m.baseline_bytes - m.startup_bytes + m.peak_bytes,
        step_time_s=m.step_time_s,
        saved_tensor_bytes=m.saved_tensor_bytes,
        param_bytes=m.param_bytes,
        num_state_tensors=state["num_state_tensors"],
        num_sn_layers=state["num_sn_layers"],
        device=m.device,
        device_name=m.device_name,
        threads=m.threads,
        torch_version=m.torch_version,
    )


def run_cases(cases: Sequence[MemoryCase], measure: MeasureConfig | None = None,
              progress: Callable[[str], None] | None = None) -> list[MemoryRecord]:
    """Measure every case, each in its own process, ``measure.jobs`` at a time; records in case order.

    Args:
        cases: the grid (:func:`depth_sweep_cases`, :func:`sn_compare_cases`).
        measure: timeout, error policy and concurrency (default :class:`MeasureConfig`). Concurrent
            workers do not change each other's memory numbers (each is its own process / CUDA
            context) but do share the cores or the GPU: keep ``jobs=1`` for timings.
        progress: called with one line per finished case.
    """
    measure = measure or MeasureConfig()
    _check_measure(measure)
    cases = list(cases)

    def one(i_case):
        i, case = i_case
        rec = measure_case(case, timeout=measure.timeout, on_error=measure.on_error)
        if progress is not None:
            what = f"{case.network} sn={case.sn_method} b={case.batch} {case.size}^3 depth={case.depth}"
            if rec.ok:
                progress(f"[{i + 1}/{len(cases)}] {what}: peak {format_bytes(rec.peak_bytes)}, "
                         f"state {format_bytes(rec.state_bytes)}, {rec.step_time_s:.2f} s")
            else:
                progress(f"[{i + 1}/{len(cases)}] {what}: FAILED {rec.error}")
        return rec

    if measure.jobs == 1:
        return [one(ic) for ic in enumerate(cases)]
    with ThreadPoolExecutor(max_workers=measure.jobs) as pool:  # threads only wait on subprocesses
        return list(pool.map(one, enumerate(cases)))


# --------------------------------------------------------------------------------------------
# Summaries and tables
# --------------------------------------------------------------------------------------------


def _fmt(n: int | None) -> str:
    return "failed" if n is None else format_bytes(n)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt_ratio(r: float | None, digits: int = 2) -> str:
    return "-" if r is None else f"{r:.{digits}f}"


def sn_summary(records: Sequence[MemoryRecord]) -> list[dict]:
    """Per (network, batch) at the largest size where "fft" and "naive" (and "none") were measured.

    Returns:
        One dict per (network, batch): ``size``, ``state_naive_over_fft``, ``state_plus_peak_naive_over_fft``,
        ``peak_naive_over_fft``, ``peak_fft_over_none`` (step peak ratio, overhead = value - 1),
        ``state_plus_peak_fft_over_none``, ``time_fft_over_none``, ``time_naive_over_fft``, and the
        raw ``state_bytes`` per method. Ratios are ``None`` where a method is missing or failed.
    """
    out = []
    for net, batch in sorted({(r.network, r.batch) for r in records}):
        rows = {(r.sn_method, r.size): r for r in records if r.network == net and r.batch == batch and r.ok}
        sizes = sorted({s for (m, s) in rows if m == "fft"} & {s for (m, s) in rows if m == "naive"}) or \
            sorted({s for (_, s) in rows})
        if not sizes:
            continue
        size = sizes[-1]
        f, n, z = (rows.get((m, size)) for m in ("fft", "naive", "none"))

        def attr(r, a):
            return None if r is None else getattr(r, a)

        out.append({
            "network": net,
            "batch": batch,
            "size": size,
            "state_bytes": {m: attr(rows.get((m, size)), "state_bytes") for m in ("fft", "naive", "none")},
            "state_naive_over_fft": _ratio(attr(n, "state_bytes"), attr(f, "state_bytes")),
            "state_plus_peak_naive_over_fft": _ratio(attr(n, "state_plus_peak_bytes"), attr(f, "state_plus_peak_bytes")),
            "peak_naive_over_fft": _ratio(attr(n, "peak_bytes"), attr(f, "peak_bytes")),
            "peak_fft_over_none": _ratio(attr(f, "peak_bytes"), attr(z, "peak_bytes")),
            "state_plus_peak_fft_over_none": _ratio(attr(f, "state_plus_peak_bytes"), attr(z, "state_plus_peak_bytes")),
            "time_fft_over_none": _ratio(attr(f, "step_time_s"), attr(z, "step_time_s")),
            "time_naive_over_fft": _ratio(attr(n, "step_time_s"), attr(f, "step_time_s")),
        })
    return out


def format_sn_table(records: Sequence[MemoryRecord]) -> str:
    """Markdown table of the SN comparison, one row per measured point.

    Columns: SN state (persistent, held between steps), step peak (measured above the memory held
    before the step, so it excludes the state), state + step peak (the method's whole cost beyond
    model, optimizer and input), step time (SN update included).
    """
    head = ["network", "batch", "size", "SN method", "SN state", "step peak", "state + step peak", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {m: i for i, m in enumerate(("fft", "naive", "torch", "none"))}
    for r in sorted(records, key=lambda r: (r.network, r.batch, r.size, order.get(r.sn_method, 9))):
        row = [r.network, str(r.batch), f"{r.size}³", r.sn_method]
        if r.ok:
            row += [_fmt(r.state_bytes), _fmt(r.peak_bytes), _fmt(r.state_plus_peak_bytes), f"{r.step_time_s:.2f}"]
        else:
            row += ["failed", "failed", "failed", r.error[:60]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_sn_summary(summary: Sequence[dict]) -> str:
    """Markdown table of :func:`sn_summary`: naive/invseg ratios and the invseg overhead over "none"."""
    head = ["network", "batch", "size", "state fft", "state naive", "state naive/fft", "(state+peak) naive/fft",
            "step peak fft/none", "(state+peak) fft/none", "time fft/none", "time naive/fft"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        lines.append("| " + " | ".join([
            s["network"], str(s["batch"]), f"{s['size']}³",
            _fmt(s["state_bytes"]["fft"]) if s["state_bytes"]["fft"] is not None else "-",
            _fmt(s["state_bytes"]["naive"]) if s["state_bytes"]["naive"] is not None else "-",
            _fmt_ratio(s["state_naive_over_fft"], 0), _fmt_ratio(s["state_plus_peak_naive_over_fft"]),
            _fmt_ratio(s["peak_fft_over_none"], 3), _fmt_ratio(s["state_plus_peak_fft_over_none"], 3),
            _fmt_ratio(s["time_fft_over_none"]), _fmt_ratio(s["time_naive_over_fft"]),
        ]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no backend switch)
# --------------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_sn_memory(records: Sequence[MemoryRecord], path: str | os.PathLike, title: str = "") -> Path:
    """Memory vs volume size (log scale), one panel per (network, batch); saved as PNG.

    Solid lines: SN state + step peak; dashed: the persistent SN state alone (absent for "none").
    """
    panels = sorted({(r.network, r.batch) for r in records})
    if not panels:
        raise ValueError("records is empty: nothing to plot")
    fig, axes = _figure(1, len(panels), 4.0, 3.4)
    colors = {"fft": "C0", "naive": "C3", "torch": "C2", "none": "C7"}
    for ax, (net, batch) in zip(axes[0], panels):
        for method in ("fft", "naive", "torch", "none"):
            rows = sorted((r for r in records if r.network == net and r.batch == batch and r.sn_method == method
                           and r.ok), key=lambda r: r.size)
            if not rows:
                continue
            x = [r.size for r in rows]
            ax.plot(x, [r.state_plus_peak_bytes / 2**20 for r in rows], "o-", color=colors[method],
                    label=f"{method}: state + step peak")
            if method != "none":
                ax.plot(x, [max(r.state_bytes, 1) / 2**20 for r in rows], "s--", color=colors[method],
                        label=f"{method}: SN state")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r.size for r in records}))
        ax.set_xlabel("volume edge N (input N³)")
        ax.set_ylabel("MiB")
        ax.set_title(f"{net}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Results on disk
# --------------------------------------------------------------------------------------------


def machine_info(records: Sequence[MemoryRecord] = ()) -> dict:
    """Where the sweep ran: CPU model and logical cores, OS, Python, torch, and the workers' device name."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ok = [r for r in records if r.ok]
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": ok[0].device if ok else "",
        "device_name": ok[0].device_name if ok else "",
        "worker_threads": ok[0].threads if ok else None,
    }


def write_results(out_dir: str | os.PathLike, cfg: Any, records: Sequence[MemoryRecord], summary: Any,
                  name: str = "results.json") -> Path:
    """Write ``results.json`` (machine, summary, records) and the resolved ``config.yaml`` into ``out_dir``.

    Returns:
        The path of the JSON file.
    """
    from invseg.config import save_config, to_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    payload = {"machine": machine_info(records), "config": to_dict(cfg), "summary": summary,
               "records": [r.to_dict() for r in records]}
    path = out / name
    path.write_text(json.dumps(payload, indent=1))
    return path


@dataclass
class SweepRun:
    """What :func:`run_sweep` measured and wrote."""

    records: list  # MemoryRecord per case
    summary: Any  # what ``summarize(records)`` returned
    machine: dict  # machine_info(records)
    path: Path  # the results.json written


def run_sweep(cfg: Any, cases: Sequence[MemoryCase], summarize: Callable[[Sequence[MemoryRecord]], Any],
              plot: Callable[..., Path], png_name: str) -> SweepRun:
    """Measure ``cases`` (progress lines on stderr), summarize, write ``results.json`` + ``config.yaml`` into
    ``cfg.out_dir`` and the plot ``png_name`` (when any case succeeded): the common body of both memory sweeps
    (``scripts/memory_compare.py``, ``scripts/bench_memory.py``)."""
    import sys

    records = run_cases(cases, cfg.measure, progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary = summarize(records)
    out = Path(cfg.out_dir)
    path = write_results(out, cfg, records, summary)
    machine = machine_info(records)
    if any(r.ok for r in records):
        title = f"{machine['device_name'] or machine['cpu']} ({machine['device']}), torch {machine['torch']}"
        plot(records, out / png_name, title=title)
    return SweepRun(records, summary, machine, path)
