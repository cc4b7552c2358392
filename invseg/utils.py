"""Small helpers shared by every sub-package: argument checks, tuples, the choice of 1/2/3-D ops.

A leaf module: it imports torch and nothing from invseg, so every layer of the package (``spectral`` up to
``analysis``) may use it.

Argument checks (``ValueError`` restating the rule and the value received, never ``assert``)::

    is_int              an int that is not a bool
    check_int           an int >= minimum (optionally None)
    check_ints          a non-empty sequence of such ints
    check_positive      a positive finite number
    check_spatial_dims  1, 2 or 3
    int_tuple           an int or a length-d sequence of ints, as a d-tuple
    weight_spatial_dims the number of spatial dims of a conv weight (C_out, C_in/groups, *kernel)

Tensors::

    tensor_tuple        a tensor or a sequence of tensors, as a tuple of tensors

Dimension dispatch (the one place where ``spatial_dims`` picks an op, MONAI-style)::

    conv_fn, conv_transpose_fn                       F.conv{d}d, F.conv_transpose{d}d
    conv_module, conv_transpose_module, instance_norm_module   nn.Conv{d}d, nn.ConvTranspose{d}d, nn.InstanceNorm{d}d

Precision vocabulary::

    PRECISIONS          "fp32", "bf16", "fp16": the training precisions (autocast settings)
    CHECK_PRECISIONS    "fp64" and the above: the precisions the numerical checkers measure in
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "is_int",
    "check_int",
    "check_ints",
    "check_positive",
    "check_spatial_dims",
    "int_tuple",
    "weight_spatial_dims",
    "tensor_tuple",
    "conv_fn",
    "conv_transpose_fn",
    "conv_module",
    "conv_transpose_module",
    "instance_norm_module",
    "PRECISIONS",
    "CHECK_PRECISIONS",
]

#: Training precisions: fp32 (no autocast), bf16 (bfloat16 autocast), fp16 (float16 autocast with loss scaling).
PRECISIONS = ("fp32", "bf16", "fp16")
#: Precisions of the numerical checkers: a float64 / float32 copy of the module, or bf16 / fp16 autocast.
CHECK_PRECISIONS = ("fp64", *PRECISIONS)

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy; ``True``/``False`` are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_rule(minimum: int) -> str:
    return "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"


def check_int(value: Any, name: str, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an int ``>= minimum`` (or ``None`` with ``allow_none``).

    Raises:
        ValueError: ``"<name> must be a positive int, got <value>"`` (or the rule for ``minimum``).
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        rule = ("None or " if allow_none else "") + _int_rule(minimum)
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def check_ints(values: Any, name: str, minimum: int = 1) -> tuple[int, ...]:
    """``values`` as a tuple if it is a non-empty sequence of ints ``>= minimum``.

    Raises:
        ValueError: naming ``name``, the rule and the value received.
    """
    if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values
            or not all(is_int(v) and v >= minimum for v in values)):
        raise ValueError(f"{name} must be a non-empty sequence of {_int_rule(minimum).removeprefix('a ')}s, "
                         f"got {values!r}")
    return tuple(int(v) for v in values)


def check_positive(value: Any, name: str) -> float:
    """``float(value)`` if it is a positive finite number (not a bool).

    Raises:
        ValueError: ``"<name> must be a positive finite number, got <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_spatial_dims(spatial_dims: Any) -> int:
    """``spatial_dims`` if it is 1, 2 or 3.

    Raises:
        ValueError: ``"spatial_dims must be 1, 2 or 3, got <value>"``.
    """
    if not is_int(spatial_dims) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def int_tuple(value: int | Sequence[int], d: int, name: str, minimum: int | None = None) -> tuple[int, ...]:
    """Expand an int or a length-``d`` sequence of ints (a ``torch.Size`` too) to a ``d``-tuple.

    Raises:
        ValueError: the value is not an int / has the wrong length / is below ``minimum`` on an axis.
    """
    if isinstance(value, torch.Size):
        value = tuple(value)
    if is_int(value):
        out = (int(value),) * d
    elif isinstance(value, Sequence) and len(value) == d and all(is_int(v) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or a sequence of {d} ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return out


def weight_spatial_dims(weight: Any, name: str = "weight") -> int:
    """Number of spatial dims of a conv weight ``(C_out, C_in/groups, *kernel)``; must be 1, 2 or 3.

    Raises:
        ValueError: not a tensor, or not 3 to 5 dimensions.
    """
    if not isinstance(weight, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(
            f"{name} must have shape (C_out, C_in/groups, *kernel) with 1, 2 or 3 spatial dims, "
            f"got shape {tuple(weight.shape)}"
        )
    return d


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def tensor_tuple(value: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``value`` as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    if isinstance(value, Tensor):
        return (value,)
    return tuple(value)


# --------------------------------------------------------------------------------------------
# Dimension dispatch
# --------------------------------------------------------------------------------------------


def conv_fn(spatial_dims: int) -> Callable[..., Tensor]:
    """``F.conv{1,2,3}d`` for ``spatial_dims``."""
    return _CONV_FN[check_spatial_dims(spatial_dims)]


def conv_transpose_fn(spatial_dims: int) -> Callable[..., Tensor]:
    """``F.conv_transpose{1,2,3}d`` for ``spatial_dims``."""
    return _CONV_T_FN[check_spatial_dims(spatial_dims)]


def conv_module(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv{1,2,3}d`` for ``spatial_dims``."""
    return _CONV[check_spatial_dims(spatial_dims)]


def conv_transpose_module(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose{1,2,3}d`` for ``spatial_dims``."""
    return _CONV_T[check_spatial_dims(spatial_dims)]


def instance_norm_module(spatial_dims: int) -> type[nn.Module]:
    """``nn.InstanceNorm{1,2,3}d`` for ``spatial_dims``."""
    return _INSTANCE_NORM[check_spatial_dims(spatial_dims)]
