"""The segmentation comparison of ``scripts/compare_seg3d.py``: IUNet (+SN), IUNet without SN and MONAI's UNet
on the same data, patch and steps -- one training step of a config as a :class:`~invseg.analysis.memory.StepSpec`
for the fresh-process memory measurement, and the training steps of several configs timed interleaved.

Both run the trainer's pieces (:func:`invseg.train.seg.build_seg_model`, its optimizer and schedule, and
:func:`invseg.train.step.train_step`), so the figures are those of the step :func:`invseg.train.seg.train_seg`
runs.
"""

from __future__ import annotations

from typing import Any

import torch

from invseg.analysis.memory import StepSpec
from invseg.layers import SpectralUpdater
from invseg.train.amp import make_grad_scaler
from invseg.train.runner import StepTimer
from invseg.train.seg import SegConfig, build_seg_model, build_seg_optimizer, build_seg_scheduler
from invseg.train.step import train_step

__all__ = ["seg_step_spec", "time_seg_steps"]


def seg_step_spec(cfg: SegConfig, in_channels: int, num_classes: int, device: str = "cpu", steps: int = 3,
                  threads: int | None = None) -> StepSpec:
    """A :class:`invseg.analysis.memory.StepSpec` for one training step of ``cfg``'s network on a batch
    of ``batch_size * num_samples`` patches (fp32 or the configured precision, Adam or SGD, the spectral
    update after the step for IUNet), for :func:`invseg.analysis.memory.measure_step`."""
    m = cfg.model
    kwargs: dict[str, Any] = dict(name=m.name, spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                                  **m.kwargs)
    sn_method = m.kwargs.get("sn_method", "fft") if m.name == "iunet" else "none"
    post_step = "invseg.layers:update_spectral_state" if sn_method in ("fft", "naive") else None
    batch = cfg.train.batch_size * cfg.data.num_samples
    precision = cfg.train.precision if device == "cuda" or cfg.train.precision != "fp16" else "fp32"
    return StepSpec("invseg.nets:create_model", kwargs, input_shape=(batch, in_channels, *cfg.data.patch_size),
                    target="segmentation", num_classes=num_classes, device=device, precision=precision, optimizer=cfg.train.optimizer,
                    lr=cfg.train.lr, steps=steps, threads=threads, post_step=post_step)


def time_seg_steps(cfgs: dict[str, SegConfig], in_channels: int, num_classes: int, rounds: int = 10,
                   steps_per_round: int = 2, device: str = "cpu", seed: int = 0) -> dict[str, list[float]]:
    """Training-step times of several configs' networks, interleaved round by round in one process.

    Each round runs ``steps_per_round`` steps of every network in turn (the trainer's step: DiceCE,
    optimizer, schedule, spectral update) on the same random batch of ``batch_size * num_samples``
    patches, so drifts of a shared machine hit all networks alike. The first round is a warm-up and
    is not returned.

    Returns:
        ``{name: [seconds per step, one per timed round]}``.
    """
    from monai.losses import DiceCELoss

    dev = torch.device(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(seed)
        model = build_seg_model(cfg.model, in_channels, num_classes).to(dev).train()
        optimizer = build_seg_optimizer(model, cfg.train)
        batch = cfg.train.batch_size * cfg.data.num_samples
        x = torch.randn(batch, in_channels, *cfg.data.patch_size, generator=g).to(dev)
        y = torch.randint(0, num_classes, (batch, 1, *cfg.data.patch_size), generator=g).to(dev)
        state[name] = (model, optimizer, build_seg_scheduler(optimizer, cfg.train), make_grad_scaler(dev.type, cfg.train.precision),
                       SpectralUpdater(model, check_every=cfg.train.sn_check_every,
                                       search_every=cfg.train.sn_search_every), x, y, cfg.train)
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(rounds + 1):
        for name, (model, opt, sched, scaler, updater, x, y, t_cfg) in state.items():
            timer = StepTimer(dev, skip=0)
            for _ in range(steps_per_round):
                with timer:
                    train_step(model, x, y, loss_fn, opt, precision=t_cfg.precision, scaler=scaler,
                               grad_clip=t_cfg.grad_clip, scheduler=sched, updater=updater)
            if r:
                times[name].append(timer.mean())
    return times
