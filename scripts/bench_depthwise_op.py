#!/usr/bin/env python
"""Depthwise convolution on the CPU: torch's ``F.conv{d}d(groups=C)`` vs ``invseg.layers.depthwise_conv``.

Times the forward (inputs requiring grad, as in training) and forward + backward of both ops on each case,
the variants interleaved round by round in one process; prints a markdown table of medians and ratios and
writes JSON. ``--step`` also times whole training steps (forward, cross-entropy, backward, Adam step,
spectral update) of IUNets with torch's depthwise backward ("before") and this op's ("after") against
MONAI's UNet, and ``--profile`` lists the ops where an IUNet step spends its time.

    python scripts/bench_depthwise_op.py                          # the default cases, 1 thread
    python scripts/bench_depthwise_op.py --threads 1 2 --cases 3:32:48:2:3 2:32:192:2:3
    python scripts/bench_depthwise_op.py --cases none --step --profile

A case is ``d:C:N:B:k[:s[:dl]]``: spatial dims, channels, size per axis, batch, kernel, stride, dilation
(padding "same" for the dilated kernel: ``dl·(k−1)//2``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import invseg.layers.sn_conv as sn_conv
from invseg import cli
from invseg.layers import SpectralUpdater, depthwise_conv
from invseg.nets import IUNet
from invseg.train.step import train_step

DEFAULT_CASES = [
    "3:32:48:2:3",  # the measured report: 32 channels, 48³, batch 2, k = 3
    "3:8:64:2:3", "3:16:64:2:3", "3:16:48:2:3", "3:32:32:2:3", "3:8:32:2:3",  # IUNet-like levels
    "3:32:48:2:3:2",  # stride 2
    "3:16:32:2:4",  # even kernel
    "2:32:192:2:3", "2:64:56:16:3",  # 2-D: a large image; MobileNet-like
    "1:32:8192:2:3",  # 1-D
]
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def parse_case(spec: str) -> dict:
    parts = spec.split(":")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (5, 6, 7) or values[0] not in (1, 2, 3) or min(values) < 1:
        raise ValueError(f"case {spec!r} must be d:C:N:B:k[:s[:dl]] with positive ints and d in 1, 2, 3")
    d, c, n, b, k = values[:5]
    s = values[5] if len(values) > 5 else 1
    dl = values[6] if len(values) > 6 else 1
    return {"spec": spec, "dims": d, "channels": c, "size": n, "batch": b, "kernel": k, "stride": s,
            "dilation": dl, "padding": dl * (k - 1) // 2}


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def bench_op(case: dict, rounds: int, repeats: int, dtype: torch.dtype) -> dict:
    """Median times (s) of forward and forward + backward for torch's op and ``depthwise_conv``."""
    d, c, b = case["dims"], case["channels"], case["batch"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, *[case["size"]] * d, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(c, 1, *[case["kernel"]] * d, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(c, generator=gen).to(dtype).requires_grad_()
    conf = (case["stride"], case["padding"], case["dilation"])
    ops = {
        "torch": lambda: _CONV[d](x, w, bias, *conf, c),
        "invseg": lambda: depthwise_conv(x, w, bias, *conf, backward="custom"),
    }
    gy = torch.randn(ops["torch"]().shape, generator=gen).to(dtype)

    def fwd(op):
        op()

    def fwdbwd(op):
        x.grad = w.grad = bias.grad = None
        op().backward(gy)

    # values and gradients agree (a benchmark of a wrong op is worthless)
    grads = {}
    for name, op in ops.items():
        fwdbwd(op)
        grads[name] = (x.grad.clone(), w.grad.clone(), bias.grad.clone())
    err = max(((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30)).item()
              for u, v in zip(grads["invseg"], grads["torch"]))
    times = {(m, n): [] for m in ("fwd", "fwdbwd") for n in ops}
    for _ in range(rounds):
        for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            for name, op in ops.items():
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn(op)
                    ts.append(time.perf_counter() - t0)
                times[(mode, name)].append(statistics.median(ts))
    out = {**case, "dtype": str(dtype).removeprefix("torch."), "max_rel_grad_diff": err}
    for (mode, name), ts in times.items():
        out[f"{mode}_{name}_s"] = statistics.median(ts)
        out[f"{mode}_{name}_rounds_s"] = ts
    for mode in ("fwd", "fwdbwd"):
        out[f"{mode}_ratio"] = _median_ratio(times[(mode, "invseg")], times[(mode, "torch")])
    return out


@contextlib.contextmanager
def torch_depthwise_backward():
    """The "before" variant: SN depthwise layers with torch's backward (what they called before this op)."""
    saved = sn_conv.depthwise_conv
    sn_conv.depthwise_conv = lambda *args, **kw: saved(*args, **kw, backward="torch")
    try:
        yield
    finally:
        sn_conv.depthwise_conv = saved


def _make_step_models() -> dict:
    from monai.networks.nets import UNet

    nets = {}
    torch.manual_seed(0)
    nets["unet"] = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2))
    for sn in ("none", "fft"):
        for variant in ("before", "after"):  # equal models (same seed): only the depthwise backward differs
            torch.manual_seed(0)
            nets[f"iunet-{sn}-{variant}"] = IUNet(3, 1, 3, channels=[8, 32, 128], num_blocks=2, sn_method=sn)
    return {name: (net.train(), torch.optim.Adam(net.parameters(), lr=1e-4), SpectralUpdater(net))
            for name, net in nets.items()}


def bench_step(size: int, batch: int, rounds: int, steps: int, warmup: int, channels_last: bool = False) -> dict:
    """Training-step times of MONAI's UNet and IUNets before/after this op, interleaved round by round.
    ``channels_last``: models and input in ``torch.channels_last_3d`` (what the networks do with it as is)."""
    state = _make_step_models()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, size, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        for net, _, _ in state.values():
            net.to(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 3, (batch, size, size, size), generator=gen)

    def step(name: str) -> None:
        net, opt, updater = state[name]
        ctx = torch_depthwise_backward() if name.endswith("-before") else contextlib.nullcontext()
        with ctx:
            train_step(net, x, y, F.cross_entropy, opt, updater=updater)

    for name in state:
        for _ in range(warmup):
            step(name)
    times = {name: [] for name in state}
    for _ in range(rounds):
        for name in state:
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step(name)
                ts.append(time.perf_counter() - t0)
            times[name].append(statistics.median(ts))
    out = {"size": size, "batch": batch, "rounds": rounds, "steps_per_round": steps, "channels_last": channels_last}
    for name, ts in times.items():
        out[f"{name}_s"] = statistics.median(ts)
        out[f"{name}_rounds_s"] = ts
        out[f"{name}_ratio_to_unet"] = _median_ratio(ts, times["unet"])
    for sn in ("none", "fft"):
        out[f"iunet-{sn}-after_vs_before"] = _median_ratio(times[f"iunet-{sn}-after"], times[f"iunet-{sn}-before"])
    return out


def step_flops(size: int, batch: int) -> dict[str, float]:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``; convolutions and matmuls) of each step
    model. The IUNet is counted with ``memory_efficient=False``: the counter cannot follow the recompute's
    ``autograd.grad`` inside backward, so the IUNet figures leave out the recomputed forward."""
    from monai.networks.nets import UNet
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 3, (batch, size, size, size))
    nets = {"unet": UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2)),
            "iunet (no recompute)": IUNet(3, 1, 3, channels=[8, 32, 128], num_blocks=2, sn_method="none",
                                          memory_efficient=False)}
    out = {}
    for name, net in nets.items():
        counter = FlopCounterMode(display=False)
        with counter:
            F.cross_entropy(net.train()(x), y).backward()
        out[name] = counter.get_total_flops()
    return out


def profile_step(size: int, batch: int, sn: str, rows: int, steps: int, before: bool = False) -> dict[str, str]:
    """torch.profiler tables of ``steps`` IUNet training steps with this op (``before``: with torch's depthwise
    backward), after two untimed steps: self
    CPU time per step by kind of op (:func:`kind_table`), and the totals over the steps by op and by op and
    input shapes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = IUNet(3, 1, 3, channels=[8, 32, 128], num_blocks=2, sn_method=sn).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    updater = SpectralUpdater(net)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 3, (batch, size, size, size))

    def step():
        with torch_depthwise_backward() if before else contextlib.nullcontext():
            train_step(net, x, y, F.cross_entropy, opt, updater=updater)

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    return {
        "by_kind": kind_table(prof.key_averages(group_by_input_shape=True), steps),
        "by_op": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows),
        "by_op_and_shape": prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32, max_shapes_column_width=90),
    }


_CONV_OPS = {"aten::mkldnn_convolution": (0, 1), "aten::slow_conv3d_forward": (0, 1), "aten::_convolution": (0, 1),
             "aten::convolution": (0, 1), "aten::conv3d": (0, 1), "aten::convolution_backward": (1, 2)}
_COPY_OPS = {"aten::cat", "aten::copy_", "aten::clone", "aten::stack", "aten::contiguous", "aten::_to_copy",
             "aten::fill_", "aten::zero_", "aten::pad", "aten::constant_pad_nd"}


def _kind(name: str, shapes) -> str:
    """What an op of the IUNet step computes, from its name and the shapes of its inputs and weight."""
    if name in _CONV_OPS:
        i, j = _CONV_OPS[name]
        x, w = (shapes[i], shapes[j]) if len(shapes) > j else ([], [])
        if len(w) == 5 and len(x) == 5:
            if w[1] == 1 and x[1] == w[0] and max(w[2:]) > 1:
                return "depthwise conv (forward, input grad; (B*C)-group weight grad)"
            if all(k == 1 for k in w[2:]):
                return "pointwise 1x1x1 conv (SN pointwise, channel mixing, head)"
            if list(w[2:]) == [2, 2, 2]:
                return "2x2x2 stride-2 conv (orthogonal down/upsampling)"
            return "other conv (stem 3x3x3)"
    if name in ("_DepthwiseConv", "_DepthwiseConvBackward"):
        return "depthwise conv (forward, input grad; (B*C)-group weight grad)"
    if name in _COPY_OPS:
        return "copies, cat, pads, fills"
    if name.startswith("_InvertibleSequence"):
        return "invertible sequence (Python, recompute driver)"
    if name in ("aten::linalg_matrix_exp", "aten::bmm", "aten::mm", "aten::tril"):
        return "matrix exp / small matmuls (orthogonal parametrization, SN)"
    return "other"


def kind_table(events, steps: int) -> str:
    """Self CPU time per profiled step summed by :func:`_kind` (markdown)."""
    totals: dict[str, float] = {}
    for e in events:
        kind = _kind(e.key, e.input_shapes or [])
        totals[kind] = totals.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / steps
    total = sum(totals.values())
    lines = ["| kind | self CPU ms per step | share |", "|---|---|---|"]
    for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")
    lines.append(f"| total | {total:.1f} | 100% |")
    return "\n".join(lines)


def op_table(rows: list[dict]) -> str:
    lines = ["| case | dtype | threads | fwd torch ms | fwd invseg ms | ratio | fwd+bwd torch ms | fwd+bwd invseg ms "
             "| ratio | max rel grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['dtype']} | {r['threads']} | {r['fwd_torch_s'] * 1e3:.1f} | "
                     f"{r['fwd_invseg_s'] * 1e3:.1f} | {r['fwd_ratio']:.2f} | {r['fwdbwd_torch_s'] * 1e3:.1f} | "
                     f"{r['fwdbwd_invseg_s'] * 1e3:.1f} | {r['fwdbwd_ratio']:.2f} | {r['max_rel_grad_diff']:.1e} |")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    lines = ["| model | threads | step ms | ratio to UNet | after / before |", "|---|---|---|---|---|"]
    for r in rows:
        for name in ("unet", "iunet-none-before", "iunet-none-after", "iunet-fft-before", "iunet-fft-after"):
            gain = f"{r[name + '_vs_before']:.2f}" if name.endswith("-after") else ""
            layout = ", channels_last_3d" if r["channels_last"] else ""
            lines.append(f"| {name} ({r['size']}³, batch {r['batch']}{layout}) | {r['threads']} | {r[name + '_s'] * 1e3:.0f} | "
                         f"{r[name + '_ratio_to_unet']:.2f} | {gain} |")
    for r in rows:
        flops = ", ".join(f"{k} {v:.2f}" for k, v in r["gflop_fwd_bwd"].items())
        lines.append(f"\nGFLOP per forward + backward ({r['size']}³, batch {r['batch']}): {flops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.make_parser(__doc__)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   help="d:C:N:B:k[:s[:dl]] cases for the op benchmark ('none': skip it)")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="intra-op thread counts (default 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="calls per variant and round (their median counts)")
    p.add_argument("--step", action="store_true", help="also time IUNet vs MONAI UNet training steps")
    p.add_argument("--step-size", type=int, default=48)
    p.add_argument("--step-batch", type=int, default=2)
    p.add_argument("--step-rounds", type=int, default=4)
    p.add_argument("--step-steps", type=int, default=2, help="timed steps per model and round")
    p.add_argument("--step-channels-last", action="store_true",
                   help="run the step models and input in channels_last_3d memory format")
    p.add_argument("--profile", action="store_true",
                   help="profile IUNet steps (before and after, SN methods none and fft)")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--out", default="outputs/bench_depthwise_op")
    args = p.parse_args(argv)
    cases = [] if args.cases == ["none"] else args.cases
    try:
        cases = [parse_case(s) for s in cases]
    except ValueError as err:
        p.error(f"--cases: {err}")
    if any(t < 1 for t in args.threads):
        p.error(f"--threads must be positive, got {args.threads}")
    args.cases = cases
    return cli.run(_job, args)


def _job(args: argparse.Namespace) -> int:
    cases = args.cases
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    meta = {"machine": platform.processor() or platform.machine(), "node": platform.node(),
            "torch": torch.__version__, "argv": sys.argv[1:]}
    op_rows, step_rows, profiles = [], [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in cases:
            op_rows.append({**bench_op(case, args.rounds, args.repeats, dtype), "threads": threads})
            print(f"done {case['spec']} threads={threads}", file=sys.stderr, flush=True)
        if args.step:
            step_rows.append({**bench_step(args.step_size, args.step_batch, args.step_rounds, args.step_steps, 1,
                                           args.step_channels_last), "threads": threads,
                              "gflop_fwd_bwd": {k: v / 1e9 for k, v in step_flops(args.step_size, args.step_batch).items()}})
        if args.profile:
            for sn in ("none", "fft"):
                for variant in ("before", "after"):
                    profiles[f"iunet-{sn}-{variant}-threads{threads}"] = profile_step(
                        args.step_size, args.step_batch, sn, args.profile_rows, args.profile_steps, variant == "before")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "ops": op_rows, "steps": step_rows, "profiles": profiles}, indent=1))
    if op_rows:
        print(op_table(op_rows))
    if step_rows:
        print()
        print(step_table(step_rows))
    for name, tables in profiles.items():
        for kind, table in tables.items():
            print(f"\n### profile: {name}, {kind.replace('_', ' ')}\n\n{table}")
    print(f"\nwrote {path}")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
