"""The inversion-error-vs-K experiment (``scripts/inversion_error.py``, ``configs/inversion_vs_K.yaml``).

IUNets in 2D/3D with additive, affine and residual blocks, K over a grid plus "no spectral
normalization", at initialization, after a few Adam steps on a synthetic segmentation task (the trainers'
step, :func:`invseg.train.step.train_step`), under an adversarial weight scaling, and optionally from a
checkpoint; measured with the library checkers of :mod:`invseg.blocks.inversion` (reconstruction error
per precision, its growth per block, the condition estimate, the memory-efficient gradient error). This
module is the experiment: the grid, the loop, the tables, the CSV/JSON files and the plot.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invseg.blocks import InvertibleResidual, SNDSSubnet
from invseg.blocks.inversion import (
    block_error_growth,
    condition_estimate,
    gradient_error,
    precision_available,
    reconstruction_error,
    scale_subnet_weights,
    sub_networks,
)
from invseg.utils import check_int

__all__ = [
    "SETTINGS",
    "synthetic_segmentation_batch",
    "SweepNetConfig",
    "InversionSweepConfig",
    "SweepResult",
    "run_inversion_sweep",
    "format_sweep_tables",
    "plot_sweep",
    "write_sweep",
]

#: Weight settings of the sweep: initial weights, after training steps, weights scaled up, a checkpoint.
SETTINGS = ("init", "trained", "adversarial", "checkpoint")


def synthetic_segmentation_batch(
    spatial_dims: int,
    size: int,
    batch_size: int = 2,
    in_channels: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A small in-memory segmentation batch: one ball per sample in noise.

    Returns:
        ``(image, label)``: ``(B, in_channels, *[size]*d)`` float32 (ball intensity ``1 + 0.5 c`` in
        channel ``c`` plus unit Gaussian noise) and ``(B, 1, *[size]*d)`` int64 labels in {0, 1}.
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    for name, value in (("size", size), ("batch_size", batch_size), ("in_channels", in_channels)):
        check_int(value, name)
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(*([axis] * spatial_dims), indexing="ij"))  # (d, *N)
    centers = (torch.rand(batch_size, spatial_dims, generator=gen) - 0.5) * 0.8
    radii = 0.25 + 0.25 * torch.rand(batch_size, generator=gen)
    shape = (batch_size, spatial_dims) + (1,) * spatial_dims
    dist = (grid.unsqueeze(0) - centers.reshape(shape)).square().sum(1).sqrt()  # (B, *N)
    label = (dist < radii.reshape((batch_size,) + (1,) * spatial_dims)).unsqueeze(1)  # (B, 1, *N)
    gains = 1.0 + 0.5 * torch.arange(in_channels, dtype=torch.float32).reshape((1, in_channels) + (1,) * spatial_dims)
    noise = torch.randn((batch_size, in_channels) + (size,) * spatial_dims, generator=gen)
    image = label.float() * gains + noise
    return image.to(device), label.long().to(device)


# --------------------------------------------------------------------------------------------
# The inversion-error-vs-K sweep
# --------------------------------------------------------------------------------------------


@dataclass
class SweepNetConfig:
    """The IUNet of one dimensionality in the sweep."""

    channels: list[int] = field(default_factory=lambda: [8, 16])  # channels per level (see IUNet)
    num_blocks: int = 2  # blocks per level and path
    size: int = 32  # spatial size per axis of the input (a multiple of 2**(levels - 1))


@dataclass
class InversionSweepConfig:
    """Grid and settings of the inversion-error-vs-K sweep (``configs/inversion_vs_K.yaml``)."""

    Ks: list[float] = field(default_factory=lambda: [0.5, 0.9, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # Lipschitz bounds
    no_sn: bool = True  # also measure the network without spectral normalization (sn_method "none")
    couplings: list[str] = field(default_factory=lambda: ["additive", "affine", "residual"])  # residual: K < 1 only
    spatial_dims: list[int] = field(default_factory=lambda: [2, 3])  # dimensionalities
    net2d: SweepNetConfig = field(default_factory=SweepNetConfig)  # the 2D IUNet
    net3d: SweepNetConfig = field(default_factory=lambda: SweepNetConfig([4, 16], 1, 16))  # the 3D IUNet
    settings: list[str] = field(default_factory=lambda: ["init", "trained", "adversarial"])  # weight settings
    precisions: list[str] = field(default_factory=lambda: ["fp64", "fp32", "bf16", "fp16"])  # fp16: CUDA
    batch_size: int = 2  # samples of the synthetic batch
    in_channels: int = 1  # image channels of the synthetic task
    num_classes: int = 2  # classes (logits) of the synthetic task
    seed: int = 0  # seed of the weights and of the synthetic batch (same weights for every K)
    train_steps: int = 20  # "trained": Adam steps on the synthetic batch (DiceCE loss)
    train_lr: float = 0.01  # "trained": Adam learning rate (high, so that the weights grow)
    adversarial_factor: float = 4.0  # "adversarial": factor on every sub-network conv weight
    power_iterations: int = 6  # condition estimate: power iterations (float64; a lower bound, ~10 % below 30 its)
    growth_precisions: list[str] = field(default_factory=lambda: ["fp32"])  # per-block error growth in these
    gradient_check: bool = True  # measure the memory-efficient gradient error (float32)
    residual_tol: float = 1.0e-6  # fixed-point tolerance of residual blocks (their error floor)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    threads: int = 1  # torch CPU threads set by the script (1 is fastest on a shared small machine)
    output_dir: str = "outputs/inversion_error"  # where JSON / CSV / PNG / tables go


@dataclass
class SweepResult:
    """Rows of the sweep (one per network x setting x precision) and what was skipped."""

    rows: list[dict[str, Any]]  # see run_inversion_sweep for the keys
    skipped: list[str]  # e.g. "fp16: needs CUDA"
    meta: dict[str, Any]  # machine, versions, config, duration


def _check_sweep_config(cfg: InversionSweepConfig) -> None:
    from invseg.nets.iunet import COUPLINGS

    if not cfg.Ks or any(not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0) for k in cfg.Ks):
        raise ValueError(f"Ks must be a non-empty list of positive numbers, got {cfg.Ks}")
    for c in cfg.couplings:
        if c not in COUPLINGS:
            raise ValueError(f"couplings entries must be in {COUPLINGS}, got {c!r}")
    for d in cfg.spatial_dims:
        if d not in (2, 3):
            raise ValueError(f"spatial_dims entries must be 2 or 3, got {d!r}")
    for s in cfg.settings:
        if s not in ("init", "trained", "adversarial"):
            raise ValueError(f"settings entries must be 'init', 'trained' or 'adversarial', got {s!r}")
    for p in list(cfg.precisions) + list(cfg.growth_precisions):
        precision_available(p)  # ValueError naming the accepted precisions
    for key in ("batch_size", "in_channels", "num_classes", "power_iterations", "threads"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.train_steps < 0:
        raise ValueError(f"train_steps must be >= 0, got {cfg.train_steps}")
    if not cfg.train_lr > 0 or not cfg.adversarial_factor > 0:
        raise ValueError(f"train_lr and adversarial_factor must be > 0, got {cfg.train_lr}, {cfg.adversarial_factor}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")


def _sweep_cases(cfg: InversionSweepConfig) -> list[tuple[str, float | None]]:
    """``(coupling, K)`` pairs; ``K=None`` means no spectral normalization (not for residual blocks)."""
    cases = []
    for c in cfg.couplings:
        for k in cfg.Ks:
            if c == "residual" and not k < 1:
                continue
            cases.append((c, float(k)))
        if cfg.no_sn and c != "residual":
            cases.append((c, None))
    return cases


def _seg_loss():
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def _train_steps(model: nn.Module, image: Tensor, label: Tensor, steps: int, lr: float) -> str:
    """Adam steps with plain backprop on one batch; spectral state updated after each step. Returns a note."""
    from invseg.layers import SpectralUpdater
    from invseg.train.runner import NonFiniteLossError, check_finite
    from invseg.train.step import train_step

    loss_fn = _seg_loss()  # DiceCE on softmax logits vs integer labels (B, 1, *N)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    updater = SpectralUpdater(model)
    memory_efficient = model.memory_efficient
    model.memory_efficient = False  # train on exact activations: the measurement comes afterwards
    model.train()
    note = ""
    try:
        for step in range(steps):
            try:
                train_step(model, image, label, loss_fn, opt, updater=updater,
                           check=lambda v, step=step: check_finite(v, step))
            except NonFiniteLossError:
                note = f"training loss non-finite at step {step}; stopped there"
                break
    finally:
        model.memory_efficient = memory_efficient
    return note


def _max_weight_norm(module: nn.Module) -> float:
    norms = [float(p.detach().double().norm()) for sub in sub_networks(module) for n, p in sub.named_parameters()
             if n.endswith("weight") or n.endswith("original")]
    return max(norms) if norms else 0.0


def _measure(
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: InversionSweepConfig,
    precisions: list[str],
    base: dict[str, Any],
) -> list[dict[str, Any]]:
    """All rows of one network in one setting."""
    with torch.no_grad():
        h = model.input_layer(image)  # (B, channels[0], *N): the core's input
    rows = []
    common: dict[str, Any] = dict(base)
    common["subnet_weight_norm_max"] = _max_weight_norm(model.core)
    try:
        c = condition_estimate(model.core, h, iterations=cfg.power_iterations)
        common.update(lip_forward=c.lip_forward, lip_inverse=c.lip_inverse, condition=c.condition)
    except RuntimeError as e:  # residual inverse not converging
        common.update(lip_forward=math.nan, lip_inverse=math.nan, condition=math.nan)
        common["note"] = (common.get("note", "") + f" condition: {e}").strip()
    if cfg.gradient_check:
        loss_fn = _seg_loss()
        try:
            g = gradient_error(model, image, lambda out: loss_fn(out, label), "fp32")
            common.update(grad_rel_err=g.relative, grad_max_tensor_rel_err=g.max_tensor)
        except RuntimeError as e:
            common.update(grad_rel_err=math.nan, grad_max_tensor_rel_err=math.nan)
            common["note"] = (common.get("note", "") + f" gradient: {e}").strip()
    for p in precisions:
        row = dict(common, precision=p)
        try:
            r = reconstruction_error(model.core, h, p)
            row.update(max_rel_err=r.max, mean_rel_err=r.mean)
            if p in cfg.growth_precisions:
                row["per_block"] = [e.max for e in block_error_growth(model.core, h, p)]
        except RuntimeError as e:
            row.update(max_rel_err=math.inf, mean_rel_err=math.inf)
            row["note"] = (row.get("note", "") + f" {p}: {e}").strip()
        rows.append(row)
    return rows


def run_inversion_sweep(
    cfg: InversionSweepConfig,
    checkpoint_model: nn.Module | None = None,
    checkpoint_name: str = "checkpoint",
    progress: bool = True,
) -> SweepResult:
    """Measure inversion error vs K for the grid of ``cfg`` (and optionally a trained checkpoint).

    For each dimensionality, coupling and K (plus "no SN", ``K=None``, for couplings), an IUNet is built
    with the same seed (hence the same raw weights for every K) and measured in each setting:

    * ``"init"``: the initial weights;
    * ``"trained"``: after ``train_steps`` Adam steps (lr ``train_lr``, plain backprop, DiceCE loss,
      spectral state updated after each step) on a synthetic segmentation batch;
    * ``"adversarial"``: the initial weights with every sub-network conv weight multiplied by
      ``adversarial_factor`` (:func:`scale_subnet_weights`): spectral normalization undoes it,
      without it the blocks' Lipschitz constants explode;
    * ``"checkpoint"``: ``checkpoint_model`` (an IUNet, e.g. from ``invseg.train.seg.load_seg_checkpoint``)
      as loaded.

    Each (network, setting) gives one row per precision with keys ``dims, coupling, K`` (None: no SN),
    ``sn, setting, precision, max_rel_err, mean_rel_err``, ``per_block`` (max error of each prefix of
    the core, see :func:`block_error_growth`; for the precisions in ``growth_precisions``),
    ``lip_forward, lip_inverse, condition`` (float64, of the core at its input),
    ``grad_rel_err, grad_max_tensor_rel_err`` (float32, memory-efficient vs plain, whole network with
    the DiceCE loss), ``subnet_weight_norm_max`` and ``note``. The core's input is
    ``model.input_layer(image)`` of the synthetic batch.

    The global RNG is left as it was (the sweep seeds inside ``torch.random.fork_rng``).
    """
    from invseg.nets import IUNet

    _check_sweep_config(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    precisions = [p for p in cfg.precisions if precision_available(p, device)]
    skipped = [f"{p}: not available on {device.type} (fp16 autocast needs CUDA)"
               for p in cfg.precisions if p not in precisions]
    cases = _sweep_cases(cfg)
    jobs = [(d, c, k, s) for d in cfg.spatial_dims for c, k in cases for s in cfg.settings]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(jobs) + (checkpoint_model is not None), desc="inversion sweep", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for d in cfg.spatial_dims:
            net = cfg.net2d if d == 2 else cfg.net3d
            image, label = synthetic_segmentation_batch(d, net.size, cfg.batch_size, cfg.in_channels, cfg.seed, device)
            for coupling, K in cases:
                torch.manual_seed(cfg.seed)
                model = IUNet(
                    d, cfg.in_channels, cfg.num_classes, channels=list(net.channels), num_blocks=net.num_blocks,
                    coupling=coupling, K=1.0 if K is None else K, sn_method="none" if K is None else "fft",
                    memory_efficient=True, residual_tol=cfg.residual_tol,
                ).to(device)
                for setting in cfg.settings:
                    work = copy.deepcopy(model)
                    note = ""
                    if setting == "trained":
                        note = _train_steps(work, image, label, cfg.train_steps, cfg.train_lr)
                    elif setting == "adversarial":
                        scale_subnet_weights(work, cfg.adversarial_factor)
                    base = dict(dims=d, coupling=coupling, K=K, sn="none" if K is None else "fft",
                                setting=setting, note=note)
                    rows += _measure(work, image, label, cfg, precisions, base)
                    bar.set_postfix_str(f"{d}D {coupling} K={'none' if K is None else K} {setting}")
                    bar.update()
        if checkpoint_model is not None:
            model = checkpoint_model.to(device)
            d = int(model.spatial_dims)
            net = cfg.net2d if d == 2 else cfg.net3d
            image, label = synthetic_segmentation_batch(d, net.size, cfg.batch_size, int(model.in_channels),
                                                        cfg.seed, device)
            label = label.clamp_max(int(model.out_channels) - 1)
            sn_method = _sn_method_of(model)
            base = dict(dims=d, coupling=model.coupling, K=None if sn_method == "none" else _K_of(model),
                        sn=sn_method, setting=checkpoint_name, note="")
            rows += _measure(model, image, label, cfg, precisions, base)
            bar.update()
    bar.close()
    meta = {
        "machine": _machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "precisions": precisions,
        "config": asdict(cfg),
    }
    return SweepResult(rows, skipped, meta)


def _sn_method_of(model: nn.Module) -> str:
    from invseg.layers import spectral_layers

    layers = spectral_layers(model.core)
    return layers[0].method if layers else "none"


def _K_of(model: nn.Module) -> float | None:
    """The sub-networks' Lipschitz bound K of an IUNet (None when it has no sub-networks)."""
    for m in model.core.modules():
        if isinstance(m, (SNDSSubnet, InvertibleResidual)):
            return float(m.K)
    return None


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    cpus = os.cpu_count()
    return f"{platform.processor() or platform.machine()} CPU, {cpus} cores ({platform.system()})"


# --------------------------------------------------------------------------------------------
# Tables, files and the plot
# --------------------------------------------------------------------------------------------


def _k_label(k: float | None) -> str:
    return "none" if k is None else f"{k:g}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.1e}"


def _pivot(rows, key_fn, value_key, columns) -> list[tuple[tuple, dict[str, float]]]:
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault(key_fn(r), {})[_k_label(r["K"])] = r.get(value_key)
    return list(table.items())


def format_sweep_tables(result: SweepResult) -> str:
    """Markdown tables: max relative reconstruction error per precision, condition and gradient error vs K."""
    rows = result.rows
    ks = []
    for r in rows:
        label = _k_label(r["K"])
        if label not in ks:
            ks.append(label)
    ks.sort(key=lambda s: math.inf if s == "none" else float(s))
    head = "| " + " | ".join(ks) + " |"
    sep = "|" + "---|" * len(ks)
    out = [f"Machine: {result.meta['machine']}, device {result.meta['device']}, torch {result.meta['torch']}, "
           f"{result.meta['threads']} thread(s); {result.meta['seconds']} s."]
    if result.skipped:
        out.append("Skipped: " + "; ".join(result.skipped) + ".")
    out += ["", "**Max relative reconstruction error ||x - f^-1(f(x))|| / ||x|| of the core** (K = none: no SN)", "",
            "| dims | setting | coupling | precision " + head, "|---|---|---|---" + sep]
    for key, vals in _pivot(rows, lambda r: (r["dims"], r["setting"], r["coupling"], r["precision"]),
                            "max_rel_err", ks):
        cells = " | ".join(_fmt(vals.get(k)) for k in ks)
        out.append(f"| {key[0]}D | {key[1]} | {key[2]} | {key[3]} | {cells} |")
    once = [r for r in rows if r["precision"] == rows[0]["precision"]]
    out += ["", "**Condition estimate Lip(f) * Lip(f^-1) of the core at the input** (float64, power iteration)", "",
            "| dims | setting | coupling " + head, "|---|---|---" + sep]
    for key, vals in _pivot(once, lambda r: (r["dims"], r["setting"], r["coupling"]), "condition", ks):
        out.append(f"| {key[0]}D | {key[1]} | {key[2]} | " + " | ".join(_fmt(vals.get(k)) for k in ks) + " |")
    if any("grad_rel_err" in r for r in once):
        out += ["", "**Relative gradient error, memory-efficient vs plain backprop** (float32, all parameters)", "",
                "| dims | setting | coupling " + head, "|---|---|---" + sep]
        for key, vals in _pivot(once, lambda r: (r["dims"], r["setting"], r["coupling"]), "grad_rel_err", ks):
            out.append(f"| {key[0]}D | {key[1]} | {key[2]} | " + " | ".join(_fmt(vals.get(k)) for k in ks) + " |")
    notes = sorted({f"{r['dims']}D {r['setting']} {r['coupling']} K={_k_label(r['K'])}: {r['note']}"
                    for r in rows if r.get("note")})
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(out)


_CSV_KEYS = ("dims", "setting", "coupling", "K", "sn", "precision", "max_rel_err", "mean_rel_err", "lip_forward",
             "lip_inverse", "condition", "grad_rel_err", "grad_max_tensor_rel_err", "subnet_weight_norm_max", "note")


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Log max relative error vs K (log2 axis; "no SN" as a separate marker at the right).

    One panel per (dims, setting), one line per coupling x precision (colour: coupling, line style:
    precision). Non-finite errors are drawn at the top edge with an "x"; exact zeros at 1e-17.
    Drawn with ``Figure`` + ``FigureCanvasAgg`` (no global backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.rows
    panels = sorted({(r["dims"], r["setting"]) for r in rows}, key=lambda p: (p[0], _setting_order(p[1])))
    dims = sorted({p[0] for p in panels})
    settings = sorted({p[1] for p in panels}, key=_setting_order)
    ks = sorted({r["K"] for r in rows if r["K"] is not None})
    k_none = (max(ks) * 4) if ks else 1.0  # x position of "no SN"
    fig = Figure(figsize=(4.2 * len(settings), 3.4 * len(dims)), constrained_layout=True)
    FigureCanvasAgg(fig)
    colors = {"additive": "tab:blue", "affine": "tab:orange", "residual": "tab:green"}
    styles = {"fp64": "-", "fp32": "--", "bf16": ":", "fp16": "-."}
    top, floor = 1e2, 1e-17
    for i, d in enumerate(dims):
        for j, s in enumerate(settings):
            ax = fig.add_subplot(len(dims), len(settings), i * len(settings) + j + 1)
            sel = [r for r in rows if r["dims"] == d and r["setting"] == s]
            for coupling in sorted({r["coupling"] for r in sel}):
                for prec in [p for p in styles if any(r["precision"] == p for r in sel)]:
                    pts = sorted(((r["K"], r["max_rel_err"]) for r in sel if r["coupling"] == coupling
                                  and r["precision"] == prec and r["K"] is not None), key=lambda t: t[0])
                    color, ls = colors.get(coupling, "k"), styles[prec]
                    if pts:
                        xs = [p[0] for p in pts]
                        ys = [min(max(p[1], floor), top) for p in pts]
                        ax.plot(xs, ys, ls, color=color, marker="o", ms=3, label=f"{coupling} {prec}")
                        for x, y0 in pts:
                            if not math.isfinite(y0):
                                ax.plot([x], [top], "x", color=color, ms=7)
                    for r in sel:
                        if r["coupling"] == coupling and r["precision"] == prec and r["K"] is None:
                            y0 = r["max_rel_err"]
                            ax.plot([k_none], [min(max(y0, floor), top)], "s" if math.isfinite(y0) else "x",
                                    color=color, ms=6, mfc="none")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = ks + ([k_none] if any(r["K"] is None for r in sel) else [])
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{k:g}" for k in ks] + (["no SN"] if len(ticks) > len(ks) else []), fontsize=7,
                               rotation=45)
            ax.set_xlabel("K (Lipschitz bound per sub-network)")
            ax.set_ylabel("max relative error")
            ax.set_title(f"{d}D, {s}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = {}, []
    for ax in fig.axes:  # one legend for all panels (coupling: colour, precision: line style)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside right upper", fontsize=7,
                   title="coupling, precision\n(square: no SN,\nx: non-finite)", title_fontsize=7)
    fig.suptitle(f"Inversion error of the IUNet core vs K ({result.meta['machine']}, {result.meta['device']})",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _setting_order(s: str) -> int:
    return SETTINGS.index(s) if s in SETTINGS else len(SETTINGS)


def write_sweep(result: SweepResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``inversion_error.json`` (rows incl. per-block growth, meta), ``.csv``, ``.md`` (tables) and ``.png``.

    Returns:
        ``{"json", "csv", "md", "png"}`` -> paths.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inversion_error.json", "csv": out / "inversion_error.csv",
             "md": out / "inversion_error.md", "png": out / "inversion_error.png"}
    payload = {"meta": result.meta, "skipped": result.skipped, "rows": result.rows}
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_CSV_KEYS), extrasaction="ignore")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("none" if k == "K" and r.get(k) is None else r.get(k, "")) for k in _CSV_KEYS})
    paths["csv"].write_text(buf.getvalue())
    paths["md"].write_text(format_sweep_tables(result) + "\n")
    plot_sweep(result, paths["png"])
    return paths
