"""The paper's experiments: training time with and without spectral normalization
(§4.4, Table 2) and the per-layer accuracy of the depthwise bounds on MobileNetV2 (§3.3, the 2.80 % /
75.6 % figures), the latter with invseg's aliasing bound for strided layers beside the paper's.

Timing (:func:`time_classifier`): the per-step times come from :func:`invseg.analysis.overhead.run_overhead`
(synthetic tensors, methods interleaved round by round in one process, so ratios are measured side by
side); when a data loader is given, a per-epoch time including data loading and augmentation is measured
too (the paper's protocol), method after method.

Bound accuracy (:func:`mobilenetv2_bound_accuracy`): for each of MobileNetV2's 17 depthwise convs, at the
input size it sees for a ``input_size``² image, the exact operator norm, the paper's bound (single grid
``M = N + 2p``, and ``||S|| <= ||K||`` for stride 2) and invseg's bound (minimum over grids, exact aliasing
formula for strides), and their relative overestimations ``bound / exact - 1``. How the exact norm is
obtained is in :func:`invseg.analysis.bound_accuracy.depthwise_exact_norm`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from invseg.analysis.overhead import OverheadCase, parse_method, run_overhead
from invseg.analysis.bound_accuracy import depthwise_exact_norm
from invseg.spectral import (
    depthwise_bound,
    depthwise_bound_dense,
)
from invseg.utils import check_int

__all__ = [
    "ClassifierTiming",
    "time_classifier",
    "format_timing_table",
    "MOBILENETV2_DEPTHWISE_STRIDES",
    "mobilenetv2_depthwise_weights",
    "LayerBoundAccuracy",
    "mobilenetv2_bound_accuracy",
    "summarize_bound_accuracy",
    "format_bound_accuracy_table",
]


def _ensure_classifiers_registered() -> None:
    """The classifiers register their names when their modules are imported."""
    import invseg.nets.mobilenetv2  # noqa: F401
    import invseg.nets.resnet_ds  # noqa: F401


# --------------------------------------------------------------------------------------------
# Timing (Table 2)
# --------------------------------------------------------------------------------------------


@dataclass
class ClassifierTiming:
    """Training time of one SN method (one row of the Table 2 comparison).

    Attributes:
        model: registry name. method: SN method ("none" = without spectral normalization).
        input_shape: ``(B, C, H, W)`` of the per-step measurement. device, device_name, precision: where.
        step_median_s, step_q25_s, step_q75_s: training-step time (synthetic tensors, no data loading).
        steps: timed steps. step_ratio: median step time / that of "none" (None without "none").
        epoch_s: time of one epoch over the given loader, data loading included (None without data);
            extrapolated from ``epoch_steps`` timed steps when those are fewer than ``steps_per_epoch``.
        epoch_steps: steps timed for the epoch figure. steps_per_epoch: the loader's length.
        epoch_ratio: epoch_s / that of "none".
    """

    model: str
    method: str
    input_shape: tuple[int, ...]
    device: str
    device_name: str
    precision: str
    step_median_s: float
    step_q25_s: float
    step_q75_s: float
    steps: int
    step_ratio: float | None = None
    epoch_s: float | None = None
    epoch_steps: int | None = None
    steps_per_epoch: int | None = None
    epoch_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_epoch(
    model_name: str, model_kwargs: Mapping[str, Any], method: str, loader: Any, device: torch.device,
    precision: str, lr: float, max_steps: int | None, sn_check_every: int, seed: int,
) -> tuple[float, int, int]:
    """Wall time of (up to ``max_steps`` steps of) one training epoch over ``loader``, data included,
    after one untimed warm-up step. Returns ``(epoch_s, timed_steps, steps_per_epoch)``."""
    from invseg.analysis.overhead import cross_entropy
    from invseg.layers import SpectralUpdater
    from invseg.nets import create_model
    from invseg.train.amp import make_grad_scaler
    from invseg.train.step import train_step

    base, mode, every = parse_method(method)  # "project@8": searches and stopping test every 8 steps
    torch.manual_seed(seed)
    model = create_model(model_name, **{**model_kwargs, "sn_method": base, "sn_mode": mode}).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    updater = SpectralUpdater(model, check_every=every if every > 1 else sn_check_every, search_every=every)
    scaler = make_grad_scaler(device.type, precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        train_step(model, x, y, cross_entropy, opt, precision=precision, scaler=scaler, updater=updater)

    total = len(loader)
    it = iter(loader)
    step(*next(it))  # warm-up: first spectral search, allocator, kernels
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    limit = total - 1 if max_steps is None else min(max_steps, total - 1)
    done = 0
    t0 = time.perf_counter()
    for x, y in it:
        if done >= limit:
            break
        step(x, y)
        done += 1
    sync()
    elapsed = time.perf_counter() - t0
    if done == 0:
        return float("nan"), 0, total
    return elapsed * total / done, done, total


def time_classifier(
    model_name: str,
    model_kwargs: Mapping[str, Any],
    batch: int,
    input_size: int,
    num_classes: int,
    methods: Sequence[str] = ("none", "reparam"),
    steps: int = 20,
    device: str = "cpu",
    precision: str = "fp32",
    data: Any = None,
    warmup: int = 2,
    rounds: int = 4,
    lr: float = 1e-3,
    sn_check_every: int = 1,
    sn_search_every: int = 1,
    epoch_steps: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[ClassifierTiming]:
    """Training time per step (and per epoch, given data) with and without spectral normalization.

    Per step: :func:`invseg.analysis.overhead.run_overhead` on synthetic tensors ``(batch, 3, input_size,
    input_size)`` -- zero_grad, forward under autocast, cross entropy, backward, SGD step, spectral update
    -- with the methods interleaved round by round in this process; the median is reported.
    Per epoch (only when ``data`` is a loader of ``(images, labels)`` batches): for each method in turn
    a fresh model trains over the loader (one untimed warm-up step, then up to ``epoch_steps`` timed steps,
    data loading and augmentation included) and the time is scaled to the loader's length.

    Args:
        model_name: registry name (``"resnet34ds"``, ``"mobilenetv2"``).
        model_kwargs: constructor arguments except ``method`` (``num_classes`` is added if missing).
        batch: images per step (synthetic tensors). input_size: image side. num_classes: classes.
        methods: SN variants of :func:`invseg.analysis.overhead.parse_method`; include ``"none"`` to get ratios
            (default ``("none", "reparam")``).
        steps: timed steps per method (split over ``rounds``). warmup: untimed steps per method.
        device: ``"cpu"`` or ``"cuda[:i]"``. precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA).
        data: optional loader for the per-epoch time (None: synthetic tensors only).
        lr: SGD learning rate (does not change the step time). sn_check_every: see
            :class:`invseg.layers.SpectralUpdater`. sn_search_every: ``N > 1`` times ``"project"`` as ``"project@N"``
            (searches and the stopping test every N steps, whole cycles; see
            :func:`invseg.analysis.overhead.parse_method`). epoch_steps: cap of timed steps per epoch (None: all).
        seed: seed of the synthetic batch and the initialization. progress: called with status lines.

    Returns:
        One :class:`ClassifierTiming` per method, in ``methods`` order.

    Raises:
        ValueError: Bad sizes, an unknown method, or ``device="cuda"`` without CUDA.
    """
    for name, value in (("batch", batch), ("input_size", input_size), ("num_classes", num_classes),
                        ("steps", steps), ("rounds", rounds)):
        check_int(value, name)
    if not methods:
        raise ValueError("methods must name at least one SN variant, e.g. ('none', 'project')")
    if "sn_method" in model_kwargs or "sn_mode" in model_kwargs:
        raise ValueError("model_kwargs must not contain 'sn_method' or 'sn_mode': they are given by `methods`")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available on this machine")
    check_int(sn_search_every, "sn_search_every")
    if sn_search_every > 1:
        methods = [f"{m}@{sn_search_every}" if m in ("reparam", "project") or m.startswith("naive") else m
                   for m in methods]
    for m in methods:
        parse_method(m)  # a clear error for unknown methods
    _ensure_classifiers_registered()
    kwargs = {"num_classes": num_classes, **dict(model_kwargs)}
    case = OverheadCase(model_name, model_name, kwargs, (batch, 3, input_size, input_size),
                        "classification", num_classes)
    results = run_overhead([case], methods, (precision,), device, steps=steps, warmup=warmup, rounds=rounds,
                           lr=lr, sn_check_every=sn_check_every, seed=seed, progress=progress)
    rows = [ClassifierTiming(model_name, r.method, tuple(r.input_shape), r.device, r.device_name, r.precision,
                             r.median_s, r.q25_s, r.q75_s, r.steps, r.ratio) for r in results]
    if data is not None:
        dev = torch.device(device)
        for row in rows:
            if progress:
                progress(f"{model_name} {row.method}: timing an epoch over the data")
            row.epoch_s, row.epoch_steps, row.steps_per_epoch = _time_epoch(
                model_name, kwargs, row.method, data, dev, precision, lr, epoch_steps, sn_check_every, seed)
        base = next((r.epoch_s for r in rows if r.method == "none"), None)
        for row in rows:
            if base and row.epoch_s is not None and math.isfinite(base):
                row.epoch_ratio = row.epoch_s / base
    return rows


def format_timing_table(rows: Iterable[ClassifierTiming]) -> str:
    """Markdown table laid out like the paper's Table 2 (plus the per-step columns)."""
    lines = ["| model | input (per step) | precision | method | step time (median) | step ratio | "
             "time per epoch | epoch ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "×".join(str(s) for s in r.input_shape)
        step_ratio = f"{r.step_ratio:.2f}" if r.step_ratio is not None else "n/a"
        if r.epoch_s is not None and math.isfinite(r.epoch_s):
            est = "" if r.epoch_steps == (r.steps_per_epoch or 0) - 1 else f" (from {r.epoch_steps} steps)"
            epoch = f"{r.epoch_s:.1f} s{est}"
        else:
            epoch = "n/a (no data)"
        epoch_ratio = f"{r.epoch_ratio:.2f}" if r.epoch_ratio is not None else "n/a"
        lines.append(f"| {r.model} | {shape} | {r.precision} | {r.method} | {r.step_median_s * 1e3:.1f} ms | "
                     f"{step_ratio} | {epoch} | {epoch_ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Exact norm of a depthwise conv (reference for the bound accuracy)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# MobileNetV2 bound accuracy (§3.3)
# --------------------------------------------------------------------------------------------


def _mobilenetv2_strides() -> tuple[int, ...]:
    from invseg.nets.mobilenetv2 import INVERTED_RESIDUAL_SETTING

    return tuple(s if i == 0 else 1 for _, _, n, s in INVERTED_RESIDUAL_SETTING for i in range(n))


#: Strides of MobileNetV2's 17 depthwise convs in forward order (4 of them 2).
MOBILENETV2_DEPTHWISE_STRIDES = _mobilenetv2_strides()


def _load_state_dict(state_dict_or_path: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"state_dict file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors of several types
            raise ValueError(f"{path} is not a readable torch state_dict file: {err}") from err
        where = str(path)
    else:
        obj, where = state_dict_or_path, "the given state_dict"
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):  # invseg checkpoints and common wrappers
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(obj), where


def mobilenetv2_depthwise_weights(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
) -> list[tuple[str, torch.Tensor]]:
    """The 17 depthwise filters of a MobileNetV2 ``state_dict``, in forward order, as ``(key, weight)``.

    Any key layout works (torchvision's ``features.N.conv.M.weight``, invseg's
    ``blocks.N.conv.depthwise.weight``, a ``module.`` prefix, an invseg checkpoint with a ``"model"``
    entry): depthwise weights are the 4-D tensors of shape ``(C, 1, k, k)`` with ``C > 1`` and ``k > 1``,
    taken in the ``state_dict``'s order (the registration = forward order of both implementations).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not a state_dict, or not exactly 17 depthwise weights (the message says how many).
    """
    sd, where = _load_state_dict(state_dict_or_path)
    found = [(k, v) for k, v in sd.items()
             if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[1] == 1 and v.shape[0] > 1
             and v.shape[2] > 1 and v.shape[3] > 1]
    expected = len(MOBILENETV2_DEPTHWISE_STRIDES)
    if len(found) != expected:
        raise ValueError(
            f"{where}: expected the {expected} depthwise conv weights of MobileNetV2 (4-D tensors of shape "
            f"(C, 1, k, k)), found {len(found)}: {[k for k, _ in found][:5]}{' ...' if len(found) > 5 else ''}"
        )
    return found


@dataclass
class LayerBoundAccuracy:
    """Bound accuracy of one depthwise layer (overestimations are ``bound / exact - 1``)."""

    index: int  # position among the 17 depthwise convs
    name: str  # state_dict key
    channels: int
    kernel: int
    stride: int
    input_size: int  # side of the (square) input of this layer
    exact: float
    exact_method: str  # "dense" or "lanczos" (see depthwise_exact_norm)
    channels_checked: int  # channels whose exact norm was computed
    paper_bound: float  # paper: single grid M = N + 2p, ||S|| <= ||K|| for strides
    ours_bound: float  # invseg: min over grids, exact aliasing formula for strides
    paper_over: float
    ours_over: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mobilenetv2_bound_accuracy(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    input_size: int = 224,
    dense_limit: int = 1024,
    tol: float = 1e-10,
    max_restarts: int = 30,
    progress: Callable[[str], None] | None = None,
) -> list[LayerBoundAccuracy]:
    """Per-layer accuracy of the paper's and invseg's depthwise bounds for a MobileNetV2 ``state_dict``.

    The 17 depthwise filters are found by :func:`mobilenetv2_depthwise_weights`; layer ``i`` gets
    stride :data:`MOBILENETV2_DEPTHWISE_STRIDES` ``[i]`` and the input size it sees for an
    ``input_size``² image (the stem and the stride-2 depthwise convs each map ``N -> floor((N - 1) / 2) + 1``
    with kernel 3 and padding 1; pointwise convs keep the size): for 224² that is 112 (layers 0-1),
    56, 28, 14 and 7. All arithmetic is float64 on the CPU.

    Args:
        state_dict_or_path: a state_dict (or an invseg checkpoint dict) or the path of a file holding one.
        input_size: image side (default 224, the paper's).
        dense_limit, tol, max_restarts: see :func:`invseg.analysis.bound_accuracy.depthwise_exact_norm`.
        progress: called with one status line per layer.

    Returns:
        One :class:`LayerBoundAccuracy` per depthwise layer, in forward order.
    """
    check_int(input_size, "input_size", 2)
    layers = mobilenetv2_depthwise_weights(state_dict_or_path)
    n = (input_size - 1) // 2 + 1  # after the 3x3 stride-2 stem with padding 1
    rows = []
    for i, ((name, weight), stride) in enumerate(zip(layers, MOBILENETV2_DEPTHWISE_STRIDES)):
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        k = int(w.shape[-1])
        pad = (k - 1) // 2
        exact = depthwise_exact_norm(w, n, stride, pad, dense_limit=dense_limit, tol=tol,
                                     max_restarts=max_restarts)
        paper = float(depthwise_bound_dense(w, n, stride=stride, padding=pad, paper_grid=True))
        ours = float(depthwise_bound(w, n, stride=stride, padding=pad))
        rows.append(LayerBoundAccuracy(i, name, int(w.shape[0]), k, stride, n, exact.value, exact.method,
                                       exact.channels_checked, paper, ours, paper / exact.value - 1.0,
                                       ours / exact.value - 1.0))
        if progress:
            progress(f"layer {i:2d} N={n:3d} s={stride}: exact {exact.value:.6g} ({exact.method}, "
                     f"{exact.channels_checked} ch), paper +{100 * rows[-1].paper_over:.3f} %, "
                     f"ours +{100 * rows[-1].ours_over:.3f} %")
        n = (n + 2 * pad - k) // stride + 1
    return rows


def summarize_bound_accuracy(rows: Sequence[LayerBoundAccuracy]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (sample, n - 1) of the overestimations in percent, per stride group.

    Returns:
        ``{"stride1": {...}, "stride2": {...}}`` with keys ``layers``, ``paper_mean``, ``paper_std``,
        ``ours_mean``, ``ours_std`` (percent; std is 0 for a single layer).
    """
    out: dict[str, dict[str, float]] = {}
    for stride in sorted({r.stride for r in rows}):
        group = [r for r in rows if r.stride == stride]
        paper = [100 * r.paper_over for r in group]
        ours = [100 * r.ours_over for r in group]
        out[f"stride{stride}"] = {
            "layers": len(group),
            "paper_mean": statistics.fmean(paper),
            "paper_std": statistics.stdev(paper) if len(paper) > 1 else 0.0,
            "ours_mean": statistics.fmean(ours),
            "ours_std": statistics.stdev(ours) if len(ours) > 1 else 0.0,
        }
    return out


def format_bound_accuracy_table(rows: Sequence[LayerBoundAccuracy]) -> str:
    """Markdown: one line per layer, then the per-stride summary (mean ± std in percent)."""
    lines = ["| # | layer | C | stride | input | exact | paper bound | ours | paper over | ours over | exact by |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.index} | {r.name} | {r.channels} | {r.stride} | {r.input_size}² | {r.exact:.5f} | "
                     f"{r.paper_bound:.5f} | {r.ours_bound:.5f} | {100 * r.paper_over:.3f} % | "
                     f"{100 * r.ours_over:.3f} % | {r.exact_method} ({r.channels_checked} ch) |")
    lines += ["", "| layers | count | paper (mean ± std) | ours (mean ± std) |", "|---|---|---|---|"]
    for key, s in summarize_bound_accuracy(rows).items():
        lines.append(f"| {key.replace('stride', 'stride ')} | {s['layers']} | {s['paper_mean']:.3f} ± "
                     f"{s['paper_std']:.3f} % | {s['ours_mean']:.3f} ± {s['ours_std']:.3f} % |")
    return "\n".join(lines)
