"""Argument normalisation shared by the spectral functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["as_tuple", "check_spatial_dims"]


def as_tuple(value: int | Sequence[int], d: int, name: str, minimum: int | None = None) -> tuple[int, ...]:
    """Expand an int or a length-``d`` sequence of ints to a ``d``-tuple, validating it.

    Raises:
        ValueError: if the value is not an int / has the wrong length / is below ``minimum``.
    """
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a sequence of {d} ints, got {value!r}")
    if isinstance(value, int):
        out = (value,) * d
    elif isinstance(value, Sequence) and len(value) == d and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or a sequence of {d} ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return out


def check_spatial_dims(weight: torch.Tensor, name: str = "weight") -> int:
    """Number of spatial dims of a conv weight ``(Cout, Cin/groups, *k)``; must be 1, 2 or 3."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(
            f"{name} must have shape (C_out, C_in/groups, *kernel) with 1, 2 or 3 spatial dims, "
            f"got shape {tuple(weight.shape)}"
        )
    return d
