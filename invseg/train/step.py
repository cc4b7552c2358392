"""The training step: forward and loss under autocast, backward with loss scaling and gradient clipping,
optimizer step, schedule, spectral update.

Every loop of invseg that trains runs :func:`train_step`: the segmentation and classification trainers
(:mod:`invseg.train.seg`, :mod:`invseg.train.classify`), and every benchmark and experiment that times or
measures a training step (:mod:`invseg.analysis`: step time and overhead, measured step memory, certificate
slack; the inversion-error sweep's training). The figures of the README therefore measure the step users
run. Variants are arguments of this one function, not copies of the loop.

The order of one step::

    optimizer.zero_grad(set_to_none=True)              # gradients of the last step freed before forward
    with autocast(precision): loss = loss_fn(model(x), y)
    check(reduce(loss))                                # e.g. the non-finite stop: before any update
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer); clip_grad_norm_(...)   # only with grad_clip
    scaler.step(optimizer); scaler.update()            # optimizer.step() without a scaler
    scheduler.step()                                   # per-step schedules only
    updater()                                          # spectral state: once, after optimizer.step() (DESIGN §1f)

This module imports torch and :mod:`invseg.train.amp` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from invseg.train.amp import autocast_context

__all__ = ["StepResult", "train_step"]


@dataclass
class StepResult:
    """What one :func:`train_step` returns.

    Attributes:
        loss: the loss, detached float32 scalar, averaged over ranks when ``reduce`` was given (what the
            non-finite check saw).
        local_loss: this process's loss, detached float32 scalar.
        output: the detached model output when ``return_output=True``, else ``None`` (so that a loop
            keeps no activation alive into the next step).
    """

    loss: Tensor
    local_loss: Tensor
    output: Tensor | None = None


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    scheduler: Any = None,
    updater: Callable[[], Any] | None = None,
    check: Callable[[Tensor], Any] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    return_output: bool = False,
) -> StepResult:
    """One optimization step (see the module docstring for the order).

    Args:
        model: the network (a DDP wrapper too); ``model(x)`` runs under autocast at ``precision``.
        x: the input batch, on the model's device (its device picks the autocast device type).
        y: the target, passed to ``loss_fn`` unchanged.
        loss_fn: ``loss_fn(output, y)`` -> scalar loss (computed under autocast, like the forward).
        optimizer: the optimizer.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA; needs ``scaler``), see
            :mod:`invseg.train.amp`.
        scaler: a ``torch.amp.GradScaler`` (:func:`invseg.train.make_grad_scaler`); ``None``: plain
            ``backward()`` and ``optimizer.step()`` (what a disabled scaler does too).
        grad_clip: clip the total gradient norm of ``model``'s parameters to this value (unscaled first).
        scheduler: stepped after the optimizer (per-step schedules; leave ``None`` for per-epoch ones).
        updater: called after the optimizer step, e.g. :class:`invseg.layers.SpectralUpdater` (the
            once-per-step spectral update, outside every recomputed region).
        check: called with the (reduced) loss before the backward; raise there to stop before any update
            (e.g. :meth:`invseg.train.TrainingRun.check_finite`).
        reduce: maps the detached loss to the value ``check`` and :attr:`StepResult.loss` see, e.g.
            :func:`invseg.train.all_reduce_mean` under DDP.
        return_output: also return the detached output (e.g. for the training accuracy).

    Returns:
        :class:`StepResult`.

    Raises:
        ValueError: ``precision="fp16"`` without a ``scaler``, or a bad ``precision`` for the device
            (:func:`invseg.train.autocast_context`); whatever ``check`` raises.
    """
    if precision == "fp16" and scaler is None:
        raise ValueError("precision='fp16' needs a gradient scaler: pass scaler=make_grad_scaler(device, 'fp16')")
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(x.device.type, precision):
        output = model(x)
        loss = loss_fn(output, y)
    local = loss.detach().float()
    reduced = reduce(local) if reduce is not None else local
    if check is not None:
        check(reduced)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if updater is not None:
        updater()  # spectral state: once per optimization step, after the weights changed
    return StepResult(reduced, local, output.detach() if return_output else None)
