"""Mixed precision: an autocast context and a gradient scaler from one ``precision`` setting.

``precision`` is ``"fp32"`` (no autocast), ``"bf16"`` (autocast to bfloat16, CPU or CUDA, no
scaling needed) or ``"fp16"`` (autocast to float16 with loss scaling; CUDA only). Uses the
device-generic ``torch.autocast`` / ``torch.amp.GradScaler`` APIs (not the deprecated
``torch.cuda.amp`` ones).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from invseg.utils import PRECISIONS

__all__ = ["PRECISIONS", "autocast_context", "make_grad_scaler"]

_DEVICE_TYPES = ("cpu", "cuda")


def _check(device_type: str | torch.device, precision: str) -> str:
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    if device_type not in _DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {', '.join(_DEVICE_TYPES)}, got {device_type!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"precision='fp16' needs device_type='cuda' (float16 autocast with loss scaling), got "
            f"device_type={device_type!r}; use precision='bf16' or 'fp32' on {device_type}"
        )
    return device_type


def autocast_context(device_type: str | torch.device, precision: str) -> ContextManager:
    """Context manager for the forward pass and loss at the given precision.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (or a ``torch.device``).
        precision: ``"fp32"`` (a no-op context), ``"bf16"`` or ``"fp16"`` (CUDA only).

    Raises:
        ValueError: On an unknown device type or precision, or ``"fp16"`` off CUDA.
    """
    device_type = _check(device_type, precision)
    if precision == "fp32":
        # A no-op rather than autocast(enabled=False), which would switch off an outer autocast.
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def make_grad_scaler(device_type: str | torch.device, precision: str) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler``, enabled only for ``"fp16"`` on CUDA.

    A disabled scaler passes ``scale(loss)`` through and ``step(optimizer)`` calls
    ``optimizer.step()``, so the training loop is the same for every precision. Its
    ``state_dict()`` belongs in the checkpoint.

    Raises:
        ValueError: As :func:`autocast_context`.
    """
    device_type = _check(device_type, precision)
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16" and device_type == "cuda")
