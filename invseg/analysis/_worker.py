"""The fresh-process worker of :mod:`invseg.analysis.memory` (private): the one place that measures peak memory.

Usage: ``python -m invseg.analysis._worker RESULT_JSON`` with a job as JSON on stdin:

* ``{"kind": "step", "spec": StepSpec.to_dict()}``: training steps (:func:`~invseg.analysis.memory.measure_step`);
  writes the :class:`~invseg.analysis.memory.StepMeasurement` fields;
* ``{"kind": "call", "setup": "module:callable", "kwargs": {...}, "device": "cpu" | "cuda"}``: ``setup(**kwargs)``
  returns a function without arguments, run once to warm up and then measured
  (:func:`~invseg.analysis.memory.measure_call`); writes ``{"peak_bytes", "time_s"}``.

Writes the result as JSON to ``RESULT_JSON``; on any error it prints the traceback to stderr and exits
non-zero. Meant to run in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (DESIGN §4).
"""

from __future__ import annotations

import gc
import importlib
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from invseg.analysis.memory import SavedTensorCounter, StepSpec
from invseg.train.amp import autocast_context, make_grad_scaler
from invseg.train.step import train_step

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
# After writing 5 to clear_refs, VmHWM must equal VmRSS up to what reading /proc allocates.
_RESET_TOLERANCE = 1 << 20


def _load_callable(path: str, what: str) -> Callable:
    """Import ``"package.module:callable"``; errors name ``what`` and the path."""
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {what} {path!r}: {err}") from err
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ImportError(f"cannot import {what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TypeError(f"{what} {path!r} is not callable")
    return obj


def _proc_status() -> dict:
    """VmRSS and VmHWM in bytes."""
    out = {}
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024  # reported in kB
    except OSError as err:
        raise RuntimeError(f"CPU memory measurement needs Linux {_PROC_STATUS}: {err}") from None
    if set(out) != {"VmRSS", "VmHWM"}:
        raise RuntimeError(f"{_PROC_STATUS} has no VmRSS/VmHWM lines; cannot measure CPU memory")
    return out


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (write 5 to clear_refs); return that RSS."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(
            f"cannot reset the peak RSS: writing '5' to {_CLEAR_REFS} failed ({err}). The CPU "
            "measurement needs Linux >= 4.0 with a writable clear_refs; no fallback is used."
        ) from None
    status = _proc_status()
    if status["VmHWM"] - status["VmRSS"] > _RESET_TOLERANCE:
        raise RuntimeError(
            f"writing '5' to {_CLEAR_REFS} did not reset VmHWM (VmHWM={status['VmHWM']}, "
            f"VmRSS={status['VmRSS']}); this kernel does not support peak-RSS reset"
        )
    return status["VmRSS"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the job's device is 'cuda' but torch.cuda.is_available() is False")
    return device


def _measured(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[list[int], list[int], list[float]]:
    """Peak (above the memory in use right before it), baseline and wall time of ``repeats`` calls of ``fn``:
    CUDA peak counters, or VmHWM after resetting it through clear_refs on the CPU (DESIGN §4)."""
    peaks, baselines, times = [], [], []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        else:
            baseline = _reset_peak_rss()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status()["VmHWM"]
        peaks.append(peak - baseline)
        baselines.append(baseline)
    return peaks, baselines, times


def run_call(setup: str, kwargs: dict, device: str) -> dict:
    """Build ``setup(**kwargs)``, call the function it returns once (warm-up), then measure one call."""
    dev = _device(device)
    fn = _load_callable(setup, "setup")(**kwargs)
    if not callable(fn):
        raise TypeError(f"setup {setup!r} must return a function without arguments, got {type(fn).__name__}")
    fn()  # warm-up: workspaces, gradient buffers, kernels
    _sync(dev)
    peaks, _, times = _measured(fn, dev, 1)
    return {"peak_bytes": int(peaks[0]), "time_s": float(times[0])}


def run(spec: StepSpec) -> dict:
    """Build the model, warm up, measure; return the StepMeasurement fields (without ``spec``)."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = _device(spec.device)
    factory = _load_callable(spec.factory, "factory")
    post_step = _load_callable(spec.post_step, "post_step") if spec.post_step else None

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        startup = torch.cuda.memory_allocated(device)
    else:
        startup = _proc_status()["VmRSS"]

    torch.manual_seed(spec.seed)
    model = factory(**spec.factory_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"factory {spec.factory!r} returned {type(model).__name__}, not an nn.Module")
    model = model.to(device).train()
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError(f"model from {spec.factory!r} has no trainable parameters")
    # Unique parameters (shared ones once).
    unique = {p.data_ptr(): p for p in params}.values()
    param_bytes = sum(p.numel() * p.element_size() for p in unique)
    num_params = sum(p.numel() for p in unique)

    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(params, lr=spec.lr)
    scaler = make_grad_scaler(device.type, spec.precision)  # enabled for fp16 only, as in the trainers

    x = torch.randn(spec.input_shape, device=device)  # (B, C, *spatial)
    labels: list = []  # built lazily from the first output's shape

    def loss_fn(out: torch.Tensor, _target: None = None) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model output must be a tensor for target {spec.target!r}, got {type(out).__name__}")
        if spec.target == "sum":
            return out.float().square().mean()
        if out.ndim < 2:
            raise ValueError(f"target {spec.target!r} needs an output (B, classes, ...), got shape {tuple(out.shape)}")
        if spec.target == "classification" and out.ndim != 2:
            raise ValueError(f"target 'classification' needs an output (B, classes), got shape {tuple(out.shape)}")
        classes = out.shape[1]
        if spec.num_classes is not None and spec.num_classes != classes:
            raise ValueError(f"num_classes={spec.num_classes} but the model outputs {classes} channels")
        if not labels:
            g = torch.Generator().manual_seed(spec.seed)
            label = torch.randint(0, classes, (out.shape[0], *out.shape[2:]), generator=g)
            labels.append(label.to(device))
        return F.cross_entropy(out.float(), labels[0])

    updater = (lambda: post_step(model)) if post_step is not None else None

    def step() -> None:  # the trainers' step (invseg.train.step.train_step)
        train_step(model, x, None, loss_fn, optimizer, precision=spec.precision, scaler=scaler, updater=updater)

    # The saved-for-backward bytes of one forward and loss (parameters, buffers and the input excluded:
    # they are in the baseline); this forward also initialises size-dependent spectral state and the labels.
    counter = SavedTensorCounter(exclude=[*params, *model.buffers(), x])
    with autocast_context(device.type, spec.precision), counter:
        loss_fn(model(x))
    for _ in range(spec.warmup):
        step()
    _sync(device)
    peaks, baselines, times = _measured(step, device, spec.steps)

    worst = max(range(len(peaks)), key=peaks.__getitem__)
    return {
        "peak_bytes": int(peaks[worst]),
        "baseline_bytes": int(baselines[worst]),
        "startup_bytes": int(startup),
        "step_time_s": float(statistics.median(times)),
        "saved_tensor_bytes": int(counter.bytes),
        "param_bytes": int(param_bytes),
        "num_params": int(num_params),
        "device": device.type,
        "method": "cuda" if device.type == "cuda" else "rss",
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "peak_bytes_per_step": [int(p) for p in peaks],
        "step_times_s": [float(t) for t in times],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m invseg.analysis._worker RESULT_JSON  (job JSON on stdin)", file=sys.stderr)
        return 2
    job = json.load(sys.stdin)
    if job.get("kind") == "step":
        result = run(StepSpec.from_dict(job["spec"]))
    elif job.get("kind") == "call":
        result = run_call(job["setup"], dict(job.get("kwargs") or {}), job.get("device", "cpu"))
    else:
        raise ValueError(f"unknown job kind {job.get('kind')!r}; expected 'step' or 'call'")
    with open(argv[0], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
