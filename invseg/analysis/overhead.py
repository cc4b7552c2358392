"""Training-step time and peak memory of spectral normalization methods, measured side by side.

One process builds the same network once per SN method (``"none"``, ``"fft"``, ``"naive"``, ``"torch"``)
and times full training steps (forward, loss, backward, optimizer step, spectral-state update) with the
methods **interleaved round by round**, so that drifts of a shared machine affect all methods alike. Ratios
to ``"none"`` are therefore measured in one process, as the project's rules require.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from invseg.layers import SpectralUpdater
from invseg.nets import create_model
from invseg.train.amp import make_grad_scaler
from invseg.train.step import train_step

__all__ = ["OverheadCase", "OverheadResult", "VARIANTS", "default_cases", "parse_method", "run_overhead",
           "update_breakdown", "certificate_slack", "format_overhead_table", "cross_entropy"]


def cross_entropy(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The benchmarks' loss: cross entropy in float32 (labels ``(B,)`` or ``(B, *spatial)``)."""
    return F.cross_entropy(output.float(), y)


@dataclass
class OverheadCase:
    """One network/input configuration of the benchmark.

    Attributes:
        name: label of the case (e.g. ``"mobilenetv2"``).
        model: registry name for :func:`invseg.nets.create_model`.
        model_kwargs: constructor arguments except the SN method (``sn_method``) and ``sn_mode``.
        input_shape: ``(B, C, *spatial)``.
        target: ``"classification"`` (labels ``(B,)``) or ``"segmentation"`` (labels ``(B, *spatial)``).
        num_classes: number of classes of the loss.
    """

    name: str
    model: str
    model_kwargs: dict
    input_shape: tuple[int, ...]
    target: str
    num_classes: int


@dataclass
class OverheadResult:
    case: str
    method: str
    precision: str
    device: str
    input_shape: tuple[int, ...]
    median_s: float
    q25_s: float
    q75_s: float
    steps: int
    peak_bytes: int | None
    ratio: float | None = None
    device_name: str = ""
    times_s: list[float] = field(default_factory=list)
    #: per round: (this method's amortized step time) / (the median "none" step of the same round)
    round_ratios: list[float] = field(default_factory=list)
    #: the regime the update ran in, from untimed steps after the timing: median over steps and SN layers of
    #: ||W_after − W_before||_F / ||W_before||_F, and the fraction of matrix layers certified exactly per step
    motion: float | None = None
    exact_share: float | None = None

    @property
    def round_ratio(self) -> float | None:
        """Median over rounds of the per-round ratio: robust to a shared machine's slow drifts."""
        return statistics.median(self.round_ratios) if self.round_ratios else None

    def to_dict(self) -> dict:
        return {**asdict(self), "round_ratio": self.round_ratio}


def default_cases(device: str, iunet: bool = True) -> list[OverheadCase]:
    """The issue's cases: MobileNetV2 (ImageNet shapes), ResNet-34-DS (CIFAR shapes), a 3D IUNet.

    CPU sizes finish in a few minutes on 2 cores (MobileNetV2 batch 16 at 128², ResNet-34-DS batch 32 at
    32², IUNet 32³); CUDA sizes are the paper's (batch 128 at 224² and 32²) and a 128³ IUNet.
    """
    gpu = device.startswith("cuda")
    cases = [
        OverheadCase("mobilenetv2", "mobilenetv2", {"num_classes": 1000, "K": 40.0, "scaling": "soft", "s_init": 0.5},
                     (128, 3, 224, 224) if gpu else (16, 3, 128, 128), "classification", 1000),
        OverheadCase("resnet34ds", "resnet34ds", {"num_classes": 10, "K": 5.0, "scaling": "hard"},
                     (128, 3, 32, 32) if gpu else (32, 3, 32, 32), "classification", 10),
    ]
    if iunet:
        cases.append(OverheadCase(
            "iunet3d", "iunet",
            {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128] if gpu else [8, 16, 32],
             "num_blocks": 2, "coupling": "additive", "K": 0.9},
            (1, 1, 128, 128, 128) if gpu else (1, 1, 32, 32, 32), "segmentation", 2))
    return cases


def _make_batch(case: OverheadCase, device: torch.device, gen: torch.Generator):
    x = torch.randn(case.input_shape, generator=gen).to(device)
    if case.target == "classification":
        y = torch.randint(0, case.num_classes, (case.input_shape[0],), generator=gen).to(device)
    else:
        y = torch.randint(0, case.num_classes, (case.input_shape[0], *case.input_shape[2:]), generator=gen).to(device)
    return x, y


#: The SN variants the benchmark knows: invseg's two modes (DESIGN §1h), the baselines and no SN.
VARIANTS = ("none", "reparam", "project", "torch", "naive")


def parse_method(spec: str) -> tuple[str, str, int]:
    """``"none"``, ``"reparam"``, ``"project"``, ``"torch"``, ``"naive"``, optionally ``@N`` (the DFT searches and
    the power method's stopping test every N steps, certified in between, e.g. ``"project@8"``) →
    ``(method, sn_mode, every)`` with ``method`` the layers' ``"fft"`` / ``"torch"`` / ``"naive"`` / ``"none"``.
    ``"naive:project"`` selects the naive method in project mode."""
    base, _, every = spec.partition("@")
    base, _, mode = base.partition(":")
    if base not in VARIANTS or (mode and (base not in ("naive",) or mode not in ("reparam", "project"))):
        raise ValueError(f"unknown method {spec!r}: use one of {VARIANTS} (naive:project for the naive method "
                         "in project mode), optionally with @N (e.g. project@8)")
    try:
        n = int(every) if every else 1
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"method {spec!r}: the number after @ must be an int >= 1")
    if base in ("reparam", "project"):
        return "fft", base, n
    return base, mode or "reparam", n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_overhead(
    cases: Sequence[OverheadCase],
    methods: Sequence[str] = ("none", "reparam", "project", "naive", "torch"),
    precisions: Sequence[str] = ("fp32",),
    device: str = "cpu",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 4,
    lr: float = 1e-3,
    sn_check_every: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[OverheadResult]:
    """Time training steps of every case × method × precision; ratios are to ``"none"``.

    Each of ``rounds`` rounds runs ``steps // rounds`` timed steps per method in turn (after ``warmup``
    untimed steps per method). The step is the trainers' :func:`invseg.train.step.train_step`: forward and
    cross-entropy under autocast, backward through the grad scaler (enabled for fp16 only), SGD (momentum 0.9)
    step, and the spectral update (:class:`invseg.layers.SpectralUpdater` with ``check_every=sn_check_every``;
    torch's method updates inside its forward). A method ``"project@N"``
    searches and checks every N steps (certified in between, :func:`parse_method`) and is timed in whole
    cycles of N steps: its step time is the median over cycles of the cycle's mean step, so searches are
    counted at their real share. Peak memory is
    ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA (None on CPU: use
    :func:`invseg.analysis.memory.measure_step` for measured CPU memory).
    """
    dev = torch.device(device)
    results: list[OverheadResult] = []
    per_round = max(1, steps // max(1, rounds))
    for case in cases:
        for precision in precisions:
            gen = torch.Generator().manual_seed(seed)
            x, y = _make_batch(case, dev, gen)
            runs, cycle = {}, {}
            for spec in methods:
                method, mode, every = parse_method(spec)
                torch.manual_seed(seed)
                model = create_model(case.model, **{**case.model_kwargs, "sn_method": method,
                                                    "sn_mode": mode}).to(dev).train()
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                updater = SpectralUpdater(model, check_every=every if every > 1 else sn_check_every,
                                          search_every=every)
                runs[spec], cycle[spec] = (model, opt, updater, make_grad_scaler(dev.type, precision)), every

            def step(method: str) -> None:
                model, opt, updater, scaler = runs[method]
                train_step(model, x, y, cross_entropy, opt, precision=precision, scaler=scaler, updater=updater)

            times = {m: [] for m in methods}
            per_round_times = {m: [] for m in methods}  # amortized step time of each round
            peaks = {m: 0 for m in methods}
            for method in methods:
                n = cycle[method]  # whole cycles only: every timed window holds the same share of searches
                for _ in range(-(-warmup // n) * n):
                    step(method)
                _sync(dev)
            for r in range(rounds):
                for method in methods:
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    this_round = []
                    for _ in range(-(-per_round // cycle[method]) * cycle[method]):
                        _sync(dev)
                        t0 = time.perf_counter()
                        step(method)
                        _sync(dev)
                        this_round.append(time.perf_counter() - t0)
                    times[method] += this_round
                    per_round_times[method].append(
                        statistics.median(this_round) if cycle[method] == 1 else statistics.fmean(this_round))
                    if dev.type == "cuda":
                        peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated(dev))
                if progress:
                    progress(f"{case.name} {precision} round {r + 1}/{rounds}")
            regime = {m: _regime(lambda m=m: step(m), runs[m][0], 2 * cycle[m]) for m in methods}
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
            base = statistics.median(times["none"]) if "none" in times else None
            for method in methods:
                n = cycle[method]  # amortized: the mean step time of each whole cycle of n steps
                raw = times[method]
                ts = sorted(sum(raw[i:i + n]) / n for i in range(0, len(raw) - n + 1, n))
                q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
                med = statistics.median(ts)
                rr = ([t / b for t, b in zip(per_round_times[method], per_round_times["none"])]
                      if "none" in per_round_times else [])
                results.append(OverheadResult(
                    case.name, method, precision, dev.type, tuple(case.input_shape), med, q[0], q[2], len(raw),
                    peaks[method] if dev.type == "cuda" else None, med / base if base else None, name, raw, rr,
                    *regime[method]))
            del runs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _regime(step: Callable[[], None], model: nn.Module, steps: int) -> tuple[float | None, float | None]:
    """(median relative weight change per step, share of matrix layers certified exactly per step) over
    ``steps`` untimed steps of ``model`` (None for models without invseg SN layers)."""
    from invseg.layers import SNLinear, SNPointwiseConv, spectral_layers

    layers = [m for m in spectral_layers(model) if m.method in ("fft", "naive")]
    if not layers:
        return None, None
    motions, exact = [], []
    for _ in range(max(1, steps)):
        before = [m.weight.detach().clone() for m in layers]
        step()
        with torch.no_grad():
            motions += [float((m.weight - b).norm() / b.norm().clamp_min(1e-30)) for m, b in zip(layers, before)]
        mats = [m for m in layers if isinstance(m, (SNPointwiseConv, SNLinear))]
        if mats:
            exact.append(sum(m.spectral_info().since_search == 0 for m in mats) / len(mats))
    return statistics.median(motions), (statistics.fmean(exact) if exact else None)


def update_breakdown(cases: Sequence[OverheadCase], device: str = "cpu", repeats: int = 10,
                     seed: int = 0, modes: Sequence[str] = ("reparam", "project")) -> list[dict]:
    """Median time of the spectral update alone, per case and ``sn_mode``, in its three forms:

    * ``search``: DFT searches and the power method with its stopping test (``SpectralUpdater`` default);
    * ``search_nocheck``: searches, one power iteration without the test (no host sync);
    * ``certify``: no searches (certified bounds, ``search=False``) and one power iteration without the test
      — the update of the steps between searches of ``@N``.

    In project mode every form includes the in-place rescaling of the weights.
    """
    from invseg.layers import update_spectral_state

    dev = torch.device(device)
    rows = []
    for case in cases:
        for mode in modes:
            gen = torch.Generator().manual_seed(seed)
            x, y = _make_batch(case, dev, gen)
            torch.manual_seed(seed)
            model = create_model(case.model, **{**case.model_kwargs, "sn_method": "fft", "sn_mode": mode})
            model = model.to(dev).train()
            F.cross_entropy(model(x).float(), y).backward()  # initialises every layer's state and input size
            row = {"case": case.name, "mode": mode, "device": dev.type}
            for name, kwargs in (("search", {}), ("search_nocheck", {"check": False}),
                                 ("certify", {"check": False, "search": False})):
                update_spectral_state(model, **kwargs)
                ts = []
                for _ in range(repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    update_spectral_state(model, **kwargs)
                    _sync(dev)
                    ts.append(time.perf_counter() - t0)
                row[name + "_s"] = statistics.median(ts)
            rows.append(row)
    return rows


def certificate_slack(case: OverheadCase, every: int = 8, steps: int = 24, lr: float = 1e-2,
                      device: str = "cpu", seed: int = 0, slack_tol: float | None = 0.01,
                      sn_mode: str = "reparam") -> dict:
    """How much ``@every`` over-normalizes between searches: SGD (momentum 0.9, ``lr``) on random data with
    ``SpectralUpdater(check_every=1, search_every=every, slack_tol=slack_tol)``; after every update, each certified DFT layer's
    certificate is divided by a fresh search's bound for the current weights (a deep copy searched anew).

    Returns:
        ``{"case", "mode", "every", "lr", "steps", "slack_tol", "median", "max", "per_step_max", "searched"}``:
        ratios − 1 over the (layer, step) pairs between periodic searches, and the fraction of those pairs in
        which the layer was searched for its slack.
    """
    from copy import deepcopy

    from invseg.layers import SNConv, SNDepthwiseConv, spectral_layers, update_spectral_state

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x, y = _make_batch(case, dev, gen)
    torch.manual_seed(seed)
    model = create_model(case.model, **{**case.model_kwargs, "sn_method": "fft", "sn_mode": sn_mode})
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # the slack test runs at check steps: every update here (check_every=1), searches every `every` updates
    updater = SpectralUpdater(model, check_every=1, search_every=every, slack_tol=slack_tol)
    ratios, per_step, searched, between = [], [], 0, 0
    dft = [m for m in spectral_layers(model) if isinstance(m, (SNDepthwiseConv, SNConv))]
    for step in range(steps):
        train_step(model, x, y, cross_entropy, opt, updater=updater)
        worst = 0.0
        if step % every:  # a step between periodic searches
            for layer in dft:
                info = layer.spectral_info()
                between += 1
                searched += info.since_search == 0
                fresh = deepcopy(layer)
                fresh.sn_mode = "reparam"  # measure, do not rescale
                update_spectral_state(fresh)  # a full search at the current weights
                ratio = info.certificate / fresh.spectral_info().certificate - 1.0
                ratios.append(ratio)
                worst = max(worst, ratio)
        per_step.append(worst)
    return {"case": case.name, "mode": sn_mode, "every": every, "lr": lr, "steps": steps, "slack_tol": slack_tol,
            "median": statistics.median(ratios) if ratios else 0.0, "max": max(ratios, default=0.0),
            "per_step_max": per_step, "searched": searched / between if between else 0.0}


def format_overhead_table(results: Sequence[OverheadResult]) -> str:
    """Markdown table: case, precision, method, median step time, ratio to "none" (of the medians, and the
    median of the per-round ratios with their range), peak memory."""
    lines = ["| case | input | precision | method | step time (median) | ratio to none | per-round ratio "
             "(median, min–max) | peak memory | weight change / step | matrices certified exactly / step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r.peak_bytes / 2**20:.0f} MiB" if r.peak_bytes else "n/a"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "n/a"
        rounds = (f"{r.round_ratio:.3f} ({min(r.round_ratios):.2f}–{max(r.round_ratios):.2f})"
                  if r.round_ratios else "n/a")
        shape = "×".join(str(s) for s in r.input_shape)
        motion = f"{r.motion:.1e}" if r.motion is not None else "–"
        exact = f"{r.exact_share * 100:.0f} %" if r.exact_share is not None else "–"
        lines.append(f"| {r.case} | {shape} | {r.precision} | {r.method} | {r.median_s * 1e3:.1f} ms | {ratio} | "
                     f"{rounds} | {peak} | {motion} | {exact} |")
    return "\n".join(lines)
